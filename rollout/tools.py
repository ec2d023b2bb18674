"""The tools environments call: a calculator and a sandboxed Python runner. Standard library only.

``calculate(expression)`` evaluates arithmetic by walking its syntax tree (``ast``), never with
``eval``: numbers, ``+ - * / // % **``, unary signs and parentheses, in exact rational arithmetic
(``0.1 + 0.2`` is ``0.3``), with bounds on the expression's length, the exponents and the size of
every intermediate number. Anything else raises ``ToolError`` with a message fit to show the
student.

``run_python(code, limits=..., seed=...)`` runs a snippet in a separate interpreter process and
returns what it printed, never raising for what the snippet does. Inside the child, before the
snippet runs: ``RLIMIT_CPU`` (CPU seconds; SIGXCPU, then SIGKILL one second later),
``RLIMIT_AS`` (address space; allocations fail with MemoryError), ``random`` seeded, and an audit
hook (``sys.addaudithook``, which cannot be removed) refusing sockets, new processes, ctypes and
opening files for writing. The parent reads at most ``output_bytes`` of output and kills the
child's process group on a wall-clock deadline (a backstop for a snippet that sleeps). Every
failure — an exception, a limit, a refused call — comes back as an ``error: ...`` line in the
output. This confines a misbehaving model's snippet; it is not a security boundary against a
determined attacker (run untrusted workloads in a container as well).
"""

from __future__ import annotations

import ast
import contextlib
import operator
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200
MAX_NUMBER_BITS = 333  # numerator and denominator of every intermediate value (~100 digits)
MAX_EXPONENT = 1000
MAX_CODE_BYTES = 64 * 1024


class ToolError(ValueError):
    """A tool call the tool cannot answer; the message is shown to the student as the answer."""


# ------------------------------------------------------------------------------- calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_ALLOWED = "numbers, + - * / // % ** and parentheses"


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text: an integer (``408``) or a decimal with up
    to 12 significant digits (``0.333333333333``). Raises ToolError for anything else."""
    text = expression.strip()
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {text!r}") from None
    value = _evaluate(tree.body)
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), ".12g")


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        # bool is an int subclass; complex and strings are not numbers here.
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"only {_ALLOWED} are allowed, not {node.value!r}")
        if isinstance(node.value, float) and not float("-inf") < node.value < float("inf"):
            raise ToolError("number too large")
        return _checked(Fraction(str(node.value)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod) and right == 0:
            raise ToolError("division by zero")
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp):
        raise ToolError(f"unsupported operator {ast.unparse(node)!r}; allowed: {_ALLOWED}")
    raise ToolError(f"only {_ALLOWED} are allowed, not {ast.unparse(node)!r}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ToolError("exponents must be integers")
    if base == 0 and exponent < 0:
        raise ToolError("division by zero")
    if abs(exponent.numerator) > MAX_EXPONENT:
        raise ToolError("number too large")
    # Cheap even at the bounds (at most MAX_EXPONENT · MAX_NUMBER_BITS bits), then checked.
    return _checked(base**exponent.numerator)


def _checked(value: Fraction) -> Fraction:
    if max(abs(value.numerator).bit_length(), value.denominator.bit_length()) > MAX_NUMBER_BITS:
        raise ToolError("number too large")
    return value


# ------------------------------------------------------------------------------- python runner


@dataclass(frozen=True)
class PythonLimits:
    """cpu_s: CPU seconds (RLIMIT_CPU, whole seconds). memory_mb: address space (RLIMIT_AS).
    output_bytes: output read back; more stops the snippet. wall_s: wall-clock backstop."""

    cpu_s: int = 2
    memory_mb: int = 512
    output_bytes: int = 4096
    wall_s: float = 10.0

    def __post_init__(self) -> None:
        if self.cpu_s < 1 or self.memory_mb < 64 or self.output_bytes < 1 or self.wall_s <= 0:
            raise ValueError(f"python tool limits out of range: {self}")


@dataclass(frozen=True)
class ToolResult:
    """text: what the student sees (output, then an ``error: ...`` line on failure)."""

    text: str
    error: bool


# Runs in the child: read the snippet, limit the process, refuse what it may not do, run it.
_CHILD = r"""
import os, random, resource, sys
code = sys.stdin.read()
sys.stdin.close()
cpu_s, memory, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
random.seed(seed)
_REFUSED = ("socket.", "ctypes.", "subprocess.", "os.system", "os.exec", "os.posix_spawn",
            "os.spawn", "os.fork", "os.forkpty", "pty.", "os.kill", "os.killpg")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def _hook(event, args):
    if event.startswith(_REFUSED) or (
        event == "open" and (any(m in str(args[1] or "") for m in "wax+")
                             or (args[2] or 0) & _WRITE)
    ):
        raise PermissionError(f"{event} is not allowed in the python tool")

