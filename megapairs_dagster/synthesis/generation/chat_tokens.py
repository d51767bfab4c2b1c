"""Token ids of a rendered prompt in which the prompt's own text stays text.

A chat template is rendered to one string and tokenized whole, so a special-token string in
the user's text (``</s>``, ``<|eot_id|>``, ``<image>``) would become that special token: an
end of sequence or a turn marker in the middle of the prompt. Here the string is tokenized
as usual, then each special token whose characters lie inside the user's text is replaced by
the ids of those characters as plain text (what ``split_special_tokens=True`` gives), while
the template's own special tokens stay. A prompt without such strings gets exactly the ids
it always got, so greedy outputs on ordinary prompts do not change.

Every backend that takes token ids uses it: ``transformers`` in process, ``vllm`` through
``LLM.generate``, ``openai`` through ``/v1/completions`` (vLLM has no per-message
``split_special_tokens``: its chat endpoints would read the strings as special tokens).

Works with any fast Hugging Face tokenizer (offsets are needed), and imports nothing heavy.
"""

from __future__ import annotations

from typing import Any


def special_token_ids(tokenizer: Any) -> set[int]:
    """The ids ``split_special_tokens`` splits: added tokens marked special."""
    return {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}


def prompt_token_ids(tokenizer: Any, text: str, user_text: str) -> list[int]:
    """Ids of ``text`` (a rendered prompt) with ``user_text``, found inside it, kept as text.

    The bos token is added unless the text before ``user_text`` (the template's part) already
    starts with it: a user text that starts with ``<s>`` does not count."""
    user_text = user_text.strip()  # templates often trim the message content
    start = text.find(user_text)
    if start < 0:
        raise ValueError("the chat template rewrote the prompt text; its tokens cannot be told "
                         "from the template's")
    end = start + len(user_text)
    bos = tokenizer.bos_token
    encoded = tokenizer(
        text, add_special_tokens=not (bos and text[:start].startswith(bos)),
        return_offsets_mapping=True,
    )
    special = special_token_ids(tokenizer)
    ids: list[int] = []
    for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token in special and start <= first < last <= end:
            ids += tokenizer(text[first:last], add_special_tokens=False,
                             split_special_tokens=True)["input_ids"]
        else:
            ids.append(token)
    return ids


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The text a model sees for ``prompt`` sent as one user turn: its chat template's
    rendering, or the prompt as it is where the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Ids of ``prompt`` as one user turn, with the prompt's own text kept as text."""
    return prompt_token_ids(tokenizer, chat_prompt(tokenizer, prompt), prompt)
