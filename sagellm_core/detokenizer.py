"""Incremental detokenization that never emits a partial UTF-8 character."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 6


def fast_decoder(tokenizer: Any) -> Any:
    """``decode(ids, skip_special_tokens)``: the Rust tokenizer directly where that is equivalent
    (transformers' wrapper converts every id in Python first, about 10x slower per call)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    if tokenizer is None:
        return lambda ids, skip: ""
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class TokenTexts(dict[int, str]):
    """Each token id's own text (``tokenizer.decode([id])``; the id as text without a tokenizer),
    decoded once per id and then a plain dict lookup (``texts[id]``): logprobs name up to 21 tokens
    for every generated token, and a decode call costs microseconds."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
        self[token_id] = text
        return text


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas.

    Decodes a small window (a few prompt tokens for correct leading spaces, plus the new tokens) and
    emits only text that no longer ends in U+FFFD, so a multi-byte character split across tokens
    is emitted once complete.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_ids = fast_decoder(tokenizer)
        self.tokens = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly empty)."""
        if self.tokenizer is None:
            return ""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return full_text[len(prefix_text):]
        return ""

    def decode_all(self, token_ids: list[int]) -> str:
        """All of ``token_ids`` at once (for requests nobody streams): one decode instead of two per token."""
        if self.tokenizer is None:
            return ""
        prefix_text = self._decode(self.tokens)
        full_text = self._decode(self.tokens + token_ids).rstrip(REPLACEMENT)
        return full_text[len(prefix_text):] if full_text.startswith(prefix_text) else full_text

    def flush(self) -> str:
        """At the end: whatever complete text is still held back (a dangling partial byte is dropped)."""
        if self.tokenizer is None or self.read_offset == len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset:]).rstrip(REPLACEMENT)
        self.read_offset = len(self.tokens)
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