sys.addaudithook(_hook)
del os, random, resource
try:
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    if e.code not in (None, 0):
        sys.stdout.flush()
        sys.stderr.write(f"error: exit status {e.code}\n")
        sys.stderr.flush()
        sys.exit(1)
except BaseException as e:
    sys.stdout.flush()
    sys.stderr.write(f"error: {type(e).__name__}" + (f": {e}" if str(e) else "") + "\n")
    sys.stderr.flush()
    sys.exit(1)
"""


def run_python(code: str, *, limits: PythonLimits = PythonLimits(), seed: int = 0) -> ToolResult:
    """Run ``code`` in a fresh interpreter under ``limits`` (module docstring); never raises for
    anything the snippet does. stdout and stderr are merged, in the order written."""
    data = code.encode("utf-8", errors="replace")
    if len(data) > MAX_CODE_BYTES:
        return ToolResult(f"error: the snippet is longer than {MAX_CODE_BYTES} bytes", True)
    argv = [sys.executable, "-s", "-B", "-c", _CHILD, str(limits.cpu_s)]
    argv += [str(limits.memory_mb * 2**20), str(seed)]
    env = {"PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8", "PATH": ""}
    with tempfile.TemporaryDirectory(prefix="opdplus-python-") as cwd:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,  # its own process group: the kill reaches only the child
        )
        try:
            out, stopped = _feed_and_read(proc, data, limits)
        finally:
            if proc.poll() is None:
                _kill(proc)
            proc.wait()
            proc.stdout.close()
    text = out[: limits.output_bytes].decode("utf-8", errors="replace")
    why = stopped or _exit_reason(proc.returncode, limits)
    if why is None:
        return ToolResult(text, proc.returncode != 0)
    sep = "" if not text or text.endswith("\n") else "\n"
    return ToolResult(f"{text}{sep}error: {why}", True)


def _feed_and_read(proc: subprocess.Popen, data: bytes, limits: PythonLimits):
    """(output bytes, why the parent stopped the child or None). Reads until EOF, the output
    limit or the wall-clock deadline, whichever comes first."""
    deadline = time.monotonic() + limits.wall_s
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:  # the child died before reading (it reads everything first)
        pass
    out = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(proc)
                return bytes(out), f"wall-clock limit of {limits.wall_s:g} s exceeded"
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > limits.output_bytes:
                _kill(proc)
                return bytes(out), f"output limit of {limits.output_bytes} bytes exceeded"
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:  # closed its output but kept running
        _kill(proc)
        return bytes(out), f"wall-clock limit of {limits.wall_s:g} s exceeded"
    return bytes(out), None


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _exit_reason(returncode: int, limits: PythonLimits) -> str | None:
    """Why the child ended, when it did not end by itself (the snippet's own errors are already
    in its output)."""
    if returncode >= 0:
        return None
    sig = -returncode
    if sig in (signal.SIGXCPU, signal.SIGKILL):  # SIGKILL: the hard CPU limit, a second later
        return f"CPU time limit of {limits.cpu_s} s exceeded"
    return f"the process was killed by {signal.Signals(sig).name}"
