"""The decode loop of one Serve replica: a thread that runs a `ContinuousDecoder` for every request.

Requests wait in a bounded queue and join the running batch between decode steps once a row and
cache blocks for their answer are free; their prompts are read in chunks between decode steps, and
each finished or cancelled one leaves at once. Tokens travel back to the request's asyncio loop; a client that
goes away cancels its request and the loop drops its row before the next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from mtnlg_ray.model.continuous import ContinuousDecoder, Emitted
from mtnlg_ray.model.generate import SamplingParams
from mtnlg_ray.model.gpt import GPT


class Overloaded(Exception):
    """The waiting queue is full; the client should retry later."""


@dataclass
class TokenStream:
    """One request as the decode loop sees it, and the async iterator of its tokens."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    seq_id: int | None = None
    finish_reason: str | None = None
    stopped: bool = False  # ended by a stop string: /health counts it finished, not cancelled

    def cancel(self) -> None:
        """Stop generating for this request (the client went away or has what it needs)."""
        self.cancelled = True

    def stop(self) -> None:
        """Stop generating: the answer is complete (a stop string was found)."""
        self.stopped = True
        self.cancelled = True

    async def batches(self, min_interval: Callable[[], float] = lambda: 0.0) -> AsyncIterator[list[int]]:
        """Lists of new tokens: everything generated since the last one (at least one token each).

        The first list comes as soon as its token does; after that at most one every `min_interval()`
        seconds, so a fast stream sends several tokens per chunk instead of paying per token.
        """
        last = None
        while True:
            items = [await self.queue.get()]
            if last is not None and items[0] is not None:
                wait = last + min_interval() - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            tokens = []
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                if item is None:  # end of the stream
                    if tokens:
                        yield tokens
                    return
                tokens.append(item)
            yield tokens
            last = self.loop.time()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the requester's event loop has closed: nobody is listening any more
            self.cancelled = True


class BatchScheduler:
    """Owns the model's decode loop thread; `submit` is safe to call from any asyncio loop."""

    def __init__(self, model: GPT, eos_id: int | None, vocab_limit: int | None, max_batch: int = 16,
                 max_waiting: int = 64, **engine) -> None:
        """`engine`: the `ContinuousDecoder`'s cache settings (kv_cache_tokens, block_size,
        prefill_chunk, prefix_cache)."""
        self.decoder = ContinuousDecoder(model, max_batch, eos_id=eos_id, vocab_limit=vocab_limit, **engine)
        self.max_waiting = max_waiting
        self.waiting: collections.deque[TokenStream] = collections.deque()
        self.running: dict[int, TokenStream] = {}
        self.counts = {"finished": 0, "cancelled": 0, "tokens": 0, "steps": 0}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> TokenStream:
        stream = TokenStream(prompt, params, asyncio.get_running_loop())
        with self._lock:
            # Free batch rows count as room too: a burst that arrives between two steps is not refused.
            # A request cancelled since the last decode step holds no place in the queue.
            queued = sum(not s.cancelled for s in self.waiting)
            if queued >= self.max_waiting + self.decoder.free_rows:
                raise Overloaded(f"{queued} requests already wait for a slot")
            self.waiting.append(stream)
        self._wake.set()
        return stream

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), **self.counts, **self.decoder.stats()}

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                idle = not self.running and not self.waiting
            if idle:  # a submit after this check sets the event, so the wait cannot miss it
                self._wake.wait()
                self._wake.clear()
            try:
                self._drop_cancelled()
                # Running streams get their tokens before a joining prompt's chunk is computed.
                self._deliver(self.decoder.decode())
                self._admit()
                self._deliver(self.decoder.prefill())
                if self.running:
                    self.counts["steps"] += 1
            except Exception as exc:  # a bug: fail the requests in flight, keep serving new ones
                for stream in list(self.running.values()):
                    self.decoder.remove(stream.seq_id)
                    stream._put(exc)
                self.running.clear()

    def _drop_cancelled(self) -> None:
        for seq_id, stream in list(self.running.items()):
            if stream.cancelled:
                self.decoder.remove(seq_id)
                del self.running[seq_id]
                self._count_dropped(stream)
        with self._lock:  # waiting ones too: clients that gave up while the batch was full
            kept = [stream for stream in self.waiting if not stream.cancelled]
            if len(kept) < len(self.waiting):
                for stream in self.waiting:
                    if stream.cancelled:
                        self._count_dropped(stream)
                self.waiting = collections.deque(kept)

    def _count_dropped(self, stream: TokenStream) -> None:
        self.counts["finished" if stream.stopped else "cancelled"] += 1

    def _admit(self) -> None:
        """Waiting requests join in order while a row and cache blocks for their whole answer are free;
        when the head of the queue does not fit, it (and everything behind it) waits for blocks."""
        while self.decoder.free_rows:
            with self._lock:
                if not self.waiting:
                    return
                stream = self.waiting[0]
            if stream.cancelled:
                self._pop(stream)
                self._count_dropped(stream)
                continue
            try:  # a request the cache could never hold fails here, with one line
                seq_id = self.decoder.add(stream.prompt, stream.params)
            except Exception as exc:
                self._pop(stream)
                stream._put(exc)
                continue
            if seq_id is None:
                return
            self._pop(stream)
            stream.seq_id = seq_id
            self.running[seq_id] = stream

    def _pop(self, stream: TokenStream) -> None:
        with self._lock:
            self.waiting.remove(stream)

    def _deliver(self, emitted: list[Emitted]) -> None:
        # One wake-up per event loop per step, not one per token: with a full batch that is the
        # difference between one and max_batch cross-thread calls for every decode step.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for e in emitted:
            stream = self.running[e.seq_id]
            items = by_loop.setdefault(stream.loop, [])
            items.append((stream, e.token))
            self.counts["tokens"] += 1
            if e.finish_reason:
                stream.finish_reason = e.finish_reason
                items.append((stream, None))
                del self.running[e.seq_id]
                self.counts["finished"] += 1
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                for stream, _ in items:
                    stream.cancelled = True


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)

