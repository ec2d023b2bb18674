"""Config loading, validation messages, shipped configs, and the CLI's error behaviour."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from services.config import Config, ConfigError, describe, load_config, to_toml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "deploy" / "configs").glob("*.toml"))


def test_divergences_come_from_the_maths_registry(tmp_path):
    """A name added to the registry is a valid distill.divergence with no other edit."""
    from learner import divergences

    doc = dict((k, d) for k, _, d in describe())["distill.divergence"]
    assert all(name in doc for name in divergences.divergence_names())
    divergences.DIVERGENCES["test_only"] = divergences.DIVERGENCES["js"]
    try:
        assert load_config(None, ["distill.divergence=test_only"]).distill.divergence == "test_only"
    finally:
        del divergences.DIVERGENCES["test_only"]
    with pytest.raises(ConfigError, match="unknown divergence 'test_only'"):
        load_config(None, ["distill.divergence=test_only"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the resolved TOML (written to every run directory) round-trips to the same config
    again = load_config_from_text(to_toml(cfg))
    assert again == cfg


def load_config_from_text(text: str) -> Config:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    return load_config(f.name)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.toml", "toy.toml", "smollm2.toml", "gpu_cluster.toml"} <= names


def test_overrides_are_typed():
    cfg = load_config(
        None,
        ["distill.divergence=js", "learner.lr=0.01", "rollout.max_staleness=0", "log.wandb=true"],
    )
    assert cfg.distill.divergence == "js"
    assert cfg.learner.lr == 0.01
    assert cfg.rollout.max_staleness == 0
    assert cfg.log.wandb is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.divergense=js", "did you mean 'divergence'"),
        ("learnr.lr=0.1", "did you mean 'learner'"),
        ("learner.lr=fast", "learner.lr: expected a number"),
        ("rollout.num_samplers=1.5", "rollout.num_samplers: expected an integer"),
        ("distill.divergence=kl", "unknown divergence 'kl'; valid: reverse_kl, forward_kl"),
        ("distill.estimator=ppo", "'ppo' is not one of 'opd_plus', 'opd'"),
        ("distill.discount=1.5", "distill.discount: must be in [0, 1]"),
        ("learner.num_ranks=3", "learner.num_ranks: must divide the step's 64 samples"),
        ("rollout.channel_capacity=8", "must hold at least one step's samples"),
        ("ray.num_cpus=1", "the actors reserve 2 CPUs"),
        ("learner.sync_every=3", "rollout.max_staleness"),
        ("learner.threads=-1", "learner.threads: must be >= 0"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    sets = [override]
    if override.startswith("ray.num_cpus"):
        sets.append("learner.cpus_per_rank=1.0")
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    assert expected in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


HEAVY = ("torch", "ray", "vllm", "deepspeed", "transformers")


def _subcommands() -> list[str]:
    import argparse

    from services.cli import _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def _imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime``'s report (``... | cumulative | name``)."""
    rows = [line.split("|") for line in stderr.splitlines() if line.startswith("import time:")]
    return {row[2].strip() for row in rows if len(row) == 3} - {"imported package"}


