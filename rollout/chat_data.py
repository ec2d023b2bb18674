"""Chat datasets: JSONL, Parquet, or a folder written by ``datasets``' ``save_to_disk``.

A row holds either ``messages`` (a list of ``{role, content}``: system prompt and earlier turns
kept, the last turn the user's) or a ``prompt`` string (one user turn), an optional ``answer``
(rows without one are prompt-only: trained on, never scored) and an optional ``id``. Column
names are mapped with ``task.fields`` (e.g. ``{messages = "conversation", answer = "solution"}``).

Files are streamed, never loaded whole: JSONL by byte offset in blocks of ``JSONL_BLOCK``
lines (decoded strictly as UTF-8, line by line), Parquet by row group (``pyarrow.parquet``),
and a ``save_to_disk`` folder by memory-mapping its Arrow files, as ``datasets.load_from_disk``
does (read with ``pyarrow``: ``datasets`` is not part of the default install). At construction
one pass validates every row (a bad row is an error naming the file and row, before any engine
starts), counts the rows and keeps only the held-out rows and a few representative ones; a
training batch then reads the blocks it needs.

Training order: every epoch a seeded permutation of the blocks, and within each block a seeded
permutation of its rows (a block shuffle: sequential reads, one block in memory).
"""

from __future__ import annotations

import heapq
import json
import random
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout import tasks
from rollout.prompting import Chat, prompt_chars

JSONL_BLOCK = 1024  # lines per JSONL block (and rows per block of an Arrow folder)
FIELDS = ("messages", "prompt", "answer", "id", "teacher")  # the task.fields keys
EVAL_FRACTION = 0.1  # held out from the training file when task.eval_path is not given
SAMPLE_ROWS = 8  # rows kept for the start-up rendering check, besides one per role pattern
MAX_ROLE_PATTERNS = 64  # distinct role sequences kept for that check


def _source_error(msg: str) -> Exception:
    from rollout.sources import SourceError  # sources imports this module

    return SourceError(msg)


# ----------------------------------------------------------------------------- readers


class _Reader:
    """A table read block by block: ``blocks`` (rows per block), ``rows(b)`` (the raw rows of
    block ``b``, each a dict, with its row label for messages)."""

    path: Path
    blocks: list[int]

    def rows(self, b: int) -> list[tuple[str, Any]]:
        raise NotImplementedError


class _JsonlReader(_Reader):
    def __init__(self, path: Path):
        self.path = path
        self._starts: list[tuple[int, int]] = []  # (byte offset, line number) of each block
        self.blocks = []
        n = 0
        with path.open("rb") as f:
            offset = 0
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    if n % JSONL_BLOCK == 0:
                        self._starts.append((offset, line_no))
                        self.blocks.append(0)
                    self.blocks[-1] += 1
                    n += 1
                offset += len(raw)

    def rows(self, b: int) -> list[tuple[str, Any]]:
        offset, line_no = self._starts[b]
        out: list[tuple[str, Any]] = []
        with self.path.open("rb") as f:
            f.seek(offset)
            while len(out) < self.blocks[b]:
                raw = f.readline()
                where = f"{self.path}:{line_no}"
                line_no += 1
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _source_error(
                        f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        f"save the file as UTF-8"
                    ) from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _source_error(
                        f"{where}: invalid JSON ({e.msg} at column {e.colno})"
                    ) from None
                out.append((where, record))
        return out


class _ParquetReader(_Reader):
    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
            raise _source_error(f"{path}: not a readable Parquet file ({e})") from None
        meta = self._file.metadata
        self.blocks = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._first = [sum(self.blocks[:i]) for i in range(len(self.blocks))]

    def rows(self, b: int) -> list[tuple[str, Any]]:
        records = self._file.read_row_group(b).to_pylist()
        return [(f"{self.path} row {self._first[b] + i}", r) for i, r in enumerate(records)]


