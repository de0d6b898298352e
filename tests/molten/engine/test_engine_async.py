"""AsyncEngine: streaming, early close, cancellation at random points, admission errors."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from engine_helpers import random_prompts

from molten.engine.async_engine import AsyncEngine
from molten.engine.llm_engine import EmptyPromptError, PromptTooLongError
from molten.engine.sampling_params import SamplingParams

RELEASE_TIMEOUT_S = 5.0
"""How long freed blocks may take to come back; one engine step takes milliseconds."""


@pytest.fixture
def async_engine(tiny_llama, make_engine):
    engine = AsyncEngine(make_engine(tiny_llama, max_model_len=256, num_kv_blocks=64), name="test")
    yield engine
    engine.shutdown()


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def engine_state(async_engine: AsyncEngine) -> tuple[int, int]:
    """Free block count and number of requests, read on the engine thread between steps."""
    # The timeout turns a dead engine thread into a failure instead of a hang.
    return await asyncio.wait_for(
        async_engine.call(lambda engine: (engine.block_manager.num_free_blocks, len(engine.sequences))),
        timeout=30,
    )


async def wait_until_idle(async_engine: AsyncEngine, num_free_blocks: int) -> tuple[int, int]:
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    state = await engine_state(async_engine)
    while state != (num_free_blocks, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        state = await engine_state(async_engine)
    return state


def test_stream_ends_with_finish_reason(async_engine):
    prompt = random_prompts(seed=30, count=1, min_len=20, max_len=20)[0]

    async def collect():
        return [event async for event in async_engine.generate("stream", prompt, params(6))]

    events = asyncio.run(collect())

    assert [event.index for event in events] == list(range(6))
    assert events[-1].finish_reason == "length"
    assert all(event.finish_reason is None for event in events[:-1])
    assert events[0].origin == "prefill"
    assert all(event.origin == "decode" for event in events[1:])
    assert all(event.request_id == "stream" for event in events)


def test_stream_matches_sync_engine(async_engine, tiny_llama, make_engine):
    prompts = random_prompts(seed=31, count=4, max_len=60)
    sync_engine = make_engine(tiny_llama, max_model_len=256)
    expected = sync_engine.generate(prompts, params(8))

    async def collect_all():
        async def collect(index, prompt):
            return [event.token_id async for event in async_engine.generate(f"req-{index}", prompt, params(8))]

        return await asyncio.gather(*(collect(index, prompt) for index, prompt in enumerate(prompts)))

    assert asyncio.run(collect_all()) == expected


def test_aclose_after_first_event_aborts(async_engine):
    prompt = random_prompts(seed=32, count=1, min_len=40, max_len=40)[0]

    async def scenario():
        start_state = await engine_state(async_engine)
        stream = async_engine.generate("closed", prompt, params(200))
        first = await stream.__anext__()
        running_state = await engine_state(async_engine)
        await stream.aclose()
        return start_state, first, running_state, await wait_until_idle(async_engine, start_state[0])

    start_state, first, running_state, end_state = asyncio.run(scenario())

    assert first.finish_reason is None
    assert running_state[0] < start_state[0]
    assert end_state == start_state


def test_random_cancellations_free_blocks(async_engine):
    rng = random.Random(33)
    prompts = random_prompts(seed=33, count=30, max_len=120)

    async def consume(index: int, prompt: list[int], cancel_after: int) -> int:
        count = 0
        async for _ in async_engine.generate(f"req-{index}", prompt, params(64)):
            count += 1
            if count == cancel_after:
                break
        return count

    async def scenario():
        start_state = await engine_state(async_engine)
        tasks = []
        for index, prompt in enumerate(prompts):
            task = asyncio.create_task(consume(index, prompt, cancel_after=rng.randint(1, 80)))
            tasks.append(task)
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0, 0.02))
            if rng.random() < 0.4:
                # Cancel the task from outside at a random point: before admission,
                # during it, or mid-stream.
                task.get_loop().call_later(rng.uniform(0, 0.05), task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        end_state = await wait_until_idle(async_engine, start_state[0])
        await async_engine.call(lambda engine: engine.check_block_accounting())
        return start_state, results, end_state

    start_state, results, end_state = asyncio.run(scenario())

    assert end_state == start_state
    assert any(isinstance(result, asyncio.CancelledError) for result in results)
    assert any(isinstance(result, int) and result < 64 for result in results)


def test_cancel_during_admission_aborts(async_engine):
    """A task cancelled after the engine thread admitted its request, before the caller resumed."""
    prompt = random_prompts(seed=34, count=1, min_len=30, max_len=30)[0]

    async def scenario():
        start_state = await engine_state(async_engine)
        stream = async_engine.generate("admitted", prompt, params(200))
        task = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0)  # the task submits the admission command and waits for it
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        # Block the event loop until the engine thread has admitted the request, so the
        # result reaches the loop only after the cancellation below.
        while "admitted" not in async_engine.engine.sequences and time.monotonic() < deadline:
            time.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return start_state, await wait_until_idle(async_engine, start_state[0])

    start_state, end_state = asyncio.run(scenario())

    assert end_state == start_state


def test_empty_prompt_raises_on_first_anext(async_engine):
    async def first_event():
        stream = async_engine.generate("empty", [], params(4))
        return await stream.__anext__()

    with pytest.raises(EmptyPromptError):
        asyncio.run(first_event())


def test_too_long_prompt_raises_on_first_anext(async_engine):
    async def first_event():
        stream = async_engine.generate("long", list(range(3, 300)), params(4))
        return await stream.__anext__()

    with pytest.raises(PromptTooLongError):
        asyncio.run(first_event())
    assert async_engine.engine.sequences == {}


def test_engine_keeps_serving_after_admission_error(async_engine):
    prompt = random_prompts(seed=35, count=1, min_len=10, max_len=10)[0]

    async def scenario():
        with pytest.raises(EmptyPromptError):
            await async_engine.generate("bad", [], params(4)).__anext__()
        return [event async for event in async_engine.generate("good", prompt, params(3))]

    events = asyncio.run(scenario())

    assert len(events) == 3
    assert events[-1].finish_reason == "length"


def test_closed_consumer_loop_does_not_stop_engine(async_engine):
    """A consumer whose event loop closes mid-stream must not kill the engine thread."""
    prompts = random_prompts(seed=36, count=2, min_len=20, max_len=20)
    orphan_loop = asyncio.new_event_loop()
    orphan_stream = async_engine.generate("orphan", prompts[0], params(200))
    orphan_loop.run_until_complete(orphan_stream.__anext__())
    orphan_loop.close()

    async def collect():
        return [event async for event in async_engine.generate("after", prompts[1], params(4))]

    async def scenario():
        # A dead engine thread would never reply, so bound the wait.
        events = await asyncio.wait_for(collect(), timeout=30)
        return events, await wait_until_idle(async_engine, async_engine.engine.block_manager.num_blocks)

    events, end_state = asyncio.run(scenario())

    assert [event.finish_reason for event in events] == [None, None, None, "length"]
    assert end_state == (async_engine.engine.block_manager.num_blocks, 0)
