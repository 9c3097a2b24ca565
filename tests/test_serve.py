"""Ray Serve generator: continuous batching against `generate`, and the OpenAI API over real HTTP.

One Serve instance for the module (started on the session's Ray, shut down at the end) holds three
apps: the main one, a "tight" one with an API key, one batch row and one queue place, and a "named"
one whose model name has a slash in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import random
import socket
import subprocess
import time
from pathlib import Path

import openai
import pytest
import requests
import torch
import yaml

from mtnlg_ray.errors import ConfigError, InputError
from mtnlg_ray.model.continuous import ContinuousDecoder
from mtnlg_ray.model.generate import SamplingParams, generate
from conftest import run_cli

API_KEY = "test-key"
CONTEXT = 1024  # long enough that a cancelled request is caught long before it would finish


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, tokenizer_dir):
    from mtnlg_ray.checkpoint import init_checkpoint

    return init_checkpoint("tiny", tokenizer_dir, tmp_path_factory.mktemp("serve") / "tiny-1k", seed=3,
                           seq_len=CONTEXT)


@pytest.fixture(scope="module")
def text_generator(long_checkpoint):
    from mtnlg_ray.inference import TextGenerator

    return TextGenerator(long_checkpoint)


@pytest.fixture(scope="module")
def server(ray_session, long_checkpoint):
    from ray import serve

    from mtnlg_ray.serve import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # num_cpus 0: replicas never hold the CPUs the rest of the suite schedules on. The main app
        # sends every token as its own chunk (the tiny model makes 32 tokens faster than the default
        # 25 chunks a second); the tight app keeps the defaults, so chunks there carry several tokens.
        serve.run(build_app({"checkpoint": str(long_checkpoint), "model_name": "tiny", "num_cpus": 0,
                             "stream_chunks_per_s": 10_000, "max_chunks_per_s": 10_000}),
                  name="main", route_prefix="/", blocking=False)
        serve.run(build_app({"checkpoint": str(long_checkpoint), "model_name": "tiny", "num_cpus": 0,
                             "api_key": API_KEY, "max_batch": 1, "max_waiting": 1, "kv_cache_tokens": 512}),
                  name="tight", route_prefix="/tight", blocking=False)
        # this one from `mtnlg-ray serve`'s own options, as the command builds it: --no-prefix-cache and
        # the cache flags reach the replica's decoder
        import inspect

        from mtnlg_ray.cli.serve import serve as serve_command, serve_args

        options = {name: getattr(p.default, "default", p.default)
                   for name, p in inspect.signature(serve_command).parameters.items()}
        options |= {"checkpoint": long_checkpoint, "model_name": "org/tiny", "num_cpus": 0.0, "max_batch": 1,
                    "max_waiting": 1, "kv_cache_tokens": 512, "block_size": 8, "no_prefix_cache": True}
        keys = {name: os.environ.pop(name) for name in ("MTNLG_API_KEY", "MTNLG_API_KEY_SHA256") if name in os.environ}
        try:  # a developer's blank key variable would be refused: this app takes no key
            named = serve_args(options)
        finally:
            os.environ.update(keys)
        serve.run(build_app(named), name="named", route_prefix="/named", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _health(server: str, prefix: str = "") -> dict:
    response = requests.get(f"{server}{prefix}/health", timeout=30)
    assert response.status_code == 200
    return response.json()


# --- the batched decoder, no Ray -------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny batches gain nothing from a second thread, and on a busy 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(seq_len: int = 64):
    import dataclasses

    from mtnlg_ray.model import GPT, PRESETS

    torch.manual_seed(0)
    return GPT(dataclasses.replace(PRESETS["tiny"], seq_len=seq_len, vocab_size=256)).eval()


def _run_alone(decoder: ContinuousDecoder, prompt: list[int], params: SamplingParams) -> list[int]:
    seq_id = decoder.add(prompt, params)
    assert seq_id is not None
    tokens = []
    while seq_id in decoder:
        tokens += [e.token for e in decoder.step() if e.seq_id == seq_id]
    return tokens


def test_continuous_batching_equals_generate_for_each_request_alone(one_thread):
    """Requests join at random steps, prompts are read in 7-token chunks, and the 120-slot pool is too
    small for everyone at once (requests wait for blocks, cached blocks get evicted): each request
    still gets exactly `generate`'s tokens, greedy and seeded sampling alike."""
    model = _tiny_model(seq_len=64)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 50))] for _ in range(16)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.0 if i % 2 else 0.9, top_k=20 * (i % 3),
                             top_p=0.8 if i % 4 == 1 else 1.0, seed=i) for i in range(16)]
    expected = [generate(model, [p], sp)[0].tokens for p, sp in zip(prompts, params)]

    decoder = ContinuousDecoder(model, max_rows=3, kv_cache_tokens=120, block_size=4, prefill_chunk=7)
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    pending = list(range(16))
    waited_for_blocks = chunked = False
    while pending or len(decoder):
        while pending and decoder.free_rows and rng.random() < 0.6:
            seq_id = decoder.add(prompts[pending[0]], params[pending[0]])
            if seq_id is None:  # a free row but not enough free blocks
                waited_for_blocks = True
                break
            owner[seq_id] = pending.pop(0)
            got[owner[seq_id]] = []
        chunked |= decoder.stats()["prefilling"] > 0 and any(
            len(prompts[i]) > 7 and not got[i] for i in got)
        for emitted in decoder.step():
            got[owner[emitted.seq_id]].append(emitted.token)
    assert [got[i] for i in range(16)] == expected
    stats = decoder.stats()
    assert waited_for_blocks and chunked and stats["evicted_blocks"] > 0
    assert stats["kv_blocks_used"] == 0  # every finished sequence gave its blocks back


def test_seeded_request_gives_the_same_tokens_whatever_joins_the_batch(one_thread):
    model = _tiny_model()
    mine = ([5, 6, 7], SamplingParams(max_tokens=30, temperature=1.0, top_k=40, top_p=0.9, seed=42))

    def run(others: int) -> list[int]:
        decoder = ContinuousDecoder(model, max_rows=8)
        for k in range(others):  # busy rows that started earlier, with unseeded sampling
            decoder.add([k + 1] * (k + 2), SamplingParams(max_tokens=50, temperature=1.0))
            decoder.step()
        return _run_alone(decoder, *mine)

    alone = run(0)
    assert len(alone) == 30
    assert run(3) == alone
    assert run(7) == alone
    assert alone == generate(model, [mine[0]], mine[1])[0].tokens  # what `mtnlg-ray generate --seed 42` gives


