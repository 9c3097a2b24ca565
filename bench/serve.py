"""Serving speed: tokens/s and time to first token through Ray Serve over HTTP, against the bare decode loop.

One process trains a tokenizer, writes a random-init checkpoint, and times the bare loop on it
(`decode` on the model `TextGenerator` loads: no Ray, no HTTP, one stream). It then serves the same
checkpoint on a local Ray (`mtnlg_ray.serve:build_app`, one replica) and times 1, 4 and 16 concurrent
streaming clients on loopback, each sending `--requests` greedy requests one after another. The bare
loop and the one-client run are each timed again at the end, and the table uses the mean of both runs
(the JSON keeps each), so drift during the run shows and favours neither side.
Replica and bare loop get the same number of torch threads. Prints a table; writes JSON with --output.

    python bench/serve.py
    python bench/serve.py --preset small --max-tokens 128 --requests 3 --threads 1 --output bench/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mtnlg_ray.checkpoint import save_checkpoint  # noqa: E402
from mtnlg_ray.config import ModelSection  # noqa: E402
from mtnlg_ray.inference import TextGenerator  # noqa: E402
from mtnlg_ray.model.generate import SamplingParams, decode, generate  # noqa: E402
from mtnlg_ray.model.gpt import GPT  # noqa: E402
from mtnlg_ray.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

# Prompts are windows of these words; with random weights only their ids matter.
WORDS = (
    "The Python interpreter reads a program as a stream of tokens produced by the lexical analyzer. Each "
    "logical line is built from one or more physical lines by following the explicit or implicit line joining "
    "rules. A function definition is an executable statement: its execution binds the function name in the "
    "current local namespace to a function object, a wrapper around the executable code for the function."
).split()


def prompts(count: int, words: int) -> list[str]:
    return [" ".join((WORDS * 2)[i % len(WORDS) : i % len(WORDS) + words]) for i in range(count)]


def build_checkpoint(preset: str, vocab: int, workdir: Path, seed: int) -> Path:
    tok_file = train_tokenizer(["builtin:python-docs"], vocab, workdir / "tokenizer", show_progress=False)
    config = ModelSection(preset=preset).resolve(tokenizer_vocab=load_tokenizer(tok_file).get_vocab_size())
    torch.manual_seed(seed)
    model = GPT(config)
    model.reset_parameters(seed=seed)
    return save_checkpoint(model, workdir / "ckpt", tokenizer_json=tok_file) or workdir / "ckpt"


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


def bare_static_batch(generator: TextGenerator, texts: list[str], max_tokens: int) -> dict:
    """All prompts in one left-padded `generate` call: the in-process ceiling for batching."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ids = [generator.encode(t) for t in texts]
    start = time.perf_counter()
    results = generate(generator.model, ids, params, eos_id=generator.eos, vocab_limit=generator.vocab)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in results)
    return {"batch": len(texts), "tok_s": tokens / seconds, "tokens": tokens}


async def one_stream(session, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
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


async def clients(url: str, model: str, concurrency: int, requests: int, max_tokens: int, words: int) -> dict:
    import aiohttp

    texts = prompts(concurrency * requests, words)

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
        "ttft_p90_s": sorted(r["ttft_s"] for r in runs)[int(0.9 * (len(runs) - 1))],
    }


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
        bare_texts = prompts(args.requests, args.prompt_words)
        bare_loop(generator, bare_texts[:1], args.max_tokens)  # warm-up
        bare_first = bare_loop(generator, bare_texts, args.max_tokens)
        static = bare_static_batch(generator, prompts(max(levels), args.prompt_words), args.max_tokens)

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
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
        asyncio.run(clients(url, "bench", 1, 2, args.max_tokens, args.prompt_words))  # warm-up
        served = [asyncio.run(clients(url, "bench", c, args.requests, args.max_tokens, args.prompt_words))
                  for c in levels]
        if 1 in levels:  # one client again at the end: its two runs bracket the others, like the bare loop
            again = asyncio.run(clients(url, "bench", 1, args.requests, args.max_tokens, args.prompt_words))
            first = next(r for r in served if r["clients"] == 1)
            first["runs"] = [dict(first), again]
            for key in ("aggregate_tok_s", "stream_tok_s", "ttft_s", "ttft_p90_s"):
                first[key] = (first["runs"][0][key] + again[key]) / 2
        serve.shutdown()
        ray.shutdown()
        bare_last = bare_loop(generator, bare_texts, args.max_tokens)

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
        "targets": {"single_stream_vs_bare": 0.8, "aggregate_16_vs_one_client": 5.0},
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
              f"{row['stream_tok_s']:.0f} | {1000 * row['ttft_s']:.1f} | {1000 * row['ttft_p90_s']:.1f} |")
    print(f"\nsingle stream / bare loop: {result['single_stream_vs_bare']:.2f} (target >= 0.8; bare runs "
          f"{bare_first['tok_s']:.0f} and {bare_last['tok_s']:.0f} tok/s)")
    print(f"aggregate at {top['clients']} clients / one client: {result['aggregate_top_vs_one_client']:.2f} "
          f"(target >= 5)")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
