"""Start-up checks on a student/teacher pair, with errors that say what to fix.

OPD compares log-probs of the *same token ids* under two models, so the two tokenizers
must map every token to the same id; a mismatch would silently train on nonsense.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.errors import UserError


class ModelPairError(UserError, ValueError):
    """The student and teacher cannot be distilled together as given."""


def _vocab(model_dir: Path) -> dict[str, int]:
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelPairError(
            f"{model_dir}: no tokenizer.json (expected a Hugging Face model folder)"
        )
    data = json.loads(tok_file.read_text())
    vocab = dict(data.get("model", {}).get("vocab", {}))
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    if not vocab:
        raise ModelPairError(f"{tok_file}: tokenizer has an empty vocabulary")
    return vocab


def check_model_dir(path: str | Path, role: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelPairError(f"{role} model folder {path} does not exist")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelPairError(f"{role} model folder {path} has no {name}")
    if not any(path.glob("*.safetensors")):
        raise ModelPairError(f"{role} model folder {path} has no *.safetensors weights")
    return path


def check_pair(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """Raise ModelPairError unless both folders exist and share one vocabulary."""
    s = check_model_dir(student_dir, "student")
    t = check_model_dir(teacher_dir, "teacher")
    sv, tv = _vocab(s), _vocab(t)
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:5]
        raise ModelPairError(
            f"student ({s}) and teacher ({t}) tokenizers differ: OPD needs identical token ids. "
            f"only in student: {only_s}; only in teacher: {only_t}; different ids: {moved}"
        )
    s_cfg = json.loads((s / "config.json").read_text())
    t_cfg = json.loads((t / "config.json").read_text())
    if s_cfg.get("vocab_size") != t_cfg.get("vocab_size"):
        raise ModelPairError(
            f"vocab_size differs: student {s_cfg.get('vocab_size')} ({s}), "
            f"teacher {t_cfg.get('vocab_size')} ({t})"
        )
