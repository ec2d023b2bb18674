"""The maths modules import only torch (docs/architecture.md, import rules)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATH_MODULES = ["learner.divergences", "learner.advantages", "learner.loss"]
FORBIDDEN_ROOTS = {"ray", "vllm", "deepspeed", "transformers", "services", "rollout"}


def test_maths_modules_import_only_torch():
    code = (
        "import importlib, json, sys\n"
        f"for m in {MATH_MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    leaked = [
        m
        for m in loaded
        if m.split(".")[0] in FORBIDDEN_ROOTS or (m.startswith("learner.") and "config" in m)
    ]
    assert not leaked, f"maths modules pulled in {leaked}"
    assert set(MATH_MODULES) <= set(loaded)


# Each heavy dependency has exactly one home (docs/architecture.md, import rules). Checked on
# the source text, so a lazy import inside a function counts too.
HEAVY_HOMES = {
    "vllm": {"rollout/engine.py", "rollout/weight_transfer.py"},
    "deepspeed": {"learner/engine.py"},
}
PACKAGES = ("rollout", "learner", "models", "services")


def _imports(path: Path) -> set[str]:
    import ast

    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def _sources():
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path


def test_heavy_dependencies_have_one_home():
    wrong = [
        f"{rel} imports {dep}"
        for rel, path in _sources()
        for dep, homes in HEAVY_HOMES.items()
        if dep in _imports(path) and rel not in homes
    ]
    assert not wrong, wrong


def test_ray_only_in_services():
    wrong = [
        rel
        for rel, path in _sources()
        if "ray" in _imports(path) and not rel.startswith("services/")
    ]
    assert not wrong, f"Ray imported outside services/: {wrong}"


def test_errors_module_is_stdlib_only():
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    extra = _imports(REPO / "services" / "errors.py") - allowed
    assert not extra, f"services/errors.py imports {extra}"
