"""Serving speed: tokens/s and time to first token through Ray Serve over HTTP, against the bare decode loop.

One process trains a tokenizer, writes a random-init checkpoint, and times the bare loop on it
(`decode` on the model `TextGenerator` loads: no Ray, no HTTP, one stream). It then serves the same
checkpoint on a local Ray (`mtnlg_ray.serve:build_app`, one replica) and times 1, 4 and 16 concurrent
streaming clients on loopback, each sending `--requests` greedy requests one after another. The bare
loop and the one-client run are each timed again at the end, and the table uses the mean of both runs
(the JSON keeps each), so drift during the run shows and favours neither side.
Replica and bare loop get the same number of torch threads. Prints a table; writes JSON with --output.
Every served run sends prompts no earlier request sent, and the bench stops if the replica's prefix
cache served any token of a throughput run: its baselines prefill every prompt token, so must it.
TTFT p90 is the nearest-rank percentile, left out under 10 requests.

The engine's own measurements follow on the same replica, each `--trials` times:
- **batching**: 16 clients send the static batch's 16 prompts at once, sampled (temperature 0.8, top-p
  0.95, seed i: the same tokens `generate` makes), `--sampled-tokens` each: aggregate tokens/s against
  bare `generate` on those prompts as one static batch (target >= 0.85x);
- **prefix cache**: time to the first token of a request whose first `--prefix-tokens` tokens an
  earlier request already read, against a same-length request that shares nothing (target <= 0.3x);
- **chunked prefill**: the longest gap between a running stream's chunks while a `--long-tokens`
  prompt joins, against that prompt's prefill time alone (target <= 0.5x).

    python bench/serve.py
    python bench/serve.py --preset small --max-tokens 128 --requests 3 --threads 1 --output bench/results/serve.json
    python bench/serve.py --preset gpt3-125m --threads 2 --concurrency 1,16 --requests 1 --max-tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import build_checkpoint, start_local_ray  # noqa: E402

from mtnlg_ray.inference import TextGenerator  # noqa: E402
from mtnlg_ray.model.generate import SamplingParams, decode, generate  # noqa: E402

# Prompts are windows of these words; with random weights only their ids matter.
WORDS = (
    "The Python interpreter reads a program as a stream of tokens produced by the lexical analyzer. Each "
    "logical line is built from one or more physical lines by following the explicit or implicit line joining "
    "rules. A function definition is an executable statement: its execution binds the function name in the "
    "current local namespace to a function object, a wrapper around the executable code for the function."
).split()


_SERIAL = iter(range(1, 10**9))


def prompts(count: int, words: int) -> list[str]:
    """`count` prompts no earlier call made: each opens with a serial number of its own, so the
    replica's prefix cache (on by default) holds no block of it, and a served run prefills every
    token as its baseline does. Give the baseline the same texts."""
    return [f"Note {next(_SERIAL)}: " + " ".join((WORDS * 2)[i % len(WORDS) : i % len(WORDS) + words])
            for i in range(count)]


def bare_loop(generator: TextGenerator, texts: list[str], max_tokens: int) -> dict:
    """One stream at a time through the same decoder `mtnlg-ray generate` uses."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ttft, rates, tokens = [], [], 0
    for text in texts:
        ids = generator.encode(text)
        start = time.perf_counter()
        n = 0
        for step in decode(generator.model, [ids], params, eos_id=generator.eos, vocab_limit=generator.vocab):
            if step[0] is None:
                break
            if n == 0:
                ttft.append(time.perf_counter() - start)
            n += 1
        rates.append(n / (time.perf_counter() - start))
        tokens += n
    return {"tok_s": statistics.mean(rates), "ttft_s": statistics.mean(ttft), "tokens": tokens}


