"""Server settings: one frozen model that feeds the CLI flags, the ``STEER_*`` env vars and the docs.

Precedence, highest first: CLI flag, environment variable, field default. The CLI flags default to
None so that an env var is not shadowed by a flag the user never typed.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "STEER_"


class SettingsError(ValueError):
    """Invalid server settings; ``str(err)`` is one line, fit to print before exiting non-zero."""


class Settings(BaseModel):
    """Everything an operator can set when starting ``steer serve``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        None, description="Model directory (HF checkpoint). Omitted: the demo model and its shipped vectors."
    )
    vectors: str | None = Field(
        None, description="Directory of safety vectors (safetensors + JSON manifest each)."
    )
    merge_vector: str | None = Field(
        None,
        description="Weight vectors to merge into the model's weights at load, each at one fixed strength: "
        "NAME=STRENGTH[,NAME=STRENGTH...]. A merged vector is part of the served model (not selectable "
        "per request); the other loaded vectors stay per-request.",
    )
    transfer: str | None = Field(
        None,
        description="Vectors declared as transfers, NAME[,NAME...]: made on another model of the same "
        "architecture (e.g. the aligned model this one was fine-tuned from). Without it a vector made "
        "for other weights is refused; a different architecture or shape is always refused.",
    )
    gate_with: str | None = Field(
        None,
        description="Serve a per-request weight vector behind a gated activation vector's gate, "
        "WEIGHT=ACTIVATION[,...]: a request's weight delta applies only if its prompt passes that gate "
        "(from the gate layer on over the prompt, at every layer for the generated tokens).",
    )
    combine: str | None = Field(
        None,
        description="Named combinations of per-request vectors, NAME=VECTOR[*RATIO]+VECTOR[*RATIO][,...]: a "
        "request naming NAME is steered by each vector at its strength times the vector's ratio (default 1), "
        "each behind its own gate (a weight vector: the one --gate-with gives it). E.g. both kinds on one "
        "request: --gate-with enchtable=refusal --combine both=refusal+enchtable*0.5.",
    )
    backend: Literal["transformers", "vllm"] = Field("transformers", description="Inference backend.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM backend: GPUs (on CPU: worker processes, each bound to its own CPUs) the "
        "model is split over (tensor parallel). Every vector kind is served at any size."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, allow_inf_nan=False,
        description="vLLM backend on a GPU: the fraction of GPU memory vLLM may take (weights + KV cache). On "
        "CPU the KV cache size is VLLM_CPU_KVCACHE_SPACE GiB (default here: 1).",
    )
    strength_step: float = Field(
        0.05, gt=0, allow_inf_nan=False,
        description="vLLM backend: per-request weight-vector strengths are served as LoRA adapters, one per "
        "strength rounded to a multiple of this step (a positive strength never rounds to 0: at least one "
        "step). The response's safety.applied_strength says what was applied where it differs.",
    )
    max_loras: int = Field(
        8, ge=1, description="vLLM backend: most weight-vector strengths (LoRA adapters) in one batch; requests "
        "for others wait for a slot.",
    )
    max_cpu_loras: int = Field(
        32, ge=1, description="vLLM backend: most LoRA adapters kept made and loaded (least recently used idle "
        "ones are dropped beyond it, and made again on their next use).",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    playground: bool | None = Field(
        None,
        description="Serve the playground page at / and /playground (a browser client of this API: steered "
        "and baseline answers side by side, strength sweeps). Omitted: on when --host is a loopback "
        "address (127.0.0.1, ::1, localhost), off otherwise. --no-playground turns it off.",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    default_strength: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Safety strength for requests that do not set one."
    )
    min_strength: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Lowest safety strength a request may ask for."
    )
    max_strength: float = Field(
        4.0, ge=0, allow_inf_nan=False, description="Highest safety strength a request may ask for."
    )
    # repr=False: the key must not end up in logs that print the settings.
    api_key: str | None = Field(
        None, repr=False, description="If set, clients must send 'Authorization: Bearer <key>'."
    )
    max_batch_size: int = Field(16, ge=1, description="Most sequences decoded in one forward batch.")
    max_model_len: int = Field(2048, ge=1, description="Most tokens (prompt + completion) per sequence.")
    max_n: int = Field(4, ge=1, description="Largest 'n' (choices per request) a request may ask for.")
    default_vector: str | None = Field(
        None,
        description="Vector used by requests that do not name one. Omitted: the only loaded vector; with "
        "several loaded the server refuses to start until one is named.",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Compute dtype of the model. 'auto' picks by the host CPU: bfloat16 where oneDNN has "
        "bf16 kernels (AVX-512 BF16 / AMX), otherwise by a short measured probe (float32 on AVX2-only "
        "hosts, where bf16 matmuls have no fast kernel).",
    )
    linear_weights: Literal["auto", "packed", "plain", "hybrid"] = Field(
        "auto",
        description="CPU linear layers: 'packed' re-lays the weights out for oneDNN once at load (faster "
        "matmuls at decode batch sizes; steady memory grows only by a packed copy of a tied LM head); "
        "'plain' keeps torch's layout; 'hybrid' (a float32 model, for CPUs without oneDNN bf16) runs "
        "one-row inputs through a bf16 copy of the weights and larger ones through a packed float32 copy; 'auto' "
        "decides by the host (see README, Hosts). An explicit choice the host cannot do is a startup error.",
    )
    max_step_tokens: int = Field(
        256,
        ge=16,
        description="Most prompt tokens one engine step prefills (chunked prefill). A long prompt is "
        "prefilled in chunks between decode steps, so it never stalls the running streams for long.",
    )
    max_queued_requests: int = Field(
        256,
        ge=1,
        description="Most requests waiting for a batch slot; beyond it a request is answered 429 with "
        "Retry-After.",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (bytes); larger is HTTP 413."
    )
    shutdown_timeout: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,
        description="On SIGTERM: seconds in-flight requests may still finish before they are cancelled "
        "with an error and the server exits 0. A second SIGTERM or SIGINT exits at once.",
    )
    served_model_name: str | None = Field(
        None, description="Model name reported by /v1/models. Omitted: derived from the model path."
    )

    def __init__(self, **data: Any) -> None:
        # Callers (CLI, tests, the app) only ever need to catch SettingsError with a one-line message.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SettingsError(_one_line(exc)) from None

    @model_validator(mode="after")
    def _check_loras(self) -> Settings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"need max_loras <= max_cpu_loras, got {self.max_loras} > {self.max_cpu_loras}")
        return self

    @model_validator(mode="after")
    def _check_strength_range(self) -> Settings:
        lo, default, hi = self.min_strength, self.default_strength, self.max_strength
        if not all(math.isfinite(v) for v in (lo, default, hi)):  # belt and braces over allow_inf_nan
            raise ValueError("strengths must be finite numbers")
        if not lo <= default <= hi:
            raise ValueError(
                f"need min_strength <= default_strength <= max_strength, got {lo:g} <= {default:g} <= {hi:g}"
            )
        return self

    @model_validator(mode="after")
    def _check_vector_lists(self) -> Settings:
        self.merged()  # raises ValueError with the reason
        self.transfers()
        self.combinations()
        gated = self.gated_by()
        both = sorted(set(gated) & set(self.merged()))
        if both:
            raise ValueError(f"gate_with: {', '.join(both)} is merged at load (--merge-vector); only a "
                             "per-request weight vector can be gated")
        return self

    def playground_enabled(self) -> bool:
        """--playground as set, else on only where the server listens on a loopback address."""
        return self.playground if self.playground is not None else is_loopback(self.host)

    def merged(self) -> dict[str, float]:
        """--merge-vector parsed: {name: strength}."""
        out: dict[str, float] = {}
        for item in _items(self.merge_vector):
            name, sep, value = item.partition("=")
            try:
                strength = float(value)
            except ValueError:
                strength = math.nan
            if not sep or not name.strip() or not math.isfinite(strength) or strength < 0:
                raise ValueError(f"merge_vector wants NAME=STRENGTH (a finite strength >= 0), got {item!r}")
            if name.strip() in out:
                raise ValueError(f"merge_vector names {name.strip()!r} twice")
            out[name.strip()] = strength
        return out

    def gated_by(self) -> dict[str, str]:
        """--gate-with parsed: {weight vector: activation vector whose gate it is served behind}."""
        out: dict[str, str] = {}
        for item in _items(self.gate_with):
            weight, sep, source = (x.strip() for x in item.partition("="))
            if not sep or not weight or not source:
                raise ValueError(f"gate_with wants WEIGHT=ACTIVATION, got {item!r}")
            if weight in out:
                raise ValueError(f"gate_with names {weight!r} twice")
            out[weight] = source
        return out

    def combinations(self) -> dict[str, dict[str, float]]:
        """--combine parsed: {name: {vector: ratio}}."""
        out: dict[str, dict[str, float]] = {}
        for item in _items(self.combine):
            name, sep, rest = (x.strip() for x in item.partition("="))
            parts: dict[str, float] = {}
            for term in rest.split("+") if sep else []:
                vector, star, ratio = (x.strip() for x in term.partition("*"))
                try:
                    r = float(ratio) if star else 1.0
                except ValueError:
                    r = math.nan
                if not vector or not math.isfinite(r) or r <= 0:
                    raise ValueError(f"combine wants NAME=VECTOR[*RATIO]+VECTOR[*RATIO] with ratios > 0, got {item!r}")
                if vector in parts:
                    raise ValueError(f"combine {name}: names {vector!r} twice")
                parts[vector] = r
            if not sep or not name or len(parts) < 2:
                raise ValueError(f"combine wants NAME=VECTOR[*RATIO]+VECTOR[*RATIO] (two or more vectors), got {item!r}")
            if name in out:
                raise ValueError(f"combine names {name!r} twice")
            out[name] = parts
        return out

    def transfers(self) -> frozenset[str]:
        """--transfer parsed: the vector names declared as transfers."""
        return frozenset(_items(self.transfer))

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from ``STEER_<FIELD>`` env vars; non-None ``overrides`` (CLI values) win."""
        data: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw:  # an empty variable counts as unset, as in most shells' `VAR= cmd`
                data[name] = raw
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address ("localhost", 127.0.0.0/8, ::1). "0.0.0.0", "::", "" and
    any other name are not: they may be reachable from other machines."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _items(raw: str | None) -> list[str]:
    return [x.strip() for x in (raw or "").split(",") if x.strip()]


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting '{name}'")
        elif name:
            source = f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}"
            parts.append(f"invalid {name}={err.get('input')!r} ({source}): {msg}")
        else:
            parts.append(f"invalid settings: {msg}")
    return "; ".join(parts)


def _cli_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """argparse (type, choices) for a field annotation; Optional[X] is treated as X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, [str(a) for a in args]
    if args:  # X | None
        return _cli_type(args[0])
    return (annotation if annotation in (int, float) else str), None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per Settings field (help = the field description; default None)."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"env {ENV_PREFIX}{name.upper()}"
        if bool in typing.get_args(field.annotation) or field.annotation is bool:
            # --flag / --no-flag; neither given: None, so the environment or the field's default decides
            shown = "auto" if field.default is None else ("on" if field.default else "off")
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.description} [{env}=1|0; default: {shown}]")
            continue
        arg_type, choices = _cli_type(field.annotation)
        shown = "none" if field.default is None or field.repr is False else field.default
        parser.add_argument(
            flag,
            dest=name,
            type=arg_type,
            choices=choices,
            default=None,
            metavar=None if choices else name.upper(),
            help=f"{field.description} [{env}; default: {shown}]",
        )


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Settings from parsed CLI args layered over the environment. Raises SettingsError."""
    return Settings.from_env(**{name: getattr(ns, name, None) for name in Settings.model_fields})