class _ArrowFolderReader(_Reader):
    """A ``Dataset.save_to_disk`` folder: ``state.json`` lists its Arrow stream files."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = path
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise _source_error(
                f"{path}: a DatasetDict folder with splits {splits}; point task.path at one "
                f"split's folder (e.g. {path / (splits[0] if splits else 'train')}) and "
                f"task.eval_path at another"
            )
        state = path / "state.json"
        if not state.is_file():
            raise _source_error(
                f"{path}: a folder but not one written by datasets' save_to_disk (no state.json)"
            )
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        tables = []
        for file in files:
            try:
                tables.append(pa.ipc.open_stream(pa.memory_map(str(file))).read_all())
            except Exception as e:
                raise _source_error(f"{file}: not a readable Arrow file ({e})") from None
        self._table = pa.concat_tables(tables) if tables else None  # memory-mapped, not read
        total = self._table.num_rows if self._table is not None else 0
        self.blocks = [min(JSONL_BLOCK, total - s) for s in range(0, total, JSONL_BLOCK)]

    def rows(self, b: int) -> list[tuple[str, Any]]:
        start = b * JSONL_BLOCK
        records = self._table.slice(start, self.blocks[b]).to_pylist()
        return [(f"{self.path} row {start + i}", r) for i, r in enumerate(records)]


def open_table(path: str | Path, key: str) -> _Reader:
    """The reader for ``path`` (``key``: the config key naming it, for errors)."""
    path = Path(path)
    if path.is_dir():
        reader: _Reader = _ArrowFolderReader(path)
    elif not path.is_file():
        raise _source_error(f"{key}: {path}: no such file or folder")
    elif path.suffix == ".parquet":
        reader = _ParquetReader(path)
    elif path.suffix in (".jsonl", ".json"):
        reader = _JsonlReader(path)
    else:
        raise _source_error(
            f"{key}: {path}: expected a .jsonl or .parquet file or a datasets save_to_disk folder"
        )
    if not sum(reader.blocks):
        raise _source_error(f"{key}: {path}: no rows (an empty split)")
    return reader


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class ChatRow:
    """A row as the source keeps it: its index in the file, the chat, the answer ("" when
    prompt-only), its id and the name of the teacher that scores it ("": the first)."""

    index: int
    chat: Chat
    answer: str
    row_id: str
    teacher: str = ""


def parse_row(
    where: str,
    index: int,
    record: Any,
    fields: Mapping[str, str],
    template_kwargs: Mapping[str, Any] | None,
    stem: str,
) -> ChatRow:
    """Validate one raw row; SourceError naming ``where`` (file and row) otherwise."""
    if not isinstance(record, dict):
        raise _source_error(f"{where}: expected an object, got {type(record).__name__}")
    col = {k: fields.get(k, k) for k in FIELDS}
    messages, prompt = record.get(col["messages"]), record.get(col["prompt"])
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise _source_error(f"{where}: '{col['messages']}' must be a non-empty list of turns")
        turns = []
        for i, m in enumerate(messages):
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise _source_error(
                    f"{where}: turn {i} of '{col['messages']}' is not {{role: str, content: str}}: {m!r}"
                )
            turns.append((m["role"], m["content"]))
        if turns[-1][0] != "user":
            raise _source_error(
                f"{where}: the last turn is the {turns[-1][0]!r}'s; a prompt must end with the "
                f"user's turn (the student answers it)"
            )
        if not turns[-1][1].strip():
            raise _source_error(f"{where}: the last user turn is empty")
    elif isinstance(prompt, str) and prompt.strip():
        turns = [("user", prompt)]
    else:
        names = ", ".join(sorted(str(k) for k, v in record.items() if v is not None)) or "none"
        raise _source_error(
            f"{where}: row has neither '{col['messages']}' (a list of turns) nor a non-empty "
            f"'{col['prompt']}' string (its fields: {names}); map your column names with "
            f'task.fields, e.g. {{messages = "conversation", prompt = "question"}}'
        )
    answer = record.get(col["answer"])
    if answer is None:
        answer = ""
    elif isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise _source_error(
            f"{where}: '{col['answer']}' must be a string or a number, got {type(answer).__name__}"
        )
    row_id = record.get(col["id"])
    row_id = str(row_id) if row_id is not None else f"{stem}:{index}"
    teacher = record.get(col["teacher"]) or ""
    if not isinstance(teacher, str):
        raise _source_error(f"{where}: '{col['teacher']}' must be a teacher's name (a string)")
    chat = Chat.of(turns, dict(template_kwargs or {}))
    return ChatRow(index, chat, str(answer).strip(), row_id, teacher)


def _held_out_key(seed: int, index: int) -> int:
    return zlib.crc32(f"chat-eval:{seed}:{index}".encode())


# ----------------------------------------------------------------------------- the source


class ChatSource:
    """Rows of a chat dataset (module docstring), reshuffled (seeded) every epoch.

    The evaluation set is ``eval_path`` when given (every usable row); otherwise a seeded
    ``EVAL_FRACTION`` of the training file (at most ``tasks.EVAL_SIZE`` rows) held out from
    training. ``eval_set()`` holds the held-out rows that have an answer (scored by the
    verifier); ``eval_prompts()`` all held-out rows. ``problem(row)`` builds the ``Problem``;
    ``sample()`` gives prompts for the start-up rendering check: the first rows and the first
    row of each distinct sequence of roles.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        max_prompt_chars: int,
        make_problem,
        eval_path: str | Path | None = None,
        fields: Mapping[str, str] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        self.path, self.seed, self.max_prompt_chars = Path(path), seed, max_prompt_chars
        self.eval_path = Path(eval_path) if eval_path else None
        self.fields = dict(fields or {})
        unknown = set(self.fields) - set(FIELDS)
        if unknown:
            raise _source_error(
                f"task.fields: unknown keys {sorted(unknown)}; expected some of {', '.join(FIELDS)}"
            )
        self.template_kwargs = dict(template_kwargs or {})
        self._problem = make_problem
        self.skipped = 0  # training rows longer than max_prompt_chars, drawn so far
        self.counts: dict[str, int] = {}  # what the validation pass found (opdplus data)
        self._reader = open_table(self.path, "task.path")
        self._samples: list[ChatRow] = []
        self._teachers: dict[str, str] = {}  # each teacher name the rows give → its first row
        patterns: set[tuple[str, ...]] = set()
        held: list[tuple[int, int, ChatRow]] = []  # max-heap by key of the lowest keys
        n_usable = n_long = n_prompt_only = 0
        for row in self._scan(self._reader):
            if prompt_chars(row.chat) > max_prompt_chars:
                n_long += 1
                continue
            n_usable += 1
            n_prompt_only += row.answer == ""
            self._teachers.setdefault(row.teacher, f"{self.path} row {row.index}")
            roles = tuple(t.role for t in row.chat.turns)
            if len(self._samples) < SAMPLE_ROWS or (
                roles not in patterns and len(patterns) < MAX_ROLE_PATTERNS
            ):
                self._samples.append(row)
            patterns.add(roles)
            if self.eval_path is None:
                item = (-_held_out_key(seed, row.index), row.index, row)
                if len(held) < tasks.EVAL_SIZE:
                    heapq.heappush(held, item)
                elif item > held[0]:
                    heapq.heapreplace(held, item)
        self.counts = {"rows": sum(self._reader.blocks), "too_long": n_long}
        if self.eval_path is None:
            n_eval = min(tasks.EVAL_SIZE, int(n_usable * EVAL_FRACTION))
            chosen = sorted(held, reverse=True)[:n_eval]  # the n_eval lowest keys
            self._eval = sorted((r for _, _, r in chosen), key=lambda r: r.index)
            self._held = {r.index for r in self._eval}
        else:
            self._held = set()
            reader = open_table(self.eval_path, "task.eval_path")
            self._eval = [r for r in self._scan(reader) if prompt_chars(r.chat) <= max_prompt_chars]
            if not self._eval:
                raise _source_error(
                    f"task.eval_path: {self.eval_path}: no usable rows (all longer than "
                    f"task.max_prompt_chars = {max_prompt_chars})"
                )
        self._n_train = n_usable - len(self._held)
        self.counts |= {
            "train": self._n_train,
            "eval": len(self._eval),
            "prompt_only": n_prompt_only,
            "role_patterns": len(patterns),
        }
        if self._n_train <= 0:
            why = (
                f" ({n_long} longer than task.max_prompt_chars = {max_prompt_chars})"
                if n_long
                else ""
            )
            raise _source_error(f"task.path: {self.path}: no training rows left{why}")
        self._position = 0
        self._epoch = -1
        self._cum: list[int] = []  # prefix sums of the epoch's block sizes, in its order
        self._order: list[int] = []
        self._cached: tuple[int, list[ChatRow]] | None = None

    def _scan(self, reader: _Reader) -> Iterator[ChatRow]:
        index = 0
        stem = reader.path.stem
        for b in range(len(reader.blocks)):
            for where, record in reader.rows(b):
                yield parse_row(where, index, record, self.fields, self.template_kwargs, stem)
                index += 1

    # ------------------------------------------------------------------ training order

    def _epoch_order(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        self._order = list(range(len(self._reader.blocks)))
        random.Random(f"chat:{self.seed}:{epoch}").shuffle(self._order)
        self._cum, total = [], 0
        for b in self._order:
            total += self._reader.blocks[b]
            self._cum.append(total)
        self._epoch = epoch

    def _block_rows(self, b: int, epoch: int) -> list[ChatRow]:
        if self._cached is None or self._cached[0] != (epoch, b):
            first = sum(self._reader.blocks[:b])
            stem = self._reader.path.stem
            rows = [
                parse_row(where, first + i, rec, self.fields, self.template_kwargs, stem)
                for i, (where, rec) in enumerate(self._reader.rows(b))
            ]
            random.Random(f"chat:{self.seed}:{epoch}:{b}").shuffle(rows)
            self._cached = ((epoch, b), rows)
        return self._cached[1]

    def _row_at(self, position: int) -> ChatRow:
        import bisect

        epoch, offset = divmod(position, self.counts["rows"])
        self._epoch_order(epoch)
        k = bisect.bisect_right(self._cum, offset)
        start = self._cum[k - 1] if k else 0
        return self._block_rows(self._order[k], epoch)[offset - start]

    def next_batch(self, n: int) -> list:
        out = []
        while len(out) < n:
            row = self._row_at(self._position)
            self._position += 1
            if row.index in self._held:
                continue
            if prompt_chars(row.chat) > self.max_prompt_chars:
                self.skipped += 1
                continue
            out.append(self._problem(row))
        return out

    def state(self) -> dict[str, Any]:
        return {
            "kind": "chat",
            "path": str(self.path),
            "seed": self.seed,
            "position": self._position,
            "skipped": self.skipped,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        from rollout.sources import _check_state

        self._position = _check_state(
            state, {"kind": "chat", "path": str(self.path), "seed": self.seed}
        )
        self.skipped = int(state.get("skipped", 0))

    def eval_set(self) -> list:
        """Held-out rows with an answer, for the verifier's accuracy."""
        return [self._problem(r) for r in self._eval if r.answer != ""]

    def eval_prompts(self) -> list:
        """Every held-out row, prompt-only ones included."""
        return [self._problem(r) for r in self._eval]

    def teachers(self) -> dict[str, str]:
        """Each teacher name its rows give (their ``teacher`` field) → the first such row."""
        where = {
            r.teacher: f"{self.eval_path or self.path} row {r.index}" for r in self._eval[::-1]
        }
        return where | self._teachers

    def sample(self) -> list:
        """Problems for the start-up rendering check (class docstring)."""
        return [self._problem(r) for r in self._samples + self._eval[:SAMPLE_ROWS]]
