"""The vLLM backend: this server's API and ``safety`` semantics with vLLM doing the serving.

vLLM's engine runs in this process (``LLMEngine`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; its async
engine always runs the model in another process, where per-request hooks could not be reached), owned by
the same worker thread, inbox, lifecycle and failure handling as the embedded backend
(:class:`server.backends.transformers.TransformersBackend`, subclassed here): only the engine differs.
:class:`VllmEngine` offers the embedded engine's interface (add, cancel, step -> events) over vLLM's
``add_request`` / ``step`` / ``abort_request``.

Activation vectors are applied inside vLLM's forward pass by forward-pre-hooks on its decoder layers
(:class:`_Hooks`). vLLM flattens a batch to ``(num_tokens, d)``; a layer's input residual stream is
``hidden_states + residual`` (``hidden_states`` alone at layer 0), so adding ``k * r`` to
``hidden_states`` adds it to the stream, as the embedded backend does. Each token's strength comes
from its request's ``SamplingParams.extra_args``; rows map to requests through the model runner's
batch (``input_batch.req_ids`` and ``query_start_loc``). A gated vector's gate is decided at the gate
layer from the request's own residual at the gate position (a multi-layer gate: the residuals at each of
its layers, kept until the last decides), and from there on every position of the
prompt and every generated token is steered, exactly the embedded engine's semantics. That needs the
whole prompt in one forward pass, so chunked prefill is off whenever a gated vector is loaded, and a
gated request never reads the prefix cache (its gate position must be computed). A steered request's
prefix-cache entries are salted with its vector and strength, so steered and unsteered KV never mix.

Weight vectors merged at load (``--merge-vector NAME=S``) are merged into a cached checkpoint
(:func:`merged_checkpoint`) that vLLM loads. Weight vectors per request are served through vLLM's
multi-LoRA: a request's strength, quantized to ``--strength-step``, picks a PEFT adapter holding the
vector's low-rank factors scaled by that strength (:mod:`steer.adapters`), made on first use (on a
background thread: the request waits, the batch does not) and kept in a bounded LRU
(``--max-cpu-loras``); strength 0 routes to no adapter, i.e. vanilla vLLM. vLLM keys its prefix cache
by adapter, and adapter ids are never reused, so KV never crosses strengths.

With ``--tensor-parallel-size`` > 1 vLLM runs the model in one worker process per rank: the hooks (and,
on CPU, the LoRA ops fix of :mod:`server.backends.vllm_cpu_lora`) are installed in every worker through
vLLM's ``collective_rpc`` (:class:`_WorkerHooks`), and gate decisions are read back from them. On a CPU
host with one NUMA node the workers are bound to disjoint CPU sets (vLLM's own binding needs a node per
worker). Not served here yet (a clear startup error, never an unsteered answer): gated weight vectors.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.backends.transformers import (
    SHIPPED_DEFAULT,
    SHIPPED_VECTORS,
    TransformersBackend,
    _model_name,
    combined_info,
)
from server.metrics import Metrics
from server.settings import Settings
from steer.engine import Event, Sequence
from steer.hooks import ActivationSteerer, Gate, borrowed_gates, check_combinations
from steer.models import fingerprint_checkpoint
from steer.types import GenerationInput, SamplingParams, TokenLogprob
from steer.vectors import SafetyVector, VectorError, choose_default, load_directory

# Before vllm is imported anywhere: the engine core must live in this process (see above).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# The hooks read the batch from the V1 model runner (input_batch, requests, query_start_loc); on a GPU
# with Triton vLLM 0.32 would pick its V2 runner, which has none of them.
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

log = logging.getLogger("steer.server")


class VllmBackend(TransformersBackend):
    """``steer serve --backend vllm``. Everything but the engine is the embedded backend's."""

    def _setup(self, model, tokenizer, vectors) -> None:
        if model is not None:
            raise ValueError("the vLLM backend loads its model from a checkpoint directory (--model)")
        from transformers import AutoTokenizer

        from steer.demo import ensure_demo_model

        settings = self.settings
        path = Path(settings.model) if settings.model else ensure_demo_model()
        vdir = settings.vectors or (str(SHIPPED_VECTORS) if not settings.model else None)
        vectors = load_directory(vdir) if vdir else []
        self.served_path = path
        self.fingerprint = fingerprint_checkpoint(path)
        self._matched = _check_vectors(settings, vectors, self.fingerprint)
        default = settings.default_vector
        if default is None and not settings.vectors and not settings.model:
            default = SHIPPED_DEFAULT
        self.gated_by, self.combos = _refuse_unsupported(settings, vectors)
        self.merged = settings.merged()
        self.all_vectors = {v.name: v for v in vectors}
        vectors = [v for v in vectors if v.name not in self.merged]  # the per-request ones
        self._default_vector = choose_default([v.name for v in vectors] + list(self.combos), default)
        self.vectors = {v.name: v for v in vectors}
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model_name = settings.served_model_name or _model_name(settings)
        weights = merged_checkpoint(path, [(self.all_vectors[n], k) for n, k in self.merged.items()],
                                    self.fingerprint) if self.merged else path
        activation = [v for v in vectors if v.kind == "activation"]
        per_request_weights = {v.name: v for v in vectors if v.kind == "weight"}
        for name, source in self.gated_by.items():  # the layers a gated row's prompt runs changed (see VllmEngine)
            per_request_weights[name] = from_layer(per_request_weights[name],
                                                   Gate.of(self.all_vectors[source], two_sided=False).layer)
        self.adapters = None
        if per_request_weights:
            from steer.adapters import AdapterCache, adapter_rank, engine_max_rank
            from steer.demo import cache_dir
            from steer.models import load_config

            self.adapters = AdapterCache(per_request_weights, load_config(path), cache_dir() / "adapters",
                                         step=settings.strength_step, capacity=settings.max_cpu_loras,
                                         on_evict=self._unload_adapter, base_model=str(path))
            self._lora_rank = engine_max_rank(max(adapter_rank(v) for v in per_request_weights.values()))
            self._lora_modules = _lora_modules(per_request_weights.values())
        self.llm = _start_engine(weights, settings, gated=any(v.config.get("gate") for v in activation),
                                 lora=(self._lora_rank, self._lora_modules) if self.adapters else None)
        self.max_model_len = self.llm.vllm_config.model_config.max_model_len
        self.vocab_size = self.llm.vllm_config.model_config.get_vocab_size()
        dtype = self.llm.vllm_config.model_config.dtype
        transfer = {v.name: self._matched[v.name] == "transfer" for v in activation}
        shas = {v.name: v.sha256 for v in activation}
        if settings.tensor_parallel_size == 1:  # the model runs in this process
            runner = self.llm.model_executor.driver_worker.worker.model_runner
            steerers = {v.name: ActivationSteerer(v, dtype=dtype, transfer=transfer[v.name]) for v in activation}
            self.hooks = _Hooks(runner, steerers, shas)
        else:  # in vLLM's worker processes, one per rank: the hooks and the LoRA ops fix are installed there
            self.hooks = _WorkerHooks(self.llm, activation, transfer, shas, dtype, lora_fix=self.adapters is not None)
        self.runtime = None  # the hooks stay installed; strength 0 rows pass through untouched
        self._kernels = {"dtype": str(dtype).removeprefix("torch."), "linear_weights": "vllm",
                         "how": "vllm", "reason": f"vLLM {_vllm_version()} ({self.llm.vllm_config.device_config.device})"}
        self.engine = self._new_engine()
        self._probe_hooks()
        self._probe_adapters()

    def _probe_prompt(self) -> list[int]:
        return list(self._prepare(GenerationInput(prompt="hello, how are you today? " * 2,
                                                  sampling=SamplingParams(max_tokens=1, temperature=0.0)),
                                  None).prompt_ids)

    def _probe_hooks(self) -> None:
        """One token per vector at strength 1 before serving: if vLLM ever runs its layers past our hooks
        (a compiled graph, a changed call path), refuse to start rather than serve unsteered answers."""
        names = sorted(self.hooks.steerers)
        if not names:
            return
        ids = self._probe_prompt()
        for name in names:
            self.engine.add(Sequence(list(ids), SamplingParams(max_tokens=1, temperature=0.0), name, 1.0))
        while self.engine.has_work():
            self.engine.step()
        missing = sorted(set(names) - self.hooks.take_ran())
        if missing:
            raise RuntimeError(f"vLLM ran its forward pass without this server's steering hooks for {', '.join(missing)}; "
                               "refusing to serve unsteered answers")

    def _probe_adapters(self) -> None:
        """Each per-request weight vector at strength 1 before serving: its adapter must load and move the
        next-token distribution, or the server refuses to start rather than serve unsteered answers (an
        adapter vLLM cannot apply, a module it does not adapt)."""
        if self.adapters is None:
            return
        from vllm import SamplingParams as VllmSampling
        from vllm.lora.request import LoRARequest

        ids = self._probe_prompt()
        params = VllmSampling(max_tokens=1, temperature=0.0, logprobs=5)

        def run(rid: str, lora=None) -> dict[int, float]:
            self.llm.add_request(rid, {"prompt_token_ids": ids}, params, lora_request=lora)
            while True:
                for out in self.llm.step():
                    if out.request_id == rid and out.finished:
                        return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}

        base = run("probe-vanilla")
        for name in sorted(self.adapters.vectors):
            ad = self.adapters.acquire(name, 1.0)
            try:
                try:
                    steered = run(f"probe-{name}", LoRARequest(ad.name, ad.id, str(ad.path)))
                except Exception as e:
                    raise VectorError(f"vLLM could not apply weight vector {name!r} as a LoRA adapter: "
                                      f"{' '.join(str(e).split())[:400]}") from e
            finally:
                self.adapters.release(ad)
            shared = set(base) & set(steered)
            if shared == set(base) and max(abs(base[t] - steered[t]) for t in shared) < 1e-6:
                raise RuntimeError(f"weight vector {name!r} as a LoRA adapter left vLLM's output unchanged; refusing "
                                   "to serve unsteered answers")

    def _unload_adapter(self, ad) -> None:
        try:
            self.llm.remove_lora(ad.id)
        except Exception as e:  # never loaded (its request was cancelled first) or already gone
            log.debug("LoRA adapter %s (id %d) was not loaded in vLLM: %s", ad.name, ad.id, e)

    def applied_strength(self, vector: str | None, strength: float) -> float:
        if self.adapters is not None and vector in self.adapters.vectors:  # (a combination's weight part is rounded too)
            return self.adapters.quantize(strength)
        return strength

    def shutdown(self) -> None:
        super().shutdown()
        if getattr(self, "adapters", None) is not None:
            self.adapters.close()

    def _new_engine(self) -> VllmEngine:
        """A fresh engine view: every request vLLM still holds is aborted (after a failed step, or a
        shutdown that failed every request)."""
        old = getattr(self, "engine", None)
        if old is not None:
            old.abort_everything()
        return VllmEngine(self.llm, self.hooks, max_rows=self.settings.max_batch_size, adapters=self.adapters,
                          gated_by=self.gated_by, combos=self.combos, metrics=self.metrics)

    # -- metadata ----------------------------------------------------------------------------
    def vector_kinds(self) -> dict[str, str]:
        return {n: v.kind for n, v in self.vectors.items()} | dict.fromkeys(self.combos, "combined")

    def _deciding(self, name: str) -> str | None:
        """The vector whose gate decision a row naming combination ``name`` reports: its first gated part."""
        return next((n for n in self.combos[name] if self.hooks.gated(n) or n in self.gated_by), None)

    def merged_vectors(self) -> dict[str, float]:
        return dict(self.merged)

    def vectors_info(self) -> list[dict]:
        return [
            {
                "name": v.name, "kind": v.kind, "model_fingerprint": v.model.to_dict(), "sha256": v.sha256,
                "default": v.name == self.default_vector(), "config": v.config,
                "method": v.provenance.get("method"),
                "applied": "merged" if v.name in self.merged else "per_request",
                "merged_strength": self.merged.get(v.name),
                "strength_step": self.adapters.step
                if self.adapters is not None and v.name in self.adapters.vectors else None,
                "transfer": self._matched.get(v.name) == "transfer", "gated_by": self.gated_by.get(v.name),
            }
            for v in self.all_vectors.values()
        ] + [combined_info(name, parts, default=name == self.default_vector(), gate_from=self._deciding(name))
             for name, parts in self.combos.items()]

    def runtime_info(self) -> dict:
        from steer import hardware

        info = {"kernels": self._kernels, "host": hardware.detect().to_dict(), "backend": "vllm"}
        if self.adapters is not None:
            s = self.settings
            info["lora"] = {"strength_step": self.adapters.step, "max_rank": self._lora_rank,
                            "target_modules": self._lora_modules,
                            "max_loras": s.max_loras, "max_cpu_loras": s.max_cpu_loras,
                            "adapters": self.adapters.loaded(), "made": self.adapters.made}
        return info


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _check_vectors(settings: Settings, vectors: list[SafetyVector], fp) -> dict[str, str]:
    names = {v.name for v in vectors}
    unknown = sorted(settings.transfers() - names)
    if unknown:
        raise VectorError(f"--transfer names {', '.join(unknown)}, not a loaded vector; loaded: "
                          f"{', '.join(sorted(names)) or 'none'}")
    return {v.name: v.check_model(fp, transfer=v.name in settings.transfers()) for v in vectors}


