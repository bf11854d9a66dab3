"""The embedded backend: one worker thread owns a transformers model and a continuous-batching Engine.

Requests arrive on a thread-safe queue; the worker admits them into the running batch between engine
steps and sends each row's events back to the request's asyncio queue. A request whose consumer goes
away (client disconnect) is cancelled and its rows leave the batch at the next step.

Failures, from the smallest blast radius up (README "Failures"):
- a row's sampling or text handling fails: that row's request fails (500), nothing else;
- a forward pass fails: the requests in the batch fail (503), waiting ones are kept, the engine is
  rebuilt; ``MAX_STEP_FAILURES`` failed steps in a row count as a worker fault;
- anything else in the worker (admission bookkeeping, delivery, a bug): a worker fault. Every pending
  and in-flight request fails at once with 503, every later one too, ``/health`` says 503, and
  ``on_fatal`` is called: ``steer serve`` then exits non-zero so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from server.backends.base import LogprobEntry, Prepared, RowEvent
from server.errors import SERVER_ERROR, APIError, current_request_id
from server.memory import Trimmer
from server.metrics import Metrics
from server.settings import Settings
from steer import serving
from steer.detok import TokenBytes
from steer.engine import Engine, Event, Sequence
from steer.vectors import SafetyVector, choose_default, load_directory

log = logging.getLogger("steer.server")

SHIPPED_VECTORS = Path(__file__).resolve().parents[2] / "vectors"
SHIPPED_DEFAULT = "refusal"  # the default vector of the shipped set (which also holds a weight vector)
MAX_STEP_FAILURES = 3
SLOW_STEP_S = 1.0  # engine steps longer than this are logged with what they did  # failed forward passes in a row before the worker is declared broken


@dataclass
class _Job:
    rows: list[tuple[int, bool, Sequence]]  # (choice index, baseline?, sequence)
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    request_id: str
    remaining: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Failure:
    """Sent to a request instead of an event: fail it with this status and message."""

    status: int
    message: str


class _Stopped(Exception):
    """Raised on the worker thread by a stop request, to leave the loop through its one exit."""


def _row_gate(seq: Sequence, baseline: bool) -> float | None:
    """A row's gate decision, its multiplier: 1.0 (open), 0.0 (closed), negative (a two-sided gate
    lowered refusal on it) for a steered row whose vector's gate was decided; None for baseline rows,
    strength 0, vectors without a gate, and rows ended before it."""
    if baseline or seq.strength <= 0 or not seq.vector or seq.vector not in seq.gate:
        return None
    return float(seq.gate[seq.vector])


def gate_label(decision: float | None) -> str | None:
    """The gate decision as the API and /metrics name it: "open", "closed", "lowered" (None: undecided)."""
    if decision is None:
        return None
    return "open" if decision > 0 else "lowered" if decision < 0 else "closed"


def combined_info(name: str, parts: dict[str, float], *, default: bool, gate_from: str | None) -> dict:
    """A combination (``--combine``) as ``/v1/safety/vectors`` lists it, on either backend."""
    return {"name": name, "kind": "combined", "default": default,
            "parts": parts,  # each vector steers a row naming this at the row's strength times its ratio
            "gate_from": gate_from,  # whose gate decision the response's safety echo reports
            "applied": "per_request"}


class TransformersBackend:
    def __init__(self, settings: Settings, *, model=None, tokenizer=None, vectors: list[SafetyVector] | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.on_fatal: Callable[[], None] | None = None  # called (from the worker) after a worker fault
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # admission vs. failure/shutdown: no job slips past either
        self._state = "starting"  # starting | serving | draining | failed | stopped
        self._stop = threading.Event()
        self._go = threading.Event()  # start() lets the loaded worker begin serving
        self._jobs: dict[int, _Job] = {}  # seq id -> job, rows not finished (worker thread only)
        self._live: dict[int, _Job] = {}  # id(job) -> every job the worker took and has not finished
        self._inflight: set[int] = set()  # ids of jobs not finished (event loop thread only)
        # Requests waiting for a batch slot, as the 429 check counts them: `_unseen` in the inbox, `_queued`
        # in the engine's waiting list. A job moves from one to the other under the lock as the worker takes
        # it, so it is never in neither (the cap holds at every instant); the worker recounts `_queued` after
        # each step, when rows have left the waiting list for the batch.
        self._unseen = 0
        self._queued = 0
        self._step_failures = 0
        # Tokenizing (chat templates of long prompts) must not block the event loop. One thread, so the
        # encoding tokenizer is only ever used from one thread (the engine thread decodes with its own copy).
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-tokenize")
        # Every torch call (load, fingerprint, packing, forward passes) happens on this one thread.
        # libgomp throttles its spin-waiting once more OpenMP threads exist than cores, so a second
        # thread that has run parallel torch ops (e.g. loading in the main thread) makes every small
        # op of the engine thread wait on a futex: measured 5-10x slower elementwise ops and ~50%
        # slower decode steps on 2 cores.
        self._thread = threading.Thread(target=self._main, args=(model, tokenizer, vectors), name="steer-engine",
                                        daemon=True)
        self._ready: queue.Queue = queue.Queue()
        self._thread.start()
        err = self._ready.get()
        if err is not None:
            self._thread.join()
            raise err

    def _setup(self, model, tokenizer, vectors) -> None:
        settings = self.settings
        path = None
        if model is None:  # a model passed in (embedding, tests) is used exactly as given
            from steer.demo import ensure_demo_model

            path = Path(settings.model) if settings.model else ensure_demo_model()
            vdir = settings.vectors or (str(SHIPPED_VECTORS) if not settings.model else None)
            vectors = load_directory(vdir) if vdir else []
        # checked before the model loads: a wrong --default-vector fails in a moment
        merged = settings.merged()
        default = settings.default_vector
        if default is None and model is None and not settings.vectors and not settings.model:
            default = SHIPPED_DEFAULT  # the shipped set: its gated activation vector, by name
        combos = settings.combinations()
        self._default_vector = choose_default([v.name for v in vectors or [] if v.name not in merged] + list(combos),
                                              default)
        served = serving.build(path, vectors, dtype=settings.dtype, linear_weights=settings.linear_weights,
                               model=model, tokenizer=tokenizer, merged=merged, transfers=settings.transfers(),
                               gated_by=settings.gated_by(), combos=combos)
        self.served, self.model, self.tok = served, served.model, served.tokenizer
        self.vocab_size = int(self.model.config.vocab_size)  # the LM head's rows: logit_bias ids below it
        self.model_name = settings.served_model_name or _model_name(settings)
        ctx = getattr(self.model.config, "max_position_embeddings", settings.max_model_len)
        self.max_model_len = min(settings.max_model_len, int(ctx))
        self.vectors, self.fingerprint, self.runtime = served.vectors, served.fingerprint, served.runtime
        self._engine_tok = copy.deepcopy(self.tok)  # the engine thread's own tokenizer (decoding)
        self.engine = self._new_engine()

    def _new_engine(self) -> Engine:
        return Engine(self.model, self._engine_tok, self.runtime, max_batch_size=self.settings.max_batch_size,
                      max_step_tokens=self.settings.max_step_tokens)

    # -- metadata ----------------------------------------------------------------------------
    def vector_kinds(self) -> dict[str, str]:
        """The vectors a request may name (a vector merged at load is part of the model instead), and the
        combinations of them (kind "combined")."""
        kinds = {n: v.kind for n, v in self.vectors.items() if n not in self.served.merged}
        return kinds | dict.fromkeys(self.settings.combinations(), "combined")

    def default_vector(self) -> str | None:
        return self._default_vector

    def merged_vectors(self) -> dict[str, float]:
        return dict(self.served.merged)

    def applied_strength(self, vector: str | None, strength: float) -> float:
        return strength  # rows carry any strength exactly

    def vectors_info(self) -> list[dict]:
        return [
            {
                "name": v.name,
                "kind": v.kind,
                "model_fingerprint": v.model.to_dict(),
                "sha256": v.sha256,
                "default": v.name == self.default_vector(),
                "config": v.config,
                "method": v.provenance.get("method"),
                # how it is applied: per request (strength from each request) or merged at load (fixed)
                "applied": "merged" if v.name in self.served.merged else "per_request",
                "merged_strength": self.served.merged.get(v.name),
                # made from these very weights, or from another model of this architecture (declared)
                "transfer": self.served.matched.get(v.name) == "transfer",
                # a weight vector served behind an activation vector's gate: that vector's name
                "gated_by": self.settings.gated_by().get(v.name),
            }
            for v in self.vectors.values()
        ] + [combined_info(name, parts, default=name == self.default_vector(),
                           gate_from=self.runtime.deciding(name) if self.runtime is not None else None)
             for name, parts in self.settings.combinations().items()]

    def model_fingerprint(self) -> dict:
        return self.fingerprint.to_dict()

    def runtime_info(self) -> dict:
        """What the model runs with on this host (reported on /health and /v1/models)."""
        return {"kernels": self.served.kernels, "host": self.served.host}

    def healthy(self) -> bool:
        return self._state == "serving" and self._thread.is_alive()

    def status(self) -> str:
        """serving | starting | draining | failed | stopped"""
        if self._state == "serving" and not self._thread.is_alive():
            return "failed"
        return self._state

    # -- requests ----------------------------------------------------------------------------
    async def prepare(self, inp, steering) -> Prepared:
        """Tokenize off the event loop, on the one thread that owns the encoding tokenizer."""
        ctx = contextvars.copy_context()  # the request id, for anything logged while tokenizing
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, ctx.run, self._prepare, inp,
                                                                steering)

    def _prepare(self, inp, steering) -> Prepared:
        if inp.messages is not None:
            msgs = [{"role": m.role, "content": m.content} for m in inp.messages]
            try:
                ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            except Exception as e:  # template errors are the client's (e.g. role order)
                raise APIError(400, f"messages cannot be rendered with the chat template: {e}", param="messages") from None
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            param = "messages"
        elif inp.prompt_ids is not None:
            ids, param = list(inp.prompt_ids), "prompt"
            limit = max(self.vocab_size, len(self.tok))  # as vLLM: the model's or the tokenizer's, the larger
            bad = next((t for t in ids if not 0 <= t < limit), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is out of the vocabulary (ids 0..{limit - 1})", param=param)
        else:
            ids = self.tok(inp.prompt, add_special_tokens=False)["input_ids"]
            param = "prompt"
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", param=param)
        too_big = [t for t, _ in inp.sampling.logit_bias if t >= self.vocab_size]
        if too_big:
            raise APIError(400, f"logit_bias token id {too_big[0]} is out of the vocabulary (ids 0..{self.vocab_size - 1})",
                           param="logit_bias")
        budget = self.max_model_len - len(ids)
        if budget <= 0:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the context is {self.max_model_len}", param=param)
        if inp.sampling.max_tokens is None:  # omitted: the rest of the context, as vLLM does
            inp = replace(inp, sampling=replace(inp.sampling, max_tokens=budget))
        elif inp.sampling.max_tokens > budget:
            name = inp.max_tokens_param
            raise APIError(
                400,
                f"{name}={inp.sampling.max_tokens} plus the prompt's {len(ids)} tokens exceeds the "
                f"context length {self.max_model_len}",
                param=name,
            )
        echo = ""
        if inp.echo:  # a text prompt as sent; token ids decoded, as vLLM echoes them
            echo = inp.prompt if inp.prompt is not None else self.tok.decode(ids)
        return Prepared(tuple(ids), inp, steering, echo)

    async def generate(self, req: Prepared) -> AsyncIterator[RowEvent]:
        job = self._job(req)
        by_id = {s.id: (i, b) for i, b, s in job.rows}
        seqs = {s.id: s for _, _, s in job.rows}
        self._submit(job, req.follows)
        self._inflight.add(id(job))
        try:
            while job.remaining:
                item = await job.out.get()
                if isinstance(item, _Failure):
                    raise APIError(item.status, item.message, type=SERVER_ERROR)
                if item.finish_reason == "error":
                    raise APIError(500, f"internal error while generating (request id {job.request_id})",
                                   type=SERVER_ERROR)
                i, b = by_id[item.seq_id]
                gate = None
                if item.finish_reason is not None:
                    job.remaining.discard(item.seq_id)
                    gate = gate_label(_row_gate(seqs[item.seq_id], b))
                yield RowEvent(i, b, item.text, item.n_tokens, item.finish_reason,
                               None if gate is None else gate == "open", gate == "lowered",
                               tuple(map(self._logprob_entry, item.logprobs)),
                               self._prompt_entries(req, item.prompt_logprobs) if item.prompt_logprobs is not None else ())
        finally:
            self._inflight.discard(id(job))
            if job.remaining:  # consumer left early or a row failed: free the other rows
                self._inbox.put(("cancel", list(job.remaining)))

    @cached_property
    def _token_bytes(self) -> TokenBytes:
        return TokenBytes(self.tok)

    def _shown(self, token_id: int) -> tuple[str, bytes]:
        """A token's text and bytes as logprobs show them."""
        raw = self._token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), raw

    def _logprob_entry(self, lp) -> LogprobEntry:
        """A steer.types.TokenLogprob (token ids) as the API shows it (token texts and bytes)."""
        return LogprobEntry(*self._shown(lp.id), lp.logprob, tuple((*self._shown(t), v) for t, v in lp.top))

    def _prompt_entries(self, req: Prepared, logprobs) -> tuple[LogprobEntry, ...]:
        """A row's prompt logprobs (its tokens after the first) with the first token before them, which has
        none."""
        return (LogprobEntry(*self._shown(req.prompt_ids[0]), None), *map(self._logprob_entry, logprobs))

    def _job(self, req: Prepared) -> _Job:
        rows = []
        for i in range(req.inp.n):
            twins = [(False, req.steering.strength)] + ([(True, 0.0)] if req.steering.compare else [])
            for baseline, strength in twins:
                seq = Sequence(list(req.prompt_ids), _row_sampling(req.inp.sampling, i), req.steering.vector, strength)
                rows.append((i, baseline, seq))
        return _Job(rows, asyncio.get_running_loop(), asyncio.Queue(), current_request_id(),
                    {s.id for _, _, s in rows})

    def _submit(self, job: _Job, follows: bool = False) -> None:
        """Queue a job for the worker, or refuse it: 503 unless serving, 429 when the queue is full (not for
        a later prompt of an admitted batch, ``follows``: a batch larger than the cap must still run)."""
        with self._lock:
            if not self.healthy():
                raise self._unavailable(job.request_id)
            waiting = self._unseen + self._queued
            if waiting >= self.settings.max_queued_requests and not follows:
                raise APIError(429, f"the server is at capacity ({waiting} requests waiting); retry shortly",
                               type=SERVER_ERROR, code="queue_full", headers={"Retry-After": "1"})
            self._unseen += 1
            self._inbox.put(job)

    def _unavailable(self, request_id: str) -> APIError:
        why = {"draining": "the server is shutting down", "starting": "the server is starting"}.get(
            self._state, "the model worker is not running")
        return APIError(503, f"{why} (request id {request_id})", type=SERVER_ERROR)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._state == "starting":
                self._state = "serving"
        self._go.set()

    def begin_shutdown(self) -> None:
        """Stop admitting requests (503, /health 503); requests already accepted go on."""
        with self._lock:
            if self._state in ("serving", "starting"):
                self._state = "draining"

    def inflight(self) -> int:
        """Requests accepted and not finished (call on the event loop thread)."""
        return len(self._inflight)

    def abort_all(self, message: str) -> None:
        """Fail every accepted request with 503 ``message`` (graceful shutdown's deadline)."""
        self._inbox.put(("abort", message))

    def shutdown(self) -> None:
        self.begin_shutdown()
        self._stop.set()
        self._go.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._state != "failed":
                self._state = "stopped"

    # -- worker ------------------------------------------------------------------------------
    def _main(self, model, tokenizer, vectors) -> None:
        torch.set_grad_enabled(False)
        try:
            self._setup(model, tokenizer, vectors)
        except BaseException as e:  # handed to the constructor, which raises it in the caller's thread
            self._ready.put(e)
            return
        self._ready.put(None)
        self._go.wait()
        if self._stop.is_set():
            return
        try:
            with self.runtime if self.runtime is not None else contextlib.nullcontext():
                self._run()
        except _Stopped:
            pass
        except BaseException as e:  # a worker fault: nothing may hang, and the operator must know
            log.critical("the model worker failed; failing every request", exc_info=e)
            self._die()
        finally:
            self._fail_everything(_Failure(503, "the server is shutting down"))

    def _run(self) -> None:
        trimmer = Trimmer()  # see server/memory.py: RSS stays flat under steady load
        while not self._stop.is_set():
            self._drain_inbox(block=not self.engine.has_work())
            if self.engine.has_work():
                self._step()
            self._observe()
            trimmer.maybe()

    def _step(self) -> None:
        try:
            t0 = time.perf_counter()
            events = self.engine.step()
            took = time.perf_counter() - t0
            if self.metrics:
                self.metrics.observe_step(self.engine.running, took)
            if took > SLOW_STEP_S:
                log.info("slow engine step: %.2f s (%s)", took, self.engine.last_step)
        except Exception:
            self._step_failures += 1
            log.exception("engine step failed (%d in a row)", self._step_failures)
            if self._step_failures >= MAX_STEP_FAILURES:
                raise
            self._fail_running()
            return
        self._step_failures = 0
        for ev in events:
            self._deliver(ev)

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                raise _Stopped
            if isinstance(item, _Job):
                self._live[id(item)] = item  # from here on a worker fault fails it: never lost
                with self._lock:
                    self._unseen, self._queued = self._unseen - 1, self._queued + 1
                self._admit(item)
            elif item[0] == "cancel":
                for sid in item[1]:
                    self.engine.cancel(sid)
            elif item[0] == "abort":
                self._fail_everything(_Failure(503, item[1]))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, job: _Job) -> None:
        """Hand a job's rows to the engine; a job that cannot be admitted fails alone."""
        for _, _, seq in job.rows:
            self._jobs[seq.id] = job
        try:
            for _, _, seq in job.rows:
                self.engine.add(seq)
        except Exception:
            log.exception("could not admit request %s", job.request_id)
            self._fail_job(job, _Failure(500, "internal error"))

    def _deliver(self, ev: Event) -> None:
        job = self._jobs.get(ev.seq_id)
        if job is None:
            return
        if ev.finish_reason is not None:
            self._finish_row(job, ev.seq_id)
            if ev.finish_reason == "error":
                seq = next(s for _, _, s in job.rows if s.id == ev.seq_id)
                log.error("request %s: a row failed: %s", job.request_id, seq.error)
            elif self.metrics and ev.finish_reason != "cancelled":
                self.metrics.gate(self._gate_value(job, ev.seq_id))
        self._send(job, ev)

    def _finish_row(self, job: _Job, seq_id: int) -> None:
        del self._jobs[seq_id]
        if not any(s.id in self._jobs for _, _, s in job.rows):
            self._live.pop(id(job), None)

    def _send(self, job: _Job, item) -> None:
        """Hand an event or failure to the job's event loop; a closed loop means nobody listens."""
        try:
            job.loop.call_soon_threadsafe(job.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: cancel what is left of the job
            self._forget(job)

    def _forget(self, job: _Job, *, cancel: bool = True) -> None:
        """Drop a job from the worker's books (and cancel its rows in the engine)."""
        self._live.pop(id(job), None)
        for _, _, s in job.rows:
            if self._jobs.pop(s.id, None) is not None and cancel:
                self.engine.cancel(s.id)

    def _fail_job(self, job: _Job, failure: _Failure, *, cancel: bool = True) -> None:
        self._forget(job, cancel=cancel)
        self._send(job, replace(failure, message=f"{failure.message} (request id {job.request_id})"))

    def _gate_value(self, job: _Job, seq_id: int):
        """(vector, "open" | "closed" | "lowered") for a steered row whose vector's gate was decided;
        None otherwise (a vector without a gate is not counted as a gate that fired)."""
        for _, baseline, s in job.rows:
            if s.id == seq_id:
                label = gate_label(_row_gate(s, baseline))
                return None if label is None else (s.vector, label)
        return None

    def _observe(self) -> None:
        """Running rows and waiting requests, for /metrics and the 429 check."""
        queued = len({id(self._jobs.get(s.id)) for s in self.engine.pending})
        with self._lock:
            self._queued = queued
            waiting = self._queued + self._unseen
        if self.metrics:
            self.metrics.running_rows.set(self.engine.running)
            self.metrics.queued_requests.set(waiting)

    def _fail_running(self) -> None:
        """After a failed forward pass: fail the requests with rows in the batch, keep the waiting ones."""
        waiting = {s.id: s for s in self.engine.pending}
        failed = [j for j in self._live.values() if any(s.id not in waiting for _, _, s in j.rows)]
        for job in failed:
            self._fail_job(job, _Failure(503, "the model failed while generating; retry"))
        self.engine = self._new_engine()
        for sid, seq in waiting.items():
            if sid in self._jobs:
                self.engine.add(seq)

    def _fail_everything(self, failure: _Failure) -> None:
        """Fail every accepted request (taken by the worker or still in the inbox), empty the engine."""
        with self._lock:
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Job):
                    self._live[id(item)] = item
            self._queued = self._unseen = 0  # every accepted request fails here
        for job in list(self._live.values()):  # the engine may be what broke: it is not touched
            self._fail_job(job, failure, cancel=False)
        self._jobs.clear()
        if hasattr(self, "engine"):
            self.engine = self._new_engine()

    def _die(self) -> None:
        with self._lock:
            self._state = "failed"
        self._fail_everything(_Failure(503, "the model worker failed"))
        if self.on_fatal is not None:
            try:
                self.on_fatal()
            except Exception:  # noqa: BLE001 - the worker is already down; log and go
                log.exception("on_fatal callback failed")


def _row_sampling(p, i: int):
    """n > 1 with a seed: each choice gets its own derived seed so choices differ but stay reproducible."""
    if p.seed is None or i == 0:
        return p
    return replace(p, seed=(p.seed + i) % 2**64)  # torch seeds are unsigned 64-bit


def _model_name(settings: Settings) -> str:
    if settings.model:
        return Path(settings.model).name
    from steer.demo import DEMO

    return DEMO.name
