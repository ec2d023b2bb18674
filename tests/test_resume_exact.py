"""Resume is exact at max_staleness = 0: a run stopped after step k and resumed trains on the
same samples (ids and tokens), with the same losses and the same final weights, as the run
that was never stopped.

Why only at staleness 0: with max_staleness = s > 0 the batch of step k may be sampled by
policy version k − 1 − s .. k − 1, whichever the sampler held when it took the chunk, and that
depends on timing (how far the producer ran ahead). A resumed run restarts with every sampler
on the checkpoint's version and an empty pipeline, so the first s steps after the resume are
sampled from a newer policy than in the uninterrupted run: the prompts and sample ids are the
same (the prompt source's position is checkpointed) but the sampled tokens, and so the losses
and weights, differ. The ledger still holds each step's exact batch, once (tested in
test_train_e2e.py's resume test).
"""

from __future__ import annotations

import pytest
import torch
from run_helpers import rows, small_config, step_rows

pytestmark = pytest.mark.slow


def _weights(run_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "student").glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no weights in {run_dir / 'student'}"
    return out


def _assert_resume_guarded(toy_pair, run_dir, config) -> None:
    import torch

    from services.driver import train
    from services.run_dir import ResumeMismatch

    saved = torch.load(
        run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert saved["client"]["config"] == (run_dir / "config.toml").read_text()
    before = (run_dir / "config.toml").read_text()
    with pytest.raises(ResumeMismatch, match="rollout.prompts_per_step: 4 → 8"):
        train(config(**{"rollout.prompts_per_step": 8}), resume=True, progress=False)
    assert (run_dir / "config.toml").read_text() == before


def test_resume_at_staleness_zero_equals_the_uninterrupted_run(ray_local, toy_pair, tmp_path):
    from services.driver import RunStopped, train
    from services.ledger import check_ledger

    steps, cut = 4, 2
    sets = {"rollout.max_staleness": 0}
    train(small_config(toy_pair, tmp_path, "full", steps, **sets), progress=False)
    cfg = small_config(toy_pair, tmp_path, "cut", steps, **sets)
    with pytest.raises(RunStopped, match=r"(?s)latest: step_0*2\b.*--resume"):
        train(cfg, progress=False, stop_after_step=cut)
    assert [r["step"] for r in step_rows(tmp_path / "cut")] == [1, 2]
    # The checkpoint holds the config it was trained with; a resume that would train another
    # batch shape is refused before anything starts (services/run_dir.py), the run untouched.
    _assert_resume_guarded(toy_pair, tmp_path / "cut", lambda **kw: small_config(
        toy_pair, tmp_path, "cut", steps, **sets, **kw))  # fmt: skip
    train(cfg, resume=True, progress=False)

    full, resumed = (
        rows(tmp_path / "full", "samples.jsonl"),
        rows(tmp_path / "cut", "samples.jsonl"),
    )
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(full, resumed, strict=True):
        assert a["sample_ids"] == b["sample_ids"], a["step"]
        assert a["response_crc"] == b["response_crc"], f"step {a['step']}: tokens differ"
        # the resumed samplers serve the checkpoint's saved policy version
        assert a["versions"] == b["versions"] == [a["step"] - 1] * len(a["versions"])
    for a, b in zip(step_rows(tmp_path / "full"), step_rows(tmp_path / "cut"), strict=True):
        assert abs(a["learner/loss"] - b["learner/loss"]) <= 1e-6, a["step"]
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= 1e-5, f"final weights differ by {worst}"
    # and the run did change the weights (the comparison is not vacuous)
    assert any(r["learner/grad_norm"] > 0 for r in step_rows(tmp_path / "full"))
    for run in ("full", "cut"):
        report = check_ledger(tmp_path / run)
        assert report.ok, report.problems
    assert torch.isfinite(
        torch.tensor([r["learner/loss"] for r in step_rows(tmp_path / "cut")])
    ).all()
