"""The import rules (CONTRIBUTING.md "Where things go", docs/architecture.md "Import rules"),
checked on every module of every package, found by globbing:

* the maths (the modules CONTRIBUTING.md's learner row names "torch only") imports only torch,
  the standard library and each other;
* vLLM only in rollout/engine.py and rollout/weight_transfer.py; DeepSpeed only in
  learner/engine.py; Ray only under services/;
* services/errors.py imports only the standard library.

Checked on the source text (a lazy import inside a function counts too, and so does
``importlib.import_module("...")``), and the maths once more at run time in a fresh
interpreter. The checker itself is run on planted violations, so it is known to be able to fail.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
HEAVY_HOMES = {
    "vllm": {"rollout/engine.py", "rollout/weight_transfer.py"},
    "deepspeed": {"learner/engine.py"},
}
RAY_HOME = "services/"
STDLIB_ONLY = {"services/errors.py"}
# What the maths must never pull in, even for type annotations (docs/architecture.md).
MATHS_FORBIDDEN = {"ray", "vllm", "deepspeed", "transformers", "services", "rollout"}


def _packages() -> list[str]:
    """Top-level packages: folders of the repo holding an __init__.py."""
    return sorted(p.parent.name for p in REPO.glob("*/__init__.py"))


def _maths_modules(contributing: str) -> set[str]:
    """``learner/<name>.py`` for each name in CONTRIBUTING.md's "the maths (`a`, `b`: torch only)"."""
    found = re.search(r"the maths \(([^)]*?): torch only\)", contributing)
    assert found, "CONTRIBUTING.md no longer says which learner modules are the maths"
    return {f"learner/{name}.py" for name in re.findall(r"`(\w+)`", found.group(1))}


PACKAGES = _packages()
MATHS = _maths_modules((REPO / "CONTRIBUTING.md").read_text())


