"""The Ray Serve deployment: an OpenAI-compatible FastAPI ingress in front of one decode loop per replica.

`build_app(args)` is what `serve run mtnlg_ray.serve:build_app checkpoint=...`, `serve deploy
mtnlg_ray/configs/serve.yaml` and `mtnlg-ray serve` all deploy; `ServeArgs` lists its arguments.
Each replica loads the checkpoint once and batches every request it holds into one running decode.
"""

import asyncio
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtnlg_ray.errors import CheckpointError, ConfigError, InputError
from mtnlg_ray.inference import IncrementalText
from mtnlg_ray.serve.protocol import (
    CHAT_STOP,
    APIError,
    ChatRequest,
    CompletionRequest,
    StopScanner,
    render_chat,
    validation_error,
)
from mtnlg_ray.apikey import BLANK_KEY, api_key_digest, is_blank
from mtnlg_ray.serve.scheduler import BatchScheduler, Overloaded, TokenStream

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
SWITCH_INTERVAL_S = 0.0001
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its requests' generation however it ends: the events'
    own `finally` runs only once they started, and a client that leaves while the headers are being
    sent would leave its sequences decoding to max_tokens for nobody."""

    def __init__(self, content, streams: list, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self._streams:
                stream.cancel()


class ServeArgs(BaseModel):
    """Arguments of `build_app`: the `args:` of a Serve config, `key=value` pairs of `serve run`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    model_name: str | None = None  # the `model` clients send; default: the checkpoint folder's name
    api_key: str | None = None  # when set, every /v1 request needs "Authorization: Bearer <key>"
    # The key's SHA-256 (hex) instead of the key: what a Ray Job carries, so neither its runtime_env
    # (which `ray job list` and the dashboard show) nor Serve's stored arguments ever hold the key.
    api_key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: cuda when the replica has a GPU
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: bfloat16 on GPU, as stored on CPU
    max_batch: int = 16  # sequences decoded together per replica
    max_waiting: int = 64  # requests queued per replica beyond the batch; more get 503 + Retry-After
    max_tokens: int | None = None  # most tokens one request may ask for; default: the context
    # The paged KV cache: one pool of blocks per replica. Requests are admitted when blocks for their
    # whole answer are free (else they wait, and past max_waiting get 503), so the pool never runs out.
    kv_cache_tokens: int | None = None  # token slots in the pool; default: max_batch x the context
    block_size: int = 16  # tokens per cache block
    prefill_chunk: int = 256  # prompt tokens read per step between decode steps (long prompts take several)
    prefix_cache: bool = True  # reuse the cached blocks of an earlier prompt's identical beginning
    # How often chunks go out. After its first chunk, a stream's chunks come at least
    # max(1 / stream_chunks_per_s, running streams / max_chunks_per_s) seconds apart, each carrying
    # every token made since the last. Each chunk costs the replica about 1.5 ms of Python (HTTP,
    # Serve's streaming, JSON) that the decode loop waits out behind the GIL: sent per token, that
    # took one stream from 0.9x to 0.8x the bare loop on 2 CPUs (bench/serve.py).
    max_chunks_per_s: float = Field(100.0, gt=0)  # all streams of a replica together
    stream_chunks_per_s: float = Field(25.0, gt=0)  # one stream
    num_replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaling on ongoing requests
    num_cpus: float = Field(1.0, ge=0.0)  # per replica; also its torch threads (at least one)
    num_gpus: float = Field(0.0, ge=0.0)

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and is_blank(value):
            raise ValueError(BLANK_KEY)
        return value

    @field_validator("api_key_sha256", mode="before")
    @classmethod
    def _hex_digest(cls, value: Any) -> Any:
        # PowerShell's Get-FileHash prints upper case; anything else was Pydantic's bare regex
        if isinstance(value, str):
            value = value.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", value):
                raise ValueError("expected a SHA-256 digest: 64 hex digits (`printf %s KEY | sha256sum`)")
        return value

    @field_validator("api_key_sha256")
    @classmethod
    def _not_the_empty_key(cls, value: str | None) -> str | None:
        if value == api_key_digest(""):  # what `submit serve --api-key ""` used to ship
            raise ValueError("expected the digest of a non-empty key; this is the empty string's")
        return value

    @model_validator(mode="after")
    def _only_the_digest(self) -> "ServeArgs":
        """A key becomes its digest at once: the deployment, and what Serve stores of it, hold only that."""
        if self.api_key is not None:
            digest = api_key_digest(self.api_key)
            if self.api_key_sha256 not in (None, digest):
                raise ValueError("api_key and api_key_sha256 disagree: give one of them")
            self.api_key, self.api_key_sha256 = None, digest
        return self

    @field_validator("autoscale", mode="before")
    @classmethod
    def _pair(cls, value):
        if isinstance(value, str):  # "1,4" from the command line or `serve run autoscale=1,4`
            value = [part.strip() for part in value.split(",")]
        return value

    @field_validator("max_batch", "max_waiting", "num_replicas", "block_size", "prefill_chunk", "kv_cache_tokens",
                     "max_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"expected a positive integer, got {value}")
        return value

    @field_validator("autoscale")
    @classmethod
    def _bounds(cls, value):
        if value is not None and not (0 <= value[0] <= value[1] and value[1] >= 1):
            raise ValueError(f"expected min,max with 0 <= min <= max and max >= 1, got {value[0]},{value[1]}")
        return value

    @property
    def name(self) -> str:
        # `-c .` names the folder; a link's own name stays (resolve() would name its target)
        return self.model_name or Path(os.path.abspath(self.checkpoint)).name


def parse_args(args: dict | ServeArgs) -> ServeArgs:
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"serve args: {key}: {message}" if key else f"serve args: {message}") from None


