"""``POST /tokenize`` and ``POST /detokenize`` with vLLM's request and response shapes.

    /tokenize    {"prompt": "..."} or {"messages": [...]}  ->  {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"tokens": [...]}                         ->  {"prompt": "..."}

Tokenizing runs in the engine's input pool. Unlike a generation request, a text longer than the
context is tokenized and counted (the body limit bounds it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import Field

from sagellm_core.errors import InvalidRequestError
from sagellm_core.inputs import check_text
from sagellm_core.server.protocol import ChatMessage, _Strict

if TYPE_CHECKING:
    from sagellm_core.server.app import Engine


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _tokenize(llm: Engine, body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
    """Input pool: the token ids (and their strings) of a prompt or a rendered conversation."""
    inputs = llm.inputs
    if isinstance(body, TokenizeChatRequest):
        kwargs = dict(body.chat_template_kwargs or {})
        if body.continue_final_message:
            kwargs["continue_final_message"] = True
        text = inputs.render_chat([m.template_dict() for m in body.messages], kwargs,
                                  body.add_generation_prompt and not body.continue_final_message)
    else:
        text = body.prompt
    check_text(text, "prompt" if isinstance(body, TokenizeCompletionRequest) else "messages")
    if llm.tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer: /tokenize needs one")
    ids = list(llm.tokenizer(text, add_special_tokens=body.add_special_tokens).input_ids)
    strs = llm.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": inputs.max_model_len, "tokens": ids, "token_strs": strs}


def add_tokenize_routes(app: FastAPI) -> None:
    from sagellm_core.server.app import in_pool

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> dict[str, Any]:
        state = request.app.state.server
        llm = state.engine()
        state.check_model(body.model)
        return await in_pool(llm, _tokenize, llm, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        state = request.app.state.server
        llm = state.engine()
        state.check_model(body.model)
        return {"prompt": await in_pool(llm, llm.inputs.decode, body.tokens, "tokens")}
