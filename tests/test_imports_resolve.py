"""Every import in the project's own code resolves here: top-level imports, lazy ones inside
functions and methods, and those under ``if TYPE_CHECKING:``.

CPU CI never runs the GPU-only paths, so a lazy import there that names a moved class goes
unseen until a GPU run (``services/actors.py`` once imported ``NcclWeightReceiver`` from
``rollout.engine`` after it had moved to ``rollout.weight_transfer``). Each file is parsed with
``ast`` and every import statement resolved with importlib: ``import a.b`` must import;
``from a.b import X`` needs ``a.b`` to import and ``X`` to be an attribute or a submodule of it.
A top-level name that is a module in the file's own folder (``from run_helpers import ...`` in
``tests/``, ``from common import ...`` in ``bench/``) resolves against that folder, as it does
when the file runs. What cannot import on a CPU machine is listed in ``CANNOT_IMPORT_ON_CPU``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("rollout", "learner", "services", "models", "bench", "scripts", "tests")

# Modules that cannot import on the CPU machines the tests run on, each with why. A key covers
# its submodules. Everything else an import statement names must import.
CANNOT_IMPORT_ON_CPU = {
    "trl": "the `bench` extra, for bench/peer_trl.py only; not in the default install",
    "wandb": "the optional `wandb` extra, imported only when log.wandb = true",
}


@dataclass(frozen=True)
class Import:
    """One import statement: ``import module`` (no names) or ``from module import names``."""

    where: str  # "path:line"
    statement: str
    module: str  # absolute; "" when a relative import could not be resolved
    names: tuple[str, ...]
    folder: Path | None  # a plain folder (not a package) the file's imports also search
    error: str = ""  # set when the statement is wrong before anything is imported


def imports_in(source: str, path: str, folder: Path | None, package: str | None) -> list[Import]:
    """Every import statement in ``source``, wherever it sits in the tree.

    path: how failures name the file. folder: the plain folder (not a package) that the file's
    own top-level modules are imported from (``tests/``, ``bench/``), None for the repository.
    package: the file's package, for relative imports (None outside a package).
    """
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        where = f"{path}:{node.lineno}"
        statement = ast.unparse(node)  # one line, however the source wraps it
        if isinstance(node, ast.Import):
            found += [Import(where, statement, a.name, (), folder) for a in node.names]
            continue
        names = tuple(a.name for a in node.names if a.name != "*")
        if node.level == 0:
            found.append(Import(where, statement, node.module or "", names, folder))
            continue
        relative = "." * node.level + (node.module or "")
        try:
            if package is None:
                raise ImportError("relative import in a file outside a package")
            module = importlib.util.resolve_name(relative, package)
        except (ImportError, ValueError) as exc:
            found.append(Import(where, statement, "", names, folder, error=str(exc)))
            continue
        found.append(Import(where, statement, module, names, folder))
    return found


def excused(module: str, cannot_import: dict[str, str]) -> bool:
    return any(module == key or module.startswith(key + ".") for key in cannot_import)


class Resolver:
    """Imports each module once, on the ``sys.path`` the importing file runs with.

    A file in a package of the repository (``rollout/``, ...) sees the repository. A file in a
    plain folder (``tests/``, ``bench/``, ``scripts/``) or in a package inside one
    (``bench/peer/``) also sees that folder, after the repository: pytest puts ``tests/`` on the
    path, a script's folder is first on it, and each benchmark puts the repository before its
    folder (``bench/learner.py`` would shadow ``learner``).
    """

    def __init__(self) -> None:
        self.modules: dict[tuple[Path | None, str], tuple[object | None, Exception | None]] = {}

    def module(self, name: str, folder: Path | None) -> tuple[object | None, Exception | None]:
        """(the module, None) or (None, why it does not import). folder: None in a package."""
        if (folder, name) not in self.modules:
            self.modules[folder, name] = self._import(name, folder)
        return self.modules[folder, name]

    @staticmethod
    def _import(name: str, folder: Path | None) -> tuple[object | None, Exception | None]:
        saved, before = list(sys.path), set(sys.modules)
        if folder is not None:
            sys.path[:] = [str(REPO), str(folder)] + [
                p for p in saved if p not in (str(REPO), str(folder))
            ]
        try:
            return importlib.import_module(name), None
        except Exception as exc:  # any failure to import is the finding
            return None, exc
        finally:
            sys.path[:] = saved
            # The folder's modules exist only for files in that folder: a package module that
            # imports `run_helpers` must not find it cached.
            for new in set(sys.modules) - before:
                origin = getattr(sys.modules[new], "__file__", None)
                if (
                    folder is not None
                    and origin
                    and Path(origin).resolve().is_relative_to(folder.resolve())
                ):
                    del sys.modules[new]

    @staticmethod
    def has_submodule(module: object, name: str) -> bool:
        if getattr(module, "__path__", None) is None:
            return False
        try:
            return importlib.util.find_spec(f"{module.__name__}.{name}") is not None
        except (ImportError, ValueError):
            return False


def broken(imports: list[Import], cannot_import: dict[str, str] | None = None) -> list[str]:
    """One line per import that does not resolve: where, the statement, and what is missing.

    A module that exists but fails to import (often because of another broken import) is listed
    after the imports that name a missing module or name, which are the causes.
    """
    cannot_import = CANNOT_IMPORT_ON_CPU if cannot_import is None else cannot_import
    resolver = Resolver()
    causes, consequences = [], []
    for imp in imports:
        head = f"{imp.where}: {imp.statement}  ->"
        if imp.error:
            causes.append(f"{head} cannot resolve: {imp.error}")
            continue
        if excused(imp.module, cannot_import):
            continue
        module, exc = resolver.module(imp.module, imp.folder)
        if module is None:
            why = f"{type(exc).__name__}: {exc}"
            missing = isinstance(exc, ModuleNotFoundError) and excused(
                imp.module, {exc.name or "": ""}
            )
            if missing:
                causes.append(f"{head} module {imp.module!r} missing ({why})")
            else:
                consequences.append(f"{head} module {imp.module!r} does not import ({why})")
            continue
        causes += [
            f"{head} name {name!r} missing: neither an attribute nor a submodule of {imp.module!r}"
            for name in imp.names
            if not hasattr(module, name) and not resolver.has_submodule(module, name)
        ]
    return causes + consequences


def project_files() -> list[Path]:
    """The project's own Python files: tracked and untracked-but-not-ignored (git), else all."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *FOLDERS],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        files = {REPO / p for p in out if p.endswith(".py")}
    except (OSError, subprocess.CalledProcessError):
        files = {p for folder in FOLDERS for p in (REPO / folder).rglob("*.py")}
    return sorted(p for p in files if p.is_file())


