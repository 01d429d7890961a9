"""Chat-template handling shared by the CLI chat, the library and the server."""

from __future__ import annotations

from typing import Any, Mapping

from sagellm_core.errors import InvalidRequestError


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], template_kwargs: Mapping[str, Any] | None = None,
                add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
    """``messages`` rendered as text with the model's chat template; ``template_kwargs`` (e.g.
    Qwen3's ``enable_thinking``) become template variables and ``tools`` (OpenAI function specs) its
    ``tools`` variable. Without a template: ``role: content`` lines. A template that rejects the
    conversation raises `InvalidRequestError`."""
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer, so no chat template")
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    if getattr(tokenizer, "chat_template", None) is None:
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"
    kwargs = dict(template_kwargs or {})
    for reserved in ("conversation", "tokenize", "add_generation_prompt", "return_dict", "tools"):
        if reserved in kwargs:
            raise InvalidRequestError(f"chat_template_kwargs must not set {reserved!r}")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **kwargs)
    except Exception as exc:  # the template itself rejects the conversation (roles, order, ...)
        raise InvalidRequestError(f"cannot apply the chat template: {type(exc).__name__}: {exc}") from None


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]],
                    template_kwargs: Mapping[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template, ready for generation."""
    text = render_chat(tokenizer, messages, template_kwargs, tools=tools)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    return list(tokenizer(text, add_special_tokens=not has_template).input_ids)
