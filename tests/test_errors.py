"""User errors reach the CLI as a clean message, also when raised inside a Ray actor.

Every subclass of ``services.errors.UserError`` is covered, found two independent ways: by
reading every module's source (a class whose bases name UserError or one of its subclasses)
and by importing every module and walking ``UserError.__subclasses__()``. The two must agree,
so a new user error is picked up by the per-class checks without editing this file, and one the
discovery misses fails ``test_discovery_finds_every_user_error``.
"""

from __future__ import annotations

import ast
import gc
import importlib
import pkgutil
from pathlib import Path

import pytest

from services.cli import _COMMANDS, _is_user_error, main
from services.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
# Importing these loads vLLM or DeepSpeed (tens of seconds on 2 cores): the fast discovery
# reads their source only; the slow test imports them too.
HEAVY_MODULES = {"rollout.engine", "rollout.weight_transfer", "learner.engine"}


def user_errors_in_source(sources: dict[str, str]) -> set[str]:
    """``module.Class`` of every class in ``sources`` (module name → text) deriving from
    UserError, directly or through another such class (bases matched by their last name)."""
    classes = []  # (qualified name, short name, base short names)
    for module, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                bases = {
                    b.id if isinstance(b, ast.Name) else b.attr
                    for b in node.bases
                    if isinstance(b, ast.Name | ast.Attribute)
                }
                classes.append((f"{module}.{node.name}", node.name, bases))
    names, found = {"UserError"}, set()
    grew = True
    while grew:
        grew = False
        for qual, short, bases in classes:
            if qual not in found and bases & names:
                found.add(qual)
                names.add(short)
                grew = True
    return found


def _project_sources() -> dict[str, str]:
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts): path.read_text()
        for pkg in PACKAGES
        for path in sorted((REPO / pkg).rglob("*.py"))
    }


def user_errors_loaded(skip: set[str] = frozenset()) -> set[str]:
    """Import every project module (but ``skip``), then walk UserError's subclasses."""
    for pkg in PACKAGES:
        root = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(root.__path__, f"{pkg}."):
            if info.name not in skip:
                importlib.import_module(info.name)
    found, todo = set(), [UserError]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            # Ray builds wrapper subclasses of an error raised in an actor: not ours.
            if sub.__module__.split(".")[0] in PACKAGES:
                found.add(f"{sub.__module__}.{sub.__qualname__}")
    return found


SOURCE_ERRORS = sorted(user_errors_in_source(_project_sources()))


def _load(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_discovery_finds_every_user_error():
    in_heavy = {q for q in SOURCE_ERRORS if q.rpartition(".")[0] in HEAVY_MODULES}
    loaded = user_errors_loaded(skip=HEAVY_MODULES)
    assert loaded | in_heavy == set(SOURCE_ERRORS)
    # Those named in CONTRIBUTING.md and the earlier hand list are among them.
    assert {
        "services.config.ConfigError",
        "rollout.sources.SourceError",
        "models.checks.ModelPairError",
        "rollout.records.RecordError",
        "services.driver.RunError",
        "services.errors.EngineError",
    } <= set(SOURCE_ERRORS)


@pytest.mark.slow
def test_discovery_with_every_module_imported():
    """The heavy modules too (vLLM, DeepSpeed): nothing defines a user error the scan missed."""
    assert user_errors_loaded() == set(SOURCE_ERRORS)


def test_the_discovery_can_fail():
    """Planted: errors the source scan must find (two levels below UserError, through a module
    alias), and one made at run time that only the import walk sees: the mismatch that
    ``test_discovery_finds_every_user_error`` reports."""
    planted = {
        "services.fake": "from services.config import ConfigError\n"
        "class NewError(ConfigError):\n    pass\n"
        "class Deeper(NewError):\n    pass\n"
        "class Unrelated(ValueError):\n    pass\n",
        "rollout.fake": "import services.errors as e\nclass Other(e.UserError):\n    pass\n",
    }
    found = user_errors_in_source(_project_sources() | planted)
    assert found - set(SOURCE_ERRORS) == {
        "services.fake.NewError",
        "services.fake.Deeper",
        "rollout.fake.Other",
    }
    sneaky = type("Sneaky", (UserError,), {"__module__": "services.fake"})
    try:
        loaded = user_errors_loaded(skip=HEAVY_MODULES)
        assert "services.fake.Sneaky" in loaded and "services.fake.Sneaky" not in SOURCE_ERRORS
    finally:
        del sneaky
        gc.collect()
    assert "services.fake.Sneaky" not in user_errors_loaded(skip=HEAVY_MODULES)


@pytest.mark.parametrize("qualified", SOURCE_ERRORS)
def test_every_user_error_prints_its_message_without_traceback(qualified, monkeypatch, capsys):
    cls = _load(qualified)
    assert issubclass(cls, UserError)
    message = f"{cls.__name__}: what went wrong and what to do"

    def command(args):
        raise cls(message)

    monkeypatch.setitem(_COMMANDS, "config", command)
    assert main(["config"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"opdplus: error: {message}\n"
    assert "Traceback" not in captured.err + captured.out


def test_a_bug_keeps_its_traceback(monkeypatch):
    assert not _is_user_error(RuntimeError("a bug keeps its traceback"))

    def command(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(_COMMANDS, "config", command)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["config"])


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
    class Faulty:  # defined here: pickled by value, the worker needs no test module
        def fail(self, qualified: str, message: str):
            import importlib

            module, _, name = qualified.rpartition(".")
            raise getattr(importlib.import_module(module), name)(message)

    actor = Faulty.remote()
    try:
        for qualified in SOURCE_ERRORS:
            cls = _load(qualified)
            with pytest.raises(cls) as info:
                ray.get(actor.fail.remote(qualified, "rollout.kv_cache_mb: must be >= 16"))
            # Ray wraps the error in a class that subclasses the original: isinstance sees it.
            assert type(info.value) is not cls, qualified
            assert _is_user_error(info.value), qualified
            assert "kv_cache_mb" in str(info.value), qualified
    finally:
        ray.kill(actor)
