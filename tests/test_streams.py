"""RequestStream's async side: one loop wake-up for many filled streams, and outputs that queued up
behind a slow consumer merged into one (deltas concatenated, cumulative fields of the latest)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sagellm_core.outputs import CompletionOutput, RequestOutput
from sagellm_core.streams import RequestStream


def output(request_id: str, tokens: list[int], new: int, finished: bool = False) -> RequestOutput:
    text = "".join(f"<{t}>" for t in tokens)
    delta = tokens[len(tokens) - new:]
    completion = CompletionOutput(0, text, list(tokens), "".join(f"<{t}>" for t in delta), delta,
                                  "length" if finished else None)
    return RequestOutput(request_id, None, [1, 2], [completion], finished)


def fill(stream: RequestStream, count: int) -> None:
    """``count`` one-token outputs, the last one finished, then the end (another thread's work)."""
    for n in range(1, count + 1):
        stream.put(output(stream.request_id, list(range(n)), 1, finished=n == count))
    stream.put_end()


def test_outputs_queued_behind_a_slow_consumer_arrive_merged() -> None:
    async def consume() -> list[RequestOutput]:
        stream = RequestStream("r")
        iterator = stream.__aiter__()
        first = asyncio.ensure_future(iterator.__anext__())
        await asyncio.sleep(0)  # the consumer is bound to the loop and waits
        producer = threading.Thread(target=fill, args=(stream, 5))
        producer.start()
        producer.join()  # all five outputs queued before the consumer runs again
        seen = [await first]
        seen += [item async for item in iterator]
        return seen

    seen = asyncio.run(consume())
    assert len(seen) == 1
    merged = seen[0].outputs[0]
    assert merged.delta_token_ids == [0, 1, 2, 3, 4] and merged.token_ids == [0, 1, 2, 3, 4]
    assert merged.delta_text == "<0><1><2><3><4>" == merged.text and merged.finish_reason == "length"


def test_one_loop_wake_up_for_many_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> tuple[int, list[int]]:
        loop = asyncio.get_running_loop()
        calls = []
        original = loop.call_soon_threadsafe

        def counting(callback, *args):  # type: ignore[no-untyped-def]
            calls.append(callback)
            return original(callback, *args)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        streams = [RequestStream(f"r{i}") for i in range(20)]
        iterators = [stream.__aiter__() for stream in streams]
        firsts = [asyncio.ensure_future(it.__anext__()) for it in iterators]
        await asyncio.sleep(0)
        producers = [threading.Thread(target=fill, args=(stream, 3)) for stream in streams]
        for producer in producers:
            producer.start()
        for producer in producers:
            producer.join()
        counts = []
        for first, iterator in zip(firsts, iterators):
            items = [await first] + [item async for item in iterator]
            counts.append(sum(len(item.outputs[0].delta_token_ids) for item in items))
        return len(calls), counts

    wake_ups, counts = asyncio.run(run())
    assert counts == [3] * 20  # every token arrives, once
    assert wake_ups == 1  # the loop did not run while the 20 streams were filled: one wake-up for all


def test_an_error_after_outputs_is_raised_after_them() -> None:
    async def run() -> tuple[list[RequestOutput], BaseException | None]:
        stream = RequestStream("r")
        iterator = stream.__aiter__()
        first = asyncio.ensure_future(iterator.__anext__())
        await asyncio.sleep(0)
        stream.put(output("r", [0], 1))
        stream.put(output("r", [0, 1], 1))
        stream.fail(RuntimeError("engine gone"))
        seen: list[RequestOutput] = []
        try:
            seen.append(await first)
            async for item in iterator:
                seen.append(item)
        except RuntimeError as exc:
            return seen, exc
        return seen, None

    seen, error = asyncio.run(run())
    assert [item.outputs[0].delta_token_ids for item in seen] == [[0, 1]] and str(error) == "engine gone"