class ServerMetrics:
    """Request and token counters and latency histograms, exported to Prometheus by Ray."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "mtnlg_requests", description="HTTP requests by endpoint and status.", tag_keys=("endpoint", "status")
        )
        self.prompt_tokens = metrics.Counter("mtnlg_prompt_tokens", description="Prompt tokens received.")
        self.generated_tokens = metrics.Counter("mtnlg_generated_tokens", description="Tokens generated.")
        self.latency = metrics.Histogram(
            "mtnlg_request_latency_s", description="Seconds from request to last byte.",
            boundaries=LATENCY_BUCKETS, tag_keys=("endpoint",),
        )
        self.first_token = metrics.Histogram(
            "mtnlg_time_to_first_token_s", description="Seconds from request to first generated text.",
            boundaries=LATENCY_BUCKETS,
        )
        self.running = metrics.Gauge("mtnlg_running_requests", description="Sequences in the decode batch.")
        self.waiting = metrics.Gauge("mtnlg_waiting_requests", description="Requests waiting for a batch slot.")
        self.kv_blocks_used = metrics.Gauge("mtnlg_kv_cache_blocks_used",
                                            description="KV cache blocks held by running sequences.")
        self.prefix_hit_rate = metrics.Gauge(
            "mtnlg_prefix_cache_hit_rate", description="Share of prompt tokens whose keys came from the prefix cache.")

    def finished(self, endpoint: str, status: int, started: float) -> None:
        self.requests.inc(1, tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(time.perf_counter() - started, tags={"endpoint": endpoint})


# No /docs, /redoc or /openapi.json: they answered without the API key, and /health is the one open path.
api = FastAPI(title="mtnlg-ray", description="OpenAI-compatible text generation from an mtnlg-ray checkpoint.",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and methods answer in the same error shape as everything else; a 405 keeps its Allow header.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment(name="TextGeneratorServer", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class TextGeneratorServer:
    """One replica: the checkpoint, its tokenizer, and a `BatchScheduler` that decodes every request."""

    def __init__(self, args: dict) -> None:
        import torch

        from mtnlg_ray.inference import TextGenerator
        from mtnlg_ray.runtime import default_device

        self.args = parse_args(args)
        # Ray sizes OMP threads from num_cpus; make torch agree, with at least one thread.
        torch.set_num_threads(max(1, int(self.args.num_cpus)))
        # The decode thread takes the GIL back after every kernel; with Python's default 5 ms switch
        # interval it can wait that long behind the HTTP event loop on every op of a decode step.
        # bench/serve.py on 2 CPUs: 0.5 ms took one stream from 0.5x to ~0.8x the bare loop, 0.1 ms to ~0.85x.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        device = default_device(self.args.device)
        default_dtype = torch.bfloat16 if device.type == "cuda" else None
        dtype = getattr(torch, self.args.dtype) if self.args.dtype else default_dtype
        self.generator = TextGenerator(self.args.checkpoint, device=device, dtype=dtype)
        self.generator.model.eval()
        self.model_name = self.args.name
        self.max_tokens = self.args.max_tokens if self.args.max_tokens is not None else self.generator.context
        self.scheduler = BatchScheduler(
            self.generator.model, self.generator.eos, self.generator.vocab,
            max_batch=self.args.max_batch, max_waiting=self.args.max_waiting,
            kv_cache_tokens=self.args.kv_cache_tokens, block_size=self.args.block_size,
            prefill_chunk=self.args.prefill_chunk, prefix_cache=self.args.prefix_cache,
        )
        self.metrics = ServerMetrics()
        self.created = int(time.time())

    # Serve calls this every health_check_period_s; raising restarts the replica.
    def check_health(self) -> None:
        if not self.scheduler.alive:
            raise RuntimeError("the decode loop thread has stopped")

    @api.get("/health")
    async def health(self) -> JSONResponse:
        stats = self.scheduler.stats()
        ok = self.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "failed", "model": self.model_name, **stats},
                            status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def run() -> Response:
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        return await self._handle("models", request, run)

    # `path`: a model name may hold slashes (`--model-name org/model`, as Hugging Face names do), and
    # OpenAI clients put it in the URL as it is.
    @api.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> Response:
        async def run() -> Response:
            self._check_model(model)
            return JSONResponse(self._model_card())

        return await self._handle("models", request, run)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        async def run() -> Response:
            body = await self._parse(request, CompletionRequest)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not prompts:
                raise APIError(400, "prompt: expected a string or a non-empty list of strings", param="prompt",
                               code="invalid_value")
            most = self.args.max_batch + self.args.max_waiting  # what an idle replica can take at once
            if len(prompts) > most:
                raise APIError(400, f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                               f"{most} (max_batch + max_waiting): send them in several requests",
                               param="prompt", code="invalid_value")
            return await self._answer("completions", body, prompts, body.stop, default_max=16, started=started)

        started = time.perf_counter()
        return await self._handle("completions", request, run, started)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        async def run() -> Response:
            body = await self._parse(request, ChatRequest)
            stops = CHAT_STOP + (body.stop or [])
            return await self._answer("chat", body, [render_chat(body.messages)], stops, default_max=None,
                                      started=started)

        started = time.perf_counter()
        return await self._handle("chat", request, run, started)

    # --- request plumbing -------------------------------------------------------------------------

    async def _handle(self, endpoint: str, request: Request, run, started: float | None = None) -> Response:
        """Authorise, run, and turn an `APIError` into its status and OpenAI error body; count it."""
        started = started or time.perf_counter()
        try:
            self._authorize(request)
            response = await run()
        except APIError as error:
            self.metrics.finished(endpoint, error.status, started)
            return _error_response(error)
        except Exception as exc:  # a bug: still an OpenAI error body, counted, with the traceback in the log
            logger.exception("%s request failed", endpoint)
            self.metrics.finished(endpoint, 500, started)
            return _error_response(APIError(500, f"internal error ({type(exc).__name__}: {exc})",
                                            kind="server_error"))
        if not isinstance(response, StreamingResponse):  # a stream counts itself when it ends
            self.metrics.finished(endpoint, response.status_code, started)
        return response

    def _authorize(self, request: Request) -> None:
        if self.args.api_key_sha256 is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(api_key_digest(token.strip()),
                                                                  self.args.api_key_sha256):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")  # OpenAI's type for a wrong key: invalid_request_error

    async def _parse(self, request: Request, schema):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body: expected JSON ({exc})", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "request body: JSON nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body: expected a JSON object, got {type(data).__name__}",
                           code="invalid_json")
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        self._check_model(body.model)
        return body

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model: '{model}' is not served here (this server has '{self.model_name}')",
                           param="model", code="model_not_found")

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mtnlg-ray",
                "context_length": self.generator.context}

    def _prepare(self, text: str, body, default_max: int | None, where: str = "prompt"):
        """Prompt ids and sampling settings, or a 400 naming what is over which limit (`where`: the
        request's field that holds the prompt)."""
        from mtnlg_ray.model.generate import SamplingParams

        ids = self.generator.tokenizer.encode(text).ids
        if not ids:
            raise APIError(400, f"{where}: expected some text, got an empty prompt", param=where,
                           code="invalid_value")
        context = self.generator.context
        if len(ids) >= context:
            raise APIError(400, f"{where}: {len(ids)} tokens leave no room to generate in the model's context "
                           f"of {context} tokens", param=where, code="context_length_exceeded")
        if body.max_tokens is not None:
            max_tokens = body.max_tokens
        else:  # OpenAI's defaults: 16 for completions, the rest of the context for chat; within our limits
            room = self.scheduler.decoder.capacity_tokens - len(ids) + 1
            max_tokens = max(1, min(default_max or context, context - len(ids), self.max_tokens, room))
        if max_tokens > self.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is over this server's limit of {self.max_tokens}",
                           param="max_tokens", code="invalid_value")
        if len(ids) + max_tokens > context:
            raise APIError(400, f"max_tokens: the prompt's {len(ids)} tokens plus max_tokens {max_tokens} exceed "
                           f"the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        needed = self.scheduler.decoder.cache_tokens_needed(len(ids), max_tokens)
        if needed > self.scheduler.decoder.capacity_tokens:
            raise APIError(400, f"max_tokens: the prompt's {len(ids)} tokens plus max_tokens {max_tokens} need "
                           f"{needed} tokens of KV cache; this server holds {self.scheduler.decoder.capacity_tokens}"
                           " (kv_cache_tokens)", param="max_tokens", code="context_length_exceeded")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature),
                                    top_k=body.top_k, top_p=float(body.top_p), seed=body.seed)
        except InputError as exc:
            param = str(exc).split(":", 1)[0]
            raise APIError(400, str(exc), param=param, code="invalid_value") from None
        return ids, params

    def _submit(self, ids: list[int], params) -> TokenStream:
        try:
            stream = self.scheduler.submit(ids, params)
        except Overloaded as exc:
            raise APIError(503, f"server at capacity ({exc}); retry after {RETRY_AFTER_S} s", kind="server_error",
                           code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        self.metrics.prompt_tokens.inc(len(ids))
        self._update_gauges()
        return stream

    def _update_gauges(self) -> None:
        stats = self.scheduler.stats()
        self.metrics.running.set(stats["running"])
        self.metrics.waiting.set(stats["waiting"])
        self.metrics.kv_blocks_used.set(stats["kv_blocks_used"])
        self.metrics.prefix_hit_rate.set(stats["prefix_cache_hit_rate"])

    def _chunk_interval(self) -> float:
        running = len(self.scheduler.running)
        return max(1.0 / self.args.stream_chunks_per_s, running / self.args.max_chunks_per_s)

    async def _pieces(self, stream: TokenStream, stops: list[str] | None, started: float,
                      usage: dict) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason) as tokens arrive; the last piece carries the finish reason."""
        scanner = StopScanner(stops)
        decoded = IncrementalText(self.generator.decode_ids)
        shown = 0
        async for new in stream.batches(self._chunk_interval):
            if not decoded.ids:
                self.metrics.first_token.observe(time.perf_counter() - started)
            text = decoded.extend(new)
            usage["completion_tokens"] = len(decoded.ids)
            self.metrics.generated_tokens.inc(len(new))
            text, stopped = scanner.cut(text)
            if stopped:
                stream.stop()
                # Tokens made after the one that completed the stop string were never the answer's.
                ids = decoded.ids
                usage["completion_tokens"] = next((
                    k for k in range(len(ids) - len(new) + 1, len(ids) + 1)
                    if scanner.cut(self.generator.decode_ids(ids[:k]))[1]), len(ids))
                yield text[shown:], "stop"
                return
            # A byte-level token can end inside a UTF-8 character: wait for the rest of it.
            safe = scanner.safe_prefix(text.rstrip("\ufffd"))
            if len(safe) > shown:
                yield safe[shown:], None
                shown = len(safe)
        text, _ = scanner.cut(decoded.extend([]))
        yield text[shown:], stream.finish_reason or "length"

    async def _answer(self, endpoint: str, body, prompts: list[str], stops, default_max, started: float) -> Response:
        chat = endpoint == "chat"
        # A chat's prompt is its messages: a limit it crosses is theirs (`param` named "prompt", which a
        # chat request has not).
        where = "messages" if endpoint == "chat" else "prompt"
        prepared = [self._prepare(p, body, default_max, where) for p in prompts]
        streams: list[TokenStream] = []
        try:
            for ids, params in prepared:
                streams.append(self._submit(ids, params))
        except APIError:
            for stream in streams:
                stream.cancel()
            raise
        usages = [{"prompt_tokens": len(ids), "completion_tokens": 0} for ids, _ in prepared]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream_events(endpoint, head, streams, stops, usages, started, include_usage)
            return _CancellingStream(events, streams, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect(stream: TokenStream, usage: dict) -> tuple[str, str]:
            parts, finish = [], "length"
            async for piece, reason in self._pieces(stream, stops, started, usage):
                parts.append(piece)
                finish = reason or finish
            return "".join(parts), finish

        try:
            results = await asyncio.gather(*(collect(s, u) for s, u in zip(streams, usages)))
        finally:  # the client went away, or one prompt failed: stop generating for all of them
            for stream in streams:
                stream.cancel()
            self._update_gauges()
        choices = []
        for index, (text, finish) in enumerate(results):
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
        prompt_tokens = sum(u["prompt_tokens"] for u in usages)
        completion_tokens = sum(u["completion_tokens"] for u in usages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return JSONResponse({**head, "choices": choices, "usage": usage})

    async def _stream_events(self, endpoint: str, head: dict, streams: list[TokenStream], stops,
                             usages: list[dict], started: float, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        chat = endpoint == "chat"
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, piece: str, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": piece} if first else ({"content": piece} if piece else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": piece, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice]})

        status = 200
        try:
            if chat:
                yield chunk(0, "", None, first=True)
            if len(streams) == 1:
                async for piece, finish in self._pieces(streams[0], stops, started, usages[0]):
                    if piece or finish:
                        yield chunk(0, piece, finish)
            else:
                async for index, piece, finish in self._merged(streams, stops, started, usages):
                    if piece or finish:
                        yield chunk(index, piece, finish)
            if include_usage:
                prompt_tokens = sum(u["prompt_tokens"] for u in usages)
                completion_tokens = sum(u["completion_tokens"] for u in usages)
                yield _sse({**head, "choices": [], "usage": {
                    "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}})
            yield _sse("[DONE]")
        except asyncio.CancelledError:  # the client disconnected
            status = 499
            raise
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            status = 500
            yield _sse(APIError(500, f"generation failed: {exc}", kind="server_error").body())
        finally:
            for stream in streams:
                stream.cancel()
            self._update_gauges()
            self.metrics.finished(endpoint, status, started)

    async def _merged(self, streams, stops, started, usages) -> AsyncIterator[tuple[int, str, str | None]]:
        """Pieces of several prompts as they come, tagged with the prompt's index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for piece, finish in self._pieces(streams[index], stops, started, usages[index]):
                    await queue.put((index, piece, finish))
            except Exception as exc:
                await queue.put(exc)
            await queue.put((index, None, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        try:
            remaining = len(streams)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                index, piece, finish = item
                if piece is None:
                    remaining -= 1
                    continue
                yield index, piece, finish
        finally:
            for task in tasks:
                task.cancel()


def build_app(args: dict | ServeArgs):
    """The Serve application for `serve run mtnlg_ray.serve:build_app checkpoint=CKPT [key=value ...]`."""
    cfg = parse_args(args)
    options: dict = {
        # The replica takes more requests than it can hold, so that its own queue decides (503 with an
        # OpenAI error body); Serve's queue in front of it is only a backstop for bursts, bounded too.
        "max_ongoing_requests": cfg.max_batch + cfg.max_waiting + 16,
        "max_queued_requests": 4 * (cfg.max_batch + cfg.max_waiting) + 64,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        "ray_actor_options": {
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus,
            # Our handlers never block (decoding has its own thread), so they can share the replica's
            # event loop: each streamed chunk then skips a hop between two loops in two threads.
            "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
        },
    }
    if cfg.autoscale:
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": cfg.autoscale[0],
            "max_replicas": cfg.autoscale[1],
            "initial_replicas": max(cfg.autoscale[0], 1),
            # A replica is busy once its batch is full; scale out before requests queue.
            "target_ongoing_requests": cfg.max_batch,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    return TextGeneratorServer.options(**options).bind(cfg.model_dump())


APP_NAME = "mtnlg"  # the Serve application `mtnlg-ray serve` deploys


def _probe_bind(host: str, port: int) -> None:
    """Bind host:port once and let go: one line blaming --host (a name that does not resolve, an
    address of another machine) or --port (in use, a privileged port), as the case is. Every address
    the name resolves to is tried (`localhost` may give ::1 first where IPv6 is off); one is enough."""
    import errno
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address this machine can resolve ({exc.strerror})") from None
    failures: list[OSError] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As the HTTP server binds: a port whose last server just stopped (its connections in
            # TIME_WAIT) takes a new one, and was refused here as "in use" for a minute. A listening
            # socket still fails.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                return
            except OSError as exc:
                failures.append(exc)
    in_use = next((e for e in failures if e.errno == errno.EADDRINUSE), None)
    if in_use is not None:
        raise ConfigError(f"--port {port}: {host}:{port} is in use ({in_use.strerror}); choose another port")
    if all(e.errno == errno.EADDRNOTAVAIL for e in failures):
        raise ConfigError(f"--host {host}: not an address of this machine ({failures[0].strerror}); serve on "
                          "127.0.0.1, 0.0.0.0 or one of its own addresses")
    raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({failures[0].strerror})")


def check_can_serve(host: str, port: int) -> None:
    """One line, before deploying, where this cluster cannot serve a model at http://host:port/.

    Every `mtnlg-ray serve` app takes the route "/", and a cluster's Serve has one HTTP address:
    deploying beside a served model used to replace it silently, and asking for another port got
    Serve's old one while the printed URL named the new. Without Serve running, the port must be free.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        _probe_bind(host, port)
        return
    served = sorted(serve.status().applications)
    if served:
        raise ConfigError(f"Ray Serve on this cluster already serves {', '.join(served)} at '/'; stop it first "
                          "(`mtnlg-ray jobs stop JOB_ID`, or Ray's `serve shutdown` for one whose job died)")
    http = client.http_config
    if (http.host, http.port) != (host, port):  # the option that differs is named: --host was blamed on --port
        given = " ".join([f"--host {host}"] * (http.host != host) + [f"--port {port}"] * (http.port != port))
        raise ConfigError(f"{given}: Ray Serve on this cluster listens on {http.host}:{http.port}; "
                          f"serve there (--host {http.host} --port {http.port}) or shut its Serve down first")


def check_servable(args: ServeArgs) -> None:
    """The checkpoint's problems in one line here, not as replicas that die while loading it."""
    from mtnlg_ray.checkpoint import check_checkpoint, check_consolidated, tokenizer_path

    checkpoint = Path(args.checkpoint)
    check_consolidated(checkpoint)  # a run directory or a training checkpoint says which to give instead
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    check_checkpoint(checkpoint)
    tokenizer_path(checkpoint)


def serve_model(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> str:
    """Deploy on the connected Ray cluster (or a local one) and return the base URL once replicas are up."""
    from mtnlg_ray.runtime import ensure_ray

    check_servable(args)
    ensure_ray()
    return _deploy(args, host, port, name)


def _deploy(args: ServeArgs, host: str, port: int, name: str) -> str:
    """`serve_model` on a checked checkpoint, with Ray connected."""
    check_can_serve(host, port)
    # Ray Serve's INFO lines on this driver ("Connecting to existing Serve app ... New http_options will
    # not be applied", after serve.start had applied them) read as if --port were ignored; what a user
    # needs is printed by the commands. Its warnings and errors still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def serve_until_stopped(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
                        on_ready: Callable[[str], None] | None = None) -> None:
    """`serve_model`, then block until Ctrl-C or SIGTERM (a `kill` or a container stop) and delete the app."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Before deploying: a stop while the replicas load the model (`jobs stop` sends SIGTERM) must
    # delete the app too, or it keeps running, and holding its GPUs, behind a stopped job. After
    # connecting to Ray, though: ray.init puts its own SIGTERM handler in place of any made before.
    from mtnlg_ray.runtime import ensure_ray

    check_servable(args)
    ours = False
    try:
        ensure_ray()
        ours = _started_ray_here()
        _refuse_replicas_the_cluster_cannot_hold(args, ours)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        url = _deploy(args, host, port, name)
        if on_ready is not None:
            on_ready(url)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        import ray

        # A Ray this process started goes down with it, Serve and all: nothing to delete. A SIGTERM to
        # the whole process group (`timeout`, systemd, `kill -- -PGID`) had stopped its GCS too, and
        # deleting the app waited 60 s for it, then failed.
        if ray.is_initialized() and not ours:  # stopped before Ray was even reached: nothing to delete
            serve.delete(name)


def _refuse_replicas_the_cluster_cannot_hold(args: ServeArgs, started_here: bool) -> None:
    """Replicas the cluster cannot hold waited for it without a word until Ctrl-C: a GPU replica on a
    cluster with no GPU, `--num-cpus 8` or `--replicas 3` on a 2-CPU Ray. A local Ray started here will
    never grow: refused. A cluster joined may (KubeRay's autoscaler, which this process cannot see,
    scales GPU groups up from 0 pods): a warning that the replicas wait for nodes."""
    import ray

    from mtnlg_ray.runtime import workers_that_fit

    if args.num_gpus > 0 and not ray.cluster_resources().get("GPU", 0):  # said as such: it is the cause
        error = (f"--num-gpus {args.num_gpus:g}: the Ray cluster has no GPU; serve on its CPUs with --num-gpus 0, "
                 "or connect to a cluster with GPUs (RAY_ADDRESS)")
        warning = (f"warning: --num-gpus {args.num_gpus:g}: the Ray cluster has no GPU now; the replicas wait "
                   "until an autoscaler adds one (--num-gpus 0 serves on its CPUs)")
    else:
        if args.num_cpus <= 0 and args.num_gpus <= 0:  # a replica that asks for nothing fits anywhere
            return
        replicas = max(args.autoscale[0], 1) if args.autoscale else args.num_replicas
        fit, cpus, gpus = workers_that_fit(args.num_cpus, args.num_gpus)
        if fit >= replicas:
            return
        want = (f"{replicas} replica{'s' if replicas > 1 else ''} of {args.num_cpus:g} CPU"
                + (f" and {args.num_gpus:g} GPU" if args.num_gpus else "") + " each")
        have = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs ({fit} such replicas fit)"
        error = f"--num-cpus / --replicas: {want}, but {have}; lower them, or connect to a larger cluster (RAY_ADDRESS)"
        warning = f"warning: {want}, but {have} now; the rest wait until an autoscaler adds nodes"
    if started_here:
        raise ConfigError(error)
    print(warning, file=sys.stderr, flush=True)


def _started_ray_here() -> bool:
    """Whether ray.init started the local Ray this process runs on (rather than joining a cluster)."""
    import ray._private.worker

    node = ray._private.worker._global_node
    return bool(node is not None and node.live_processes())
