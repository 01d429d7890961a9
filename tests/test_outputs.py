"""`TokenLogprobs`: a completion's logprobs stored flat, read as `TokenLogprob` entries."""

from __future__ import annotations

import pytest

from sagellm_core.detokenizer import TokenTexts
from sagellm_core.outputs import TokenLogprob, TokenLogprobs


class CountingTexts(dict[int, str]):
    """Token texts that count their lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def __missing__(self, token_id: int) -> str:
        self.lookups += 1
        return f"<{token_id}>"


def _filled(texts: dict[int, str]) -> TokenLogprobs:
    logprobs = TokenLogprobs(texts)
    logprobs.append(5, -0.5, [5, 7], [-0.5, -1.5])
    logprobs.append(7, -0.25, [], [])
    logprobs.append(9, -2.0, [1], [-0.125])
    return logprobs


EXPECTED = [TokenLogprob(5, "<5>", -0.5, [(5, "<5>", -0.5), (7, "<7>", -1.5)]),
            TokenLogprob(7, "<7>", -0.25, []),
            TokenLogprob(9, "<9>", -2.0, [(1, "<1>", -0.125)])]


def test_entries_read_as_token_logprobs_named_when_read() -> None:
    texts = CountingTexts()
    logprobs = _filled(texts)
    assert texts.lookups == 0  # appending names nothing
    assert len(logprobs) == 3
    assert logprobs[0] == EXPECTED[0] and logprobs[-1] == EXPECTED[2]
    assert texts.lookups == 5
    assert logprobs[1:] == EXPECTED[1:] and isinstance(logprobs[1:], list) and logprobs[::-1] == EXPECTED[::-1]
    assert list(logprobs) == EXPECTED
    with pytest.raises(IndexError):
        logprobs[3]
    with pytest.raises(IndexError):
        logprobs[-4]


def test_equal_to_sequences_of_equal_entries() -> None:
    logprobs = _filled(TokenTexts(None))
    named = _filled({1: "<1>", 5: "<5>", 7: "<7>", 9: "<9>"})
    assert logprobs != EXPECTED  # TokenTexts(None) names a token by its id: "5"
    assert named == EXPECTED and EXPECTED == named and named == tuple(EXPECTED)
    assert named == _filled(CountingTexts()) and named != logprobs and named != EXPECTED[:2]
    assert TokenLogprobs(CountingTexts()) == [] and named != "abc" and named != 3
    assert repr(named) == f"TokenLogprobs({EXPECTED!r})"


def test_a_snapshot_shares_the_entries_so_far_and_not_later_ones() -> None:
    logprobs = TokenLogprobs(CountingTexts())
    logprobs.append(5, -0.5, [5, 7], [-0.5, -1.5])
    snapshot = logprobs.snapshot()
    logprobs.append(7, -0.25, [], [])
    assert len(snapshot) == 1 and list(snapshot) == EXPECTED[:1] and snapshot[:] == EXPECTED[:1]
    assert snapshot.token_ids is logprobs.token_ids  # no copy
    with pytest.raises(IndexError):
        snapshot[1]
    with pytest.raises(TypeError):
        snapshot.append(9, -2.0, [], [])
    assert snapshot.snapshot() == snapshot and len(logprobs) == 2


def test_flat_gives_the_stored_entries_from_a_position() -> None:
    logprobs = _filled(CountingTexts())
    assert logprobs.flat(1) == ([7, 9], [-0.25, -2.0], [[], [1]], [[], [-0.125]])
    copy = TokenLogprobs(CountingTexts())
    for entry in zip(*logprobs.flat()):
        copy.append(*entry)
    assert copy == logprobs and logprobs.snapshot().flat(3) == ([], [], [], [])
