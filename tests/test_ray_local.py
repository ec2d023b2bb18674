"""An empty ``ray.address`` starts a new local Ray instance: it never joins the cluster that
``ray start`` last recorded on this machine (what a bare ``ray.init()`` would do)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.ray_cluster import RAY, REPO, RayNode, _node_env, free_ports

pytestmark = pytest.mark.slow

SESSION = """
from services.cluster import ray_session
with ray_session(num_cpus=1, dashboard=False) as info:
    print("GCS", info.address)
"""


def test_empty_address_starts_its_own_instance_beside_a_recorded_cluster():
    root = Path(tempfile.mkdtemp(prefix="opdl-", dir="/tmp"))  # short: Ray's socket paths
    env = _node_env(secrets.token_hex(32)) | {"RAY_TMPDIR": str(root)}
    (port,) = free_ports(1)
    (root / "ray").mkdir()
    head = RayNode(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--include-dashboard=false", f"--temp-dir={root / 'ray'}", "--disable-usage-stats"],
        env,
        root / "ray",
    )  # fmt: skip
    try:
        # what ray.init() with no address would join: the cluster recorded in $RAY_TMPDIR/ray
        recorded = (root / "ray" / "ray_current_cluster").read_text().strip()
        assert recorded.endswith(f":{port}"), recorded
        out = subprocess.run(
            [sys.executable, "-c", SESSION], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        gcs = next(ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("GCS"))
        assert gcs != recorded, f"joined the recorded cluster {recorded}"
    finally:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)