def file_imports(path: Path, repo: Path = REPO) -> list[Import]:
    # The sys.path entry the file is imported from: the folder above its top package.
    root = path.parent
    while (root / "__init__.py").is_file():
        root = root.parent
    package = ".".join(path.parent.relative_to(root).parts) or None
    folder = None if root == repo else root
    return imports_in(path.read_text(), path.relative_to(repo).as_posix(), folder, package)


def project_imports() -> list[Import]:
    return [imp for path in project_files() for imp in file_imports(path)]


# ======================================================================================= tests


def test_every_import_in_the_project_resolves(tmp_path):
    # In a fresh interpreter: importing vLLM, Ray and DeepSpeed here would change this process
    # for the tests after it, and pytest's sys.path (tests/ on it) would hide a tests-only
    # helper imported from a package module.
    report = tmp_path / "broken.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0 and report.is_file(), (
        f"the checker itself failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    result = json.loads(report.read_text())
    assert result["imports"] > 100, f"only {result['imports']} imports found: wrong file list?"
    problems = result["broken"]
    assert not problems, (
        f"{len(problems)} import(s) do not resolve (checked {result['imports']} imports in "
        f"{result['files']} files in {time.monotonic() - t0:.0f} s):\n  "
        + "\n  ".join(problems)
        + "\nA module that genuinely cannot import on a CPU machine goes into "
        "CANNOT_IMPORT_ON_CPU (tests/test_imports_resolve.py) with the reason."
    )


def test_every_excused_module_is_still_imported_somewhere():
    named = {imp.module for imp in project_imports()}
    stale = [key for key in CANNOT_IMPORT_ON_CPU if not any(excused(m, {key: ""}) for m in named)]
    assert not stale, f"CANNOT_IMPORT_ON_CPU names modules nothing imports any more: {stale}"


BROKEN = """\
from __future__ import annotations

from typing import TYPE_CHECKING

from services.errors import UserError

if TYPE_CHECKING:
    from services.errors import NoSuchError


class Actor:
    def later(self):
        from services.errors import UserError, AlsoMissing
        import services.no_such_module
        from selftest_helper_0f3a import present, absent
        from selftest_broken_0f3a import anything
        return UserError
"""

