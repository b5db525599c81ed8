"""Every option of every command is in the documentation (the README and docs/), in both
languages: a flag a user can only find with --help is a flag they never find."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from hpo_framework.cli.commands import coordinator, inspect_command
from workers.cli import main as worker_command

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> Iterator[tuple[str, click.Command]]:
    for name, command in (
        ("hpo-coordinator", coordinator), ("hpo-inspect", inspect_command),
        ("hpo-worker", worker_command),
    ):  # fmt: skip
        yield name, command
        if isinstance(command, click.Group):
            for sub_name, sub in command.commands.items():
                yield f"{name} {sub_name}", sub


def _options() -> list[tuple[str, str]]:
    found = []
    for name, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                longest = max(param.opts + param.secondary_opts, key=len)
                if longest != "--help":
                    found.append((name, longest))
    return found


def test_the_commands_have_options_to_check() -> None:
    names = {name for name, _ in _options()}
    assert {"hpo-inspect", "hpo-worker", "hpo-coordinator create"} <= names


@pytest.mark.parametrize(("readme", "docs"), [("README.md", "docs"), ("README.ko.md", "docs/ko")])
def test_every_cli_option_is_documented(readme: str, docs: str) -> None:
    text = "\n".join(p.read_text() for p in [ROOT / readme, *sorted((ROOT / docs).glob("*.md"))])
    missing = sorted(
        {
            f"{name} {option}"
            for name, option in _options()
            if not re.search(re.escape(option) + r"(?![\w-])", text)
        }
    )
    assert not missing, f"{readme} and {docs}/ do not mention: {missing}"
