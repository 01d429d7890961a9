"""Token bans and biases of a batch as one indexed device write each: ``bad_words`` (always
banned), stop ids and EOS before ``min_tokens`` (banned), and ``logit_bias`` (added). The (row,
token) pairs are gathered on the host from what it knows without reading the device (the number of
outputs counts tokens still in flight), so these steps stay asynchronous."""

from __future__ import annotations

import torch

from sagellm_core.request import Request


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def banned_tokens(request: Request) -> set[int]:
    """Tokens ``request`` may not sample now."""
    banned = set(request.bad_token_ids)
    if request.num_prior_outputs < request.params.min_tokens:
        banned.update(request.params.stop_token_ids)
        if not request.params.ignore_eos:
            banned.update(request.eos_token_ids)
    return banned


def apply_bans(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """``logits`` with every banned (row, token) set to -inf (a new tensor when any)."""
    rows: list[int] = []
    cols: list[int] = []
    vocab = logits.shape[1]
    for row, request in enumerate(requests):
        if not request.bad_token_ids and request.params.min_tokens == 0:
            continue
        for token in banned_tokens(request):
            if 0 <= token < vocab:
                rows.append(row)
                cols.append(token)
    if not rows:
        return logits
    device = logits.device
    return logits.index_put((_index(rows, device), _index(cols, device)),
                            torch.tensor(float("-inf"), dtype=logits.dtype, device=device))


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """``logits`` plus each request's ``logit_bias`` (OpenAI's: added to the logit of the token)."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    vocab = logits.shape[1]
    for row, request in enumerate(requests):
        for token, bias in (request.params.logit_bias or {}).items():
            if 0 <= token < vocab:
                rows.append(row)
                cols.append(token)
                values.append(bias)
    if not rows:
        return logits
    device = logits.device
    biases = torch.tensor(values, dtype=logits.dtype).to(device, non_blocking=True)
    return logits.index_put((_index(rows, device), _index(cols, device)), biases, accumulate=True)