def test_batch_wide_sampling_keeps_to_top_k_and_top_p_and_draws_in_proportion():
    from mtnlg_ray.model.generate import sample_next

    logits = torch.tensor([[4.0, 3.0, 2.5, 2.0, 0.0, -1.0, -2.0, -3.0]]).repeat(3, 1)
    params = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0.5, top_p=0.9),
              SamplingParams(temperature=0.0)]
    draws = torch.stack([sample_next(logits, params, [s, s + 1, s + 2], [0, 0, 0]) for s in range(0, 12000, 3)])
    assert set(draws[:, 2].tolist()) == {0}  # greedy row
    for row, allowed in ((0, torch.softmax(logits[0, :3], dim=0)), (1, None)):
        counts = torch.bincount(draws[:, row], minlength=8).double() / len(draws)
        if allowed is None:  # top-p 0.9 at temperature 0.5: token 0 has 0.83 of the mass, 0 and 1 have 0.94
            probs = torch.softmax(logits[1] / 0.5, dim=0)
            allowed = probs[:2] / probs[:2].sum()
        k = len(allowed)
        assert counts[k:].sum() == 0
        assert torch.allclose(counts[:k], allowed.double(), atol=0.03), (row, counts, allowed)


def test_a_top_p_below_float32s_least_still_keeps_the_best_token():
    # OpenAI's top_p 0 becomes 1e-9 (greedy); a smaller one, 0 in float32, dropped every token and
    # the draw fell on token 0, <|endoftext|> for this tokenizer: an empty answer, finish_reason "stop".
    from mtnlg_ray.model.generate import sample_next

    logits = torch.tensor([[-5.0, 1.0, 3.0, 2.0]]).repeat(4, 1)
    for top_p in (1e-9, 1e-46, 1e-300):
        draws = sample_next(logits, [SamplingParams(top_p=top_p)] * 4, [0, 1, 2, 3], [0, 0, 0, 0])
        assert draws.tolist() == [2, 2, 2, 2], top_p


def _pool(num_blocks: int, block_size: int = 4):
    from mtnlg_ray.model.gpt import GPTConfig
    from mtnlg_ray.model.paged import BlockPool

    config = GPTConfig(vocab_size=64, seq_len=64, n_layer=1, n_head=1, d_model=4)
    return BlockPool(config, num_blocks, block_size, torch.device("cpu"), torch.float32)


