"""Resolve the config's model names ('toy', 'toy_tool', 'smollm2' or a folder) to model folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.common import cache_dir


@dataclass(frozen=True)
class ModelPair:
    teacher: Path
    student: Path


def resolve_pair(teacher: str, student: str, *, progress: bool = True) -> ModelPair:
    """Build (or reuse from the cache) the built-in pairs; check user folders exist and share
    one tokenizer (`models.checks.check_pair`: the one place a pair is checked; output layers
    padded to different sizes pass)."""
    built: dict[str, object] = {}

    def resolve(name: str, role: str) -> Path:
        if name == "toy":
            if "toy" not in built:
                from models.toy import build_toy_models

                built["toy"] = build_toy_models(cache_dir() / "models" / "toy", progress=progress)
            return Path(getattr(built["toy"], f"{role}_dir"))
        if name == "toy_tool":  # the calculator tool pair (models/toy_tool.py)
            if "toy_tool" not in built:
                from models.toy_tool import build_toy_tool_models

                built["toy_tool"] = build_toy_tool_models(cache_dir() / "models" / "toy_tool")
            return Path(getattr(built["toy_tool"], f"{role}_dir"))
        if name == "smollm2":
            if "smollm2" not in built:
                from models.smollm2 import build_smollm_pair

                built["smollm2"] = build_smollm_pair(cache_dir() / "models" / "smollm2")
            return Path(getattr(built["smollm2"], f"{role}_dir"))
        return Path(name).expanduser().resolve()

    pair = ModelPair(teacher=resolve(teacher, "teacher"), student=resolve(student, "student"))
    from models.checks import check_pair

    check_pair(pair.student, pair.teacher)
    return pair
