"""Continuous-batching generation for many LoRA adapters on one base causal LM.

Requests join and leave the running batch at every step, as in Orca (Yu et al., OSDI '22)
and vLLM (Kwon et al., arXiv 2309.06180); each row of a batch uses its own adapter (or
none) through the pool's stacked slots (S-LoRA, arXiv 2311.03285; Punica, arXiv 2310.18547).
One `step()`:

1. admits waiting requests (first come, first served) while the batch has room and the
   prefill budget allows, making their adapters resident; a request whose adapter cannot
   be loaded fails alone, one whose adapter has no free slot yet waits;
2. advances every running request by one token in one decode pass (one token per row);
3. prefills the admitted requests in one right-padded pass, which gives their first token,
   and appends them to the running batch;
4. drops finished and cancelled requests, handing their KV rows and adapters back.

The KV cache keeps one row per request with its own length (`RowKVCache`), so rows of
different lengths need no padding shifts and greedy output equals offline greedy
generation of each request alone. Adapters attached to the model itself (`ll.load_adapter`,
`ll.add_adapter`; any method: DoRA, VeRA, a LoRAMoE mixture, a MeteoRA router …) are served too,
always resident, through the core per-row path (`loralab.model.row_adapters`), in the same
batches as the pool's adapters; attach them before the pool loads its first adapter.
Prefetching of queued requests' adapters runs in a
background thread. Tokens stream out per request through a queue (`RequestHandle.stream`)
or a callback; `start()` runs the step loop in a thread for a server.
"""

from __future__ import annotations

import inspect
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loralab.model import adapter_names, row_adapters, set_active
from loralab.serve.kv_cache import RowKVCache
from loralab.serve.pool import AdapterLoadError, AdapterNotFound, AdapterPool, Lease, PoolBusy, PoolPinned
from loralab.serve.sampling import Sampler, SamplingParams

SUPPORTED_ATTENTION = ("sdpa", "eager")


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue: retry later (HTTP 429)."""


class RequestError(ValueError):
    """The request itself is invalid: unknown adapter, prompt too long, bad settings (HTTP 400)."""


class RequestFailed(RuntimeError):
    """A submitted request could not be completed; the message says why."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it adds (may be empty while a character or a possible
    stop string is incomplete)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class Completion:
    request_id: int
    adapter: str | None
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length", "cancelled" or "error"
    error: str | None = None


Event = TokenEvent | Completion