def _cache(pool, prompt: list[int]) -> list[int]:
    """Run `prompt` through the pool as the decoder does: admit, take its blocks, offer the full ones to
    the prefix cache under their chained keys. Its blocks, still referenced."""
    from mtnlg_ray.model.paged import block_key

    need = pool.blocks_for(len(prompt))
    matched, key = pool.admit(prompt, need)
    blocks = matched + [pool.allocate() for _ in range(need - len(matched))]
    bs = pool.block_size
    for i in range(len(matched), len(prompt) // bs):
        key = block_key(key, prompt[i * bs:(i + 1) * bs])
        pool.register(blocks[i], key)
    return blocks


def test_a_prompt_matching_cached_blocks_nobody_holds_waits_for_the_blocks_it_still_needs():
    """Cached blocks nobody references count as available until a match takes them: a prompt matching 7
    of them and needing 2 more from a pool with none left over was admitted, and a later step ran out
    of blocks mid-answer ("KV cache pool exhausted")."""
    pool = _pool(num_blocks=10)  # 9 usable blocks of 4 tokens
    prompt = list(range(33))  # 8 full blocks and 1 token
    pool.release(_cache(pool, prompt))  # all 9 back: 8 cached (evictable), 1 free
    running = _cache(pool, [60] * 8)  # another request holds 2: the free one and the cache's LRU block
    assert (len(pool.free), len(pool.evictable), pool.reserved) == (0, 7, 0)
    assert pool.admit(prompt, pool.blocks_for(len(prompt))) is None  # 7 matched + 2 more: none to give
    assert (len(pool.evictable), pool.reserved, pool.counts["prefix_hit_tokens"]) == (7, 0, 0)  # untouched
    pool.release(running)
    matched, _ = pool.admit(prompt, pool.blocks_for(len(prompt)))
    assert len(matched) == 7 and pool.reserved == 2 and pool.available == 0
    pool.allocate(), pool.allocate()  # both promised blocks exist


def test_a_shared_block_stays_held_while_one_sharer_is_left():
    pool = _pool(num_blocks=12)
    first = _cache(pool, list(range(17)))  # 4 full blocks and 1 token
    second = _cache(pool, list(range(16)) + [50, 51])  # the same 4 full blocks, referenced again
    assert second[:4] == first[:4] and all(pool.refs[b] == 2 for b in first[:4])
    pool.release(first)
    assert all(pool.refs[b] == 1 for b in second[:4]) and not set(second[:4]) & set(pool.evictable)
    pool.release(second)
    assert all(pool.refs[b] == 0 for b in second[:4]) and set(second[:4]) <= set(pool.evictable)


def test_a_cached_block_matches_only_after_the_same_blocks_before_it():
    """A block's key chains every token before it: X+W must not match B's W, cached after Z."""
    pool = _pool(num_blocks=12)
    x, y, z, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    pool.release(_cache(pool, x + y))
    pool.release(_cache(pool, z + w))
    assert len(pool.match(x + y + [0])[0]) == 2 and len(pool.match(z + w + [0])[0]) == 2
    assert len(pool.match(x + w + [0])[0]) == 1  # X alone: W was cached after Z, not after X
    assert len(pool.match(w + [0])[0]) == 0
    pool.release(_cache(pool, x + x + x + [0]))  # a block that repeats is a new block at each position
    assert len(pool.match(x + x + x + [0])[0]) == 3 and len(pool.match(x + x + y + [0])[0]) == 2


def test_prefix_cache_shares_blocks_and_evicts_least_recently_used(one_thread):
    model = _tiny_model(seq_len=128)
    rng = random.Random(1)
    system = [rng.randrange(256) for _ in range(40)]  # a shared "system prompt": 10 full blocks of 4
    first, second = system + [1, 2, 3], system + [9, 8]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    decoder = ContinuousDecoder(model, max_rows=4, kv_cache_tokens=40 * 4, block_size=4, prefill_chunk=16)

    a = decoder.add(first, greedy)
    tokens = {a: [e.token for e in decoder.step()]}  # 43 tokens in 16-token chunks: 3 steps to the first token
    while not tokens[a]:
        tokens[a] = [e.token for e in decoder.step()]
    b = decoder.add(second, greedy)
    tokens[b] = []
    seq_a, seq_b = decoder.sequences[a], decoder.sequences[b]
    assert seq_b.blocks[:10] == seq_a.blocks[:10]  # the same physical blocks, referenced twice
    assert all(decoder.pool.refs[block] == 2 for block in seq_a.blocks[:10])
    assert seq_b.cached == 40  # only the 2 new tokens are left to read
    while len(decoder):
        for e in decoder.step():
            tokens[e.seq_id].append(e.token)
    assert tokens[a] == generate(model, [first], greedy)[0].tokens
    assert tokens[b] == generate(model, [second], greedy)[0].tokens
    assert decoder.stats()["prefix_hit_tokens"] == 40

    # Unreferenced cached blocks are evicted oldest first: run another prompt, then fill the pool.
    other = [rng.randrange(256) for _ in range(41)]
    _run_alone(decoder, other, greedy)
    assert len(decoder.pool.match(system + [0])[0]) == 10 and len(decoder.pool.match(other)[0]) == 10
    filler = [rng.randrange(256) for _ in range(80)]
    _run_alone(decoder, filler, SamplingParams(max_tokens=4, temperature=0))
    assert decoder.stats()["evicted_blocks"] > 0
    # used longest ago: evicted first, from the end of its chain, so its beginning still matches (evicting
    # the first block first stranded every block after it: a match found none)
    assert 0 < len(decoder.pool.match(system + [0])[0]) < 10
    assert len(decoder.pool.match(other)[0]) == 10

    off = ContinuousDecoder(model, max_rows=4, block_size=4, prefix_cache=False)
    _run_alone(off, first, greedy)
    assert _run_alone(off, second, greedy) == tokens[b] and off.stats()["prefix_hit_tokens"] == 0


def test_the_default_pool_holds_max_rows_full_contexts_when_the_context_is_no_multiple_of_a_block(one_thread):
    model = _tiny_model(seq_len=100)  # 7 blocks of 16 a row
    decoder = ContinuousDecoder(model, max_rows=4, block_size=16)
    long = SamplingParams(max_tokens=90, temperature=0)
    assert all(decoder.add([1] * 10, long) is not None for _ in range(4))  # the 4th used to wait


def test_a_full_pool_makes_requests_wait_and_a_long_prompt_is_read_between_decode_steps(one_thread):
    model = _tiny_model(seq_len=128)
    decoder = ContinuousDecoder(model, max_rows=4, kv_cache_tokens=64, block_size=8, prefill_chunk=16)
    running = decoder.add([1, 2, 3], SamplingParams(max_tokens=30, temperature=0))
    decoder.step()
    # 70 prompt tokens + 10 new ones need 10 blocks; the pool has 8, 4 of them promised: never fits.
    assert not decoder.fits(list(range(70)), SamplingParams(max_tokens=10))
    with pytest.raises(InputError, match="79 tokens of KV cache; this decoder holds 64"):
        decoder.add(list(range(70)), SamplingParams(max_tokens=10))
    long_prompt = [(7 * i) % 256 for i in range(33)]  # 33 + 8 - 1 tokens: 5 blocks, 4 are free
    assert decoder.add(long_prompt, SamplingParams(max_tokens=8, temperature=0)) is None
    while running in decoder:
        decoder.step()
    joined = decoder.add(long_prompt, SamplingParams(max_tokens=8, temperature=0))
    assert joined is not None  # the finished sequence's blocks made room

    # With a stream running, the 33-token prompt takes three 16-token chunks, one per step, and the
    # running stream gets a token in each of those steps.
    decoder.remove(joined)
    running = decoder.add([4, 5], SamplingParams(max_tokens=20, temperature=0))
    decoder.step()
    joined = decoder.add(long_prompt, SamplingParams(max_tokens=8, temperature=0))
    steps = 0
    while not decoder.sequences[joined].produced:
        emitted = decoder.step()
        steps += 1
        assert any(e.seq_id == running for e in emitted)
    assert steps == 3

    # Prompts that join together are read in one batch: one prefill call gives each its first token.
    batch = ContinuousDecoder(model, max_rows=4)
    ids = [batch.add([i + 1] * (i + 2), SamplingParams(max_tokens=5, temperature=0)) for i in range(3)]
    assert sorted(e.seq_id for e in batch.prefill()) == sorted(ids)


def test_the_scheduler_keeps_a_running_stream_going_while_a_long_prompt_is_read(one_thread):
    """The serving loop reads a long prompt a chunk per step, between decode steps: the stream already
    running gets a token in each of them. Reading the whole prompt at once (which the decoder-level test
    above would not see) gives it none. Counted on the decode thread, as the steps run."""
    from mtnlg_ray.serve.scheduler import BatchScheduler

    model = _tiny_model(seq_len=CONTEXT)
    scheduler = BatchScheduler(model, eos_id=None, vocab_limit=None, max_batch=2, max_waiting=2, prefill_chunk=16)
    long_prompt = [(7 * i) % 256 for i in range(96)]  # 6 chunks of 16
    while_reading: list[int] = []  # tokens each decode step made while an admitted prompt had no token yet
    decode = scheduler.decoder.decode

    def observed_decode():
        emitted = decode()
        if any(not seq.produced for seq in scheduler.decoder.sequences.values()):
            while_reading.append(len(emitted))
        return emitted

    scheduler.decoder.decode = observed_decode

    async def scenario() -> None:
        running = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=CONTEXT - 3, temperature=0))
        await running.queue.get()  # it is decoding
        joining = scheduler.submit(long_prompt, SamplingParams(max_tokens=2, temperature=0))
        await joining.queue.get()  # its first token: the whole prompt has been read
        running.cancel()

    try:
        asyncio.run(scenario())
        # chunks 2-6 are each read after a decode step that gave the running stream its token
        assert len(while_reading) == 5 and all(n == 1 for n in while_reading), while_reading
    finally:
        scheduler.close()


