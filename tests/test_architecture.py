"""The package's shape, held as tests: the layers (import-linter's contract in pyproject.toml), no
imports hidden in functions, one error base, no scripts, no module named like an API function."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import maest_cli
from maest_cli.errors import MaestError, UsageError, exit_code_of

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "maest_cli"
API = ("extract", "prepare_mels", "train", "probe", "run_bench", "load_model", "build_corpus", "run_findings", "tag",
       "similar", "export_model", "download_dataset", "build_index")


def import_every_module() -> None:
    for info in pkgutil.walk_packages(maest_cli.__path__, "maest_cli."):
        if info.name != "maest_cli.__main__":  # that one runs the CLI
            importlib.import_module(info.name)


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_layers_hold_and_nothing_imports_up_or_in_a_cycle():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True) == 0


def test_no_project_module_is_imported_inside_a_function_outside_the_cli():
    """Dependencies are seen at the top of each module; only the CLI's commands import the API
    lazily (so `maest --help` stays instant), and __init__ resolves the API lazily."""
    hidden = []
    for path in modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or path.name in ("__init__.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in node.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0 or id(node) in typing_only:
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if (isinstance(node, ast.ImportFrom) and node.level) or any(n.startswith("maest_cli") for n in names):
                hidden.append(f"{rel}:{node.lineno}")
    assert hidden == []


def test_every_subpackage_ships_in_the_wheel():
    """pyproject.toml lists the packages by hand: a new subpackage missing there would be left out of
    a non-editable install."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"maest_cli", *(f"maest_cli.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py"))}
    assert found - listed == set()


def test_at_most_six_modules_at_the_top_and_no_scripts():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    scripts = [str(p.relative_to(PACKAGE)) for p in modules() if "argparse" in p.read_text()]
    assert scripts == []


def test_no_module_or_subpackage_is_named_like_an_api_function():
    """`import maest_cli.train` would otherwise replace the function maest_cli.train."""
    names = {p.stem for p in modules()} | {p.name for p in PACKAGE.rglob("*") if p.is_dir()}
    assert names.isdisjoint(API), sorted(names & set(API))


def test_every_project_error_is_a_maest_error_with_its_exit_code():
    import_every_module()
    errors = {cls for cls in _subclasses(BaseException) if cls.__module__.startswith("maest_cli")}
    assert len(errors) > 10  # every module was imported, so their errors are known
    strays = sorted(f"{c.__module__}.{c.__name__}" for c in errors if not issubclass(c, MaestError))
    assert strays == []
    for cls in errors:
        assert cls.exit_code in (1, 2), cls
    assert exit_code_of(UsageError("x")) == 2 and exit_code_of(MaestError("x")) == 1
    assert exit_code_of(FileNotFoundError("x")) == 1 and exit_code_of(KeyError("bug")) is None


def test_the_cli_maps_errors_in_one_place():
    """No module of the CLI but its app decides exit codes from error types."""
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        text = path.read_text()
        if path.name != "app.py":
            assert "exit_code_of" not in text and "def _exit_code" not in text, path.name
        for cls in ("DatasetError", "ProbeError", "EffNetError", "CheckpointError"):
            assert f"except {cls}" not in text, f"{path.name} catches {cls} itself"


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def test_the_api_names_are_functions_whatever_was_imported_before():
    import_every_module()
    for name in API:
        assert inspect.isfunction(getattr(maest_cli, name)), name