def bare_static_batch(generator: TextGenerator, texts: list[str], max_tokens: int,
                      sampling: list[dict] | None = None) -> dict:
    """All prompts in one left-padded `generate` call: the in-process ceiling for batching. Greedy, or
    row i with `sampling[i]` (SamplingParams fields)."""
    params = [SamplingParams(max_tokens=max_tokens, **(sampling[i] if sampling else {"temperature": 0.0}))
              for i in range(len(texts))]
    ids = [generator.encode(t) for t in texts]
    start = time.perf_counter()
    results = generate(generator.model, ids, params, eos_id=generator.eos, vocab_limit=generator.vocab)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in results)
    return {"batch": len(texts), "tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def sampled(i: int) -> dict:
    """The sampling of the batching run's request i: what the served and the static batch both use."""
    return {"temperature": 0.8, "top_p": 0.95, "seed": i}


async def one_stream(session, url: str, model: str, prompt: str, max_tokens: int,
                     sampling: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **(sampling or {"temperature": 0}),
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    seconds = time.perf_counter() - start
    return {"ttft_s": first if first is not None else seconds, "seconds": seconds, "tokens": tokens}


async def clients(url: str, model: str, concurrency: int, requests: int, max_tokens: int, texts: list[str]) -> dict:
    """`concurrency` clients, each sending `requests` of `texts` one after another."""
    import aiohttp

    assert len(texts) == concurrency * requests

    async def client(k: int, session) -> list[dict]:
        return [await one_stream(session, url, model, texts[k * requests + r], max_tokens) for r in range(requests)]

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.perf_counter()
        done = await asyncio.gather(*(client(k, session) for k in range(concurrency)))
        wall = time.perf_counter() - start
    runs = [r for per_client in done for r in per_client]
    tokens = sum(r["tokens"] for r in runs)
    return {
        "clients": concurrency,
        "requests": len(runs),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "stream_tok_s": statistics.mean(r["tokens"] / r["seconds"] for r in runs),
        "ttft_s": statistics.mean(r["ttft_s"] for r in runs),
        "ttft_p90_s": p90([r["ttft_s"] for r in runs]),
        "ttft_all_s": [r["ttft_s"] for r in runs],
    }


def p90(values: list[float]) -> float | None:
    """The nearest-rank 90th percentile; None under 10 values, where it would be the largest or a guess."""
    if len(values) < 10:
        return None
    return sorted(values)[math.ceil(0.9 * len(values)) - 1]


def token_text(generator: TextGenerator, tokens: int, seed: int) -> str:
    """Made-up text of about `tokens` tokens (`seed` picks the words, so texts share nothing)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) + rng.choice(["", "s", "ed", "er"]) for _ in range(2 * tokens)]
    ids = generator.tokenizer.encode(" ".join(words)).ids
    # Decoding and encoding again can merge tokens at the cut: take as many ids as give `tokens` back.
    cut = tokens
    while len(generator.tokenizer.encode(generator.decode_ids(ids[:cut])).ids) < tokens:
        cut += 1
    return generator.decode_ids(ids[:cut])


async def first_token_s(session, url: str, body: dict) -> tuple[float, int]:
    """Seconds to a one-token completion (its first token) and the prompt's length in tokens."""
    start = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json={**body, "max_tokens": 1, "temperature": 0}) as response:
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {await response.text()}")
        usage = (await response.json())["usage"]
    return time.perf_counter() - start, usage["prompt_tokens"]


async def prefix_hit_vs_miss(url: str, model: str, generator: TextGenerator, prefix_tokens: int, trial: int) -> dict:
    """TTFT of a prompt whose first `prefix_tokens` tokens were read before, and of one sharing nothing."""
    import aiohttp

    prefix = token_text(generator, prefix_tokens, seed=1000 + trial)
    fresh = token_text(generator, prefix_tokens, seed=2000 + trial)
    tail = [" The river walks.", " A stone builds.", " The garden keeps."]
    async with aiohttp.ClientSession() as session:
        await first_token_s(session, url, {"model": model, "prompt": prefix + tail[0]})  # fills the cache
        hit, hit_len = await first_token_s(session, url, {"model": model, "prompt": prefix + tail[1]})
        miss, miss_len = await first_token_s(session, url, {"model": model, "prompt": fresh + tail[2]})
    return {"hit_ttft_s": hit, "miss_ttft_s": miss, "hit_prompt_tokens": hit_len, "miss_prompt_tokens": miss_len,
            "ratio": hit / miss}


async def gap_while_long_prompt_joins(url: str, model: str, generator: TextGenerator, long_tokens: int,
                                      trial: int) -> dict:
    """The longest pause in a running stream while a long prompt joins, against that prompt's prefill alone."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        alone, _ = await first_token_s(session, url, {"model": model,
                                                      "prompt": token_text(generator, long_tokens, 3000 + trial)})
        arrivals: list[float] = []
        joined: dict = {}

        async def running_stream() -> None:
            body = {"model": model, "prompt": token_text(generator, 16, 4000 + trial),
                    "max_tokens": generator.context - 32, "temperature": 0, "stream": True}
            async with session.post(f"{url}/v1/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                        arrivals.append(time.perf_counter())
                    if "end" in joined and arrivals[-1] > joined["end"] + 0.5:
                        return
            joined["stream_ended"] = True

        async def long_prompt() -> None:
            while len(arrivals) < 10:  # the stream is under way
                if "stream_ended" in joined:  # a model so fast the whole answer came in a few chunks
                    raise SystemExit("the running stream ended before the long prompt joined; use a larger preset")
                await asyncio.sleep(0.01)
            joined["start"] = time.perf_counter()
            joined["ttft_s"], joined["prompt_tokens"] = await first_token_s(
                session, url, {"model": model, "prompt": token_text(generator, long_tokens, 5000 + trial)})
            joined["end"] = time.perf_counter()

        await asyncio.gather(running_stream(), long_prompt())
    if arrivals[-1] < joined["end"]:
        raise SystemExit("the running stream ended before the long prompt joined; try another --seed")
    window = [t for t in arrivals if joined["start"] <= t <= joined["end"] + 0.5]
    before = [t for t in arrivals if t < joined["start"]]
    gaps = [b - a for a, b in zip(before[-1:] + window, window)]
    steady = [b - a for a, b in zip(before[:-1], before[1:])]
    return {"prefill_alone_s": alone, "joined_ttft_s": joined["ttft_s"], "long_prompt_tokens": joined["prompt_tokens"],
            "longest_gap_s": max(gaps), "steady_gap_s": statistics.median(steady), "ratio": max(gaps) / alone}


async def sampled_clients(url: str, model: str, texts: list[str], max_tokens: int) -> dict:
    """Every prompt at once, one client each, request i sampled with `sampled(i)`: aggregate tokens/s."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(session, url, model, text, max_tokens, sampled(i))
                                      for i, text in enumerate(texts)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in runs)
    return {"clients": len(texts), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def milliseconds(seconds: float | None) -> str:
    return "" if seconds is None else f"{1000 * seconds:.1f}"


def prefix_hit_tokens(url: str) -> int:
    return json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())["prefix_hit_tokens"]


