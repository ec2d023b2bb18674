"""The verifier registry (rollout/verifiers.py) on known equivalent and non-equivalent answers."""

from __future__ import annotations

import json
import threading

import pytest

from rollout.sources import Problem, SourceError, make_source, score
from rollout.verifiers import VERIFIERS, VerifierError, check_verifier, score_with


def _p(answer: str, *verifier: str) -> Problem:
    return Problem("t:1", "q", answer, "test", "jsonl", verifier=tuple(verifier))


# (gold answer, completion, equivalent?)
MATH_CASES = [
    ("0.5", "so the result is \\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "The answer is $0.5$", True),
    ("1/2", "\\boxed{0.5}", True),
    ("42", "We get \\boxed{42}.", True),
    ("42", "$42.0$", True),
    ("x^2 + 2x", "\\boxed{x(x+2)}", True),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", True),
    ("3", "\\boxed{4}", False),
    ("0.5", "\\boxed{\\frac{1}{3}}", False),
    ("42", "no number here", False),
    ("x^2 + 2x", "\\boxed{x^2 + 2}", False),
]


@pytest.mark.parametrize("gold, completion, same", MATH_CASES)
def test_math_final_answer_equivalence(gold, completion, same):
    assert score(_p(gold, "math"), completion) == float(same)


def test_math_scores_outside_the_main_thread():
    """math-verify's timeouts use SIGALRM, which only the main thread may set (a Ray actor's
    worker thread must still score)."""
    out = []
    t = threading.Thread(target=lambda: out.append(score(_p("0.5", "math"), "\\boxed{1/2}")))
    t.start()
    t.join()
    assert out == [1.0]


def test_exact_regex_and_marker():
    assert score(_p("Paris", "exact"), "  Paris\n") == 1.0
    assert score(_p("Paris", "exact"), "It is Paris") == 0.0
    regex = _p("12", "regex", r"answer: (\d+)")
    assert score(regex, "answer: 3 ... no, answer: 12") == 1.0  # the last match counts
    assert score(regex, "answer: 3") == 0.0 and score(regex, "twelve") == 0.0
    assert score(_p("hello", "regex", r"\w+$"), "say hello") == 1.0  # no group: whole match
    assert score(_p("632", "marker"), "2+5+0=07;#0632") == 1.0
    assert score(_p("632"), "#632") == 1.0  # the jsonl kind's default: the marker


def test_unknown_and_misused_verifiers_are_named(tmp_path):
    assert set(VERIFIERS) >= {"marker", "reasoning_gym", "exact", "regex", "math"}
    with pytest.raises(VerifierError, match="unknown verifier 'maths'; expected one of"):
        score_with("maths", _p("1"), "1")
    assert "needs task.verifier_pattern" in check_verifier("regex", source="chat")
    assert "not a regular expression" in check_verifier("regex", source="chat", pattern="(")
    assert "scores only reasoning_gym" in check_verifier("reasoning_gym", source="chat")
    assert check_verifier("math", source="jsonl") is None
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(SourceError, match="task.verifier: unknown verifier 'nope'"):
        make_source("jsonl", path=path, verifier="nope")
    with pytest.raises(VerifierError, match="no answer"):
        score(_p("", "exact"), "")


def test_task_verifier_replaces_a_sources_default(tmp_path):
    """task.verifier reaches the problems of any source, keeping its deal and state."""
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain, exact = (
        make_source("jsonl", path=path),
        make_source("jsonl", path=path, verifier="exact"),
    )
    a, b = plain.next_batch(5), exact.next_batch(5)
    assert [p.id for p in a] == [p.id for p in b] and plain.state() == exact.state()
    assert score(a[0], f"#{a[0].answer}") == 1.0 and score(a[0], a[0].answer) == 0.0
    assert score(b[0], a[0].answer) == 1.0 and score(b[0], f"#{a[0].answer}") == 0.0
    arith = make_source("arithmetic", verifier="regex", verifier_pattern=r"#(\d+)$")
    p = arith.eval_set()[0]
    assert p.verifier == ("regex", r"#(\d+)$") and score(p, f"..#{p.answer}") == 1.0
