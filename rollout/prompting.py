"""Prompt → token ids: the one place that decides how a prompt is presented to a model.

A prompt is either a plain string (one user turn: the arithmetic, JSONL and reasoning-gym
sources) or a ``Chat``: a system prompt and earlier turns kept, ending with the user's turn, plus
the ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``) it is rendered with. Both are
rendered by ``encode_prompt`` for every model (sampler, scorer, evaluation, the ledger's replay),
so the kwargs travel with the prompt and can never be applied to one model and not the other.

Tokenizers with a chat template render through it (``add_generation_prompt=True``). Tokenizers
without one (base models, the toy pair) get the plain fallback ``PLAIN_ROLES``: ``[BOS]``, then
each earlier turn as ``"{role}: {content}\\n"``, then the last (user) turn's text as is, so a
one-turn prompt is ``[BOS] + text`` exactly as before chats existed (the toy pair's cached weights
and tokenizer files are unchanged). ``check_same_rendering`` proves at a run's start that the
teacher and the student see identical token ids.

In an episode, an environment's answer to the student's turn is rendered here too
(``encode_environment_answer``): through the chat template's ``tool`` role, or for a plain
tokenizer as ``TOOL_ANSWER_OPEN + text + TOOL_ANSWER_CLOSE``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from services.errors import UserError

PLAIN_ROLES = ("system", "user", "assistant")  # what the plain fallback renders
# A tool's answer in the plain rendering (a tokenizer without a chat template): the answer's
# text between these two strings, right after the student's call, e.g. `<calc>37*58</calc>`
# then `[2146]`. The toy tool pair (models/) is trained on exactly this format.
TOOL_ANSWER_OPEN = "["
TOOL_ANSWER_CLOSE = "]"
CONTEXT_TOKENS = 12  # tokens shown before the first difference in a mismatch message


class PromptError(UserError, ValueError):
    """A prompt cannot be rendered for a model (its template rejects a role or the layout)."""


class RenderingMismatch(PromptError):
    """The teacher and the student would be given different token ids for the same prompt."""


class Turn(NamedTuple):
    role: str
    content: str


class Chat(NamedTuple):
    """A conversation ending with the user's turn, and the template kwargs it is rendered with
    (sorted JSON, so a ``Chat`` hashes, pickles and compares like the plain values it holds)."""

    turns: tuple[Turn, ...]
    template_kwargs: str = ""

    @classmethod
    def of(cls, turns: Iterable[tuple[str, str]], template_kwargs: dict | None = None) -> Chat:
        kwargs = json.dumps(template_kwargs, sort_keys=True) if template_kwargs else ""
        return cls(tuple(Turn(r, c) for r, c in turns), kwargs)

    @property
    def chars(self) -> int:
        return sum(len(t.content) for t in self.turns)


Prompt = str | Chat


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt's text (every turn's content for a chat): ``max_prompt_chars``."""
    return prompt.chars if isinstance(prompt, Chat) else len(prompt)


def _messages(prompt: Prompt) -> tuple[list[dict[str, str]], dict[str, Any]]:
    if isinstance(prompt, Chat):
        messages = [{"role": t.role, "content": t.content} for t in prompt.turns]
        return messages, json.loads(prompt.template_kwargs) if prompt.template_kwargs else {}
    return [{"role": "user", "content": prompt}], {}


def _plain_text(messages: list[dict[str, str]]) -> str:
    for m in messages:
        if m["role"] not in PLAIN_ROLES:
            raise PromptError(
                f"the plain rendering (a tokenizer without a chat template) takes roles "
                f"{', '.join(PLAIN_ROLES)}; got {m['role']!r}"
            )
    *history, last = messages
    return "".join(f"{m['role']}: {m['content']}\n" for m in history) + last["content"]


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids the sampler, the scorer and the evaluator all feed the model for ``prompt``.

    Tokenizers with a chat template get the chat plus the generation prompt; plain tokenizers
    get the fallback (module docstring). A template that rejects the chat (a role, the turn
    order) raises ``PromptError``. Keep this the only place that decides.
    """
    messages, kwargs = _messages(prompt)
    if messages[-1]["role"] != "user":
        raise PromptError(f"a prompt must end with the user's turn, not {messages[-1]['role']!r}")
    if getattr(tokenizer, "chat_template", None):
        ids = _apply_template(tokenizer, messages, kwargs, tokenize=True)
        # transformers 5 returns a BatchEncoding from apply_chat_template; older ones a list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if tokenizer.bos_token_id is None:
        raise ValueError("tokenizer has neither a chat template nor a BOS token")
    text = _plain_text(messages)
    return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]


def _apply_template(tokenizer, messages, kwargs, *, tokenize: bool, shown=None):
    """``apply_chat_template`` with the generation prompt; a template that rejects the chat is a
    ``PromptError`` naming the roles of ``shown`` (the chat the caller renders; default
    ``messages``)."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=tokenize, **kwargs
        )
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        roles = [m["role"] for m in (messages if shown is None else shown)]
        raise PromptError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')} "
            f"rejects a chat with roles {roles}: {e}"
        ) from None