class RequestHandle:
    """A submitted request: its tokens so far, a stream of events, its completion."""

    def __init__(self, engine: Engine, request_id: int, prompt_ids: list[int], adapter: str | None,
                 params: SamplingParams, on_event: Callable[[Event], None] | None) -> None:
        self.engine = engine
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.events: queue.Queue[Event] = queue.Queue()
        self._on_event = on_event
        self._done = threading.Event()
        self._sampler = Sampler(params)
        self._lease: Lease | None = None
        self._sent = 0  # characters of text already streamed

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def slot(self) -> int:
        return self._lease.slot if self._lease is not None else -1

    def cancel(self) -> None:
        """Stop generating now; the request's batch row and adapter are freed at once."""
        self.engine.cancel(self)

    def stream(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Yield token events as they come; raises RequestFailed if the request fails."""
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, Completion):
                if event.finish_reason == "error":
                    raise RequestFailed(event.error)
                return
            yield event

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to finish (something else must be stepping the engine)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.completion()

    def completion(self) -> Completion:
        return Completion(self.id, self.adapter, self.prompt_ids, list(self.token_ids), self.text,
                          self.finish_reason or "", self.error)

    def _send(self, event: Event) -> None:
        self.events.put(event)
        if self._on_event is not None:
            self._on_event(event)


class Engine:
    """Serve `model` (a transformers causal LM, Llama family) with the adapters of `pool`.

    max_batch: rows decoded together; max_queue: waiting requests before `submit` raises
    QueueFull; max_len: context length (default: the model's); max_prefill_tokens: padded
    prompt tokens admitted per step (at least one request is always admitted);
    prefetch: load queued requests' adapters in a background thread.
    """

    def __init__(self, model: nn.Module, tokenizer=None, pool: AdapterPool | None = None, *, max_batch: int = 16,
                 max_queue: int = 256, max_len: int | None = None, max_prefill_tokens: int = 4096,
                 prefetch: bool = True) -> None:
        config = model.config
        attention = getattr(config, "_attn_implementation", "eager") or "eager"
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(f"attention implementation {attention!r} is not supported by the engine; "
                             f"load the model with attn_implementation in {SUPPORTED_ATTENTION}")
        if pool is not None and pool.model is not model:
            raise ValueError("the pool was made for another model: create it with AdapterPool(..., model=model)")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model = model.eval()
        self.attached = set(adapter_names(model))
        if self.attached:
            set_active(model, [])  # rows choose their adapter; the others see the base model
        overlap = sorted(self.attached & set(pool.names())) if pool is not None else []
        if overlap:
            raise ValueError(f"adapters {overlap} are both attached to the model and registered in the pool")
        self.decoder = model.get_decoder()
        # transformers ≥ 5.24 names the cache argument `cache`; older releases `past_key_values`
        takes_cache = "cache" in inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if takes_cache else "past_key_values"
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        limit = getattr(config, "max_position_embeddings", None) or max_len
        self.max_len = min(max_len or limit, limit)
        self.device = next(model.parameters()).device
        self.vocab_size = config.vocab_size
        self.eos_ids = self._eos_ids(model, tokenizer)
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else 0
        self._float_mask = model.dtype if attention == "eager" else None
        self.cache = RowKVCache(config.num_hidden_layers, max_batch, self.max_len)
        self._running: list[RequestHandle] = []
        self._waiting: deque[RequestHandle] = deque()
        self._ids = itertools.count()
        self._queue_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._work = threading.Condition(self._queue_lock)
        self._in_step = False
        self._loop: threading.Thread | None = None
        self._stop = threading.Event()
        self.prefetch = prefetch and pool is not None
        self._prefetcher: threading.Thread | None = None

    @staticmethod
    def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        return set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], adapter: str | None = None, params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request; raises RequestError if it is invalid and QueueFull if the queue is full."""
        params = params or SamplingParams()
        ids = self._check_prompt(prompt_ids)
        if adapter is not None and adapter not in self.attached:
            if self.pool is None:
                raise RequestError(f"unknown adapter {adapter!r}: this engine has no adapter pool and serves "
                                   f"{sorted(self.attached) or 'no attached adapters'}")
            try:
                self.pool.slot_of(adapter)
            except AdapterNotFound as err:
                raise RequestError(str(err)) from None
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this engine has none")
        with self._queue_lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} waiting requests (max_queue); retry later")
            handle = RequestHandle(self, next(self._ids), ids, adapter, params, on_event)
            self._waiting.append(handle)
            self._work.notify()
        return handle

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        ids = list(prompt_ids)
        if not ids:
            raise RequestError("the prompt is empty: give at least one token id")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(ids) >= self.max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context holds {self.max_len}, "
                               "leaving no room to generate; shorten it")
        return ids

    def cancel(self, handle: RequestHandle) -> None:
        if self._take(handle):
            self._finish(handle, "cancelled")
            return
        with self._step_lock:
            if handle.done:
                return
            self._finish(handle, "cancelled")
            if not self._in_step:
                self._drop_finished()

    def _take(self, handle: RequestHandle) -> bool:
        """Take `handle` off the waiting queue; False if it is not there (admitted or cancelled)."""
        with self._queue_lock:
            if handle in self._waiting:
                self._waiting.remove(handle)
                return True
            return False

    def adapter_names(self) -> list[str]:
        """Every adapter a request may name: the attached ones, then the pool's."""
        return sorted(self.attached) + (self.pool.names() if self.pool is not None else [])

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def running(self) -> int:
        return len(self._running)

    def waiting(self) -> int:
        return len(self._waiting)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> int:
        """Advance every running request by one token and admit waiting ones; returns tokens made."""
        with self._step_lock, torch.inference_mode():
            self._in_step = True
            admitted: list[RequestHandle] = []
            try:
                admitted = self._admit()
                made = self._decode() if self._running else 0
                if admitted:
                    made += self._prefill(admitted)
            except BaseException as err:
                self._fail_batch(admitted, err)
                raise
            finally:
                self._in_step = False
            self._drop_finished()
            self._request_prefetch()
            return made

    def _admit(self) -> list[RequestHandle]:
        admitted: list[RequestHandle] = []
        longest = 0
        with self._queue_lock:
            waiting = list(self._waiting)
        for handle in waiting:
            if len(self._running) + len(admitted) >= self.max_batch:
                break
            longest_if = max(longest, len(handle.prompt_ids))
            if admitted and longest_if * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            lease = None
            if handle.adapter is not None and handle.adapter not in self.attached and not handle.done:
                try:
                    lease = self.pool.acquire(handle.adapter)
                except PoolBusy:
                    continue
                except (AdapterNotFound, AdapterLoadError, PoolPinned) as err:
                    if self._take(handle):
                        self._finish(handle, "error", str(err))
                    continue
            if not self._take(handle):  # cancelled meanwhile
                if lease is not None:
                    self.pool.release(lease)
                continue
            handle._lease = lease
            admitted.append(handle)
            longest = longest_if
        return admitted

    def _fail_batch(self, admitted: list[RequestHandle], err: BaseException) -> None:
        """A forward pass raised: every request in it fails with the reason, and the batch starts afresh."""
        for handle in self._running + [h for h in admitted if h not in self._running]:
            self._finish(handle, "error", f"the batch failed: {type(err).__name__}: {err}")
            self._release(handle)
        self._running.clear()
        self.cache.clear()

    def _forward(self, handles: list[RequestHandle], start: int, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, T, d] for rows start … start+n-1 of the cache, each with its adapter."""
        if self.pool is not None:
            self.pool.rows.assign([h.slot for h in handles], self.device)
        positions, mask = self.cache.prepare(start, start + len(handles), ids.shape[1], self.device, self._float_mask)

        def forward() -> torch.Tensor:
            return self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                **{self._cache_kwarg: self.cache}).last_hidden_state

        if not self.attached:
            return forward()
        with row_adapters(self.model, [h.adapter if h.adapter in self.attached else None for h in handles]):
            return forward()

    def _decode(self) -> int:
        handles = list(self._running)
        ids = torch.tensor([[h.token_ids[-1]] for h in handles], device=self.device)
        hidden = self._forward(handles, 0, ids)[:, -1]
        self.cache.advance(0, [1] * len(handles))
        self._emit_all(handles, self.model.get_output_embeddings()(hidden))
        return len(handles)

    def _prefill(self, handles: list[RequestHandle]) -> int:
        lengths = [len(h.prompt_ids) for h in handles]
        ids = torch.tensor([h.prompt_ids + [self.pad_id] * (max(lengths) - n) for h, n in zip(handles, lengths)],
                           device=self.device)
        start = self.cache.add_rows(len(handles))
        hidden = self._forward(handles, start, ids)
        last = hidden[torch.arange(len(handles), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        self.cache.advance(start, lengths)
        self._running.extend(handles)
        self._emit_all(handles, self.model.get_output_embeddings()(last))
        return len(handles)

    def _emit_all(self, handles: list[RequestHandle], logits: torch.Tensor) -> None:
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        for i, handle in enumerate(handles):
            if handle.done:  # cancelled during this step
                continue
            token = greedy[i] if handle.params.greedy else handle._sampler(logits[i].cpu())
            self._emit(handle, token)

    def _emit(self, handle: RequestHandle, token: int) -> None:
        p = handle.params
        handle.token_ids.append(token)
        reason = None
        if token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif len(handle.token_ids) >= p.max_tokens or len(handle.prompt_ids) + len(handle.token_ids) >= self.max_len:
            reason = "length"
        delta = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(handle.token_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            handle.text = text
            ready = len(text) if reason else _safe_prefix(text, p.stop)
            delta, handle._sent = text[handle._sent : max(ready, handle._sent)], max(ready, handle._sent)
        handle._send(TokenEvent(token, delta))
        if reason:
            self._finish(handle, reason)

    def _finish(self, handle: RequestHandle, reason: str, error: str | None = None) -> None:
        if handle.done:
            return
        handle.finish_reason = reason
        handle.error = error
        handle._done.set()
        handle._send(handle.completion())

    def _drop_finished(self) -> None:
        """Free the KV rows and adapters of finished requests (the last row moves into each hole)."""
        with torch.inference_mode():  # the cache's tensors were made in inference mode
            for i in range(len(self._running) - 1, -1, -1):
                handle = self._running[i]
                if not handle.done:
                    continue
                self.cache.remove_row(i)
                self._running[i] = self._running[-1]
                self._running.pop()
                self._release(handle)

    def _release(self, handle: RequestHandle) -> None:
        if handle._lease is not None:
            self.pool.release(handle._lease)
            handle._lease = None

    # ---- prefetching -------------------------------------------------------------------------
    def _request_prefetch(self) -> None:
        """Load the adapters of the next queued requests in a short-lived thread (one at a time)."""
        if not self.prefetch or (self._prefetcher is not None and self._prefetcher.is_alive()):
            return
        with self._queue_lock:
            names = [h.adapter for h in itertools.islice(self._waiting, self.max_batch)
                     if h.adapter is not None and h.adapter not in self.attached]
        if names:
            self._prefetcher = threading.Thread(target=self.pool.prefetch, args=(names,), name="loralab-prefetch",
                                                daemon=True)
            self._prefetcher.start()

    # ---- driving -----------------------------------------------------------------------------
    def generate(self, requests: Iterable[tuple[Sequence[int], str | None, SamplingParams | None]]
                 ) -> list[Completion]:
        """Run (prompt_ids, adapter, params) requests to completion, in order of the input.

        Requests are fed as the queue has room; invalid ones come back as "error" completions."""
        pending = deque(enumerate(requests))
        handles: dict[int, RequestHandle] = {}
        failed: dict[int, Completion] = {}
        while pending or any(not h.done for h in handles.values()):
            while pending and self.waiting() < self.max_queue:
                i, (prompt, adapter, params) = pending.popleft()
                try:
                    handles[i] = self.submit(prompt, adapter, params)
                except RequestError as err:
                    failed[i] = Completion(-1, adapter, list(prompt), [], "", "error", str(err))
            if self.has_work():
                self.step()
        return [failed[i] if i in failed else handles[i].completion() for i in range(len(handles) + len(failed))]

    def start(self) -> None:
        """Step in a background thread whenever there is work (for a server)."""
        if self._loop is not None:
            return
        self._stop.clear()
        self._loop = threading.Thread(target=self._serve, name="loralab-engine", daemon=True)
        self._loop.start()

    def stop(self) -> None:
        if self._loop is None:
            return
        self._stop.set()
        with self._queue_lock:
            self._work.notify_all()
        self._loop.join()
        self._loop = None

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._queue_lock:
                if not (self._running or self._waiting):
                    self._work.wait(timeout=0.1)
                    continue
            try:
                self.step()
            except Exception:  # the batch's requests already carry the error; keep serving the rest
                continue


def _safe_prefix(text: str, stops: list[str]) -> int:
    """How much of `text` can be streamed: not an incomplete character, not the start of a stop string."""
    text = text.rstrip("\ufffd")
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return len(text) - held
