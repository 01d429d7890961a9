"""Structured outputs' token mask on the GPU in one Triton pass: each program reads a block of a
row's logits and the bitmask words covering it, and writes the logits with every token whose bit is
clear at -inf. The torch path (`sagellm_core.structured.bitmask.mask_logits`) unpacks to an int32
and a bool tensor, then selects: about 5x the memory traffic at batch 256 and a 151,936-token
vocabulary, in four launches instead of one."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit(do_not_specialize=["vocab", "num_words"])
def _apply_bitmask_kernel(logits_ptr, logits_stride, words_ptr, words_stride, out_ptr, out_stride, vocab, num_words,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    word_index = cols // 32
    word = tl.load(words_ptr + row * words_stride + word_index, mask=inside & (word_index < num_words), other=0)
    allowed = ((word >> (cols % 32)) & 1) != 0
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, tl.where(allowed, x, float("-inf")), mask=inside)


def apply_token_bitmask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``logits`` [N, V] with -inf where the bit of a token in ``words`` [N, W] int32 is clear (and at
    ids >= 32 * W), as a new tensor (the logits may be an inference-mode tensor or a graph's output)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if words.stride(1) != 1 or words.dtype != torch.int32:
        words = words.to(torch.int32).contiguous()
    out = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    if rows == 0 or vocab == 0:
        return out
    grid = (rows, triton.cdiv(vocab, BLOCK))
    _apply_bitmask_kernel[grid](logits, logits.stride(0), words, words.stride(0), out, out.stride(0), vocab,
                                words.shape[1], BLOCK=BLOCK)
    return out