def encode_environment_answer(
    tokenizer, prompt: Prompt, exchanged: Sequence[Turn], answer: Sequence[Turn]
) -> list[int]:
    """Token ids of an environment's ``answer`` (e.g. a ``tool`` turn), to append right after
    the student's last turn in an episode; the one place that decides how an answer is shown.

    prompt: the episode's prompt (as ``encode_prompt`` rendered it); exchanged: the turns since,
    ending with the student's latest (``assistant``) turn as decoded from its tokens.
    A tokenizer with a chat template renders the whole chat with the answer (and the generation
    prompt) and keeps what follows the already-rendered part: the prompt with its generation
    prompt, then the student's text. A template whose rendering of that part changes once the
    answer is added (one that rewrites earlier assistant turns, say) cannot extend the
    student's tokens: ``PromptError``. Without a template, each answer is
    ``TOOL_ANSWER_OPEN + text + TOOL_ANSWER_CLOSE``.
    """
    if not exchanged or exchanged[-1].role != "assistant":
        raise PromptError("an environment answers the student's turn: exchanged must end with it")
    if not getattr(tokenizer, "chat_template", None):
        roles = {t.role for t in answer} - {"tool"}
        if roles:
            raise PromptError(
                f"the plain rendering (a tokenizer without a chat template) shows only tool "
                f"answers; got roles {sorted(roles)}"
            )
        text = "".join(TOOL_ANSWER_OPEN + t.content + TOOL_ANSWER_CLOSE for t in answer)
        return list(tokenizer.encode(text, add_special_tokens=False))
    messages, kwargs = _messages(prompt)
    history = messages + [{"role": t.role, "content": t.content} for t in exchanged[:-1]]
    chat = history + [{"role": t.role, "content": t.content} for t in (exchanged[-1], *answer)]
    name = getattr(tokenizer, "name_or_path", "the tokenizer")
    before = _apply_template(tokenizer, history, kwargs, tokenize=False, shown=chat)
    after = _apply_template(tokenizer, chat, kwargs, tokenize=False)
    prefix = before + exchanged[-1].content
    if not after.startswith(prefix):
        k = next(
            (i for i, (x, y) in enumerate(zip(prefix, after, strict=False)) if x != y),
            min(len(prefix), len(after)),
        )
        raise PromptError(
            f"the chat template of {name} renders the episode so far differently once the "
            f"environment's answer is added (from character {k}: {prefix[k : k + 40]!r} became "
            f"{after[k : k + 40]!r}), so the answer cannot follow the student's tokens; use a "
            f"template that leaves earlier turns as they were rendered"
        )
    return list(tokenizer.encode(after[len(prefix) :], add_special_tokens=False))


def render_text(tokenizer, prompt: Prompt) -> str:
    """The prompt as the model sees it, decoded from ``encode_prompt``'s ids (for humans)."""
    return tokenizer.decode(encode_prompt(tokenizer, prompt))


def _excerpt(tokenizer, ids: list[int], k: int) -> str:
    before = tokenizer.decode(ids[max(0, k - CONTEXT_TOKENS) : k])
    after = tokenizer.decode(ids[k : k + CONTEXT_TOKENS]) if k < len(ids) else "<end>"
    return f"…{before!r} ⟦{after!r}⟧"


def check_same_rendering(
    samples: Sequence[tuple[str, Prompt]], teacher_tokenizer, student_tokenizer
) -> int:
    """Every ``(where, prompt)`` must give the teacher and the student identical token ids (the
    teacher scores the student's ids, so a different rendering is a silently wrong signal).
    Raises ``RenderingMismatch`` at the first sample that differs, showing the first differing
    position as text for both; a chat a template rejects raises ``PromptError`` naming where.
    Returns the number of samples checked."""
    for where, prompt in samples:
        ids = {}
        for name, tok in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
            try:
                ids[name] = encode_prompt(tok, prompt)
            except PromptError as e:
                raise PromptError(f"{where}: {name}: {e}") from None
        t, s = ids["teacher"], ids["student"]
        if t == s:
            continue
        k = next(
            (i for i, (a, b) in enumerate(zip(t, s, strict=False)) if a != b), min(len(t), len(s))
        )
        raise RenderingMismatch(
            f"{where}: the teacher and the student render this prompt differently, from token "
            f"{k} on ({len(t)} vs {len(s)} tokens; differing part in ⟦ ⟧):\n"
            f"  teacher: {_excerpt(teacher_tokenizer, t, k)}\n"
            f"  student: {_excerpt(student_tokenizer, s, k)}\n"
            f"The teacher scores the student's token ids, so both must render prompts "
            f"identically: give both models the same chat template (tokenizer_config.json "
            f"'chat_template' or chat_template.jinja), or neither one."
        )
    return len(samples)