def test_importtime_parser_sees_a_heavy_import():
    """The probe below can fail: a report naming a heavy module is seen."""
    report = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       120 |        120 |   argparse\n"
        "import time:      9000 |     900000 |     torch._C\n"
    )
    loaded = _imported_modules(report)
    assert loaded == {"argparse", "torch._C"}
    assert [m for m in loaded if m.split(".")[0] in HEAVY] == ["torch._C"]


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_cli_help_imports_no_heavy_library(command):
    """``--help`` answers without importing torch, Ray, vLLM, DeepSpeed or transformers (style
    rule 13): checked on what the interpreter actually imported, not on a wall clock."""
    args = ["--help"] if command is None else [command, "--help"]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "services.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: opdplus")
    if command is None:
        assert all(name in out.stdout for name in _subcommands())
    loaded = _imported_modules(out.stderr)
    assert {"argparse", "services"} <= loaded  # the report was parsed
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"opdplus {' '.join(args)} imported {heavy}"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "distill.divergense=js"], "did you mean 'divergence'"),
        (["--set", "distill.divergence=kl"], "valid: reverse_kl"),
        (["--set", "learner.lr=fast"], "expected a number"),
        (["--set", "ray.num_cpus=1"], "inconsistent resources"),
    ],
)
def test_cli_config_errors_exit_nonzero_without_traceback(args, expected):
    out = _cli("train", "--config", "deploy/configs/toy.toml", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("opdplus: error:")
    assert expected in out.stderr


def _schema(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key of the config tree → its dataclass field, walked from the dataclasses."""
    hints = typing.get_type_hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _schema(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _described(text: str) -> dict[str, tuple[str, str]]:
    """``opdplus config --describe`` output → key: (default as TOML, doc)."""
    rows = {}
    for line in text.splitlines():
        key, _, rest = line.partition(" = ")
        default, _, doc = rest.partition("  # ")
        rows[key.strip()] = (default.strip(), doc.strip())
    return rows


def describe_problems(schema: dict[str, dataclasses.Field], text: str) -> list[str]:
    """What ``--describe``'s output ``text`` gets wrong about ``schema``: a key missing, listed
    twice or unknown, a key without a doc, a default that is not the field's."""
    rows = _described(text)
    problems = []
    keys = [line.partition(" = ")[0].strip() for line in text.splitlines()]
    problems += [
        f"{k}: listed {keys.count(k)} times" for k in sorted(set(keys)) if keys.count(k) > 1
    ]
    problems += [f"{k}: not a config key" for k in rows if k not in schema]
    for key, f in schema.items():
        if not f.metadata.get("doc", "").strip():
            problems.append(f"{key}: no doc in services/config.py")
        if key not in rows:
            problems.append(f"{key}: not described")
            continue
        default, doc = rows[key]
        if not doc:
            problems.append(f"{key}: described without a doc")
        if tomllib.loads(f"v = {default}")["v"] != _default(f):
            problems.append(f"{key}: described default {default} is not {_default(f)!r}")
    return problems


@pytest.fixture(scope="module")
def described() -> str:
    out = _cli("config", "--describe")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_config_describe_lists_every_key(described):
    schema = _schema()
    assert len(schema) > 50 and {"distill.divergence", "learner.zero_stage"} <= set(schema)
    assert describe_problems(schema, described) == []
    # The function behind it agrees with what was printed.
    assert [k for k, _, _ in describe()] == list(schema)


@dataclasses.dataclass(frozen=True)
class _Undocumented:
    knob: int = dataclasses.field(default=3)  # no doc: a planted schema error


@dataclasses.dataclass(frozen=True)
class _PlantedTree:
    extra: _Undocumented = dataclasses.field(default_factory=_Undocumented)


def test_describe_check_catches_planted_errors(described):
    schema = _schema()
    lines = described.splitlines()
    dropped = "\n".join(ln for ln in lines if not ln.startswith("rollout.max_staleness "))
    assert describe_problems(schema, dropped) == ["rollout.max_staleness: not described"]
    undocumented = "\n".join(
        ln.partition("  # ")[0] if ln.startswith("run.seed ") else ln for ln in lines
    )
    assert describe_problems(schema, undocumented) == ["run.seed: described without a doc"]
    wrong = "\n".join(
        ln.replace("= 1 ", "= 7 ", 1) if ln.startswith("learner.zero_stage ") else ln
        for ln in lines
    )
    assert describe_problems(schema, wrong) == ["learner.zero_stage: described default 7 is not 1"]
    twice = "\n".join([*lines, lines[0]])
    assert describe_problems(schema, twice) == ["run.name: listed 2 times"]

    assert describe_problems(_schema(_PlantedTree), "") == [
        "extra.knob: no doc in services/config.py",
        "extra.knob: not described",
    ]


# ----------------------------------------------------------------------------- ranges


def _numeric_keys() -> list[str]:
    """Every int or float key of the schema (bools are not numbers here)."""
    from services.config import schema_hints

    return [k for k, h in schema_hints().items() if h in (int, float)]


def _outside(spec: str, is_int: bool) -> list:
    """Values outside a RANGES spec (and, for floats, NaN and inf)."""
    if spec == "finite":
        return [float("nan"), float("inf")]
    if spec.startswith(">="):
        out = [float(spec[2:]) - 1]
    elif spec.startswith(">"):
        out = [float(spec[1:])]
    else:
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        out = [lo if spec[0] == "(" else lo - 1, hi if spec[-1] == ")" else hi + 1]
    out = [int(v) for v in out] if is_int else out + [float("nan"), float("inf")]
    return out


def test_every_numeric_key_has_a_range():
    from services.config import RANGES

    keys = _numeric_keys()
    assert len(keys) > 40 and "learner.lr" in keys and "rollout.max_model_len" in keys
    assert [k for k in keys if k not in RANGES] == []  # (a misspelt entry leaves its key out)


@pytest.mark.parametrize("key", _numeric_keys())
def test_an_out_of_range_value_is_refused_naming_the_key(key):
    from services.config import RANGES, validate

    *path, name = key.split(".")
    is_int = typing.get_type_hints(_section_class(key))[name] is int
    cfg = Config()
    validate(cfg)  # the defaults are in range
    for bad in _outside(RANGES[key], is_int):
        planted = _replaced(cfg, [*path, name], bad)
        with pytest.raises(ConfigError, match=rf": {key}: must be"):
            validate(planted)


def _section_class(key: str) -> type:
    """The dataclass holding ``key``'s last part (a section, or a table such as learner.lora)."""
    cls = Config
    for part in key.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls


def _replaced(node, path: list[str], value):
    """``node`` with the key at ``path`` (nested dataclasses) set to ``value``."""
    head, *rest = path
    inner = _replaced(getattr(node, head), rest, value) if rest else value
    return dataclasses.replace(node, **{head: inner})


def test_the_range_check_can_fail():
    """A planted key with no range is what the schema test reports."""
    from services.config import RANGES, in_range

    assert "rollout.new_knob" not in RANGES
    assert not in_range(float("nan"), ">= 0") and not in_range(float("inf"), "> 0")
    assert in_range(0.5, "(0, 1)") and not in_range(1.0, "(0, 1)") and in_range(1.0, "[0, 1]")


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", "/abs", "a\\b"])
def test_run_name_cannot_leave_the_output_folder(name):
    from services.config import validate

    cfg = Config()
    with pytest.raises(ConfigError, match="run.name: must be a plain folder name"):
        validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name)))
    validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="a..b-1")))
