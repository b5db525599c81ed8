"""The package's layers, written down once and checked: a module imports only from its own
layer and those its layer may use (``hpo_framework/__init__.py`` describes each layer).
Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hpo_framework"

FOUNDATION = {"exceptions", "defaults", "logs", "_checks", "_version"}
#: Modules outside a subpackage and their layer (the seed names runner.py and param_sampler.py).
TOP_LEVEL = {**{name: "foundation" for name in FOUNDATION}, "param_sampler": "config",
             "runner": "operations"}  # fmt: skip
MAY_IMPORT = {
    "foundation": {"foundation"},
    "config": {"foundation", "config"},
    "storage": {"foundation", "config", "storage"},
    "session": {"foundation", "config", "session"},
    "views": {"foundation", "config", "storage", "session", "views"},
    "runtime": {"foundation", "config", "storage", "session", "views", "runtime"},
    "operations": {"foundation", "config", "storage", "session", "views", "runtime", "operations"},
    "cli": {"foundation", "config", "storage", "session", "views", "runtime", "operations", "cli"},
}
#: What the workers package may use: the runtime's door, the health file, the shared CLI
#: options, logging, the storage URL helpers, the defaults' names, the executor (started
#: before the door is imported, so that the session's imports overlap the worker's) and the
#: pool's fork server (started before its workers are forked).
WORKERS_MAY_IMPORT = {
    "hpo_framework.defaults",
    "hpo_framework.runtime.executor",
    "hpo_framework.runtime.forkserver",
    "hpo_framework.runtime.serving",
    "hpo_framework.runtime.health",
    "hpo_framework.cli.options",
    "hpo_framework.logs",
    "hpo_framework.storage.database",
}


def layer_of(module: str) -> str:
    """``hpo_framework.storage.tickets`` -> ``storage``; the face -> ``face``."""
    parts = module.split(".")[1:]
    if not parts:
        return "face"
    if len(parts) == 1 and not (PACKAGE / parts[0]).is_dir():
        return TOP_LEVEL[parts[0]]
    return parts[0]


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """The hpo_framework modules ``path`` imports (``from hpo_framework.x import y`` names
    ``hpo_framework.x.y`` when ``y`` is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hpo_framework"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpo_framework"):
            assert node.module is not None
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / candidate.replace(".", "/") / "__init__.py"
                ).exists()
                found.add(candidate if is_module else node.module)
    return found


def test_every_module_belongs_to_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name != "hpo_framework" and name.count(".") == 1:
            assert name.split(".")[1] in TOP_LEVEL or path.name == "__init__.py", (
                f"{name}: a module outside a subpackage; give it a layer in TOP_LEVEL"
            )
        else:
            layer = layer_of(name)
            assert layer == "face" or layer in MAY_IMPORT, f"{name}: unknown layer {layer!r}"


def test_modules_import_only_their_own_layer_and_those_below() -> None:
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        layer = layer_of(name)
        if layer == "face":
            continue
        for imported in sorted(project_imports(path)):
            if imported == "hpo_framework":
                broken.append(f"{name} imports the package face")
            elif layer_of(imported) not in MAY_IMPORT[layer]:
                broken.append(f"{name} ({layer}) imports {imported} ({layer_of(imported)})")
    assert not broken, "\n".join(broken)


def test_the_workers_package_goes_through_its_doors() -> None:
    outside = {
        f"{path.name}: {imported}"
        for path in (ROOT / "workers").glob("*.py")
        for imported in project_imports(path)
        if imported not in WORKERS_MAY_IMPORT
    }
    assert not outside, sorted(outside)


def test_the_layer_check_sees_a_breach() -> None:
    """The check is not vacuous: an upward import is named."""
    assert layer_of("hpo_framework.storage.tickets") == "storage"
    assert "runtime" not in MAY_IMPORT["storage"]
    assert "hpo_framework.runtime.heartbeat" in project_imports(PACKAGE / "runtime" / "serving.py")


def retry_calls(path: Path) -> list[int]:
    """Lines of ``path`` that call ``with_db_retry`` (the storage layer's own mechanism)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "with_db_retry"
    ]


def test_the_storage_layer_owns_its_retries() -> None:
    """Outside ``storage/database.py`` nobody wraps a database call in a retry: a step is a
    storage method marked ``@retried``, and callers just call it."""
    owner = PACKAGE / "storage" / "database.py"
    wrapping = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "workers").glob("*.py")])
        if path != owner
        for line in retry_calls(path)
    ]
    assert not wrapping, wrapping
    assert retry_calls(owner), "the check is vacuous: database.py no longer calls it"
