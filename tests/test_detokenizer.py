"""Token texts for logprobs: one decode per token id."""

from __future__ import annotations


def test_token_texts_decode_each_id_once_and_match_the_tokenizer() -> None:
    from sagellm_core.detokenizer import TokenTexts

    class CountingTokenizer:
        def __init__(self) -> None:
            self.calls = 0

        def decode(self, ids: list[int]) -> str:
            self.calls += 1
            return f"<{ids[0]}>"

    tokenizer = CountingTokenizer()
    texts = TokenTexts(tokenizer)
    assert [texts[5], texts[7], texts[5], texts[5]] == ["<5>", "<7>", "<5>", "<5>"]
    assert tokenizer.calls == 2
    assert TokenTexts(None)[42] == "42"
