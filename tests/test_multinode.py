"""Two Ray nodes on one machine (``ray start --head`` + ``ray start --address``, each with its
own ports, temp dir and custom resources); a short run with the roles' custom resources set
puts the samplers and scorers on the rollout node and the learner on the learner node, as
``ray.util.state.list_actors`` reports while the run is going.

One run storage (services/storage.py): the driver, the head node and the learner's node each
run in their own working directory (a node's workers inherit its raylet's), and ``run.out_dir``
is relative. The checkpoints and ``student/`` land in the driver's run directory, not in the
learner's working directory, and from a third working directory the stored config resolves
to the same run and its checkpoint (checked without a second run: path resolution and the
checkpoint choice a ``--resume`` starts with)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ray_cluster
from tests.ray_cluster import REPO, LocalCluster, toy_entrypoint, wait_for_actors

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.long]


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    cluster = LocalCluster(num_cpus=1, resources={"rollout": 2})
    try:
        # The learner's node is started from a working directory of its own (`ray start`
        # runs in ray_cluster.REPO): its raylet, and so the learner rank, run there.
        learner_cwd = tmp_path / "learner-node-cwd"
        learner_cwd.mkdir()
        with monkeypatch.context() as m:
            m.setattr(ray_cluster, "REPO", learner_cwd)
            cluster.add_node(num_cpus=1, resources={"learner": 1})
        cluster.learner_cwd = learner_cwd
        yield cluster
    finally:
        cluster.stop()


def test_roles_land_on_the_nodes_their_resources_name(two_nodes, cache_root, toy_pair, tmp_path):
    cluster = two_nodes
    name = "multinode"
    driver_cwd = tmp_path / "driver-cwd"
    driver_cwd.mkdir()
    run_dir = driver_cwd / "runs" / name  # run.out_dir = "runs", relative to the driver
    argv = toy_entrypoint(
        Path("runs"),
        name,
        steps=3,
        **{
            "ray.address": cluster.address,
            "rollout.sampler_resources": "{rollout = 1}",
            "rollout.scorer_resources": "{rollout = 1}",
            "learner.resources": "{learner = 1}",
            # Copies of the checkpoints and the student through pyarrow.fs (file:// here).
            "run.storage": f"file://{tmp_path / 'store'}",
        },
    )
    # The driver joins the cluster as a plain `opdplus train` with the cluster's token.
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    env["OPDPLUS_CACHE"] = str(cache_root)
    out, err = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    config_at = argv.index("--config") + 1
    argv[config_at] = str(REPO / argv[config_at])
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "opdplus"), *argv[1:]],
        cwd=driver_cwd,
        env=env,
        stdout=out,
        stderr=err,
    )
    engine_log = run_dir / "engine.log"

    def output() -> str:
        text = (tmp_path / "stdout.txt").read_text() + (tmp_path / "stderr.txt").read_text()
        return text[-3000:] + (engine_log.read_text()[-5000:] if engine_log.exists() else "")

    try:
        actors = wait_for_actors(
            cluster,
            f"opdplus-{name}",
            {"student-sampler-0", "teacher-scorer-0", "learner-rank-0"},
            timeout=900,  # engines + DeepSpeed start; minutes on a loaded 2-core machine
            alive=lambda: proc.poll() is None,
        )
        rc = proc.wait(timeout=600)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{output()}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert rc == 0, (stdout + stderr)[-4000:] + (
        engine_log.read_text()[-4000:] if engine_log.exists() else ""
    )
    assert_quiet_console(stdout + stderr, engine_log)
    node_of = {a["name"]: a["node_id"] for a in actors}
    rollout_nodes = {node_of["student-sampler-0"], node_of["teacher-scorer-0"]}
    assert len(rollout_nodes) == 1, node_of
    assert node_of["learner-rank-0"] not in rollout_nodes, node_of
    # Which node is which: the head offers `rollout`, the second node `learner`.
    nodes = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json,sys; from ray.util.state import list_nodes; "
                "print(json.dumps([{'id': n.node_id, 'head': n.is_head_node, "
                "'res': n.resources_total} for n in list_nodes(address=sys.argv[1])]))",
                cluster.dashboard_url,
            ],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    by_id = {n["id"]: n for n in nodes}
    assert by_id[node_of["student-sampler-0"]]["res"].get("rollout") == 2
    assert by_id[node_of["learner-rank-0"]]["res"].get("learner") == 1
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if "learner/loss" in r] == [1, 2, 3]
    assert_one_run_storage(cluster, run_dir, actors, stdout, tmp_path)


def assert_one_run_storage(cluster, run_dir: Path, actors, stdout: str, tmp_path: Path) -> None:
    """The learner rank ran in its own working directory, yet its checkpoint and the final
    student are in the driver's run directory; a --resume from a third directory finds them."""
    import psutil

    from learner import manifest
    from services.storage import MARKER

    learner_pid = next(a["pid"] for a in actors if a["name"] == "learner-rank-0")
    with contextlib.suppress(psutil.Error):  # the rank has exited by now, normally
        assert psutil.Process(learner_pid).cwd() == str(cluster.learner_cwd)
    assert f"[opdplus] run directory: {run_dir}" in stdout
    assert (run_dir / MARKER).is_file()
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000003"
    manifest.verify(ckpt / "step_00000003")
    assert (run_dir / "student" / "config.json").is_file()
    assert (run_dir / "student" / "model.safetensors").is_file()
    for stray in (cluster.learner_cwd / "runs", REPO / "runs" / run_dir.name):
        assert not stray.exists(), f"the learner wrote into its own working directory: {stray}"
    # run.storage: learner rank 0 copied the checkpoint (latest last) and the student there.
    store = tmp_path / "store" / run_dir.name
    assert (store / "checkpoints" / "latest").read_text() == "step_00000003"
    manifest.verify(store / "checkpoints" / "step_00000003")
    assert (store / "student" / "model.safetensors").is_file()
    assert f"copied to file://{tmp_path / 'store'}/{run_dir.name}" in stdout
    third = tmp_path / "third-cwd"
    third.mkdir()
    probe = (
        "import sys; from services.config import load_config; "
        "from services.storage import resolve_run_dir, has_checkpoint; "
        "from learner.manifest import choose; "
        "cfg = load_config(sys.argv[1]); d = resolve_run_dir(cfg.run.out_dir, cfg.run.name); "
        "print(d, has_checkpoint(d), choose(d / 'checkpoints').tag)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(run_dir / "config.toml")],
        cwd=third,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(run_dir), "True", "step_00000003"], out.stdout


def assert_quiet_console(console: str, engine_log: Path) -> None:
    """Only opdplus's own lines reached the terminal: ``[opdplus] …`` lines, the progress bar
    and the closing JSON summary; everything from vLLM, Ray and DeepSpeed is in
    run_dir/engine.log."""
    lines = console.replace("\r", "\n").splitlines()
    if "{" in lines:  # the closing summary, printed as indented JSON
        at = lines.index("{")
        json.loads("\n".join(lines[at:]))
        lines = lines[:at]
    for line in lines:
        s = line.strip()
        assert not s or s.startswith("[opdplus]") or "OPD+ train" in s, (
            f"a foreign line on the console: {line!r}"
        )
    log = engine_log.read_text()
    assert "pid=" in log, "the actors' forwarded output belongs in engine.log"
