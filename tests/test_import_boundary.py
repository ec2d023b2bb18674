"""The maths modules import only torch (style.md §2)."""

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
