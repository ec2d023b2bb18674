"""Starting or joining Ray, the run's namespace and actor names. Ray is imported only under
services/.

Three ways a run meets Ray:

- ``ray.address`` empty and no ``RAY_ADDRESS`` in the environment: start a local instance
  (dashboard and every port on 127.0.0.1).
- ``ray.address = "auto"`` or ``"HOST:PORT"``: join a running cluster (``ray start --head``).
- Launched by ``ray job submit`` (Ray sets ``RAY_ADDRESS`` for the entrypoint): join the
  cluster the job was submitted to, whatever ``ray.address`` says.

Every run's actors live in the namespace ``opdplus-<run name>``, named by role and index
(``student-sampler-0``, ``teacher-scorer-1``, ``learner-rank-0``), so the dashboard's actor list
reads as the pipeline and two runs on one cluster do not collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from services.errors import UserError

SESSION_RECORD = "ray-session.json"
_SIGNALS: list[tuple[tuple, Callable]] = []  # the active stop_on_signals handler, if any


@contextlib.contextmanager
def stop_on_signals(signums: tuple = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``, ``docker stop``) and SIGHUP (a closed terminal) take
    Ctrl-C's path for the block: KeyboardInterrupt in the main thread, so the run stops its
    actors and Ray, keeps its checkpoints and prints the resume command. Only the first signal
    interrupts; later ones are ignored so cleanup can finish (SIGKILL still ends it at once).
    Outside the main thread (no handlers can be installed there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def interrupt(signum, _frame) -> None:
        seen.append(signum)
        if len(seen) == 1:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        print(
            f"opdplus: {signal.Signals(signum).name} again: still stopping the run's actors "
            "(SIGKILL to end at once)",
            file=sys.stderr,
        )

    old = {s: signal.signal(s, interrupt) for s in signums}
    _SIGNALS.append((signums, interrupt))
    try:
        yield
    finally:
        _SIGNALS.pop()
        for s, handler in old.items():
            signal.signal(s, handler)


def _reclaim_signals() -> None:
    """``ray.init`` installs its own SIGTERM handler (``sys.exit``, which skips the resume
    message); put the active ``stop_on_signals`` handler back."""
    if _SIGNALS and threading.current_thread() is threading.main_thread():
        signums, handler = _SIGNALS[-1]
        for s in signums:
            signal.signal(s, handler)


@dataclass(frozen=True)
class RayInfo:
    address: str
    dashboard_url: str | None
    namespace: str = ""


def run_namespace(run_name: str) -> str:
    """Ray namespace of a run: ``opdplus-<run name>`` with characters Ray rejects replaced."""
    return "opdplus-" + (re.sub(r"[^A-Za-z0-9_.-]", "-", run_name) or "run")


def worker_env() -> dict[str, str]:
    """Environment every actor process gets (Ray 2.60 runs workers with the driver's
    interpreter, not its environment). Engine log levels follow the driver's, so that the
    quiet console stays quiet and ``--verbose`` reaches the workers too."""
    env = {
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in ("OPDPLUS_CACHE", "OPDPLUS_VERBOSE", "DS_ACCELERATOR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """Drop variables the submitted job's runtime env already sets: Ray refuses to merge a
    driver runtime env that names the same keys (and the job's values are the ones wanted)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return env
    return {k: v for k, v in env.items() if k not in job_env}


class ClusterUnreachable(UserError, ConnectionError):
    """The Ray cluster a command is to join does not answer; names the address."""


def check_reachable(address: str, *, timeout_s: float = 10.0) -> str:
    """The cluster ``address`` resolves to (``auto`` or empty: RAY_ADDRESS, else the cluster
    ``ray start`` last recorded, as ``ray.init`` resolves it), once it accepts a TCP connection
    within ``timeout_s`` (``services.config.check_ray_address``); ClusterUnreachable otherwise:
    ``ray.init`` would wait on a dead address for minutes."""
    from services.config import ConfigError, check_ray_address

    target = address
    if address in ("", "auto"):
        from ray._private.services import get_ray_address_from_environment

        try:
            target = get_ray_address_from_environment("auto", None)
        except ConnectionError as exc:
            raise ClusterUnreachable(f"ray.address = {address!r}: {exc}") from None
    try:
        check_ray_address(target, timeout_s=timeout_s)
    except ConfigError as exc:
        raise ClusterUnreachable(str(exc)) from None
    return target


def joins_cluster(address: str) -> bool:
    """True when the run joins an existing cluster (config address, or launched as a Ray job)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def ray_session(
    *,
    address: str = "",
    num_cpus: int = 0,
    dashboard: bool = True,
    namespace: str = "",
    record: Path | None = None,
) -> Iterator[RayInfo]:
    """Join ``address`` (or the cluster of the Ray job this process runs in) or start a local
    Ray instance (dashboard on 127.0.0.1) for the block, in ``namespace``.

    record: a run directory; the session is written to its ``ray-session.json`` (address,
    session dir, driver pid and host) and marked stopped when the block ends, and a local
    instance an earlier driver of that run left running (it was killed before it could stop
    it) is named in a warning first."""
    import ray

    if record is not None:
        warn_if_alive(record)

    env = {"env_vars": _not_set_by_job(worker_env())}
    if ray.is_initialized():
        yield RayInfo(address="(already initialised)", dashboard_url=None)
        return
    ns = namespace or None
    if joins_cluster(address):
        # Inside `ray job submit` RAY_ADDRESS names the cluster; the job's runtime env (working
        # dir, excludes) is inherited by the actors, ours only adds the env vars.
        target = address or os.environ["RAY_ADDRESS"]
        check_reachable(target)  # a dead address is an error in seconds, not a long wait
        ctx = ray.init(address=target, namespace=ns, runtime_env=env, log_to_driver=True)
    else:
        ctx = ray.init(
            # "local": a new instance. Without it ray.init joins the cluster `ray start` last
            # recorded in /tmp/ray/ray_current_cluster, which an empty ray.address must not do.
            address="local",
            num_cpus=num_cpus or None,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            # The node's address: Ray's own servers, the learner's rendezvous and the weight-sync
            # probes then listen on loopback only (a cluster node uses its real IP instead).
            _node_ip_address="127.0.0.1",
            namespace=ns,
            runtime_env=env,
            log_to_driver=True,
        )
    _reclaim_signals()
    from services.console import route_ray_worker_logs

    route_ray_worker_logs()  # quiet console: actor output to the run's engine.log
    url = getattr(ctx, "dashboard_url", None) or None
    if url and not url.startswith("http"):
        url = "http://" + url
    info = RayInfo(
        address=ctx.address_info.get("gcs_address", address or "local"),
        dashboard_url=url,
        namespace=namespace,
    )
    session = {
        "address": info.address,
        "session_dir": ctx.address_info.get("session_dir", ""),
        "local": not joins_cluster(address),
        "driver_pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": time.time(),
    }
    if record is not None:
        _write_record(record, session)
    try:
        yield info
    finally:
        ray.shutdown()
        if record is not None:
            _write_record(record, session | {"stopped_at": time.time()})


def _write_record(run_dir: Path, session: dict) -> None:
    with contextlib.suppress(OSError):  # a record is a courtesy: never what stops a run
        (Path(run_dir) / SESSION_RECORD).write_text(json.dumps(session, indent=2) + "\n")


def old_session_alive(run_dir: Path, *, timeout_s: float = 1.0) -> dict | None:
    """The session ``run_dir/ray-session.json`` records, if it is a local instance a run
    started and never stopped whose GCS still answers (the driver was killed: SIGKILL, OOM)."""
    try:
        session = json.loads((Path(run_dir) / SESSION_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not session.get("local") or "stopped_at" in session:
        return None
    host, _, port = str(session.get("address", "")).rpartition(":")
    if session.get("host") != socket.gethostname() or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return session
    except OSError:
        return None


def warn_if_alive(run_dir: Path) -> None:
    old = old_session_alive(run_dir)
    if old is None:
        return
    from services.console import say

    say(
        f"[opdplus] warning: the local Ray instance an earlier driver of this run started is "
        f"still running (address {old['address']}, session {old.get('session_dir')}, driver "
        f"pid {old.get('driver_pid')}); it holds CPUs and memory this run needs. Stop it: its "
        f"processes' command lines name {old.get('session_dir')}"
    )


class Stops(contextlib.ExitStack):
    """What a run started, stopped when the block ends, last started first. Every stop runs
    even when an earlier one raises (its error is reported, not raised, so the run's own
    outcome is what the user sees) or the block fails while starting."""

    def __init__(self, report: Callable[[str], None] = print) -> None:
        super().__init__()
        self.report = report

    def add(self, what: str, obj, method: str):
        """Stop ``obj`` by calling ``obj.<method>()`` at the end; returns ``obj``."""

        def stop() -> None:
            try:
                getattr(obj, method)()
            except Exception as exc:
                self.report(f"[opdplus] warning: stopping {what} failed: {exc!r}")

        self.callback(stop)
        return obj

    def start_beside(self, what: str, start: Callable[[], object], method: str, *, wait_s=30.0):
        """Run ``start()`` in a background thread while the caller starts something else in
        this one (the learner ranks load beside the vLLM engines: start-up is two waits for
        other processes, not one after the other). Returns a function that waits for it and
        returns the started object or raises its error. Its stop is registered now, so it is
        stopped in the order it was started; if the block fails while it is still starting,
        the stop waits ``wait_s`` for it and otherwise leaves its actors to end with the Ray
        session. ``start`` must only make Ray calls (no signal handlers off the main thread)."""
        box: dict = {}

        def run() -> None:
            try:
                box["obj"] = start()
            except BaseException as exc:  # handed to the caller by result()
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"start {what}", daemon=True)
        thread.start()

        def stop() -> None:
            thread.join(wait_s)
            if thread.is_alive():
                self.report(f"[opdplus] warning: {what} still starting; they end with Ray")
            elif "obj" in box:
                try:
                    getattr(box["obj"], method)()
                except Exception as exc:
                    self.report(f"[opdplus] warning: stopping {what} failed: {exc!r}")

        self.callback(stop)

        def result():
            thread.join()
            if "error" in box:
                raise box["error"]
            return box["obj"]

        return result


def actor_name(base: str) -> str:
    """``base`` if no live actor in this namespace holds that name, else ``base-<4 hex>``.

    Names are for people reading the dashboard; a second pipeline in the same namespace (tests
    that build several in one Ray session, or a name not yet released by a killed actor) gets
    a suffixed name instead of failing.
    """
    import ray

    try:
        ray.get_actor(base)
    except ValueError:
        return base
    return f"{base}-{uuid.uuid4().hex[:4]}"


def free_node_address() -> tuple[str, int]:
    """This node's IP and a port free on it now, for a TCP rendezvous (run it on that node).

    Probed on the node's own address (127.0.0.1 for a local instance), not on every interface:
    nothing a run opens should listen wider than it has to. The port is released before the
    caller binds it; another process could take it in between, which fails loudly, not hangs.
    """
    import socket

    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        port = sock.getsockname()[1]
    return ip, port
