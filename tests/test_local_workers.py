"""The in-process mode's workers (services/rollout_service.py ``_LocalSampler``) keep an actor's
one-call-at-a-time order on the real engine: an evaluation's ``generate`` called between two
``next``s of a sampling stream neither fails nor takes that stream's samples."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_generate_between_two_groups_of_a_stream(toy_pair):
    from models.toy import build_tokenizer
    from rollout.engine import EngineSettings
    from rollout.prompting import encode_prompt
    from rollout.sampler import SampleRequest, WorkItem
    from services.rollout_service import _LocalSampler

    tok = build_tokenizer()
    sampler = _LocalSampler(
        EngineSettings(
            model_path=str(toy_pair.student_dir), dtype="float32", seed=0, kv_cache_mb=64
        )
    )
    try:
        # Sums of 1 to 3 digits: worked solutions of different lengths, so the stream's
        # requests finish at different engine steps and some are still running after the first.
        texts = ["5+4=", "37+48=", "476+505=", "8+9=", "61+75=", "999+999="]
        items = [WorkItem(f"p{i}", "0", tuple(encode_prompt(tok, t))) for i, t in enumerate(texts)]
        req = SampleRequest(n=2, max_tokens=40, temperature=1.0, seed=7)
        stream = sampler.sample_stream(items, req)
        first = next(stream)
        prompt = encode_prompt(tok, "12+34=")
        (greedy,) = sampler.generate([prompt], max_tokens=20, temperature=0.0, n=1, seed=0)
        assert len(greedy) == 1 and greedy[0].token_ids
        rest = list(stream)
        positions = sorted([first[0], *(i for i, _ in rest)])
        assert positions == list(range(len(items)))  # every group arrives, once
        assert all(len(group) == 2 for _, group in [first, *rest])
    finally:
        sampler.close()
