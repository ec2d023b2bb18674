"""Environments as plain objects (rollout/environments.py) and their tools (rollout/tools.py):
the calculator's values and malformed calls, the python tool's limits (each failure an error
observation, never an exception), seeding, the episode protocol and the registry's errors.

The python tool runs real child processes with small limits (1 CPU second, 256 MB, 2 KB of
output); no assertion reads a clock. The wall-clock limit of the CPU and memory cases is far
above what they need, so under load they still end by their own limit.
"""

import pytest

from rollout.environments import (
    ENVIRONMENTS,
    EnvironmentOptions,
    Step,
    episode_seed,
    make_environment,
)
from rollout.prompting import Chat, Turn
from rollout.sources import Problem
from rollout.tools import PythonLimits, ToolError, calculate, run_python
from services.errors import UserError

LIMITS = PythonLimits(cpu_s=1, memory_mb=256, output_bytes=2048, wall_s=60.0)


def _problem(pid: str = "p1", prompt="What is 12*34?") -> Problem:
    return Problem(id=pid, prompt=prompt, answer="408", source="test", kind="jsonl")


# ----------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    "expression, value",
    [
        ("12*34", "408"),
        (" (1 + 2) * 3 ", "9"),
        ("7/2", "3.5"),
        ("2**10", "1024"),
        ("2**-2", "0.25"),
        ("-3+5", "2"),
        ("10//3", "3"),
        ("-7 % 3", "2"),
        ("1/3", "0.333333333333"),
        ("0.1+0.2", "0.3"),  # exact rationals, not binary floats
        ("1e5", "100000"),
        ("123456789*987654321", "121932631112635269"),
    ],
)
def test_calculator_values(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression, message",
    [
        ("", "empty"),
        ("12*", "not an arithmetic expression"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0**-1", "division by zero"),
        ("2^3", "unsupported operator"),
        ("a+1", "only numbers"),
        ("__import__('os').system('true')", "only numbers"),
        ("(1).__class__", "only numbers"),
        ("'1'+'2'", "only numbers"),
        ("True+1", "only numbers"),
        ("1j", "only numbers"),
        ("9**9**9", "number too large"),
        ("10**400", "number too large"),
        ("1e400", "number too large"),
        ("2**0.5", "integers"),
        ("1+" * 150 + "1", "longer than"),
    ],
)
def test_calculator_refuses_malformed_calls(expression, message):
    with pytest.raises(ToolError, match=message):
        calculate(expression)


def test_calculator_episode():
    env = make_environment("calculator", EnvironmentOptions(seed=0, system="Use <calc>."))
    assert env.stop == ("</calc>",)
    first = env.reset(_problem())
    assert first == (Turn("system", "Use <calc>."), Turn("user", "What is 12*34?"))
    step = env.step("I need 12*34: <calc>12*34</calc>")
    assert step == Step(turns=(Turn("tool", "408"),), done=False, tool_calls=1, tool_errors=0)
    bad = env.step("<calc>12*</calc>")
    assert bad.tool_errors == 1 and bad.turns[0].content.startswith("error: not an arithmetic")
    unclosed = env.step("so <calc>408+")
    assert unclosed.tool_errors == 1 and "not closed with </calc>" in unclosed.turns[0].content
    assert env.step("#408") == Step(turns=(), done=True)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("<calc>1+1</calc>")


def test_reset_keeps_a_chats_turns():
    env = make_environment("calculator", EnvironmentOptions(seed=0))
    chat = Chat.of([("system", "be brief"), ("user", "2+2?")])
    assert env.reset(_problem(prompt=chat)) == chat.turns


# ----------------------------------------------------------------------------- python tool


def test_python_prints_and_raises():
    assert run_python("print(6*7)", limits=LIMITS) == run_python("print(42)", limits=LIMITS)
    ok = run_python("print(6*7)", limits=LIMITS)
    assert (ok.text, ok.error) == ("42\n", False)
    failed = run_python("print('before')\n1/0", limits=LIMITS)
    assert failed.error
    assert failed.text == "before\nerror: ZeroDivisionError: division by zero\n"
    assert run_python("import sys; sys.exit(3)", limits=LIMITS).text == "error: exit status 3\n"


def test_python_cpu_limit():
    result = run_python("while True:\n    pass", limits=LIMITS)
    assert result.error and result.text == "error: CPU time limit of 1 s exceeded"


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(512 * 2**20)", "a = []\nfor _ in range(512):\n    a.append(bytearray(2**20))"],
    ids=["at-once", "bit-by-bit"],
)
def test_python_memory_limit(code):
    """512 MB against a 256 MB limit (bounded, so the test stays safe with the limit broken)."""
    result = run_python(code + "\nprint('allocated')", limits=LIMITS)
    assert result.error and result.text.startswith("error: MemoryError")


def test_python_output_limit():
    result = run_python("print('x' * 10**7)", limits=LIMITS)
    assert result.error
    assert result.text == "x" * 2048 + "\nerror: output limit of 2048 bytes exceeded"


@pytest.mark.parametrize(
    "code, event",
    [
        ("import socket\nsocket.socket()", "socket.__new__"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "socket.getaddrinfo"),
        ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')", "socket."),
        ("import os\nos.system('true')", "os.system"),
        ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
        ("open('written.txt', 'w')", "open"),
    ],
)
def test_python_refuses_network_processes_and_writes(code, event):
    result = run_python(code, limits=LIMITS)
    assert result.error and result.text.startswith("error: ")
    assert f"{event}" in result.text and "is not allowed in the python tool" in result.text


def test_python_wall_clock_backstop():
    limits = PythonLimits(cpu_s=1, memory_mb=256, output_bytes=2048, wall_s=0.5)
    result = run_python("import time\ntime.sleep(60)", limits=limits)
    assert result.error and result.text == "error: wall-clock limit of 0.5 s exceeded"


def test_python_episode_is_seeded():
    """The same run seed and problem give the same answers; another seed does not."""
    code = "<python>import random\nprint(random.random(), list({'a', 'b', 'c', 'd'}))</python>"

    def answer(seed: int, pid: str = "p1") -> str:
        env = make_environment("python", EnvironmentOptions(seed=seed, python=LIMITS))
        env.reset(_problem(pid))
        step = env.step(code)
        assert step.tool_calls == 1 and step.tool_errors == 0
        return step.turns[0].content

    assert answer(0) == answer(0)
    assert answer(0) != answer(1)
    assert answer(0) != answer(0, "p2")
    assert episode_seed(0, "p1", 0) != episode_seed(0, "p1", 1)


def test_python_episode_turns_a_failure_into_an_observation():
    env = make_environment("python", EnvironmentOptions(seed=0, python=LIMITS))
    env.reset(_problem())
    step = env.step("<python>print(1)\n[][0]</python>")
    assert step.done is False and step.tool_errors == 1
    assert step.turns == (Turn("tool", "1\nerror: IndexError: list index out of range\n"),)


# ----------------------------------------------------------------------------- registry


def test_unknown_environment_names_the_key_and_the_choices():
    with pytest.raises(UserError) as info:
        make_environment("calculater", EnvironmentOptions(seed=0))
    message = str(info.value)
    assert "'calculater'" in message
    for name in ENVIRONMENTS:
        assert name in message
    assert set(ENVIRONMENTS) >= {"calculator", "python"}