def _refuse_unsupported(settings: Settings, vectors: list[SafetyVector]) -> tuple[dict, dict]:
    """What this backend cannot serve, refused in one line before vLLM starts; returns the checked
    ``--gate-with`` ({weight vector: activation vector}) and ``--combine`` ({name: {vector: ratio}})."""
    by_name = {v.name: v for v in vectors}
    unknown = sorted(set(settings.merged()) - set(by_name))
    if unknown:
        raise VectorError(f"--merge-vector names {', '.join(unknown)}, not a loaded vector; loaded: "
                          f"{', '.join(sorted(by_name)) or 'none'}")
    for name in settings.merged():
        if by_name[name].kind != "weight":
            raise VectorError(f"--merge-vector {name}: only weight vectors can be merged, {name!r} is an "
                              f"{by_name[name].kind} vector")
    gated_by, combos = settings.gated_by(), settings.combinations()
    borrowed_gates(by_name, gated_by)
    vectors = [v for v in vectors if v.name not in settings.merged()]
    other = sorted(v.name for v in vectors if v.kind not in ("activation", "weight"))
    if other:
        raise VectorError(f"{', '.join(other)}: only activation and weight vectors are served on --backend vllm")
    per_request = {v.name: v for v in vectors}
    check_combinations(per_request, combos)
    for name, parts in combos.items():
        acts = [p for p in parts if per_request[p].kind == "activation"]
        weights = [p for p in parts if per_request[p].kind == "weight"]
        weight = weights[0] if weights else None
        if len(acts) > 1 or len(weights) > 1:
            raise VectorError(f"--combine {name}: on --backend vllm a combination is one activation vector and one "
                              "weight vector (a request carries one LoRA adapter); use --backend transformers")
        gate = gated_by.get(weight) if weight else None
        if gate and acts and Gate.of(per_request[acts[0]]) is not None and acts[0] != gate:
            raise VectorError(f"--combine {name}: on --backend vllm its weight part must borrow its activation "
                              f"part's gate (--gate-with {weight}={acts[0]}) when both are gated; "
                              "use --backend transformers")
    from steer.adapters import lowrank_targets

    for v in vectors:
        if v.kind == "weight":
            try:
                lowrank_targets(v)
            except VectorError as e:
                raise VectorError(f"{e} (on --backend vllm a weight vector per request is a LoRA adapter; merge a "
                                  "dense one at load with --merge-vector NAME=STRENGTH)") from None
    return gated_by, combos


