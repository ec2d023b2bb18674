"""User errors reach the CLI as a clean message, also when raised inside a Ray actor."""

from __future__ import annotations

import pytest

from services.cli import _is_user_error, main
from services.config import ConfigError
from services.errors import EngineError, UserError


def test_every_user_facing_error_derives_from_the_base():
    from models.checks import ModelPairError
    from rollout.records import RecordError
    from rollout.sources import SourceError
    from services.driver import RunError

    for cls in (ConfigError, SourceError, ModelPairError, RecordError, RunError, EngineError):
        assert issubclass(cls, UserError), cls
    assert not _is_user_error(RuntimeError("a bug keeps its traceback"))


def test_config_error_prints_message_not_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[distill]\ndivergense = 'js'\n")
    assert main(["config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "divergense" in err and "did you mean 'divergence'" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_user_error_raised_inside_an_actor_is_recognised(ray_local):
    ray = ray_local

    @ray.remote
    class Faulty:
        def fail(self):
            raise ConfigError("rollout.kv_cache_mb: must be >= 16")

    actor = Faulty.remote()
    with pytest.raises(ConfigError) as info:
        ray.get(actor.fail.remote())
    # Ray wraps the error in a class that subclasses the original: isinstance sees through it.
    assert type(info.value) is not ConfigError
    assert _is_user_error(info.value)
    assert "kv_cache_mb" in str(info.value)
    ray.kill(actor)
