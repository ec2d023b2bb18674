"""A quiet console: opdplus's own lines, the progress bar and the final table on the terminal;
everything else (vLLM, Ray, DeepSpeed, Triton, NUMA, torch warnings, from this process and,
through Ray's log forwarding, from every actor) in ``engine.log`` in the run directory.

How: file descriptors 1 and 2 of this process are pointed at the log file (so C-level writes
and every Python stream or logging handler bound to stdout/stderr land there), while
``console()`` is a stream on a duplicate of the original terminal descriptor. Ray's handler
that prints actor output on the driver is swapped for one that writes to the same file.
``--verbose`` (or OPDPLUS_VERBOSE=1) leaves all of it on the terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_NAME = "engine.log"

_state: dict = {}


def console() -> TextIO:
    """The stream for opdplus's own output (the terminal, also in quiet mode)."""
    return _state.get("console", sys.stdout)


def say(message: str) -> None:
    print(message, file=console(), flush=True)


def log_path() -> Path | None:
    """Where engine and library output goes now (None when not quiet)."""
    return _state.get("path")


@contextlib.contextmanager
def quiet_console(out_dir: str | Path, *, verbose: bool = False) -> Iterator[None]:
    """Send everything but opdplus's own output to a log file for the block.

    The file starts as ``<out_dir>/.engine-<pid>.log``; ``adopt_run_dir`` moves it into the
    run directory once that exists. Restores the descriptors on exit (also on error, so the
    CLI's error message and any traceback reach the terminal).
    """
    if verbose or os.environ.get("OPDPLUS_VERBOSE") == "1" or _state:
        os.environ["OPDPLUS_VERBOSE"] = "1" if verbose else os.environ.get("OPDPLUS_VERBOSE", "")
        yield
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f".engine-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    term = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        _state.update(console=term, path=path, log=os.fdopen(os.dup(log_fd), "a", buffering=1))
        # Library loggers that honour these stay at warnings (to the log file anyway).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        yield
    except BaseException:
        say(f"[opdplus] engine and library output of this run: {_state.get('path', path)}")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        os.close(log_fd)
        with contextlib.suppress(Exception):
            _state["log"].close()
        term.flush()
        term.close()
        _state.clear()


def adopt_run_dir(run_dir: str | Path) -> None:
    """Move the log into ``run_dir/engine.log`` (appending if a resumed run has one)."""
    path = _state.get("path")
    if path is None:
        return
    dest = Path(run_dir) / LOG_NAME
    if dest == path:
        return
    if dest.exists():
        # Resume: keep one file; the descriptors follow the renamed inode.
        with dest.open("ab") as f:
            f.write(Path(path).read_bytes())
        fd = os.open(dest, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        Path(path).unlink()
        _state["log"].close()
        _state["log"] = dest.open("a", buffering=1)
    else:
        os.replace(path, dest)  # open descriptors keep writing to the moved file
    _state["path"] = dest


def route_ray_worker_logs() -> None:
    """In quiet mode, write the actors' forwarded output to the log file instead of the
    terminal (call after ``ray.init``). Ray prints it through one replaceable handler."""
    if "log" not in _state:
        return
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    log = _state["log"]

    def to_log(data) -> None:
        ray_worker.print_worker_logs(data, log, False)

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("opdplus_engine_log", to_log)