def from_layer(vector: SafetyVector, layer: int) -> SafetyVector:
    """A weight vector's tensors in decoder layers ``layer`` and above: what a gated weight vector's adapter
    holds on this backend, where the adapter is chosen before the gate is read."""
    import copy
    import re

    out = copy.copy(vector)
    out.tensors = {k: t for k, t in vector.tensors.items()
                   if (m := re.search(r"\.layers\.(\d+)\.", k)) is None or int(m.group(1)) >= layer}
    return out


def merged_checkpoint(path: Path, merges: list[tuple[SafetyVector, float]], fp) -> Path:
    """The checkpoint at ``path`` with weight vectors merged at their strengths (``W += s * c * B A``, as
    the embedded backend merges at load), saved once under the cache and reused: keyed by the model's
    fingerprint and each vector's hash and strength. Written to a temporary directory and renamed into
    place, so an interrupted build never leaves a half checkpoint."""
    import hashlib
    import shutil
    import tempfile

    from steer.demo import cache_dir
    from steer.hooks import merge_weight_vector
    from steer.models import load_config, load_model

    key = hashlib.sha256(json.dumps([fp.weights_sha256, sorted((v.sha256, k) for v, k in merges)]).encode())
    out = cache_dir() / "merged" / f"{path.name}-{key.hexdigest()[:16]}"
    if (out / "config.json").exists():
        log.info("merged checkpoint (cached): %s", out)
        return out
    cfg = load_config(path)
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, tok = load_model(path, dtype=dtype, attn_implementation="eager")
    for vector, strength in merges:
        changed = merge_weight_vector(model, vector, strength)
        log.info("merged weight vector %s at strength %g into %d weights", vector.name, strength, len(changed))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "steer_merge.json").write_text(json.dumps(
            {"base": str(path), "base_fingerprint": fp.to_dict(),
             "merged": [{"vector": v.name, "sha256": v.sha256, "strength": k} for v, k in merges]}, indent=1) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():  # another server may have finished the same one first
            raise
    log.info("merged checkpoint: %s", out)
    return out


# vLLM fuses these projections into one layer; its LoRA target names are the fused ones
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


def _lora_modules(vectors) -> list[str]:
    """vLLM's LoRA target module suffixes for the weights these vectors change (only those layers get
    LoRA wrappers: the others cost nothing)."""
    from steer.adapters import lowrank_targets

    suffixes = {name.rsplit(".", 1)[-1] for v in vectors for name in lowrank_targets(v)}
    return sorted({_FUSED.get(s, s) for s in suffixes})


def _start_engine(path: Path, settings: Settings, *, gated: bool, lora: tuple[int, list[str]] | None = None):
    from vllm import EngineArgs, LLMEngine

    threads = torch.get_num_threads()
    # vLLM drops torch to one thread unless OMP_NUM_THREADS is set; the embedded backend uses them all
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    from steer.models import load_config

    dtype = _engine_dtype(settings.dtype)
    if lora:
        _check_gpu_lora_dtype(dtype, load_config(path))
    if settings.tensor_parallel_size > 1:
        _bind_cpu_workers(settings.tensor_parallel_size)
    # as the embedded backend: the setting, capped at the model's context
    ctx = getattr(load_config(path), "max_position_embeddings", None)
    max_len = min(settings.max_model_len, int(ctx)) if ctx else settings.max_model_len
    args = EngineArgs(
        model=str(path), tokenizer=str(path), dtype=dtype, max_model_len=max_len,
        max_num_seqs=settings.max_batch_size,
        # Python hooks need eager mode (a compiled graph would bake them in or drop them)
        enforce_eager=True,
        enable_prefix_caching=True,
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        # a gate needs the whole prompt in one forward pass (see the module docstring)
        enable_chunked_prefill=not gated,
        max_num_batched_tokens=max(max_len, 2048) if gated else None,
        seed=0,
        # weight vectors per request: one LoRA adapter per (vector, quantized strength)
        **(_lora_args(settings, *lora) if lora else {}),
    )
    try:
        return LLMEngine.from_engine_args(args)
    except Exception as e:  # vLLM's own checks (memory, lengths, dtypes): one line for the operator
        from server.app import StartupError

        raise StartupError(f"vLLM could not start {path}: {' '.join(str(e).split())[:600]}") from e


def _engine_dtype(asked: str) -> str:
    """vLLM's dtype. 'auto' on CPU follows the embedded backend's rule: the checkpoint's dtype (vLLM's
    auto) where the host has oneDNN bf16, float32 where it has not (AVX2 hosts, where vLLM's bf16 CPU
    path has no fast kernel; under AVX2 emulation on an AMX host it died on an illegal instruction)."""
    if asked != "auto":
        return asked
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "auto"
    from steer import hardware

    return "auto" if hardware.detect().onednn_bf16 else "float32"


def _check_gpu_lora_dtype(dtype: str, config) -> None:
    """vLLM's GPU LoRA kernels take float16/bfloat16 only (an assertion deep inside vLLM otherwise)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    eff = dtype if dtype != "auto" else str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", ""))
    if eff.removeprefix("torch.") in ("float32", "float"):
        from server.app import StartupError

        raise StartupError(f"weight vectors per request run on vLLM's GPU LoRA kernels, which take float16 or "
                           f"bfloat16 only, and the model would run in {eff}: pass --dtype bfloat16, or merge "
                           "the vector at load (--merge-vector)")


def _bind_cpu_workers(tp: int) -> None:
    """vllm-cpu binds each tensor-parallel worker's threads to a NUMA node of its own and refuses to start
    on a host with fewer nodes than workers (one-node hosts: most VMs). There, unless the operator set
    VLLM_CPU_OMP_THREADS_BIND, this process's CPUs are split into ``tp`` contiguous groups, one per
    worker; fewer CPUs than workers is a startup error."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    try:
        nodes = sum(n.startswith("node") and n[4:].isdigit() for n in os.listdir("/sys/devices/system/node"))
    except OSError:
        nodes = 1
    if nodes >= tp:
        return  # vLLM's own binding (auto) works
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tp:
        from server.app import StartupError

        raise StartupError(f"--tensor-parallel-size {tp} on CPU needs at least {tp} CPUs, this process has "
                           f"{len(cpus)}")
    from steer import hardware

    if hardware.detect().torch_capability != "AVX512" and "TORCH_COMPILE_DISABLE" not in os.environ:
        # torch limited to AVX2 (inductor then vectorizes for AVX2): vLLM's torch.compile'd vocab-parallel
        # masking (get_masked_input_and_mask) gave worker ranks out-of-range token ids (seen under AVX2
        # emulation, with plain vLLM too; eager is right). The workers, spawned after this, run it eagerly
        # (the model itself is eager anyway)
        os.environ["TORCH_COMPILE_DISABLE"] = "1"
    per = len(cpus) // tp
    groups = [cpus[i * per:(i + 1) * per] for i in range(tp)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)
    log.info("vLLM CPU workers bound to CPUs %s (one NUMA node; set VLLM_CPU_OMP_THREADS_BIND to choose)",
             os.environ["VLLM_CPU_OMP_THREADS_BIND"])


def _lora_args(settings: Settings, rank: int, modules: list[str]) -> dict:
    args = {"enable_lora": True, "max_lora_rank": rank, "max_loras": settings.max_loras,
            "max_cpu_loras": settings.max_cpu_loras, "lora_target_modules": modules}
    if _install_cpu_lora_fix():
        args["lora_dtype"] = torch.float32  # small float32 matmuls are 3-5x faster than bf16 ones on CPU
    return args


def _install_cpu_lora_fix() -> bool:
    """On CPU, replace vLLM's PyTorch LoRA ops in this process (a bug and a 3x slowdown: see
    :mod:`server.backends.vllm_cpu_lora`); True if on CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from server.backends.vllm_cpu_lora import install_grouped_ops

    install_grouped_ops()
    return True


# ------------------------------------------------------------------------------ the engine view


class _AdapterFailed(RuntimeError):
    pass


@dataclass
class _Row:
    seq: Sequence
    rid: str
    n_tokens: int = 0
    adapter: object = None  # the LoRA adapter it holds (released when the row ends)
    gate_pass: bool = False  # a first pass that decides the row's gate (see VllmEngine)
    speculative: bool = False  # a gate pass run as the whole row, vanilla: kept if the gate closes


@dataclass(frozen=True)
class _Plan:
    """How one row is steered: an activation part by the hooks, a weight part as a LoRA adapter."""

    activation: tuple[str, float] | None = None  # (vector, strength)
    weight: tuple[str, float] | None = None  # (vector, strength)
    gate: float | None = None  # the activation part's gate, already decided by the row's gate pass
    gate_pass: str | None = None  # decide this gated activation vector's gate first, in a pass of its own
    speculate: bool = False  # the row is vanilla if that gate closes: the gate pass runs as the whole row


@dataclass
class VllmEngine:
    """The embedded engine's interface over vLLM's: rows in, events out, one owner thread.

    A weight vector behind a gate (``gated_by``: {weight vector: gated activation vector}) cannot wait for
    its gate inside vLLM's forward pass: a request's LoRA adapter is fixed when it is submitted. Such a row
    runs a gate pass first: its prompt alone, one token, unsteered, with the gating vector's hooks deciding
    the gate; then the row itself, with its adapter if the gate opened, vanilla if not (reading back the full
    KV blocks of its prompt that the gate pass cached). Its adapter holds the vector's layers from the gate
    layer on (:func:`from_layer`): its prompt then runs as in the embedded engine's phased prefill, and its
    generated tokens run the lower layers unchanged too (the embedded engine changes them). A combination's
    activation part gated by the same vector keeps the gate pass's decision: with the adapter in the
    layers below the gate, its own reading would see another residual.

    Where a closed gate leaves the row vanilla (no other steering), the gate pass is the row itself,
    vanilla with the row's sampling: the gate is decided in its prefill, before its first token. If the
    gate closes it carries on as the row (no second prefill); if it opens it is aborted after that token,
    which is never sent, and the row runs with its adapter as above."""

    llm: object
    hooks: _Hooks
    max_rows: int
    adapters: object = None  # steer.adapters.AdapterCache for weight vectors per request
    gated_by: dict[str, str] = field(default_factory=dict)
    combos: dict[str, dict[str, float]] = field(default_factory=dict)
    pending: list[Sequence] = field(default_factory=list)
    rows: dict[str, _Row] = field(default_factory=dict)  # vLLM request id -> row
    decided: dict[int, float] = field(default_factory=dict)  # sequence id -> its gate pass's decision
    last_step: dict = field(default_factory=dict)
    metrics: Metrics | None = None  # counts speculative gate passes kept and rerun

    def add(self, seq: Sequence) -> None:
        if seq.sampling.max_tokens is None or seq.sampling.max_tokens < 1:
            raise ValueError("max_tokens must be resolved to a positive int before a sequence is added")
        if not seq.prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.pending.append(seq)

    def cancel(self, seq_id: int) -> None:
        for s in self.pending:
            if s.id == seq_id:
                s.cancelled = True
        for row in self.rows.values():
            if row.seq.id == seq_id:
                row.seq.cancelled = True

    @property
    def running(self) -> int:
        return len(self.rows)

    def has_work(self) -> bool:
        return bool(self.pending) or bool(self.rows)

    def _plan(self, seq: Sequence) -> _Plan:
        if seq.strength <= 0 or not seq.vector:
            return _Plan()
        activation = weight = None
        for name, ratio in (self.combos.get(seq.vector) or {seq.vector: 1.0}).items():
            if self.adapters is not None and name in self.adapters.vectors:
                weight = (name, seq.strength * ratio)
            else:
                activation = (name, seq.strength * ratio)
        source = self.gated_by.get(weight[0]) if weight else None
        if source is None:
            return _Plan(activation, weight)
        decided = self.decided.get(seq.id)
        shared = activation is not None and activation[0] == source  # its gate: the gate pass's decision
        if decided is None:
            return _Plan(gate_pass=source, speculate=activation is None or shared)
        return _Plan(activation, weight if decided > 0 else None, gate=decided if shared else None)

    @staticmethod
    def _vanilla(plan: _Plan) -> bool:
        """Whether a decided row runs unsteered (a shared gate's 0 multiplies its activation part away)."""
        return plan.weight is None and (plan.activation is None or plan.gate == 0.0)

    def _waits_for_adapter(self, seq: Sequence) -> bool:
        """Its strength's adapter is still being written (in the background: the batch goes on)."""
        weight = self._plan(seq).weight
        return weight is not None and not self.adapters.ready(*weight)

    def step(self) -> list[Event]:
        events = self._drop_cancelled()
        waiting: list[Sequence] = []
        while self.pending and len(self.rows) < self.max_rows:
            seq = self.pending.pop(0)
            if self._waits_for_adapter(seq):
                waiting.append(seq)
                continue
            try:
                self._submit(seq)
            except _AdapterFailed as e:  # this row fails (500, logged); the batch goes on
                self.decided.pop(seq.id, None)
                seq.finish_reason, seq.error = "error", str(e.__cause__ or e)
                events.append(Event(seq.id, "", 0, "error"))
        self.pending[:0] = waiting  # first in line once their adapters are written
        self.last_step = {"rows": len(self.rows)}
        if not self.rows:
            if waiting and not events:  # nothing to run until an adapter is written: wait, don't spin
                concurrent.futures.wait(self.adapters.pending(), timeout=0.05)
            return events
        decided = []
        for out in self.llm.step():
            row = self.rows.get(out.request_id)
            if row is None:
                continue
            if row.gate_pass:
                if not (out.finished or row.speculative):
                    continue
                # the gate was decided in the prefill, which ended with this output's (first) token
                gate = self.hooks.pop_gate(out.request_id)
                self.decided[row.seq.id] = row.seq.gate[row.seq.vector] = 0.0 if gate is None else gate
                if row.speculative and self._vanilla(self._plan(row.seq)):  # it is the row: carry on
                    self.decided.pop(row.seq.id)
                    row.gate_pass = False
                    self._count_gate_pass("kept")
                else:  # the row itself goes next, first in line, steered as its gate decided
                    if not out.finished:
                        self.llm.abort_request([out.request_id])
                    if row.speculative:
                        self._count_gate_pass("rerun")
                    self._end(out.request_id)
                    decided.append(row.seq)
                    continue
            o = out.outputs[0]
            row.n_tokens += len(o.token_ids)
            row.seq.generated.extend(o.token_ids)
            reason = None
            if out.finished:
                reason = o.finish_reason if o.finish_reason in ("stop", "length") else "cancelled"
                self._finish(out.request_id)
            prompt_lp = None
            if row.seq.sampling.prompt_logprobs is not None and out.prompt_logprobs:  # all of them, at the first
                prompt_lp = _prompt_logprobs(out.prompt_logprobs, row.seq.prompt_ids, row.seq.sampling.prompt_logprobs)
            events.append(Event(row.seq.id, o.text, row.n_tokens, reason, _logprobs(o, row.seq.sampling), prompt_lp))
        self.pending[:0] = decided
        return events

    def _count_gate_pass(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.gate_pass.labels(outcome).inc()

    def _submit(self, seq: Sequence) -> None:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        plan = self._plan(seq)
        p = seq.sampling

        def sampling(**kw) -> VllmSampling:
            return VllmSampling(
                n=1, max_tokens=p.max_tokens, temperature=0.0 if p.greedy else p.temperature,
                top_p=1.0 if p.greedy else p.top_p, seed=p.seed, stop=list(p.stop) or None,
                ignore_eos=p.ignore_eos, output_kind=RequestOutputKind.DELTA, logprobs=p.logprobs,
                presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias) or None,
                prompt_logprobs=p.prompt_logprobs, **kw)

        if plan.gate_pass:  # unsteered, the gating vector's hooks reading the gate; the whole row if speculative
            rid = f"gate-{seq.id}"
            steer = {"steer": {"vector": plan.gate_pass, "strength": 0.0}}
            params = (sampling(extra_args=steer, skip_reading_prefix_cache=True) if plan.speculate else
                      VllmSampling(n=1, max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA,
                                   extra_args=steer, skip_reading_prefix_cache=True))
            self.llm.add_request(rid, {"prompt_token_ids": list(seq.prompt_ids)}, params)
            self.rows[rid] = _Row(seq, rid, gate_pass=True, speculative=plan.speculate)
            self.hooks.expect_gate(rid)
            return
        self.decided.pop(seq.id, None)
        rid = f"row-{seq.id}"
        adapter = None
        if plan.weight is not None:
            try:
                adapter = self.adapters.acquire(*plan.weight)
            except Exception as e:  # writing the adapter failed (disk full, ...)
                raise _AdapterFailed(f"making the LoRA adapter for {plan.weight[0]}@{plan.weight[1]:g} failed") from e
        steer = None
        if plan.activation is not None:
            name, strength = plan.activation
            steer = {"vector": name, "strength": float(strength)}
            if plan.gate is not None:
                steer["gate"] = plan.gate
        gated = steer is not None and plan.gate is None and self.hooks.gated(steer["vector"])
        # a gated request's gate position must be computed, never read from the cache
        # prompt logprobs are computed in the prefill: a cached prefix would have none
        params = sampling(extra_args={"steer": steer} if steer else None,
                          skip_reading_prefix_cache=gated or p.prompt_logprobs is not None)
        prompt = {"prompt_token_ids": list(seq.prompt_ids)}
        if steer:  # its KV holds steered activations: never shared with other settings
            prompt["cache_salt"] = (f"steer:{steer['vector']}:{self.hooks.sha(steer['vector'])}:{steer['strength']!r}"
                                    + (f":gate={plan.gate!r}" if plan.gate is not None else ""))
        lora = None
        if adapter is not None:  # vLLM keys the prefix cache by adapter: no salt needed
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(adapter.name, adapter.id, str(adapter.path))
        try:
            self.llm.add_request(rid, prompt, params, lora_request=lora)
        except BaseException:
            if adapter is not None:
                self.adapters.release(adapter)
            raise
        self.rows[rid] = _Row(seq, rid, adapter=adapter)
        if gated or plan.gate is not None:  # a decision to read back, or one given to drop when the row ends
            self.hooks.expect_gate(rid)

    def _end(self, rid: str) -> _Row:
        row = self.rows.pop(rid)
        if row.adapter is not None:
            self.adapters.release(row.adapter)
        return row

    def _finish(self, rid: str) -> None:
        row = self._end(rid)
        decided = self.hooks.pop_gate(rid)
        if decided is not None:  # a decision from the row's gate pass stays
            row.seq.gate.setdefault(row.seq.vector, decided)

    def _drop_cancelled(self) -> list[Event]:
        events = [Event(s.id, "", 0, "cancelled") for s in self.pending if s.cancelled]
        for s in self.pending:
            if s.cancelled:
                self.decided.pop(s.id, None)
        self.pending = [s for s in self.pending if not s.cancelled]
        gone = [rid for rid, row in self.rows.items() if row.seq.cancelled]
        if gone:
            self.llm.abort_request(gone)
            for rid in gone:
                row = self._end(rid)
                self.hooks.pop_gate(rid)
                self.decided.pop(row.seq.id, None)
                events.append(Event(row.seq.id, "", row.n_tokens, "cancelled"))
        return events

    def abort_everything(self) -> None:
        if self.rows:
            self.llm.abort_request(list(self.rows))
            for rid in list(self.rows):
                self._end(rid)
                self.hooks.pop_gate(rid)
        self.pending.clear()
        self.decided.clear()


# ------------------------------------------------------------------------------ steering hooks


def _logprobs(o, p: SamplingParams) -> tuple[TokenLogprob, ...]:
    """A completion output's new tokens' logprobs as the embedded engine gives them: vLLM's raw
    log-probabilities (its default ``logprobs_mode``) and the ``p.logprobs`` most likely by rank, an
    end-of-sequence token that ends the answer included (as vLLM's own server lists it)."""
    if p.logprobs is None or not o.logprobs:
        return ()
    return tuple(_token_logprob(tok, step, p.logprobs) for tok, step in zip(o.token_ids, o.logprobs, strict=False))


def _prompt_logprobs(steps, prompt_ids, k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's prompt logprobs (None for the first token, then per token its own and the ``k`` most likely,
    with ranks) as the embedded engine gives them: the tokens after the first."""
    return tuple(_token_logprob(tok, step, k) for tok, step in zip(prompt_ids[1:], steps[1:], strict=True))


def _token_logprob(tok: int, step: dict, k: int) -> TokenLogprob:
    """One position of vLLM's logprobs ({token id: Logprob with rank}): ``tok``'s and the ``k`` most likely."""
    top = sorted((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank is not None and lp.rank <= k)
    return TokenLogprob(tok, float(step[tok].logprob), tuple((t, float(v)) for _, t, v in top))


@dataclass
class _Step:
    """One forward pass's rows: which token rows belong to which request, and their strengths."""

    tokens: int  # real token rows (padding beyond is left alone)
    req_of_token: torch.Tensor  # (T,) request index per token row
    prompt_token: torch.Tensor  # (T,) True where the token row is a prompt token (not a generated one)
    rids: list[str]  # vLLM's internal request ids, by request index
    strength: dict[str, torch.Tensor]  # vector -> (n,) strength per request (0: another vector or none)
    gate_rows: dict[str, list[tuple[str, int]]]  # gated vector -> [(rid, token row of its gate position)]
    multiplier: dict[str, torch.Tensor] = field(default_factory=dict)  # vector -> (T,) strength * gate
    # a multi-layer gate's streams at its rows, kept until its decision layer: vector -> {layer: (rows, d)}
    gate_parts: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)


class _HookInfo:
    """What the engine view asks of the hooks wherever they run: which vectors are gated, and the hash a
    steered request's prefix-cache salt carries."""

    steerers: dict[str, ActivationSteerer]
    shas: dict[str, str]

    def gated(self, name: str) -> bool:
        st = self.steerers.get(name)
        return st is not None and st.gate is not None

    def sha(self, name: str) -> str:
        return self.shas[name][:16]


class _Hooks(_HookInfo):
    """Forward-pre-hooks on vLLM's decoder layers: per-token activation steering and gates."""

    def __init__(self, runner, steerers: dict[str, ActivationSteerer], shas: dict[str, str]):
        self.runner, self.steerers, self.shas = runner, steerers, shas
        self.gates: dict[str, float] = {}  # our request id -> gate decision (gated vectors)
        self.step: _Step | None = None
        self.ran: set[str] = set()  # vectors whose layer hooks have acted (the startup probe reads it)
        if not steerers:
            return
        model = runner.model
        layers = model.model.layers
        for st in steerers.values():
            bad = [ly for ly in st.layers() if not 0 <= ly < len(layers)]
            if bad:
                raise VectorError(f"vector {st.name!r} targets layers {bad}, model has {len(layers)}")
        model.register_forward_pre_hook(self._begin)  # the top module: vLLM calls its decoder stack past nn.Module hooks
        for st in steerers.values():
            for ly in sorted(st.layers()):
                layers[ly].register_forward_pre_hook(self._layer_hook(st, ly), with_kwargs=True)

    def pop_gate(self, rid: str) -> float | None:
        return self.gates.pop(rid, None)

    def expect_gate(self, rid: str) -> None:
        """A gated request was submitted (the worker-process hooks use it to skip needless calls)."""

    def take_ran(self) -> set[str]:
        ran, self.ran = self.ran, set()
        return ran

    def _begin(self, module, args) -> None:
        """Before the decoder stack: map this pass's token rows to requests and their steering."""
        self.step = None
        ib = self.runner.input_batch
        n = ib.num_reqs
        if n == 0:
            return
        rids = list(ib.req_ids[:n])
        settings = []
        for rid in rids:
            state = self.runner.requests.get(rid)
            extra = state.sampling_params.extra_args if state is not None and state.sampling_params else None
            settings.append((extra or {}).get("steer"))
        if not any(settings):
            return
        qsl = self.runner.query_start_loc.cpu[: n + 1].to(torch.long)
        lens = qsl[1:] - qsl[:-1]
        strength: dict[str, torch.Tensor] = {}
        gate_rows: dict[str, list[tuple[str, int]]] = {}
        for i, (rid, s) in enumerate(zip(rids, settings, strict=True)):
            if not s or s["vector"] not in self.steerers:
                continue
            name = s["vector"]
            strength.setdefault(name, torch.zeros(n, dtype=torch.float32))[i] = s["strength"]
            st = self.steerers[name]
            ours = _our_id(rid)
            if st.gate is not None and "gate" in s:  # decided by the request's gate pass (VllmEngine)
                self.gates.setdefault(ours, float(s["gate"]))
            if st.gate is not None and ours not in self.gates:
                at = int(ib.num_prompt_tokens[i]) + st.gate.position  # the gate's position in the prompt
                done = int(ib.num_computed_tokens_cpu[i])
                if done <= at < done + int(lens[i]):
                    gate_rows.setdefault(name, []).append((ours, int(qsl[i]) + at - done))
        req_of_token = torch.repeat_interleave(torch.arange(n), lens)
        # each token row's position in its request: a prompt token's is below the prompt's length
        pos = (torch.arange(len(req_of_token)) - qsl[req_of_token]
               + torch.as_tensor(ib.num_computed_tokens_cpu[:n], dtype=torch.long)[req_of_token])
        prompt = pos < torch.as_tensor(ib.num_prompt_tokens[:n], dtype=torch.long)[req_of_token]
        self.step = _Step(int(qsl[-1]), req_of_token, prompt, [_our_id(r) for r in rids], strength, gate_rows)

    def _multiplier(self, st: ActivationSteerer) -> torch.Tensor:
        step = self.step
        k = step.multiplier.get(st.name)
        if k is None:
            per_req = step.strength[st.name]
            if st.gate is None:
                k = per_req[step.req_of_token]
            else:  # undecided counts as closed; a generated token's row may run a lowered row vanilla
                g = torch.tensor([self.gates.get(r, 0.0) for r in step.rids], dtype=torch.float32)[step.req_of_token]
                k = per_req[step.req_of_token] * torch.where(step.prompt_token, g, st.gate.in_decode(g))
            k = step.multiplier[st.name] = k * st.coefficient
        return k

    def _layer_hook(self, st: ActivationSteerer, layer: int):
        r = st.directions.get(layer)
        on: dict = {}  # the direction on the model's device and dtype, moved once

        def hook(module, args, kwargs):
            step = self.step
            if step is None or st.name not in step.strength:
                return None
            h = args[1] if len(args) > 1 else kwargs["hidden_states"]
            res = args[2] if len(args) > 2 else kwargs.get("residual")
            t = step.tokens
            self.ran.add(st.name)
            if st.gate is not None and layer in st.gate.layers and step.gate_rows.get(st.name):
                # the gate reads each of its layers' input stream at the rows' gate positions (a few rows;
                # the gate's tensors live on the CPU) and decides at its last layer
                rows = step.gate_rows[st.name]
                idx = torch.tensor([row for _, row in rows])
                stream = h[idx] if res is None else h[idx] + res[idx]
                parts = step.gate_parts.setdefault(st.name, {})
                parts[layer] = stream.float().cpu()
                if layer == st.gate.layer:
                    del step.gate_rows[st.name]
                    decided = st.gate.decide_from(parts)
                    for (rid, _), f in zip(rows, decided.tolist(), strict=True):
                        self.gates[rid] = float(f)
            if r is None:
                return None
            k = self._multiplier(st)
            if not bool(k.any()):
                return None
            h2 = h.clone()
            rd = on.get((h.device, h.dtype))
            if rd is None:
                rd = on[(h.device, h.dtype)] = r.to(device=h.device, dtype=h.dtype)
            h2[:t] = h[:t] + k.to(device=h.device, dtype=h.dtype)[:, None] * rd
            if len(args) > 1:
                return (args[0], h2, *args[2:]), kwargs
            return args, {**kwargs, "hidden_states": h2}

        return hook


def _our_id(rid: str) -> str:
    """vLLM's internal request id is ours plus '-' and 8 random characters."""
    return rid.rsplit("-", 1)[0]


# ------------------------------------------------------------------------------ tensor parallel

# With --tensor-parallel-size > 1 vLLM runs the model in one worker process per rank. Every rank holds the
# whole residual stream at a decoder layer's input (it is all-reduced after each layer), so the same
# hooks installed in every worker steer, and decide gates, identically; each request's steering reaches
# the workers inside its SamplingParams. This process talks to them through vLLM's collective_rpc.

_WORKER: dict = {}  # in a worker process: its _Hooks


def _worker_install(worker, vectors: list, transfer: dict, shas: dict, dtype: torch.dtype, lora_fix: bool) -> dict:
    if lora_fix:
        _install_cpu_lora_fix()
    steerers = {v.name: ActivationSteerer(v, dtype=dtype, transfer=transfer[v.name]) for v in vectors}
    _WORKER["hooks"] = _Hooks(worker.model_runner, steerers, shas)
    from vllm.lora.ops.torch_ops import lora_ops

    return {"pid": os.getpid(), "rank": getattr(worker, "rank", None), "hooks": sorted(steerers),
            "lora_fix": bool(getattr(lora_ops.bgmv_shrink, "__steer_grouped__", False))}


def _worker_pop_gates(worker, rids: list[str]) -> list:
    hooks = _WORKER["hooks"]
    return [hooks.pop_gate(r) for r in rids]


def _worker_take_ran(worker) -> list[str]:
    return sorted(_WORKER["hooks"].take_ran())


class _WorkerHooks(_HookInfo):
    """The main process's view of the hooks in vLLM's worker processes (tensor parallel): the same
    interface as :class:`_Hooks`. Gate decisions are read from the workers when a gated request ends;
    the ranks must agree, or the server fails the request rather than guess."""

    def __init__(self, llm, vectors: list[SafetyVector], transfer: dict, shas: dict, dtype: torch.dtype, *,
                 lora_fix: bool):
        self.llm, self.shas = llm, shas
        self.steerers = {v.name: ActivationSteerer(v, dtype=torch.float32, transfer=transfer[v.name]) for v in vectors}
        self.expected: set[str] = set()
        self.workers = llm.collective_rpc(_worker_install, args=(vectors, transfer, shas, dtype, lora_fix))
        if lora_fix and not all(w["lora_fix"] for w in self.workers):
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                raise RuntimeError("the LoRA ops fix did not reach every vLLM worker; refusing to serve weight "
                                   "vectors whose unsteered rows could get a steered delta (vllm#48421)")
        log.info("steering hooks installed in %d vLLM workers (pids %s)", len(self.workers),
                 ", ".join(str(w["pid"]) for w in self.workers))

    def expect_gate(self, rid: str) -> None:
        self.expected.add(rid)

    def pop_gate(self, rid: str) -> float | None:
        if rid not in self.expected:
            return None
        self.expected.discard(rid)
        per_rank = [d[0] for d in self.llm.collective_rpc(_worker_pop_gates, args=([rid],))]
        if len(set(per_rank)) > 1:
            raise RuntimeError(f"tensor-parallel ranks decided the gate differently for {rid}: {per_rank}")
        return per_rank[0]

    def take_ran(self) -> set[str]:
        ran = [set(r) for r in self.llm.collective_rpc(_worker_take_ran)]
        return set.intersection(*ran) if ran else set()
