"""The embedded backend: one worker thread owns a transformers model and a continuous-batching Engine.

Requests arrive on a thread-safe queue; the worker admits them into the running batch between decode
steps and sends each row's events back to the request's asyncio queue. A request whose consumer goes
away (client disconnect) is cancelled and its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from server.backends.base import Prepared, RowEvent
from server.errors import APIError
from server.metrics import Metrics
from server.settings import Settings
from steer.engine import Engine, Event, Sequence
from steer.hooks import SteeringRuntime
from steer.models import fingerprint, load_model
from steer.packed import pack_linears, packing_unavailable
from steer.vectors import SafetyVector, load_directory

log = logging.getLogger("steer.server")

SHIPPED_VECTORS = Path(__file__).resolve().parents[2] / "vectors"


@dataclass
class _Job:
    rows: list[tuple[int, bool, Sequence]]  # (choice index, baseline?, sequence)
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    remaining: set[int] = field(default_factory=set)


class TransformersBackend:
    def __init__(self, settings: Settings, *, model=None, tokenizer=None, vectors: list[SafetyVector] | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._go = threading.Event()  # start() lets the loaded worker begin serving
        self._jobs: dict[int, _Job] = {}  # seq id -> job
        self._error: BaseException | None = None
        # Every torch call (load, fingerprint, packing, forward passes) happens on this one thread.
        # libgomp throttles its spin-waiting once more OpenMP threads exist than cores, so a second
        # thread that has run parallel torch ops (e.g. loading in the main thread) makes every small
        # op of the engine thread wait on a futex: measured 5-10x slower elementwise ops and ~50%
        # slower decode steps on 2 cores.
        self._thread = threading.Thread(target=self._main, args=(model, tokenizer, vectors), name="steer-engine",
                                        daemon=True)
        self._ready: queue.Queue = queue.Queue()
        # Tokenizing (chat templates of long prompts) must not block the event loop. One thread, so the
        # encoding tokenizer is only ever used from one thread (the engine thread decodes with its own copy).
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-tokenize")
        self._thread.start()
        err = self._ready.get()
        if err is not None:
            self._thread.join()
            raise err

    def _setup(self, model, tokenizer, vectors) -> None:
        settings = self.settings
        loaded = model is None  # a model passed in (embedding, tests) is used exactly as given
        if loaded:
            model, tokenizer, vectors = self._load(settings)
        self.model, self.tok = model, tokenizer
        self.model_name = settings.served_model_name or _model_name(settings)
        ctx = getattr(model.config, "max_position_embeddings", settings.max_model_len)
        self.max_model_len = min(settings.max_model_len, int(ctx))
        self.vectors = {v.name: v for v in (vectors or [])}
        self.fingerprint = fingerprint(model)
        self.runtime = (SteeringRuntime(model, self.vectors.values(), model_fingerprint=self.fingerprint)
                        if self.vectors else None)
        if loaded and settings.linear_weights in ("packed", "auto"):  # auto: replaced by the host choice
            self._pack()
        self.engine = Engine(model, tokenizer, self.runtime, max_batch_size=settings.max_batch_size)

    @staticmethod
    def _load(settings: Settings):
        from steer.demo import ensure_demo_model

        path = Path(settings.model) if settings.model else ensure_demo_model()
        model, tok = load_model(path)
        vdir = settings.vectors or (str(SHIPPED_VECTORS) if not settings.model else None)
        vectors = load_directory(vdir) if vdir else []
        return model, tok, vectors

    def _pack(self) -> None:
        """Pack the linear weights (after the fingerprint: it reads the plain weights)."""
        why = packing_unavailable(self.model)
        if why is not None:
            log.warning("linear weights stay plain: %s", why)
            return
        pack_linears(self.model)

    # -- metadata ----------------------------------------------------------------------------
    def vector_kinds(self) -> dict[str, str]:
        return {n: v.kind for n, v in self.vectors.items()}

    def default_vector(self) -> str | None:
        return next(iter(sorted(self.vectors)), None)

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
            }
            for v in self.vectors.values()
        ]

    def model_fingerprint(self) -> dict:
        return self.fingerprint.to_dict()

    def healthy(self) -> bool:
        return self._go.is_set() and self._thread.is_alive() and self._error is None

    # -- requests ----------------------------------------------------------------------------
    async def prepare(self, inp, steering) -> Prepared:
        """Tokenize off the event loop, on the one thread that owns the encoding tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self._prepare, inp, steering)

    def _prepare(self, inp, steering) -> Prepared:
        if inp.messages is not None:
            msgs = [{"role": m.role, "content": m.content} for m in inp.messages]
            try:
                ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            except Exception as e:  # template errors are the client's (e.g. role order)
                raise APIError(400, f"messages cannot be rendered with the chat template: {e}", param="messages") from None
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            param = "messages"
        else:
            ids = self.tok(inp.prompt, add_special_tokens=False)["input_ids"]
            param = "prompt"
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", param=param)
        budget = self.max_model_len - len(ids)
        if budget <= 0:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the context is {self.max_model_len}", param=param)
        if inp.sampling.max_tokens is None:  # omitted: the rest of the context, as vLLM does
            inp = replace(inp, sampling=replace(inp.sampling, max_tokens=budget))
        elif inp.sampling.max_tokens > budget:
            raise APIError(
                400,
                f"max_tokens={inp.sampling.max_tokens} plus the prompt's {len(ids)} tokens exceeds the "
                f"context length {self.max_model_len}",
                param="max_tokens",
            )
        return Prepared(tuple(ids), inp, steering)

    async def generate(self, req: Prepared) -> AsyncIterator[RowEvent]:
        if not self.healthy():
            raise APIError(503, "the model worker is not running", type="server_error")
        rows = []
        for i in range(req.inp.n):
            twins = [(False, req.steering.strength)] + ([(True, 0.0)] if req.steering.compare else [])
            for baseline, strength in twins:
                seq = Sequence(list(req.prompt_ids), _row_sampling(req.inp.sampling, i), req.steering.vector, strength)
                rows.append((i, baseline, seq))
        job = _Job(rows, asyncio.get_running_loop(), asyncio.Queue(), {s.id for _, _, s in rows})
        self._inbox.put(job)
        by_id = {s.id: (i, b) for i, b, s in rows}
        try:
            while job.remaining:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item}", type="server_error")
                i, b = by_id[item.seq_id]
                if item.finish_reason is not None:
                    job.remaining.discard(item.seq_id)
                yield RowEvent(i, b, item.text, item.n_tokens, item.finish_reason)
        finally:
            if job.remaining:  # consumer left early: free the rows
                self._inbox.put(("cancel", list(job.remaining)))

    # -- worker ------------------------------------------------------------------------------
    def start(self) -> None:
        self._go.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._go.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _main(self, model, tokenizer, vectors) -> None:
        torch.set_grad_enabled(False)
        try:
            self._setup(model, tokenizer, vectors)
        except BaseException as e:  # handed to the constructor, which raises it in the caller's thread
            self._ready.put(e)
            return
        self._ready.put(None)
        self._go.wait()
        if not self._stop.is_set():
            self._run()

    def _run(self) -> None:
        ctx = self.runtime if self.runtime is not None else contextlib.nullcontext()
        with ctx:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.engine.has_work())
                if not self.engine.has_work():
                    continue
                try:
                    t0 = time.perf_counter()
                    events = self.engine.step()
                    if self.metrics:
                        self.metrics.observe_step(self.engine.running, time.perf_counter() - t0)
                except Exception as e:  # fail every in-flight request loudly, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                for ev in events:
                    self._deliver(ev)

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            if isinstance(item, tuple):
                for sid in item[1]:
                    self.engine.cancel(sid)
            else:
                self._admit(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, job: _Job) -> None:
        """Hand a job's rows to the engine; a job that cannot be admitted fails alone."""
        try:
            for _, _, seq in job.rows:
                self.engine.add(seq)
        except Exception as e:
            log.exception("could not admit a request")
            for _, _, seq in job.rows:
                self.engine.cancel(seq.id)
            job.loop.call_soon_threadsafe(job.out.put_nowait, e)
            return
        for _, _, seq in job.rows:
            self._jobs[seq.id] = job

    def _deliver(self, ev: Event) -> None:
        job = self._jobs.get(ev.seq_id)
        if job is None:
            return
        if ev.finish_reason is not None:
            del self._jobs[ev.seq_id]
            if self.metrics and ev.finish_reason != "cancelled":
                self.metrics.gate(self._gate_value(job, ev.seq_id))
        job.loop.call_soon_threadsafe(job.out.put_nowait, ev)

    def _gate_value(self, job: _Job, seq_id: int):
        for _, baseline, s in job.rows:
            if s.id == seq_id and not baseline and s.strength > 0:
                return s.vector, bool(s.gate.get(s.vector, 1.0))
        return None

    def _fail_all(self, err: Exception) -> None:
        jobs = {id(j): j for j in self._jobs.values()}
        self._jobs.clear()
        self.engine = Engine(self.model, self.tok, self.runtime, max_batch_size=self.settings.max_batch_size)
        for job in jobs.values():
            job.loop.call_soon_threadsafe(job.out.put_nowait, err)


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
