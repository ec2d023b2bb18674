"""``ray job submit`` against a real head started with ``ray start --head`` (token auth on,
every port on 127.0.0.1, its own temp dir): a short toy run succeeds, writes its run
directory, and ``ray job logs`` shows its progress. Also: what the working-dir upload carries."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from tests.ray_cluster import REPO, live_job

ARTIFACTS = ("config.toml", "metrics.jsonl", "summary.json", "student/config.json")


def test_working_dir_upload_leaves_venv_cache_and_runs_behind(tmp_path):
    """Zip the working dir exactly as Ray's job client does, with deploy/ray/runtime_env.yaml's
    excludes (gitignore handling off, so the excludes alone must do it)."""
    import yaml
    from ray._private.runtime_env.packaging import _zip_files

    env = yaml.safe_load((REPO / "deploy/ray/runtime_env.yaml").read_text())
    out = tmp_path / "pkg.zip"
    _zip_files(str(REPO), env["excludes"], str(out), include_gitignore=False)
    names = zipfile.ZipFile(out).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {".venv", ".cache", "runs", ".git"}.isdisjoint(tops), tops
    assert not any(n.startswith("bench/results/") for n in names)
    assert {"services/cli.py", "deploy/configs/cluster_toy.toml", "pyproject.toml"} <= set(names)
    assert out.stat().st_size < 20 * 2**20, "upload would be large"
    # .rayignore (read by Ray whatever RAY_RUNTIME_ENV_IGNORE_GITIGNORE says) lists the same.
    rayignore = (REPO / ".rayignore").read_text().split()
    assert {".venv/", ".cache/", "runs/"} <= set(rayignore)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.long
def test_ray_job_submit_runs_a_short_toy_run(request, cache_root, toy_pair):
    job = live_job(request.config, cache_root, need_running=False)
    cluster = job["cluster"]
    status = cluster.wait_job(job["job_id"], timeout=600)
    logs = cluster.ray("job", "logs", job["job_id"])
    assert status == "SUCCEEDED", logs[-4000:]
    run_dir = Path(job["run_dir"])
    for name in ARTIFACTS:
        assert (run_dir / name).is_file(), name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "learner/loss" in r]
    from tests.ray_cluster import LIVE_STEPS

    assert steps == list(range(1, LIVE_STEPS + 1))
    # The job log carries the run's own progress lines (the JSON summary printed at the end).
    assert f'"run_dir": "{run_dir}"' in logs, logs[-3000:]
    assert "[opdplus]" in logs
    # The models came from the explicit OPDPLUS_CACHE, not rebuilt in the uploaded copy.
    assert "building toy" not in logs.lower()
    # The job's namespace held the role-named actors (checked live in the other tests); here,
    # that the submission went through token auth: without the token the API refuses.
    import requests

    r = requests.get(f"{cluster.dashboard_url}/api/jobs/", timeout=10)
    assert r.status_code == 401
    r = requests.get(
        f"{cluster.dashboard_url}/api/jobs/",
        headers={"Authorization": f"Bearer {cluster.token}"},
        timeout=10,
    )
    assert r.status_code == 200 and job["job_id"] in r.text
    assert os.environ.get("RAY_AUTH_TOKEN") != cluster.token  # the test process kept no token