GOOD = """\
from __future__ import annotations

import os.path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.errors import UserError


def later():
    import services.errors
    from services import errors
    from selftest_helper_0f3a import present
    from some_gpu_only_package.sub import Thing
    return errors, services.errors, os.path, present, Thing
"""


def _check(source: str, folder: Path) -> list[str]:
    (folder / "selftest_helper_0f3a.py").write_text("present = 1\n")
    (folder / "selftest_broken_0f3a.py").write_text("from services.errors import Nope\n")
    imports = imports_in(source, "probe.py", folder, package=None)
    return broken(imports, {"some_gpu_only_package": "stands in for a GPU-only module"})


def test_checker_reports_broken_lazy_and_type_checking_imports(tmp_path):
    problems = _check(BROKEN, tmp_path)
    assert len(problems) == 5, problems
    type_checking, lazy_name, lazy_module, local_name, consequence = problems
    assert type_checking.startswith("probe.py:8: from services.errors import NoSuchError ")
    assert "name 'NoSuchError' missing" in type_checking
    assert lazy_name.startswith("probe.py:13: from services.errors import UserError, AlsoMissing")
    assert "name 'AlsoMissing' missing" in lazy_name and "UserError'" not in lazy_name
    assert lazy_module.startswith("probe.py:14: import services.no_such_module ")
    assert "module 'services.no_such_module' missing (ModuleNotFoundError" in lazy_module
    assert local_name.startswith("probe.py:15: from selftest_helper_0f3a import present, absent")
    assert "name 'absent' missing" in local_name
    # Listed last: a module that exists but does not import, because of a broken import in it.
    assert consequence.startswith("probe.py:16: from selftest_broken_0f3a import anything  ->")
    assert "module 'selftest_broken_0f3a' does not import (ImportError: cannot" in consequence
    assert "selftest_helper_0f3a" not in sys.modules  # a folder's modules are not left behind


def test_checker_passes_good_imports(tmp_path):
    assert _check(GOOD, tmp_path) == []


def test_relative_imports_resolve_against_the_package(tmp_path):
    source = "from .errors import UserError\nfrom . import config, nowhere\nfrom .. import x\n"
    problems = broken(imports_in(source, "services/probe.py", None, package="services"))
    assert len(problems) == 2, problems
    assert problems[0].startswith("services/probe.py:2: from . import config, nowhere ")
    assert "name 'nowhere' missing" in problems[0]
    assert problems[1].startswith("services/probe.py:3: from .. import x  -> cannot resolve")
    outside = broken(imports_in("from . import x\n", "tests/probe.py", tmp_path, package=None))
    assert outside == [
        "tests/probe.py:1: from . import x  -> cannot resolve: relative import in a file "
        "outside a package"
    ]


def test_a_package_inside_a_plain_folder_sees_that_folder(tmp_path):
    # bench/peer/ is a package `peer` imported with bench/ on sys.path (bench/peer_trl.py).
    (tmp_path / "bench" / "peer").mkdir(parents=True)
    (tmp_path / "bench" / "selftest_common_0f3a.py").write_text("ROW = 1\n")
    (tmp_path / "bench" / "peer" / "__init__.py").write_text("ERROR = 1\n")
    probe = tmp_path / "bench" / "peer" / "side.py"
    probe.write_text(
        "from selftest_common_0f3a import ROW, GONE\nfrom peer import ERROR\nfrom . import nope\n"
    )
    imports = file_imports(probe, repo=tmp_path)
    assert {imp.folder for imp in imports} == {tmp_path / "bench"}
    assert [p.split("  -> ")[1] for p in broken(imports)] == [
        "name 'GONE' missing: neither an attribute nor a submodule of 'selftest_common_0f3a'",
        "name 'nope' missing: neither an attribute nor a submodule of 'peer'",
    ]
    assert "peer" not in sys.modules and "selftest_common_0f3a" not in sys.modules


def main(report: str) -> None:
    # Run as a script: sys.path[0] is tests/, which a package module must not rely on.
    sys.path[0] = str(REPO)
    os.chdir(REPO)
    imports = project_imports()
    problems = broken(imports)
    files = len({imp.where.rsplit(":", 1)[0] for imp in imports})
    Path(report).write_text(
        json.dumps({"broken": problems, "imports": len(imports), "files": files}, indent=1)
    )


if __name__ == "__main__":
    main(sys.argv[1])
