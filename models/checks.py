"""Start-up checks on a student/teacher pair, with errors that say what to fix.

OPD compares log-probs of the *same token ids* under two models, so the two tokenizers
must map every token to the same id; a mismatch would silently train on nonsense. The output
layers may differ in size: rows beyond the tokenizer's length are padding (Qwen's 151936 and
152064 rows for 151665 tokens), sliced off on every path (docs/math.md, "Padding rows").
"""

from __future__ import annotations

import json
from pathlib import Path

from services.errors import UserError


class ModelPairError(UserError, ValueError):
    """The student and teacher cannot be distilled together as given."""


def _vocab(model_dir: Path) -> dict[str, int]:
    """token text → id over the tokenizer.json's model vocabulary and its added tokens."""
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelPairError(
            f"{model_dir}: no tokenizer.json (expected a Hugging Face model folder)"
        )
    data = json.loads(tok_file.read_text())
    entries = data.get("model", {}).get("vocab", {})
    if isinstance(entries, list):  # Unigram: [[piece, score], ...], the id is the position
        vocab = {piece: i for i, (piece, _score) in enumerate(entries)}
    else:
        vocab = dict(entries)
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    if not vocab:
        raise ModelPairError(f"{tok_file}: tokenizer has an empty vocabulary")
    return vocab


def tokenizer_length(model_dir: str | Path) -> int:
    """The number of real token ids of a model folder's tokenizer: its largest id + 1.

    The log-softmaxes of the samplers, the teacher and the learner run over the first
    `tokenizer_length` rows of the output layer; any further rows are padding (docs/math.md).
    """
    return max(_vocab(Path(model_dir)).values()) + 1


def _output_rows(model_dir: Path) -> int | None:
    """config.json's vocab_size (the output layer's rows), also under text_config; None if absent."""
    cfg = json.loads((model_dir / "config.json").read_text())
    rows = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    return int(rows) if rows is not None else None


def _first_difference(s: dict[str, int], t: dict[str, int]) -> tuple[int, str, str]:
    """(id, student token, teacher token) at the smallest id whose text differs (s != t)."""
    s_ids, t_ids = _texts_by_id(s), _texts_by_id(t)
    first = min(i for i in s_ids.keys() | t_ids.keys() if s_ids.get(i) != t_ids.get(i))

    def show(texts: dict[int, list[str]]) -> str:
        if first not in texts:
            return f"no token (its tokenizer has {max(texts) + 1} ids)"
        return " / ".join(repr(x) for x in texts[first])

    return first, show(s_ids), show(t_ids)


def _texts_by_id(vocab: dict[str, int]) -> dict[int, list[str]]:
    by_id: dict[int, list[str]] = {}
    for text, i in vocab.items():
        by_id.setdefault(i, []).append(text)
    return {i: sorted(texts) for i, texts in by_id.items()}


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


def check_pair(student_dir: str | Path, teacher_dir: str | Path) -> int:
    """Raise ModelPairError unless both folders exist and share one tokenizer; return its
    length (`tokenizer_length`).

    Output layers of different sizes pass when both cover the tokenizer: the extra rows are
    padding (docs/math.md, "Padding rows"). Tokenizers that differ are refused, naming the
    first differing token id and its text on each side.
    """
    s = check_model_dir(student_dir, "student")
    t = check_model_dir(teacher_dir, "teacher")
    sv, tv = _vocab(s), _vocab(t)
    if sv != tv:
        first, s_text, t_text = _first_difference(sv, tv)
        raise ModelPairError(
            f"student ({s}) and teacher ({t}) tokenizers differ at token id {first}: student "
            f"{s_text}, teacher {t_text}. OPD compares log-probs of the same token ids, so both "
            "models need one tokenizer (output layers padded to different sizes are fine)"
        )
    length = max(sv.values()) + 1
    for role, folder in (("student", s), ("teacher", t)):
        rows = _output_rows(folder)
        if rows is not None and rows < length:
            raise ModelPairError(
                f"{role} {folder / 'config.json'}: vocab_size {rows} is smaller than its "
                f"tokenizer's {length} token ids; the output layer must have a row per token"
            )
    return length
