"""Placing actors: an actor that asks for what no node offers is a clear error at once (before
any engine starts), naming the actor, its resources and the config key; one that stays
pending past ``ray.placement_timeout_s`` is an error naming what the cluster has free."""

from __future__ import annotations

import time

import pytest

from services.placement import Ask, PlacementError, check_feasible, ray_resources, unmet

NODES = [{"CPU": 2.0, "memory": 4e9}, {"CPU": 8.0, "GPU": 1.0, "learner": 1.0}]


def test_unmet_names_what_no_single_node_offers():
    assert unmet({"CPU": 1.0}, NODES) == []
    assert unmet({"CPU": 4.0, "GPU": 1.0, "learner": 1.0}, NODES) == []
    assert unmet({"rollout": 1.0}, NODES) == ["rollout (no node has it)"]
    assert unmet({"CPU": 16.0}, NODES) == ["CPU = 16 (largest node: 8)"]
    assert unmet({"GPU": 2.0, "CPU": 1.0}, NODES) == ["GPU = 2 (largest node: 1)"]
    # each fits some node, but no node holds both at once
    assert unmet({"memory": 1e9, "GPU": 1.0}, NODES) == [
        "all of it on one node (no node has every resource at once)"
    ]


def test_ray_resources_uses_rays_names():
    opts = {"num_cpus": 0.5, "num_gpus": 0, "resources": {"rollout": 1}}
    assert ray_resources(opts) == {"CPU": 0.5, "rollout": 1.0}


def test_infeasible_ask_names_actor_resource_key_and_cluster():
    view = (NODES, {"CPU": 10.0, "GPU": 1.0, "learner": 1.0}, {"CPU": 3.0})
    with pytest.raises(PlacementError) as info:
        check_feasible([Ask("learner-rank-0", "learner.resources", {"trainer": 1.0})], view)
    msg = str(info.value)
    assert "learner-rank-0" in msg and "trainer (no node has it)" in msg
    assert "learner.resources" in msg and "CPU = 10, GPU = 1, learner = 1" in msg


def test_config_refuses_custom_resources_on_a_local_instance(monkeypatch):
    from services.config import ConfigError, load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(
        ConfigError, match=r"learner\.resources: asks for \{'learner': 1(\.0)?\}.*local"
    ):
        load_config(None, ["learner.resources={learner = 1}"])
    load_config(None, ["learner.resources={learner = 1}", 'ray.address="auto"'])  # a cluster


# ------------------------------------------------------------------ real Ray (no engine starts)


@pytest.mark.slow
def test_learner_resource_no_node_has_fails_at_once(ray_local, tiny_model):
    from services.config import load_config
    from services.learner_group import LearnerGroup
    from services.parts import learner_settings

    optim, loss = learner_settings(load_config(None, []))

    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        LearnerGroup(
            str(tiny_model),
            pad_id=0,
            num_ranks=1,
            rank_options={"num_cpus": 0.1, "resources": {"no_such_node": 1}},
            optim=optim,
            loss=loss,
            placement_timeout_s=300,
        )
    assert time.monotonic() - t0 < 30  # at once, not after the 300 s deadline
    msg = str(info.value)
    assert "learner-rank-0" in msg and "no_such_node (no node has it)" in msg
    assert "learner.cpus_per_rank / gpus_per_rank / resources" in msg
    assert not [a for a in ray_local.util.list_named_actors() if a.startswith("learner-rank")]


@pytest.mark.slow
def test_gpu_on_a_cpu_machine_fails_before_anything_starts(ray_local, toy_pair, tmp_path):
    """The driver's preflight: a learner or a sampler asking for a GPU on this CPU-only Ray."""
    from run_helpers import small_config

    from services.placement import preflight

    for key in ("learner.gpus_per_rank", "rollout.sampler_gpus"):
        cfg = small_config(toy_pair, tmp_path, "gpu", 1, **{key: 1})
        t0 = time.monotonic()
        with pytest.raises(PlacementError, match=r"GPU \(no node has it\)") as info:
            preflight(cfg)
        assert time.monotonic() - t0 < 10
        assert key.split(".")[1] in str(info.value)


@pytest.mark.slow
def test_pending_actor_fails_after_the_deadline_naming_what_is_free(ray_local):
    """An ask the nodes could hold but that stays pending (here: Ray's real view says no node
    has it; the view given to the check says one does, as for capacity another job holds)."""
    import ray

    from services.placement import wait_started

    @ray.remote(num_cpus=0, resources={"held_by_another_job": 1})
    class Waits:
        pass

    actor = Waits.remote()
    fake_view = ([{"CPU": 2.0, "held_by_another_job": 1.0}], {"CPU": 2.0}, {"CPU": 0.5})
    t0 = time.monotonic()
    try:
        with pytest.raises(PlacementError) as info:
            wait_started(
                [actor.__ray_ready__.remote()],
                [Ask("teacher-scorer-0", "rollout.scorer_resources", {"held_by_another_job": 1})],
                timeout_s=1.5,
                poll_s=0.5,
                view=lambda: fake_view,
            )
    finally:
        ray.kill(actor)
    assert 1.5 <= time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "not placed and started within 1.5 s (ray.placement_timeout_s)" in msg
    assert "teacher-scorer-0 asks for held_by_another_job = 1" in msg
    assert "free now CPU = 0.5" in msg


@pytest.mark.slow
def test_a_learner_call_past_its_deadline_names_the_rank(ray_local):
    """learner.step_timeout_s: a rank that does not answer stops the collective call with
    LearnerTimeout naming it (the driver then stops the run with the resume command)."""
    import ray

    from services.calls import LearnerTimeout
    from services.learner_group import _get_all

    @ray.remote(num_cpus=0)
    class Rank:
        def work(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    ranks = [Rank.remote(), Rank.remote()]
    try:
        assert _get_all([r.work.remote(0) for r in ranks], timeout_s=30) == [0, 0]
        t0 = time.monotonic()
        with pytest.raises(
            LearnerTimeout, match=r"learner-rank-1 did not answer a call within 1 s"
        ):
            _get_all([ranks[0].work.remote(0), ranks[1].work.remote(60)], timeout_s=1)
        assert time.monotonic() - t0 < 10
        # the rollout tier's get (evaluation's generate): a late answer is a hung worker
        from services.calls import CallTimeout, RayCalls

        calls = RayCalls()
        with pytest.raises(CallTimeout, match="no answer within 0.5 s") as info:
            calls.get(ranks[0].work.remote(60), timeout=0.5)
        assert calls.is_death(info.value)  # → killed and replaced like a crashed worker
    finally:
        for r in ranks:
            ray.kill(r)
