"""Chat-template handling shared by the CLI chat, the library and the server."""

from __future__ import annotations

from typing import Any

from sagellm_core.errors import InvalidRequestError


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                    ) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template, ready for generation;
    ``tools`` (OpenAI function specs) reach the template as its ``tools`` variable."""
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer, so no chat template")
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    if getattr(tokenizer, "chat_template", None) is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tokenizer(text).input_ids)
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
