"""Write the two-teacher demo's data (deploy/configs/two_teachers*.jsonl): the toy arithmetic
task as JSONL rows, every other row naming the teacher "self" (the rest go to the first
[[teachers]] entry, the toy teacher). Training rows come from the task's seeded generator,
held-out rows are the task's own 200 evaluation problems (rollout.tasks.eval_problems), so
the accuracies compare with the one-teacher demo's.

    python scripts/two_teachers_data.py    # deterministic: the same files every time
"""

from __future__ import annotations

import json
from pathlib import Path

from rollout import tasks

OUT = Path(__file__).resolve().parent.parent / "deploy" / "configs"
TRAIN_ROWS = 4000


def rows(problems, prefix: str) -> str:
    lines = []
    for i, p in enumerate(problems):
        row = {"id": f"{prefix}{i}", "prompt": p.prompt, "answer": p.answer}
        if i % 2:
            row["teacher"] = "self"
        lines.append(json.dumps(row))
    return "\n".join(lines) + "\n"


def main() -> None:
    gen = tasks.ArithmeticGenerator(seed=20)
    held = {p.key for p in tasks.eval_problems()}
    train = []
    while len(train) < TRAIN_ROWS:
        p = gen.next()
        if p.key not in held:  # never train on a held-out problem
            train.append(p)
    (OUT / "two_teachers.jsonl").write_text(rows(train, "t"))
    (OUT / "two_teachers_eval.jsonl").write_text(rows(tasks.eval_problems(), "e"))


if __name__ == "__main__":
    main()
