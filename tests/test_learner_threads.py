"""``learner.threads``: the torch intra-op threads of each learner rank, set in the rank's own
process. Ray sets OMP_NUM_THREADS to a task's reserved CPUs (1 here), so a rank that kept
torch's default would run one thread: two threads seen means the setting reached the rank."""

from __future__ import annotations

import pytest
from learner_settings import loss_settings, optim_settings

pytestmark = pytest.mark.slow


def test_learner_threads_reach_every_rank(ray_local, tiny_model):
    import ray

    from services.learner_group import LearnerGroup

    def threads(group):
        return ray.get(
            [
                r.__ray_call__.remote(lambda _: __import__("torch").get_num_threads())
                for r in group.ranks
            ]
        )

    group = LearnerGroup(
        str(tiny_model),
        pad_id=0,
        num_ranks=1,
        rank_options={"num_cpus": 1.0, "num_gpus": 0.0},
        optim=optim_settings(zero_stage=0),
        loss=loss_settings(divergence="js"),
        num_threads=2,
    )
    try:
        assert threads(group) == [2]
    finally:
        group.shutdown()
