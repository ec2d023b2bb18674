"""Prompt text → token ids: the one place that decides how a prompt is presented to a model."""

from __future__ import annotations


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids the sampler and the evaluator both feed the model for a prompt.

    Tokenizers with a chat template (instruction-tuned models) get the user turn plus the
    generation prompt; plain tokenizers get ``[BOS] + text``. Keep this the only place that
    decides, so sampling, scoring and evaluation see identical prompts.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding from apply_chat_template; older ones a list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if tokenizer.bos_token_id is None:
        raise ValueError("tokenizer has neither a chat template nor a BOS token")
    return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
