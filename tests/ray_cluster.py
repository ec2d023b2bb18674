"""A real Ray cluster for tests, started with the project's own ``ray start`` CLI.

Each node runs in its own session (``setsid``) with its own ``--temp-dir``, every port chosen
free on 127.0.0.1, token authentication on with a token made for the test. Teardown ends only
the processes of that session (never ``ray stop``, which would stop every Ray instance on the
machine, other people's included).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _free_range(width: int) -> tuple[int, int]:
    """A run of ``width`` consecutive ports free now (worker ports), away from the ephemeral
    range that the other ports come from."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        start = rng.randrange(20000, 30000 - width)
        try:
            socks = []
            for p in range(start, start + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return start, start + width - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


class RayNode:
    """One ``ray start`` node (head or worker) in its own session."""

    def __init__(self, cmd: list[str], env: dict, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        log = (temp_dir.parent / f"{temp_dir.name}.start.log").open("w")
        # setsid: the node's daemons (and the workers they spawn) share this session id, which
        # is how teardown finds exactly them.
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
        self.sid = self.proc.pid
        rc = self.proc.wait(timeout=180)
        if rc != 0:
            log.close()
            text = (temp_dir.parent / f"{temp_dir.name}.start.log").read_text()
            self.stop()
            raise RuntimeError(f"ray start failed ({rc}):\n{text[-4000:]}")

    def pids(self) -> list[int]:
        import psutil

        out = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == self.sid:
                    out.append(proc.pid)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return out

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process of this node's session, SIGKILL what is left after grace_s."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + wait
            while time.time() < deadline and self.pids():
                time.sleep(0.3)


class LocalCluster:
    """A head (and optionally more nodes) bound to 127.0.0.1, with token auth.

    ``env``: the environment for CLI calls against this cluster (``ray job submit`` etc.):
    RAY_ADDRESS (the dashboard's HTTP address, what the job CLI wants) and RAY_AUTH_TOKEN.
    """

    def __init__(self, *, num_cpus: int = 2, resources: dict | None = None, metrics=True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="opdray-", dir="/tmp"))  # short: socket paths
        self.token = secrets.token_hex(32)
        self.nodes: list[RayNode] = []
        (
            self.gcs_port,
            self.dashboard_port,
            self.client_port,
            self.metrics_port,
        ) = free_ports(4)
        self.base_env = _node_env(self.token)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = self.base_env | {"RAY_ADDRESS": self.dashboard_url}
        cmd = [
            RAY,
            "start",
            "--head",
            f"--port={self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--metrics-export-port={self.metrics_port}",
        ]
        self._add_node(cmd, num_cpus, resources, "head")

    def add_node(self, *, num_cpus: int, resources: dict | None = None) -> None:
        """Join another node (``ray start --address``) on this machine, own ports and temp dir."""
        (metrics_port,) = free_ports(1)
        cmd = [
            RAY,
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--metrics-export-port={metrics_port}",
        ]
        self._add_node(cmd, num_cpus, resources, f"node{len(self.nodes)}")

    def _add_node(self, cmd: list[str], num_cpus: int, resources, name: str) -> None:
        node_manager, object_manager, agent_grpc, agent_http, runtime_env = free_ports(5)
        lo, hi = _free_range(40)
        temp_dir = self.root / name
        temp_dir.mkdir()
        cmd += [
            f"--num-cpus={num_cpus}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        # `ray start` gives a raylet 30 s (fixed in Ray) to register with the GCS; on a loaded
        # 2-core machine that can pass. One retry, after the failed node's processes are gone.
        try:
            node = RayNode(cmd, self.base_env, temp_dir)
        except RuntimeError:
            shutil.rmtree(temp_dir, ignore_errors=True)
            temp_dir.mkdir()
            node = RayNode(cmd, self.base_env, temp_dir)
        self.nodes.append(node)

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        """Run the venv's ``ray`` CLI against this cluster; returns stdout (+stderr)."""
        out = subprocess.run(
            [RAY, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout + out.stderr

    def submit(self, entrypoint: list[str], *, job_id: str, runtime_env: str = "") -> str:
        """``ray job submit --no-wait --working-dir .`` (with the project's runtime env file)."""
        args = ["job", "submit", "--no-wait", f"--submission-id={job_id}"]
        args += [f"--runtime-env={runtime_env or REPO / 'deploy/ray/runtime_env.yaml'}"]
        args += ["--working-dir", str(REPO), "--", *entrypoint]
        self.ray(*args)
        return job_id

    def job_status(self, job_id: str) -> str:

        return str(self.client().get_job_status(job_id)).split(".")[-1]

    def client(self):
        """A JobSubmissionClient with the token in its headers."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(
            self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"}
        )

    def wait_job(self, job_id: str, *, timeout: float, until=("SUCCEEDED", "FAILED", "STOPPED")):
        deadline = time.time() + timeout
        status = "?"
        while time.time() < deadline:
            status = self.job_status(job_id)
            if status in until:
                return status
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        # A job's driver runs in a session of its own, from a working dir under our temp dir:
        # end what is left there too (found by that path, which no other cluster uses).
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = self._stragglers()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + wait
            while pids and time.time() < deadline and self._stragglers():
                time.sleep(0.3)
        shutil.rmtree(self.root, ignore_errors=True)

    def _stragglers(self) -> list[int]:
        import psutil

        root = str(self.root)
        out = []
        for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                if root in " ".join(proc.info["cmdline"] or []) or root in (proc.info["cwd"] or ""):
                    out.append(proc.pid)
            except psutil.Error:
                pass
        return [p for p in out if p != os.getpid()]


def _node_env(token: str) -> dict:
    env = dict(os.environ)
    # Token auth with this cluster's own token; the user's ~/.ray/auth_token is left alone.
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def toy_entrypoint(out_dir: Path, name: str, *, steps: int, **extra) -> list[str]:
    """``opdplus train`` on deploy/configs/cluster_toy.toml, shrunk to a few small steps."""
    sets = {
        "run.name": name,
        "run.out_dir": str(out_dir),
        "run.steps": steps,
        "run.checkpoint_every": steps,
        "models.teacher": "toy",  # resolved under OPDPLUS_CACHE on the cluster
        "models.student": "toy",
        "rollout.prompts_per_step": 8,
        "rollout.samples_per_prompt": 2,
        "rollout.max_tokens": 24,
        "rollout.channel_capacity": 64,
        "rollout.sampler_cpus": 0.5,
        "rollout.scorer_cpus": 0.5,
        "rollout.kv_cache_mb": 64,
        "learner.cpus_per_rank": 1.0,
        "task.eval_size": 16,
        "eval.every": 0,
        "eval.samples": 1,
        "eval.max_tokens": 24,
        "log.plots": False,
        "log.progress": True,
        "log.tensorboard": False,
    }
    sets.update(extra)
    argv = ["opdplus", "train", "--config", "deploy/configs/cluster_toy.toml"]
    for k, v in sets.items():
        if isinstance(v, bool):
            value = "true" if v else "false"
        elif isinstance(v, (int, float)) or str(v).startswith(("{", "[")):
            value = v
        else:
            value = f'"{v}"'
        argv += ["--set", f"{k}={value}"]
    return argv


def runtime_env_file(dest: Path, cache: Path) -> Path:
    """deploy/ray/runtime_env.yaml with OPDPLUS_CACHE set to ``cache`` (the explicit model
    cache every node reads), written to ``dest``."""
    import yaml

    env = yaml.safe_load((REPO / "deploy/ray/runtime_env.yaml").read_text())
    env["env_vars"]["OPDPLUS_CACHE"] = str(cache)
    dest.write_text(yaml.safe_dump(env))
    return dest


# ----------------------------------------------------------------------------- shared cluster
# One head and one "live" toy job serve the job-submission, metrics and browser tests, so a
# full test run starts the cluster once. Stopped when the pytest session ends.

_SHARED: dict = {}


def shared_cluster(config) -> LocalCluster:
    if "cluster" not in _SHARED:
        # One node offering both roles' custom resources (deploy/configs/cluster_toy.toml).
        cluster = LocalCluster(num_cpus=2, resources={"rollout": 2, "learner": 1})
        _SHARED["cluster"] = cluster
        config.add_cleanup(_stop_shared)
    return _SHARED["cluster"]


def _stop_shared() -> None:
    cluster = _SHARED.pop("cluster", None)
    job = _SHARED.pop("job", None)
    if cluster is None:
        return
    if job is not None:
        cluster.ray("job", "stop", job["job_id"], check=False, timeout=60)
    cluster.stop()


LIVE_STEPS = 16


def live_job(config, cache: Path, *, need_running: bool) -> dict:
    """The shared toy job: {"cluster", "job_id", "run_dir", "name"}. Submitted on first use;
    with ``need_running`` a new one is submitted if the last has already finished."""
    cluster = shared_cluster(config)
    job = _SHARED.get("job")
    if (
        job is not None
        and need_running
        and cluster.job_status(job["job_id"]) not in ("PENDING", "RUNNING")
    ):
        job = None
    if job is None:
        n = _SHARED.get("n", 0) + 1
        _SHARED["n"] = n
        name = f"live-{n}"
        out = cluster.root / "runs"
        env_file = runtime_env_file(cluster.root / f"runtime_env_{n}.yaml", cache)
        job_id = cluster.submit(
            toy_entrypoint(out, name, steps=LIVE_STEPS),
            job_id=f"opdplus-{name}",
            runtime_env=str(env_file),
        )
        job = {"cluster": cluster, "job_id": job_id, "run_dir": out / name, "name": name}
        _SHARED["job"] = job
    return job


_LIST_ACTORS = """
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], detail=True,
                     limit=1000, raise_on_missing_output=False)
print(json.dumps([{"name": a.name, "namespace": a.ray_namespace, "node_id": a.node_id,
                   "class_name": a.class_name, "pid": a.pid} for a in actors]))
"""


def list_alive_actors(cluster: LocalCluster) -> list[dict]:
    """``ray.util.state.list_actors`` (ALIVE ones) run in a child process with the cluster's
    token in its environment (the token loader caches per process; the test process keeps
    none)."""
    out = subprocess.run(
        [sys.executable, "-c", _LIST_ACTORS, cluster.dashboard_url],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for_actors(
    cluster: LocalCluster, namespace: str, names: set[str], timeout: float, alive=lambda: True
):
    """Block until every actor in ``names`` is ALIVE in ``namespace``; returns them all.
    ``alive()`` False (the driver exited) stops the wait at once."""
    deadline = time.time() + timeout
    actors: list = []
    while time.time() < deadline and alive():
        try:
            actors = [a for a in list_alive_actors(cluster) if a["namespace"] == namespace]
        except (RuntimeError, subprocess.TimeoutExpired):
            actors = []  # the state API answers once the dashboard is up
        if names <= {a["name"] for a in actors}:
            return actors
        time.sleep(3)
    seen = sorted(a["name"] for a in actors)
    raise TimeoutError(f"actors {names} not all alive in {namespace} (alive: {seen})")