@pytest.mark.parametrize("end, counted", [("cancel", "cancelled"), ("stop", "finished")])
def test_scheduler_drops_a_cancelled_request_before_it_finishes(one_thread, end, counted):
    """A client gone is `cancelled`; an answer a stop string completed (`stop`) is `finished`, as /health
    reports them (it counted a stop string's end as a client that left)."""
    from mtnlg_ray.serve.scheduler import BatchScheduler

    model = _tiny_model(seq_len=CONTEXT)
    scheduler = BatchScheduler(model, eos_id=None, vocab_limit=None, max_batch=2, max_waiting=2)

    async def consume_one_batch_then_cancel() -> int:
        stream = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=CONTEXT - 3, temperature=0))
        async for _ in stream.batches():
            getattr(stream, end)()
            return scheduler.stats()["tokens"]

    try:
        at_cancel = asyncio.run(consume_one_batch_then_cancel())
        deadline = time.monotonic() + 60
        while scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = scheduler.stats()
        other = {"cancelled": "finished", "finished": "cancelled"}[counted]
        assert stats["running"] == 0 and stats[counted] == 1 and stats[other] == 0
        # it leaves before the next decode step: one step may be under way when the flag is set (a drop
        # every 256 steps stayed under the old bound, CONTEXT - 3)
        assert stats["tokens"] <= at_cancel + 1, (stats["tokens"], at_cancel)
    finally:
        scheduler.close()


def test_a_cancelled_waiting_request_gives_its_queue_place_back_at_once(one_thread):
    from mtnlg_ray.serve.scheduler import BatchScheduler, Overloaded

    model = _tiny_model(seq_len=CONTEXT)
    scheduler = BatchScheduler(model, eos_id=None, vocab_limit=None, max_batch=1, max_waiting=1)
    long = SamplingParams(max_tokens=CONTEXT - 3, temperature=0)

    async def fill_cancel_and_submit_again() -> None:
        running = scheduler.submit([1, 2, 3], long)
        async for _ in running.batches():
            break  # it holds the only batch row now
        waiting = scheduler.submit([4, 5, 6], long)
        with pytest.raises(Overloaded):
            scheduler.submit([7, 8, 9], long)
        waiting.cancel()  # a client that gave up: its place is free before the next decode step
        again = scheduler.submit([7, 8, 9], long)
        for stream in (running, again):
            stream.cancel()

    try:
        asyncio.run(fill_cancel_and_submit_again())
        deadline = time.monotonic() + 60
        while (scheduler.stats()["running"] or scheduler.stats()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = scheduler.stats()
        assert stats["running"] == stats["waiting"] == 0 and stats["cancelled"] == 3
    finally:
        scheduler.close()


def test_a_stream_sends_its_first_tokens_at_once_then_at_most_one_chunk_per_interval():
    from mtnlg_ray.serve.scheduler import TokenStream

    async def chunks(interval: float) -> list[list[int]]:
        stream = TokenStream([1], SamplingParams(max_tokens=32), asyncio.get_running_loop())
        stream.queue.put_nowait(0)

        async def decode_loop() -> None:  # the other 31 tokens a millisecond apart, then the end
            for token in range(1, 32):
                await asyncio.sleep(0.001)
                stream.queue.put_nowait(token)
            stream.queue.put_nowait(None)

        producer = asyncio.create_task(decode_loop())
        out = [tokens async for tokens in stream.batches(lambda: interval)]
        await producer
        return out

    # The first token alone and at once; the rest arrive within one interval, so they go together.
    assert asyncio.run(chunks(2.0)) == [[0], list(range(1, 32))]
    unlimited = asyncio.run(chunks(0.0))
    assert [t for tokens in unlimited for t in tokens] == list(range(32)) and len(unlimited) > 2


def test_a_stream_whose_client_leaves_before_its_first_event_stops_generating():
    """The events' own `finally` cancels their requests only once iteration began; a client gone while
    the headers were being sent used to leave its sequences decoding to max_tokens for nobody."""
    from starlette.requests import ClientDisconnect

    from mtnlg_ray.serve.app import _CancellingStream
    from mtnlg_ray.serve.scheduler import TokenStream

    async def scenario() -> tuple[list[bool], bool]:
        streams = [TokenStream([1, 2], SamplingParams(max_tokens=8), asyncio.get_running_loop()) for _ in range(2)]
        started = False

        async def events():
            nonlocal started
            started = True
            yield "data: x\n\n"

        async def receive():
            await asyncio.sleep(3600)  # no disconnect message: the send below fails first

        async def send(message):
            raise OSError("client went away")  # at the headers

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
                 "asgi": {"version": "3.0", "spec_version": "2.4"}}
        with pytest.raises(ClientDisconnect):  # Starlette's word for a send that failed
            await _CancellingStream(events(), streams, media_type="text/event-stream")(scope, receive, send)
        return [stream.cancelled for stream in streams], started

    cancelled, started = asyncio.run(scenario())
    assert cancelled == [True, True] and not started