def _sources() -> list[tuple[str, Path]]:
    return [
        (path.relative_to(REPO).as_posix(), path)
        for pkg in PACKAGES
        for path in sorted((REPO / pkg).rglob("*.py"))
    ]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(rel: str, source: str) -> list[tuple[str, bool]]:
    """(dotted module, only under ``if TYPE_CHECKING:``) for every import in ``source``, the
    module at path ``rel``: ``import a.b``, ``from a import b`` (as ``a.b``), relative imports
    resolved against ``rel``, and ``importlib.import_module`` / ``__import__`` of a literal."""
    package = rel.removesuffix(".py").split("/")[:-1]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, typing_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.extend((f"{base}.{a.name}", typing_only) for a in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append((node.args[0].value, typing_only))
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(ast.parse(source), False)
    return found


def violations(rel: str, source: str) -> list[str]:
    """Every import rule ``source`` (the module at repo path ``rel``) breaks, one line each."""
    maths_names = {m.removesuffix(".py").replace("/", ".") for m in MATHS}
    wrong = []
    for module, typing_only in imports(rel, source):
        root = module.split(".")[0]
        for dep, homes in HEAVY_HOMES.items():
            if root == dep and rel not in homes:
                wrong.append(f"{rel} imports {dep} (only {sorted(homes)} may)")
        if root == "ray" and not rel.startswith(RAY_HOME):
            wrong.append(f"{rel} imports ray (only {RAY_HOME} may)")
        if rel in STDLIB_ONLY and root not in STDLIB:
            wrong.append(f"{rel} imports {module} (standard library only)")
        if rel in MATHS:
            inner = ".".join(module.split(".")[:2])
            if root in MATHS_FORBIDDEN:
                wrong.append(f"{rel} (maths) imports {module}")
            elif not typing_only and not (
                root in STDLIB or root == "torch" or inner in maths_names
            ):
                wrong.append(f"{rel} (maths) imports {module} (torch and the maths only)")
    return wrong


# --- the rules hold on the code -------------------------------------------------------------


def test_packages_are_the_installed_ones():
    """The glob finds exactly what pyproject.toml installs, so no package escapes the rules."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == PACKAGES


def test_the_maths_set_matches_the_docs():
    assert {"learner/divergences.py", "learner/advantages.py", "learner/loss.py"} <= MATHS
    assert "learner/dense.py" in MATHS  # CONTRIBUTING.md: "`dense`: torch only"
    for rel in MATHS:
        assert (REPO / rel).is_file(), rel
    # Whatever docs/architecture.md calls the maths is held to the same rule.
    arch = (REPO / "docs" / "architecture.md").read_text()
    rule = re.search(r"\*\*The maths\*\* \(([^)]*)\)", arch)
    assert rule, "docs/architecture.md no longer lists the maths modules"
    assert set(re.findall(r"`(learner/\w+\.py)`", rule.group(1))) <= MATHS


def test_every_module_keeps_the_import_rules():
    sources = _sources()
    assert {rel for rel, _ in sources} >= MATHS | STDLIB_ONLY | set().union(*HEAVY_HOMES.values())
    wrong = [v for rel, path in sources for v in violations(rel, path.read_text())]
    assert not wrong, "\n".join(wrong)


def test_maths_modules_import_only_torch_at_run_time():
    """A fresh interpreter imports every maths module: nothing forbidden gets loaded, whatever
    path it took (a re-export, a plugin, torch itself)."""
    names = sorted(m.removesuffix(".py").replace("/", ".") for m in MATHS)
    code = (
        "import importlib, json, sys\n"
        f"for m in {names!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert set(names) <= loaded
    leaked = sorted(m for m in loaded if m.split(".")[0] in MATHS_FORBIDDEN)
    assert not leaked, f"maths modules pulled in {leaked}"
    project = sorted(m for m in loaded if m.split(".")[0] in PACKAGES)
    assert set(project) <= set(names) | {"learner"}, project


# --- the checker fails where it should ------------------------------------------------------


@pytest.mark.parametrize(
    "rel, source, expected",
    [
        ("learner/step.py", "import ray\n", "learner/step.py imports ray"),
        ("models/toy.py", "def f():\n    import ray.util\n", "models/toy.py imports ray"),
        ("rollout/sampler.py", "from vllm import LLM\n", "rollout/sampler.py imports vllm"),
        ("services/actors.py", "import vllm.config\n", "services/actors.py imports vllm"),
        (
            "learner/step.py",
            "def f():\n    import importlib\n    return importlib.import_module('deepspeed')\n",
            "learner/step.py imports deepspeed",
        ),
        ("services/errors.py", "import torch\n", "services/errors.py imports torch"),
        ("learner/dense.py", "import transformers\n", "learner/dense.py (maths) imports"),
        ("learner/loss.py", "from services.config import Config\n", "(maths) imports services"),
        ("learner/divergences.py", "import numpy as np\n", "(maths) imports numpy"),
        ("learner/advantages.py", "from learner.batch import TrainBatch\n", "learner.batch"),
        ("learner/dense.py", "from . import settings\n", "(maths) imports learner.settings"),
        (
            "learner/loss.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rollout.records import Rollout\n",
            "(maths) imports rollout.records",
        ),
    ],
)
def test_checker_reports_a_planted_violation(rel, source, expected):
    found = violations(rel, source)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(
    "rel, source",
    [
        ("rollout/engine.py", "import vllm\n"),
        ("rollout/weight_transfer.py", "from vllm.distributed import x\n"),
        ("learner/engine.py", "import deepspeed\nfrom deepspeed import comm\n"),
        ("services/actors.py", "import ray\n"),
        ("services/errors.py", "from __future__ import annotations\nimport json\n"),
        (
            "learner/dense.py",
            "import math\nimport torch\nfrom learner.loss import surrogate_loss\n",
        ),
        ("learner/dense.py", "from . import loss\n"),
        (
            "learner/dense.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from learner.batch import TrainBatch\n",
        ),
    ],
)
def test_checker_accepts_what_the_rules_allow(rel, source):
    assert violations(rel, source) == []
