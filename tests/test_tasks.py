"""The built-in arithmetic task: worked solutions, the held-out split, and the verifier."""

from __future__ import annotations

import pytest

from rollout import prompting, tasks
from rollout.tasks import Arithmetic, extract_answer, verify


def test_worked_solution_format():
    assert Arithmetic(347, 285, "+").prompt == "347+285="
    assert Arithmetic(347, 285, "+").completion() == "7+5+0=12;4+8+1=13;3+2+1=06#632"
    assert Arithmetic(947, 285, "+").completion() == "7+5+0=12;4+8+1=13;9+2+1=12#1232"
    assert Arithmetic(5, 47, "+").completion() == "5+7+0=12;0+4+1=05#52"
    assert Arithmetic(0, 0, "+").completion() == "0+0+0=00#0"
    assert Arithmetic(947, 285, "-").completion() == "7-5-0=02;4-8-0=16;9-2-1=06#662"
    assert Arithmetic(100, 1, "-").completion() == "0-1-0=19;0-0-1=19;1-0-1=00#99"


def test_every_worked_solution_verifies_and_fits_the_length_budget():
    gen = tasks.ArithmeticGenerator(seed=3, ops=("+", "-"))
    for _ in range(2000):
        p = gen.next()
        assert verify(p.completion(), p.answer)
        assert len(p.prompt) <= 8 and len(p.completion()) <= 31
        # The columns really compute the answer: digits read back from the columns.
        cols = p.completion().split("#")[0].split(";")
        digits = "".join(c[-1] for c in reversed(cols))
        carry = cols[-1][-2]
        value = int(digits) if p.op == "-" else int((carry if carry == "1" else "") + digits)
        assert value == int(p.answer)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("7+5+0=12;4+8+1=13;3+2+1=06#632", True),
        ("#632", True),
        ("#0632", True),  # integers compare by value
        ("# 632 \n", True),
        ("7+5+0=12;4+8+1=13;3+2+1=06#633", False),  # wrong answer
        ("7+5+0=12;4+8+1=13;3+2+1=06", False),  # no marker
        ("7+5+0=12;4+8+1=13;3+2+1=06#", False),  # nothing after the marker
        ("#632;1+1", False),  # kept writing after the answer
        ("#632#632", False),
        ("#6 32", False),
        ("", False),
        ("#-632", False),
        ("garbage\x00\ufffd#", False),
    ],
)
def test_verify_hand_written_completions(completion, expected):
    assert verify(completion, "632") is expected


def test_verify_negative_and_text_answers():
    assert verify("#-5", "-5")
    assert not verify("#5", "-5")
    assert verify("#paris", "paris")
    assert not verify("#Paris", "paris")
    assert extract_answer("no marker") is None
    assert extract_answer("a#b#c") == "b#c"


def test_eval_set_is_fixed_distinct_and_disjoint_from_training():
    ev = tasks.eval_problems()
    assert len(ev) == tasks.EVAL_SIZE == len({p.key for p in ev})
    assert ev == tasks.eval_problems()
    held = {p.key for p in ev}
    gen = tasks.ArithmeticGenerator(seed=0)
    assert not any(gen.next().key in held for _ in range(20_000))


def test_generator_resumes_exactly():
    a = tasks.ArithmeticGenerator(seed=7)
    first = [a.next() for _ in range(50)]
    b = tasks.ArithmeticGenerator(seed=7)
    b.skip_to(20)
    assert [b.next() for _ in range(30)] == first[20:]
    other = tasks.ArithmeticGenerator(seed=8)
    assert [other.next() for _ in range(50)] != first


def test_generator_rejects_unknown_ops():
    with pytest.raises(ValueError, match="ops"):
        tasks.ArithmeticGenerator(ops=("*",))


def test_encode_prompt_plain_tokenizer_prepends_bos():
    from models.toy import build_tokenizer

    tok = build_tokenizer()
    ids = prompting.encode_prompt(tok, "12+3=")
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == "12+3="
    assert len(ids) == 6
