"""The documentation's code blocks, checked against the code, in both languages.

The README's first hour runs as written (``tests/cli/test_readme.py``) and the container path
runs for real (``tests/containers``). Here, without a database: every command line of every
bash block in the READMEs and ``docs/`` parses as its program would parse it (hpo's commands
by their own click parsers, ``make`` targets, ``scripts/``, compose services); the config
reference is a valid config; the error lines it shows are the ones hpo prints; and the layout
in ARCHITECTURE.md names every module of the package.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml

from hpo_framework import ConfigError, load_config
from hpo_framework.cli.commands import coordinator, inspect_command
from hpo_framework.config.schema import Config
from workers.cli import main as worker_command

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md", ROOT / "README.ko.md",
    *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "ko").glob("*.md")),
]  # fmt: skip
HPO_COMMANDS: dict[str, click.Command] = {
    "hpo-coordinator": coordinator, "hpo-inspect": inspect_command, "hpo-worker": worker_command,
}  # fmt: skip
_FENCE = re.compile(r"^```(\w*)$")


def blocks(path: Path, language: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each fenced block of ``language`` in ``path``."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if _FENCE.match(lines[j]))
        if opening.group(1) == language:
            yield i + 2, "\n".join(lines[i + 1 : end])
        i = end + 1


def command_lines() -> Iterator[tuple[str, list[str]]]:
    """Every simple command of every bash block: ``(where, argv)``, environment assignments
    dropped, ``;``/``&&``/``|``/``&`` split."""
    for path in DOCS:
        for first, block in blocks(path, "bash"):
            for offset, line in enumerate(block.replace("\\\n", " ").splitlines()):
                words = shlex.split(line, comments=True)
                where = f"{path.relative_to(ROOT)}:{first + offset}"
                argv: list[str] = []
                for word in [*words, ";"]:
                    if word in (";", "&&", "||", "|", "&"):
                        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                            argv.pop(0)
                        if argv:
                            yield where, argv
                        argv = []
                    else:
                        argv.append(word.rstrip(";"))
                        if word.endswith(";") and word != ";":
                            yield where, argv
                            argv = []


def parse_with_click(command: click.Command, name: str, args: list[str]) -> None:
    """Parse ``args`` as ``command`` would, down to the subcommand, running nothing."""
    ctx = command.make_context(name, list(args))
    if isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if rest:
            sub_name, sub, sub_args = command.resolve_command(ctx, rest)
            assert sub is not None and sub_name is not None
            parse_with_click(sub, f"{name} {sub_name}", sub_args)


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, flags=re.M))


def _compose_services() -> set[str]:
    services: set[str] = set()
    for path in ROOT.glob("docker-compose*.yml"):
        services |= set(yaml.safe_load(path.read_text()).get("services") or {})
    return services


def check_command(argv: list[str]) -> str | None:
    """Why ``argv`` would not run here as documented, or None."""
    program, args = argv[0], argv[1:]
    if program in HPO_COMMANDS:
        try:
            parse_with_click(HPO_COMMANDS[program], program, args)
        except click.ClickException as e:
            return e.format_message()
        return None
    if program == "make":
        unknown = [t for t in args if not t.startswith("-") and t not in _make_targets()]
        return f"no make target {unknown}" if unknown else None
    if program.startswith("scripts/"):
        script = ROOT / program
        return None if script.is_file() and script.stat().st_mode & 0o111 else "no such script"
    if program == "python":
        return None if (ROOT / args[0]).is_file() else f"no file {args[0]}"
    if program == "docker" and args[:1] == ["compose"]:
        named = [a.split("=")[0] for a in args if re.match(r"^[\w-]+=\d+$", a)]
        if "run" in args:
            rest = [a for a in args[args.index("run") + 1 :] if not a.startswith("-")]
            named.append(rest[0])
        unknown = sorted(set(named) - _compose_services())
        return f"no compose service {unknown}" if unknown else None
    if program in {".", "export", "sleep", "wait", "cd"}:
        return None
    return f"unknown program {program!r}: teach this test what it is"


def test_the_docs_have_command_blocks_to_check() -> None:
    programs = {argv[0] for _, argv in command_lines()}
    assert {"hpo-coordinator", "hpo-inspect", "hpo-worker", "make", "docker"} <= programs


def test_every_documented_command_parses_as_its_program_would() -> None:
    broken = [
        f"{where}: {' '.join(argv)}: {why}"
        for where, argv in command_lines()
        if (why := check_command(argv)) is not None
    ]
    assert not broken, "\n".join(broken)


def test_the_command_check_is_not_vacuous() -> None:
    assert check_command(["hpo-inspect", "s", "--no-such-flag"]) is not None
    assert check_command(["hpo-coordinator", "crate", "config.yaml"]) is not None
    assert check_command(["hpo-inspect", "s", "--format", "xml"]) is not None
    assert check_command(["make", "no-such-target"]) is not None
    assert check_command(["docker", "compose", "run", "--rm", "coordinatr", "x"]) is not None
    assert check_command(["hpo-coordinator", "set", "s", "--n-trials", "34"]) is None


@pytest.mark.parametrize("path", ["docs/CONFIG.md", "docs/ko/CONFIG.md"])
def test_the_config_reference_is_a_valid_config(path: str) -> None:
    (_, reference), *_ = blocks(ROOT / path, "yaml")
    config = Config.from_mapping(yaml.safe_load(reference), "config.yaml")
    assert config.study.name == "linear-regression" and config.study.n_trials == 30
    assert len(config.enqueue) == 1 and "momentum" in config.search_space.names


_BROKEN_CONFIGS = {
    "search_space.lr.low": "study: {name: s}\nsearch_space:\n  lr: {type: float, low: 0, "
    "high: 0.1, log: true}\n",
    "study.n_trails": "study: {name: s, n_trails: 3}\nsearch_space:\n  x: {type: float, "
    "low: 0, high: 1}\n",
    "YAML syntax": "study: {name: s}\nsearch_space:\n  x: {type: float, low: 0, high: 1}\n"
    "bad: [1, 2",
}


@pytest.mark.parametrize("path", ["docs/CONFIG.md", "docs/ko/CONFIG.md"])
def test_the_documented_config_errors_are_the_ones_hpo_prints(path: str, tmp_path: Path) -> None:
    (_, shown), *_ = blocks(ROOT / path, "text")
    documented = [line.removeprefix("Error: ") for line in shown.splitlines()]
    assert len(documented) == len(_BROKEN_CONFIGS)
    printed = []
    for text in _BROKEN_CONFIGS.values():
        config_file = tmp_path / "config.yaml"
        config_file.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config(config_file)
        printed.append(str(raised.value).replace(str(config_file), "config.yaml"))
    assert printed == documented


def test_the_layout_names_every_module() -> None:
    """A newcomer can place every module: ARCHITECTURE.md's tree names each file of the
    package (both languages), and names none that is gone."""
    for path in ("docs/ARCHITECTURE.md", "docs/ko/ARCHITECTURE.md"):
        (_, tree), *_ = blocks(ROOT / path, "text")
        named = set(re.findall(r"([\w.]+\.py)\b", tree))
        for part in re.findall(r"([\w.]+\.py(?:, [\w.]+\.py)+)", tree):
            named |= set(part.split(", "))
        package = {p.name for p in (ROOT / "hpo_framework").rglob("*.py")}
        entry_points = {n for n in package if re.fullmatch(r"_\w+_main\.py", n)}  # python -m
        missing = sorted(package - named - entry_points)
        assert not missing, f"{path} does not place: {missing}"
        gone = sorted(n for n in named if n not in package and not (ROOT / n).exists())
        assert not [n for n in gone if not list(ROOT.rglob(n))], f"{path} names gone files: {gone}"