def test_stop_strings_and_chat_template():
    from mtnlg_ray.serve.protocol import ChatMessage, StopScanner, render_chat

    scanner = StopScanner(["\n\nUser:", "END"])
    assert scanner.cut("hello END there") == ("hello ", True)
    assert scanner.cut("hello") == ("hello", False)
    assert scanner.safe_prefix("reply\n\nUs") == "reply"  # could still become a stop string
    assert scanner.safe_prefix("reply EN") == "reply "
    assert scanner.safe_prefix("reply") == "reply"
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert render_chat(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"


def test_serve_args_and_shipped_config(long_checkpoint):
    from ray.serve.schema import ServeDeploySchema

    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.serve import build_app
    from mtnlg_ray.serve.app import parse_args

    import mtnlg_ray

    shipped = yaml.safe_load((Path(mtnlg_ray.__file__).parent / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(shipped)
    app_config = schema.applications[0]
    assert app_config.import_path == "mtnlg_ray.serve:build_app"
    assert shipped["http_options"]["host"] == "127.0.0.1"
    assert parse_args(app_config.args).autoscale == (1, 4)
    build_app({**app_config.args, "checkpoint": str(long_checkpoint)})
    # `serve run ... key=value` passes strings.
    assert parse_args({"checkpoint": "c", "max_batch": "8", "autoscale": "2,6"}).max_batch == 8
    # The model id is the folder's name; `-c .` gave an empty id, which no client could name.
    assert parse_args({"checkpoint": "."}).name == Path.cwd().name
    assert parse_args({"checkpoint": "runs/pretrain/final"}).name == "final"
    with pytest.raises(ConfigError, match="max_batchh"):
        parse_args({"checkpoint": "c", "max_batchh": 8})
    with pytest.raises(ConfigError, match="autoscale"):
        parse_args({"checkpoint": "c", "autoscale": "5,2"})
    # A digest in upper case (PowerShell's) is the same key; a malformed one said only the bare regex.
    import hashlib

    digest = hashlib.sha256(b"key").hexdigest()
    assert parse_args({"checkpoint": "c", "api_key_sha256": digest.upper()}).api_key_sha256 == digest
    with pytest.raises(ConfigError, match=r"api_key_sha256: expected a SHA-256 digest: 64 hex digits"):
        parse_args({"checkpoint": "c", "api_key_sha256": "abc"})
    with pytest.raises(ConfigError, match=r"^serve args: api_key and api_key_sha256 disagree"):  # was "args: : "
        parse_args({"checkpoint": "c", "api_key": "a", "api_key_sha256": hashlib.sha256(b"b").hexdigest()})
    # max_tokens 0 used to mean "no limit", and a negative one deployed a server refusing every request
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="max_tokens: expected a positive integer"):
            parse_args({"checkpoint": "c", "max_tokens": bad})


def test_a_gpu_replica_on_a_cluster_without_gpus_is_refused_not_left_waiting(ray_session, capsys):
    # `serve --num-gpus 1` on a CPU machine printed nothing until it was killed.
    from mtnlg_ray.serve.app import _refuse_replicas_the_cluster_cannot_hold, parse_args

    assert not ray_session.cluster_resources().get("GPU")  # CI's machines, and this one, have none
    gpu = parse_args({"checkpoint": "c", "num_gpus": 0.5})
    with pytest.raises(ConfigError, match=r"^--num-gpus 0.5: the Ray cluster has no GPU; serve on its CPUs with "
                                          r"--num-gpus 0"):
        _refuse_replicas_the_cluster_cannot_hold(gpu, started_here=True)
    _refuse_replicas_the_cluster_cannot_hold(parse_args({"checkpoint": "c"}), started_here=True)  # CPU replicas: nothing
    # A cluster joined may add GPU nodes (KubeRay scales a GPU group up from 0 pods): it waits, and says so.
    _refuse_replicas_the_cluster_cannot_hold(gpu, started_here=False)
    assert "the replicas wait until an autoscaler adds one" in capsys.readouterr().err


def test_replicas_the_cluster_cannot_hold_are_refused_not_left_waiting(ray_session, capsys):
    # `serve --num-cpus 8` (or --replicas 3) on a 2-CPU Ray printed nothing until it was killed.
    from mtnlg_ray.serve.app import _refuse_replicas_the_cluster_cannot_hold, parse_args

    cpus = ray_session.cluster_resources()["CPU"]  # 2 in the tests' shared Ray
    for too_many in ({"num_cpus": cpus + 1}, {"num_replicas": int(cpus) + 1}, {"autoscale": f"{int(cpus) + 1},8"}):
        args = parse_args({"checkpoint": "c", **too_many})
        with pytest.raises(ConfigError, match=r"^--num-cpus / --replicas: \d+ replicas? of [\d.]+ CPU each, but "
                                              rf"the Ray cluster has {cpus:g} CPUs"):
            _refuse_replicas_the_cluster_cannot_hold(args, started_here=True)
        _refuse_replicas_the_cluster_cannot_hold(args, started_here=False)  # a cluster joined may scale
        assert "the rest wait until an autoscaler adds nodes" in capsys.readouterr().err
    _refuse_replicas_the_cluster_cannot_hold(parse_args({"checkpoint": "c", "num_replicas": int(cpus)}),
                                             started_here=True)
    # replicas that ask for no CPU fit anywhere (the first version refused them: 0 of them fit)
    _refuse_replicas_the_cluster_cannot_hold(parse_args({"checkpoint": "c", "num_cpus": 0, "num_replicas": 4}),
                                             started_here=True)
    assert capsys.readouterr().err == ""


def test_serve_cli_help_and_bad_checkpoint(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from mtnlg_ray.cli import app
    from mtnlg_ray.errors import MtnlgError

    def refused_in_process(*args: str) -> str:  # what the command prints as "error: ..." (exit 2)
        result = CliRunner().invoke(app, ["serve", *args])
        assert isinstance(result.exception, MtnlgError), result.output
        return f"error: {result.exception}"

    shown = CliRunner().invoke(app, ["serve", "--help"])
    assert shown.exit_code == 0 and "curl" in shown.stdout and "--api-key" in shown.stdout
    assert refused_in_process("--checkpoint", str(tmp_path / "nope")) == f"error: {tmp_path / 'nope'}: checkpoint not found"
    # No weights: one line before Ray starts, not replicas that die loading them.
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_checkpoint, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert refused_in_process("--checkpoint", str(no_weights)) == f"error: {no_weights / 'model.safetensors'}: missing"
    # A port something else holds: one line before deploying (it used to be Ray's 130-line traceback).
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = run_cli("serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port))
    assert taken.returncode == 2, taken.stderr[-600:]
    assert taken.stderr.strip().splitlines()[-1] == (f"error: --port {port}: 127.0.0.1:{port} is in use "
                                                    "(Address already in use); choose another port")
    # Port 0 bound a port the printed URL (":0") could not name; an empty key variable served with no key.
    # (`serve_args` refuses these and --replicas with --autoscale: test_jobs calls it through `submit serve`.)
    assert refused_in_process("--checkpoint", str(tiny_checkpoint), "--port", "0") == (
        "error: --port 0: expected a port number from 1 to 65535")
    blank = subprocess.run([shutil.which("mtnlg-ray"), "serve", "--checkpoint", str(tiny_checkpoint)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "MTNLG_API_KEY": ""})
    assert blank.returncode == 2 and blank.stderr.strip().splitlines() == [
        "error: MTNLG_API_KEY is set but empty; set it to the key (or unset it to serve without a key)"]
    # An address of another machine (TEST-NET-1, never assigned) blamed the port as "in use".
    elsewhere = run_cli("serve", "--checkpoint", str(tiny_checkpoint), "--host", "192.0.2.1", "--port", "8123")
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.strip().splitlines()[-1].startswith(
        "error: --host 192.0.2.1: not an address of this machine (Cannot assign requested address)")


# --- the API over HTTP ------------------------------------------------------------------------------


def test_greedy_completion_equals_text_generator_and_generate_cli(client, text_generator, long_checkpoint):
    prompt = "The list type"
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    local = text_generator.complete([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    assert result.choices[0].text == local[0]
    assert result.choices[0].finish_reason == local[1].finish_reason
    assert result.usage.prompt_tokens == len(text_generator.encode(prompt))
    assert result.usage.completion_tokens == len(local[1].tokens)
    cli = run_cli("generate", "--checkpoint", str(long_checkpoint), "--prompt", prompt, "--max-tokens", "24",
                  "--temperature", "0")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == result.choices[0].text + "\n"
    # top_p 0 is greedy on both sides too (the CLI used to refuse the value the server takes)
    nucleus = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=1, top_p=0, seed=3)
    cli = run_cli("generate", "--checkpoint", str(long_checkpoint), "--prompt", prompt, "--max-tokens", "24",
                  "--top-p", "0", "--seed", "3")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == nucleus.choices[0].text + "\n" == result.choices[0].text + "\n"


def test_streaming_joins_to_the_completion_and_ends_with_done(client, server):
    from mtnlg_ray.serve import ServeArgs

    args = dict(model="tiny", prompt="def ", max_tokens=32, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    counted = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 32
    assert "".join(c.choices[0].text for c in counted[:-1]) == whole

    raw = requests.post(f"{server}/v1/completions", json={**args, "stream": True}, stream=True, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == whole

    # At the default chunk rate a fast stream sends several tokens per chunk, and loses none of them.
    keyed = openai.OpenAI(base_url=f"{server}/tight/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert keyed.completions.create(**args).choices[0].text == whole
    started = time.perf_counter()
    coalesced = list(keyed.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    elapsed = time.perf_counter() - started
    assert coalesced[-1].usage.completion_tokens == 32
    # The first chunk goes at once, the closing one (finish reason) when the stream ends, and between
    # them at most one per 1 / stream_chunks_per_s: sending per token breaks this bound on a machine
    # that decodes faster than that rate (the exact rule, free of timing, is tested on TokenStream).
    per_s = ServeArgs.model_fields["stream_chunks_per_s"].default
    assert 2 <= len(coalesced) <= 3 + per_s * elapsed  # text chunks (at least one), then the closing one
    assert "".join(c.choices[0].text for c in coalesced[:-1]) == whole


def test_chat_is_a_completion_of_the_documented_template(client):
    from mtnlg_ray.serve.protocol import CHAT_STOP, ChatMessage, render_chat

    messages = [{"role": "system", "content": "You answer in Python."}, {"role": "user", "content": "A list?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    plain = client.completions.create(
        model="tiny", prompt=render_chat([ChatMessage(**m) for m in messages]), max_tokens=20, temperature=0,
        stop=CHAT_STOP,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.object == "chat.completion"
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_prompt_lists_stop_strings_models_and_health(client, server, text_generator):
    singles = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
               for p in ("import ", "class ")]
    both = client.completions.create(model="tiny", prompt=["import ", "class "], max_tokens=12, temperature=0)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == singles
    streamed = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt=["import ", "class "], max_tokens=12,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == singles

    text = singles[0]
    cut = text[len(text) // 2 :][:2]
    stopped = client.completions.create(model="tiny", prompt="import ", max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].text == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    # Usage counts the tokens up to the one that completed the stop string, not the rest of its chunk
    # (the tight app's chunks carry several tokens, the main app's one each).
    tokens = text_generator.complete(["import "], SamplingParams(max_tokens=12, temperature=0))[0][1].tokens
    upto = next(k for k in range(1, len(tokens) + 1) if cut in text_generator.decode_ids(tokens[:k]))
    for prefix, key in (("", "unused"), ("/tight", API_KEY)):
        keyed = openai.OpenAI(base_url=f"{server}{prefix}/v1", api_key=key, max_retries=0, timeout=120)
        usage = keyed.completions.create(model="tiny", prompt="import ", max_tokens=12, temperature=0,
                                         stop=[cut]).usage
        assert usage.completion_tokens == upto < len(tokens), prefix
    # A temperature too small for float32 logits samples greedily, not NaN garbage.
    assert client.completions.create(model="tiny", prompt="import ", max_tokens=12, temperature=1e-40,
                                     seed=0).choices[0].text == text
    # max_completion_tokens is max_tokens' newer name.
    newer = requests.post(f"{server}/v1/completions", json={"prompt": "import ", "max_completion_tokens": 5,
                                                            "temperature": 0}, timeout=60).json()
    assert newer["usage"]["completion_tokens"] == 5 and text.startswith(newer["choices"][0]["text"])

    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = _health(server)
    assert health["status"] == "ok" and health["model"] == "tiny"

    # The same long prompt twice: the second reads its keys from the prefix cache, and says the same.
    prompt = "The list type supports slicing and sorting. " * 8
    texts = [client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
             for _ in range(2)]
    after = _health(server)
    assert texts[0] == texts[1]
    assert after["prefix_hit_tokens"] - health["prefix_hit_tokens"] >= 48  # at least three 16-token blocks
    assert 0 < after["prefix_cache_hit_rate"] <= 1 and after["kv_blocks_used"] == 0


def test_seeded_sampling_over_http_ignores_concurrent_requests(client, server):
    args = dict(model="tiny", prompt="for ", max_tokens=40, temperature=0.9, top_p=0.95, seed=7)
    alone = client.completions.create(**args).choices[0].text

    async def crowded() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        noise = [aclient.completions.create(model="tiny", prompt="x" * (k + 1), max_tokens=60, temperature=1.0)
                 for k in range(8)]
        results = await asyncio.gather(*noise[:4], aclient.completions.create(**args), *noise[4:])
        return results[4].choices[0].text

    assert asyncio.run(crowded()) == alone
    assert client.completions.create(**{**args, "seed": 8}).choices[0].text != alone


def test_32_streaming_clients_4_requests_each_all_complete(server):
    async def one_client(k: int) -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)
        finishes = []
        for r in range(4):
            stream = await aclient.completions.create(model="tiny", prompt=f"def f{k}_{r}(", max_tokens=12,
                                                      temperature=0.8, seed=k * 4 + r, stream=True)
            last = None
            async for chunk in stream:
                last = chunk.choices[0].finish_reason or last
            finishes.append(last)
        return finishes

    async def run_all():
        return await asyncio.gather(*(one_client(k) for k in range(32)))

    finishes = asyncio.run(run_all())  # any 5xx raises openai.InternalServerError / APIStatusError
    assert len(finishes) == 32 and all(f in ("length", "stop") for client_f in finishes for f in client_f)
    assert _health(server)["running"] == 0


MALFORMED = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"model": "tiny"}).encode(), 400),  # no prompt
    (json.dumps({"prompt": 5}).encode(), 400),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400),
    (json.dumps({"prompt": "x", "n": 3}).encode(), 400),
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404),
    (json.dumps({"prompt": "x", "max_tokens": 10**6}).encode(), 400),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400),
    (json.dumps({"prompt": "x", "top_p": 1.5}).encode(), 400),  # (0 is OpenAI's greedy: accepted)
    (json.dumps({"prompt": "hello " * CONTEXT}).encode(), 400),  # longer than the context
    (json.dumps({"prompt": ""}).encode(), 400),
    (b'{"prompt": "x", "temperature": NaN}', 400),  # Python's JSON reads NaN
    (b'{"prompt": "\\ud800 lone surrogate"}', 400),
    (json.dumps({"prompt": "x", "stop": list("abcde")}).encode(), 400),  # OpenAI's limit is 4
    (json.dumps({"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}).encode(), 400),
    (json.dumps({"prompt": ["x"] * 81}).encode(), 400),  # more than max_batch + max_waiting could ever take
    (b"[" * 100_000 + b"]" * 100_000, 400),  # deeper than the JSON parser recurses
]


def test_openai_clients_nulls_and_newer_forms_are_read_and_what_it_cannot_give_is_refused(server, client):
    # null means the default, as OpenAI reads it (a client's temperature=None used to get 422); the
    # developer role and text parts are chat forms OpenAI takes; logprobs and echo were silently
    # ignored, so a harness scored a missing value or the wrong text.
    greedy = client.completions.create(model="tiny", prompt="def ", max_tokens=4, temperature=0).choices[0].text
    nulls = requests.post(f"{server}/v1/completions", timeout=60, json={
        "prompt": "def ", "max_tokens": 4, "temperature": 0, "top_p": None, "n": None, "stream": None, "top_k": None})
    assert nulls.status_code == 200 and nulls.json()["choices"][0]["text"] == greedy
    assert requests.post(f"{server}/v1/completions", timeout=60, json={
        "prompt": "def ", "max_tokens": 4, "top_p": 0, "seed": 1}).json()["choices"][0]["text"] == greedy
    developer = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "hi"}])
    system = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert developer.choices[0].message.content == system.choices[0].message.content
    # penalties, a logit bias, tools and a JSON response format were accepted and ignored: text the client
    # read as penalised, biased or JSON was none of those
    # A limit a chat's prompt crosses is its messages' (param was "prompt", which a chat has not); the
    # two names of the token limit disagreeing name one (param was null); the API docs pages, which
    # answered without a key, are gone.
    long_chat = requests.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello " * CONTEXT}]})
    assert long_chat.status_code == 400 and long_chat.json()["error"]["param"] == "messages"
    assert long_chat.json()["error"]["message"].startswith("messages: ")
    both = requests.post(f"{server}/v1/completions", timeout=60, json={
        "prompt": "x", "max_tokens": 3, "max_completion_tokens": 4})
    assert both.status_code == 400 and both.json()["error"]["param"] == "max_completion_tokens"
    assert [requests.get(f"{server}/{page}", timeout=60).status_code for page in ("docs", "redoc", "openapi.json")] \
        == [404] * 3
    # logprobs 0 asks for the sampled tokens' log-probabilities; the older functions and function_call
    # ask for tools; a field OpenAI refuses is a 400, which OpenAI's client raises as BadRequestError
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="def ", max_tokens=4, logprobs=0)
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["param"] == "logprobs"
    for field, value in (("logprobs", 3), ("logprobs", 0), ("echo", True), ("best_of", 2), ("suffix", "x"), ("presence_penalty", 1.5),
                         ("frequency_penalty", -0.5), ("logit_bias", {"50256": -100}),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}),
                         ("response_format", {"type": "json_object"})):
        refused = requests.post(f"{server}/v1/completions", timeout=60,
                                json={"prompt": "def ", "max_tokens": 4, field: value})
        assert refused.status_code == 400, refused.text
        assert f"{field} is not supported by this server" in refused.json()["error"]["message"]
    assert requests.post(f"{server}/v1/completions", timeout=60, json={
        "prompt": "def ", "max_tokens": 4, "logprobs": None, "echo": False, "best_of": 1, "presence_penalty": 0,
        "frequency_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none", "functions": [],
        "function_call": None, "response_format": {"type": "text"}, "user": "u-1", "metadata": {"a": "b"},
        "stream_options": None}).status_code == 200
    # A near miss of a field it reads answered 200 with that field's default (`max_token`: 16 tokens),
    # and stream_options without stream passed, where OpenAI answers 400.
    for body, param, message in (
            ({"max_token": 100}, "max_token", "max_token: unknown field; did you mean 'max_tokens'?"),
            ({"temprature": 0}, "temprature", "temprature: unknown field; did you mean 'temperature'?"),
            ({"stream_options": {"include_usage": True}}, "stream_options",
             "stream_options: only allowed with stream=true"),
            ({"top_p": 1.5}, "top_p", "top_p: expected a value in [0, 1] (0: the likeliest token alone), got 1.5")):
        refused = requests.post(f"{server}/v1/completions", timeout=60, json={"prompt": "def ", **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
        assert refused.json()["error"]["message"] == message
    empty = requests.post(f"{server}/v1/completions", timeout=60, json={"prompt": ""})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_value"  # was null


def test_200_malformed_requests_get_4xx_and_the_server_still_answers(server, client):
    import aiohttp

    async def fire():
        async with aiohttp.ClientSession() as session:
            async def one(i: int):
                body, expected = MALFORMED[i % len(MALFORMED)]
                path = "/v1/chat/completions" if i % 7 == 0 and expected == 400 and body.startswith(b"{not") \
                    else "/v1/completions"
                async with session.post(f"{server}{path}", data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    return i, expected, response.status, await response.json()

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(fire())
    assert len(results) == 200
    for i, expected, status, body in results:
        assert status == expected, (MALFORMED[i % len(MALFORMED)][0][:60], status, body)
        assert set(body["error"]) >= {"message", "type", "code"}
    wrong_type = next(body for i, _, _, body in results if MALFORMED[i % len(MALFORMED)][0].startswith(b'{"prompt": 5'))
    assert wrong_type["error"]["param"] == "prompt"
    assert requests.get(f"{server}/v1/nowhere", timeout=30).json()["error"]["code"] == "not_found"
    wrong_method = requests.get(f"{server}/v1/completions", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong_method.headers["allow"]
    assert _health(server)["status"] == "ok"
    assert client.completions.create(model="tiny", prompt="def ", max_tokens=4, temperature=0).choices[0].text


def test_a_model_name_with_a_slash_is_listed_retrieved_and_answers(server):
    # OpenAI clients put the name into the URL as it is: GET /v1/models/org/tiny used to be a 404.
    named = openai.OpenAI(base_url=f"{server}/named/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in named.models.list().data] == ["org/tiny"]
    assert named.models.retrieve("org/tiny").id == "org/tiny"
    with pytest.raises(openai.NotFoundError) as missing:
        named.models.retrieve("org/other")
    assert missing.value.code == "model_not_found"
    assert named.completions.create(model="org/tiny", prompt="def ", max_tokens=3, temperature=0).choices[0].text
    # served from `mtnlg-ray serve`'s options with --no-prefix-cache --block-size 8 --kv-cache-tokens 512
    prompt = "The list type supports slicing and sorting. " * 8
    for _ in range(2):
        named.completions.create(model="org/tiny", prompt=prompt, max_tokens=2, temperature=0)
    health = _health(server, "/named")
    assert health["prefix_hit_tokens"] == 0 and health["prefix_cache_hit_rate"] == 0
    assert (health["block_size"], health["kv_blocks"]) == (8, 512 // 8)


def test_api_key_is_required_when_set(server):
    tight = f"{server}/tight"
    assert requests.post(f"{tight}/v1/completions", json={"prompt": "x"}, timeout=30).status_code == 401
    wrong = requests.get(f"{tight}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert wrong.json()["error"]["type"] == "invalid_request_error"  # OpenAI's, for a wrong key
    assert requests.get(f"{tight}/health", timeout=30).status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tight}/v1", api_key="nope", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=f"{tight}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert keyed.completions.create(model="tiny", prompt="def ", max_tokens=3, temperature=0).choices[0].text


def test_over_capacity_is_503_with_retry_after_never_a_hang(server):
    """The tight app holds one running and one waiting request; the rest are refused at once."""
    import aiohttp

    async def fire():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async def one(k: int):
                body = {"prompt": f"while {k}", "max_tokens": 300, "temperature": 0}
                async with session.post(f"{server}/tight/v1/completions", json=body) as response:
                    return response.status, response.headers.get("Retry-After"), await response.json()

            return await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(6))), timeout=240)

    results = asyncio.run(fire())
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1
    for status, retry_after, body in results:
        if status == 503:
            assert int(retry_after) >= 1
            assert body["error"]["code"] == "overloaded"
    assert _health(server, "/tight")["waiting"] == 0
    # More than the replica's 512-slot KV cache could ever hold is a 400 at once, not a wait forever.
    too_big = requests.post(f"{server}/tight/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                            json={"prompt": "while", "max_tokens": 600}, timeout=30)
    assert too_big.status_code == 400 and "kv_cache_tokens" in too_big.json()["error"]["message"]


def test_client_disconnect_stops_its_generation(server):
    before = _health(server)
    with requests.post(f"{server}/v1/completions", stream=True, timeout=60,
                       json={"prompt": "def ", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}) as r:
        assert next(line for line in r.iter_lines() if line).startswith(b"data: ")
    # Leaving the block closed the connection; the server must notice and drop the row.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = _health(server)
        if after["running"] == 0 and after["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"]
    assert after["tokens"] - before["tokens"] < CONTEXT - 8


def test_the_ready_lines_show_a_request_that_works_as_pasted():
    from mtnlg_ray.cli.serve import ready_lines

    url = "http://127.0.0.1:8000"
    plain = ready_lines("mtnlg", url, keyed=False)
    assert plain[1] == (f"try:  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{{\"model\": "
                        "\"mtnlg\", \"prompt\": \"def \", \"max_tokens\": 32, \"temperature\": 0}'")
    keyed = ready_lines("mtnlg", url, keyed=True)[1]  # pasted where MTNLG_API_KEY was unset, it got 401
    assert '-H "Authorization: Bearer $MTNLG_API_KEY"' in keyed and keyed.endswith("(export MTNLG_API_KEY=<the key> first)")


def test_a_sigterm_to_the_whole_process_group_stops_a_local_server_cleanly(tiny_checkpoint, tmp_path):
    """`timeout`, systemd and `kill -- -PGID` signal every process of the group, the local Ray's GCS
    among them: deleting the app then waited 60 s for the dead GCS and ended in Ray's error, never
    printing `stopped.`. A Ray the command started goes down with it; there is nothing to delete."""
    import os
    import shutil as sh
    import signal
    import subprocess

    from conftest import unused_port

    port = unused_port()
    exe = sh.which("mtnlg-ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([exe, "serve", "-c", str(tiny_checkpoint), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "Ctrl-C to stop." not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "Ctrl-C to stop." in log.read_text(), log.read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=150) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert text.rstrip().endswith("stopped.") and "GCS" not in text, text[-2000:]


def test_a_port_whose_last_server_just_stopped_is_free_to_serve_on():
    """The port check bound without SO_REUSEADDR, as the HTTP server binds with it: right after a
    server stopped, its connections in TIME_WAIT made the check say "in use" for a minute."""
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.serve.app import _probe_bind

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ConfigError, match="is in use"):  # a listening server: in use
            _probe_bind("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: its end waits in TIME_WAIT
        client.close()
    _probe_bind("127.0.0.1", port)
