"""LoRA students (`learner.lora`): the config's errors, the target check against the student's
modules, and one in-process toy run that checks everything a LoRA run promises: the samplers
serve the merged student (the learner's log-probs equal theirs after every push), only the
adapters train (the base weights stay bit-identical), the checkpoints hold the adapters and the
resume path reloads them exactly, and the export writes the merged folder and the adapter folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import rows, small_config, step_rows

from services.config import ConfigError, load_config

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["learner.lora.rnak=4"], r"learner\.lora\.rnak: unknown key; did you mean 'rank'\?"),
        (["learner.lora.rank=-1"], r"learner\.lora\.rank: must be >= 0, got -1"),
        (["learner.lora.rank=4", "learner.lora.alpha=0"], r"learner\.lora\.alpha: must be > 0"),
        (["learner.lora.rank=4", "learner.lora.dropout=1.0"], r"dropout: must be in \[0, 1\)"),
        (["learner.lora.rank=4.5"], r"learner\.lora\.rank: expected an integer, got 4\.5"),
        (["learner.lora.target_modules=q_proj"], r"target_modules: expected a list"),
        (
            ['learner.lora.target_modules=["q_proj"]'],
            r"learner\.lora\.target_modules: set learner\.lora\.rank > 0",
        ),
        (
            ["learner.lora.rank=4", 'learner.lora.target_modules=["q_proj", ""]'],
            r"learner\.lora\.target_modules: expected module names, got \[''\]",
        ),
        (["learner.lora=4"], r"learner\.lora: expected a \[learner\.lora\] table, got 4"),
    ],
)
def test_lora_config_errors_name_the_key(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)


def test_lora_config_round_trips_and_a_changed_rank_is_not_resumed():
    from services.config import to_toml
    from services.run_dir import resume_diff

    cfg = load_config(None, ["learner.lora.rank=8", 'learner.lora.target_modules=["q_proj"]'])
    assert (cfg.learner.lora.rank, cfg.learner.lora.alpha) == (8, 16.0)
    assert "[learner.lora]\nrank = 8\n" in to_toml(cfg)
    other = load_config(None, ["learner.lora.rank=4", 'learner.lora.target_modules=["q_proj"]'])
    assert resume_diff(to_toml(cfg), other) == ["  learner.lora.rank: 8 → 4"]
    assert resume_diff(to_toml(load_config()), cfg)[0].startswith("  learner.lora.rank: 0 → 8")


# ----------------------------------------------------------------------------- targets


def test_lora_targets_resolve_against_the_student(toy_pair):
    from learner.lora import LoraTargetError
    from services.parts import learner_settings

    def targets(names):
        sets = ["learner.lora.rank=4", f"learner.lora.target_modules={json.dumps(names)}"]
        optim, _ = learner_settings(load_config(None, sets), toy_pair.student_dir)
        return optim.lora.target_modules

    layers = [f"model.layers.{i}.self_attn" for i in range(3)]
    assert targets(["self_attn.q_proj", "v_proj"]) == tuple(
        f"{layer}.{p}" for layer in layers for p in ("q_proj", "v_proj")
    )
    everything = targets([])  # every linear layer but the output layer
    assert len(everything) == 3 * 7 and not any("lm_head" in n for n in everything)
    with pytest.raises(LoraTargetError) as missing:
        targets(["q_proj", "qkv_proj"])
    message = str(missing.value)
    assert message.startswith("learner.lora.target_modules: the student")
    assert "'qkv_proj'" in message and str(toy_pair.student_dir) in message
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message
    with pytest.raises(LoraTargetError, match=r"'lm_head' names the output layer"):
        targets(["lm_head"])


# ----------------------------------------------------------------------------- a run


def _lora_config(toy_pair, tmp_path, **extra):
    return small_config(
        toy_pair,
        tmp_path,
        "lora",
        3,
        **{
            "rollout.in_process": "true",
            "learner.sync_every": 1,
            "rollout.max_staleness": 0,  # strictly on-policy: the sampler serves the learner
            "learner.lr": 1e-2,  # adapters far enough from zero that an unmerged push shows
            "learner.lora.rank": 4,
            "learner.lora.alpha": 8.0,
            "learner.lora.target_modules": '["q_proj", "v_proj", "down_proj"]',
            **extra,
        },
    )


@pytest.mark.slow
def test_lora_run_serves_merged_weights_trains_adapters_and_resumes(ray_local, toy_pair, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from learner import manifest
    from services.driver import RunHooks, train

    pushed, reloaded = {}, {}

    def on_checkpoint(done):
        # What the learner exports (= pushes) at each checkpoint: the merged student.
        pushed[done.step] = dict(done.learner.export_weights())
        if done.step != 2:
            return
        # The resume path (LearnerEngine.load_checkpoint) on the live rank: the step-1
        # checkpoint alone (copied to its own folder) brings back step 1's adapters, and
        # the run's own latest (step 2) brings it back to where it was; the run then goes on.
        alone = tmp_path / "alone"
        tag = manifest.tag_for(1)
        shutil.copytree(done.run_dir / "checkpoints" / tag, alone / tag)
        manifest.write_latest(alone, tag)
        reloaded[1] = (done.learner.load_checkpoint(alone), dict(done.learner.export_weights()))
        state = done.learner.load_checkpoint(done.run_dir / "checkpoints")
        reloaded[2] = (state, dict(done.learner.export_weights()))

    cfg = _lora_config(toy_pair, tmp_path, **{"run.checkpoint_every": 1})
    train(cfg, progress=False, hooks=RunHooks(on_checkpoint=on_checkpoint))
    run_dir = tmp_path / "lora"

    steps = step_rows(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3]
    # The learner's log-probs (base + adapters) equal the samplers' (the merged weights they
    # were pushed) on every sample: after each push, and after the reloads at step 2.
    assert all(r["distill/mismatch"] < 1e-4 for r in steps), [r["distill/mismatch"] for r in steps]
    assert [sorted(set(r["versions"])) for r in rows(run_dir, "samples.jsonl")] == [[0], [1], [2]]

    # Checkpoints hold the adapters only (A and B of 3 layers x 3 targets) and reload exactly.
    ckpt = run_dir / "checkpoints" / manifest.tag_for(3)
    assert manifest.read_latest(ckpt.parent) == ckpt.name and manifest.verifies(ckpt)
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert len(module) == 2 * 3 * 3 and all(".lora_" in k for k in module), sorted(module)[:4]
    for step in (1, 2):
        state, weights = reloaded[step]
        assert state["step"] == step
        assert all(torch.equal(weights[k], pushed[step][k]) for k in pushed[step]), step
    assert not all(torch.equal(pushed[1][k], pushed[2][k]) for k in pushed[1])

    # The export: the merged student under the base model's names and shapes, and the adapters.
    base = load_file(toy_pair.student_dir / "model.safetensors")
    merged = load_file(run_dir / "student" / "model.safetensors")
    assert all(torch.equal(merged[k], pushed[3][k]) for k in merged)  # what was pushed last
    adapters = load_file(run_dir / "student" / "adapter" / "adapter_model.safetensors")
    adapter_config = json.loads(
        (run_dir / "student" / "adapter" / "adapter_config.json").read_text()
    )
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8.0)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    targeted = set()
    for key, a in adapters.items():
        if ".lora_A." not in key:
            continue
        b = adapters[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        targeted.add(name)
        # merged = W (untouched by training) + (alpha / r) B A, with B trained away from 0
        assert b.abs().max() > 0, name
        torch.testing.assert_close(merged[name], base[name] + 2.0 * b @ a, rtol=0, atol=1e-6)
    assert len(targeted) == 9
    # Every other base weight is bit-identical to the student the run started from.
    assert [k for k in base if k not in targeted and not torch.equal(base[k], merged[k])] == []