def expect_no_cache_hits(url: str, before: int, what: str) -> None:
    """A throughput run compared with a baseline that prefills everything must prefill everything too."""
    after = prefix_hit_tokens(url)
    if after != before:
        raise SystemExit(f"{what}: the prefix cache served {after - before} prompt tokens; the comparison "
                         "with the baseline would not be like for like")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--requests", type=int, default=3, help="sequential requests per client")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replica and the bare loop")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-chunks-per-s", type=float, default=100.0, help="the replica's chunk budget")
    parser.add_argument("--stream-chunks-per-s", type=float, default=25.0, help="one stream's chunk budget")
    parser.add_argument("--sampled-tokens", type=int, default=48, help="tokens per client in the batching run")
    parser.add_argument("--prefix-tokens", type=int, default=1500,
                        help="shared prefix of the prefix-cache run (at most 75%% of the context)")
    parser.add_argument("--long-tokens", type=int, default=1700,
                        help="the joining prompt of the chunked-prefill run (at most 85%% of the context)")
    parser.add_argument("--trials", type=int, default=3, help="repeats of each engine measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = load_average()
    torch.set_num_threads(args.threads)

    import ray
    from ray import serve

    from mtnlg_ray.serve import build_app

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.preset, args.vocab, Path(tmp), args.seed)
        generator = TextGenerator(ckpt)
        generator.model.eval()
        words, requests = args.prompt_words, args.requests
        # Every served run gets prompts of its own (see `prompts`); each baseline reads the same texts.
        one_first, one_again = prompts(requests, words), prompts(requests, words)
        level_texts = {c: one_first if c == 1 else prompts(c * requests, words) for c in levels}
        trial_texts = [prompts(16, words) for _ in range(args.trials)]
        batch_sampling = [sampled(i) for i in range(16)]
        bare_loop(generator, prompts(1, words), args.max_tokens)  # warm-up
        bare_first = bare_loop(generator, one_first, args.max_tokens)
        static = bare_static_batch(generator, level_texts[max(levels)][: max(levels)], args.max_tokens)
        sampled_static = [bare_static_batch(generator, texts, args.sampled_tokens, batch_sampling)
                          for texts in trial_texts]

        # The replica at the priority `mtnlg-ray serve` gives it (nice 0), not Ray's default nice 15.
        start_local_ray(num_cpus=os.cpu_count(), include_dashboard=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"checkpoint": str(ckpt), "model_name": "bench", "num_cpus": args.threads,
                             "max_batch": args.max_batch, "max_chunks_per_s": args.max_chunks_per_s,
                             "stream_chunks_per_s": args.stream_chunks_per_s}),
                  name="bench", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        time.sleep(5)  # let Ray's start-up work (agents, metrics export) settle before timing
        asyncio.run(clients(url, "bench", 1, 2, args.max_tokens, prompts(2, words)))  # warm-up
        hits = prefix_hit_tokens(url)
        served = [asyncio.run(clients(url, "bench", c, requests, args.max_tokens, level_texts[c])) for c in levels]
        if 1 in levels:  # one client again at the end: its two runs bracket the others, like the bare loop
            again = asyncio.run(clients(url, "bench", 1, requests, args.max_tokens, one_again))
            first = next(r for r in served if r["clients"] == 1)
            first["runs"] = [dict(first), again]
            for key in ("aggregate_tok_s", "stream_tok_s", "ttft_s"):
                first[key] = (first["runs"][0][key] + again[key]) / 2
            first["ttft_p90_s"] = p90([t for run in first["runs"] for t in run["ttft_all_s"]])
        expect_no_cache_hits(url, hits, "the greedy client runs")
        prefix_tokens = min(args.prefix_tokens, int(0.75 * generator.context))
        long_tokens = min(args.long_tokens, int(0.85 * generator.context))
        engine = {"sampled": [], "prefix": [], "gap": []}
        for trial in range(args.trials):
            hits = prefix_hit_tokens(url)
            engine["sampled"].append(asyncio.run(sampled_clients(url, "bench", trial_texts[trial],
                                                                 args.sampled_tokens)))
            expect_no_cache_hits(url, hits, f"sampled trial {trial}")
            engine["prefix"].append(asyncio.run(prefix_hit_vs_miss(url, "bench", generator, prefix_tokens, trial)))
            engine["gap"].append(asyncio.run(gap_while_long_prompt_joins(url, "bench", generator, long_tokens,
                                                                         trial)))
        health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
        serve.shutdown()
        ray.shutdown()
        bare_last = bare_loop(generator, one_again, args.max_tokens)
        sampled_static += [bare_static_batch(generator, texts, args.sampled_tokens, batch_sampling)
                           for texts in trial_texts]

    bare = {"tok_s": (bare_first["tok_s"] + bare_last["tok_s"]) / 2,
            "ttft_s": (bare_first["ttft_s"] + bare_last["ttft_s"]) / 2,
            "runs": [bare_first, bare_last]}
    one = next(r for r in served if r["clients"] == 1)
    for row in served:
        row["aggregate_vs_one_client"] = row["aggregate_tok_s"] / one["aggregate_tok_s"]
        row["stream_vs_bare"] = row["stream_tok_s"] / bare["tok_s"]
    top = served[-1]
    result = {
        "bench": "serve",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "load_before": load_before, "load_after": load_average()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "bare_loop": bare,
        "bare_static_batch": static,
        "served": served,
        "single_stream_vs_bare": one["stream_tok_s"] / bare["tok_s"],
        "aggregate_top_vs_one_client": top["aggregate_tok_s"] / one["aggregate_tok_s"],
        "targets": {"single_stream_vs_bare": 0.8, "aggregate_16_vs_one_client": 5.0,
                    "sampled_16_vs_static_batch": 0.85, "prefix_hit_vs_miss_ttft": 0.3,
                    "longest_gap_vs_prefill_alone": 0.5},
        "engine": engine,
        "sampled_static_batch": sampled_static,
        "sampled_16_vs_static_batch": statistics.median(r["tok_s"] for r in engine["sampled"])
        / statistics.median(r["tok_s"] for r in sampled_static),
        "prefix_hit_vs_miss_ttft": statistics.median(r["ratio"] for r in engine["prefix"]),
        "longest_gap_vs_prefill_alone": statistics.median(r["ratio"] for r in engine["gap"]),
        "replica_health": health,
    }

    print(f"\n{args.preset}, {args.max_tokens} new tokens, greedy, {args.threads} torch thread(s), "
          f"load {load_before} -> {result['machine']['load_after']}\n")
    print("| | clients | requests | aggregate tok/s | per-stream tok/s | TTFT mean (ms) | TTFT p90 (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| bare loop (1 process) | 1 | {args.requests} | {bare['tok_s']:.0f} | {bare['tok_s']:.0f} | "
          f"{1000 * bare['ttft_s']:.1f} | |")
    print(f"| bare `generate`, static batch | {static['batch']} | {static['batch']} | {static['tok_s']:.0f} | | | |")
    for row in served:
        print(f"| Ray Serve, HTTP streaming | {row['clients']} | {row['requests']} | {row['aggregate_tok_s']:.0f} | "
              f"{row['stream_tok_s']:.0f} | {1000 * row['ttft_s']:.1f} | {milliseconds(row['ttft_p90_s'])} |")
    print(f"\nsingle stream / bare loop: {result['single_stream_vs_bare']:.2f} (target >= 0.8; bare runs "
          f"{bare_first['tok_s']:.0f} and {bare_last['tok_s']:.0f} tok/s)")
    print(f"aggregate at {top['clients']} clients / one client: {result['aggregate_top_vs_one_client']:.2f} "
          f"(target >= 5)")
    static_tok_s = statistics.median(r["tok_s"] for r in sampled_static)
    print(f"\n16 clients at once, sampled, {args.sampled_tokens} tokens each: "
          f"{', '.join(str(round(r['tok_s'])) for r in engine['sampled'])} tok/s against the static batch's "
          f"{', '.join(str(round(r['tok_s'])) for r in sampled_static)}: median ratio "
          f"{result['sampled_16_vs_static_batch']:.2f} (target >= 0.85)")
    print("prefix cache, TTFT hit / miss: " + ", ".join(
        f"{1000 * r['hit_ttft_s']:.0f} / {1000 * r['miss_ttft_s']:.0f} ms ({r['hit_prompt_tokens']} tokens)"
        for r in engine["prefix"]) + f": median ratio {result['prefix_hit_vs_miss_ttft']:.3f} (target <= 0.3)")
    print("chunked prefill, longest gap / prefill alone: " + ", ".join(
        f"{1000 * r['longest_gap_s']:.0f} / {1000 * r['prefill_alone_s']:.0f} ms (steady "
        f"{1000 * r['steady_gap_s']:.0f} ms, {r['long_prompt_tokens']} tokens)" for r in engine["gap"])
        + f": median ratio {result['longest_gap_vs_prefill_alone']:.2f} (target <= 0.5)")
    print(f"replica: prefix-cache hit rate {health['prefix_cache_hit_rate']:.2f}, "
          f"static batch {static_tok_s:.0f} tok/s")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
