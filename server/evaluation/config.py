"""``steer eval`` settings: the CLI flags, their validation, and one frozen config the runner reads.

Every flag is parsed as a string and validated here, so a bad value is one line on stderr and exit
code 1 (an :class:`EvalError` that ``server/cli.py`` prints), never argparse's usage block.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.evaluation.plots import ComparedRun

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)
MAX_TOKENS_SAFETY = 64  # refusals show in the first sentence; the judge reads the first 200 characters
MAX_TOKENS_CODE = 512  # chat code models restate the prompt first: 256 cut off 4/4 demo answers, 512 1/4
JUDGES = ("refusal", "llm")


class EvalError(Exception):
    """A user-facing evaluation error: one line, printed by the CLI before exiting with code 1."""


@dataclass(frozen=True)
class EvalConfig:
    """Validated settings of one ``steer eval`` run."""

    base_url: str
    out: str
    model: str | None = None
    api_key: str = "unused"
    suites: tuple[str, ...] = ()
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    strengths_explicit: bool = False
    methods: tuple[str, ...] = ("none",)
    vector: str | None = None
    limit: int | None = None
    max_tokens: int | None = None  # None: MAX_TOKENS_SAFETY / MAX_TOKENS_CODE by suite
    judge: str = "refusal"
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    concurrency: int = 4
    timeout: float = 300.0
    connect_timeout: float = 5.0
    sandbox_timeout: float = 10.0
    command: str = ""
    compare: tuple[ComparedRun, ...] = ()  # earlier runs drawn on the plots, read before any request

    def max_tokens_for(self, kind: str) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return MAX_TOKENS_CODE if kind == "utility" else MAX_TOKENS_SAFETY


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``steer eval`` flags. Values stay strings; :func:`config_from_args` validates them."""
    from server.evaluation.methods import METHODS
    from server.evaluation.suites import OPT_IN, SUITES

    p.add_argument(
        "--base-url",
        required=True,
        metavar="URL",
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="model id to ask for (default: the first of GET /v1/models)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="bearer key for --base-url (default: $OPENAI_API_KEY, else none)",
    )
    p.add_argument(
        "--suites",
        nargs="+",
        default=None,
        metavar="SUITE",
        help=f"suites to run: {', '.join(SUITES)} (default: all but the long-prompt jailbreak-template "
        f"suites {', '.join(OPT_IN)})",
    )
    p.add_argument(
        "--strengths",
        default=None,
        metavar="S,S,..",
        help="comma-separated safety strengths to sweep (default: 0,0.5,1,1.5,2 where the server "
        "accepts the `safety` field; the server's own behaviour, 'n/a', where it does not)",
    )
    p.add_argument(
        "--method",
        nargs="+",
        default=["none"],
        metavar="METHOD",
        help=f"request wrappers to compare: {', '.join(METHODS)}",
    )
    p.add_argument(
        "--vector",
        default=None,
        metavar="NAME",
        help="safety vector name to send (default: the server's default)",
    )
    p.add_argument(
        "--limit", default=None, metavar="N", help="at most N prompts per suite (the first N of its split)"
    )
    p.add_argument(
        "--max-tokens",
        default=None,
        metavar="N",
        help=f"completion tokens per answer (default: {MAX_TOKENS_SAFETY} for safety suites, "
        f"{MAX_TOKENS_CODE} for humaneval)",
    )
    p.add_argument(
        "--judge",
        default="refusal",
        metavar="{refusal,llm}",
        help="harmfulness judge: refusal (phrase matcher) or llm",
    )
    p.add_argument(
        "--judge-url", default=None, metavar="URL", help="OpenAI-compatible base URL of the --judge llm model"
    )
    p.add_argument(
        "--judge-model",
        default=None,
        metavar="NAME",
        help="judge model id (default: the first at --judge-url)",
    )
    p.add_argument(
        "--judge-api-key", default=None, metavar="KEY", help="bearer key for --judge-url (default: --api-key)"
    )
    p.add_argument(
        "--concurrency", default="4", metavar="N", help="requests in flight at once (lets the server batch)"
    )
    p.add_argument("--timeout", default="300", metavar="SECONDS", help="seconds per request")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="DIR",
        help="earlier steer eval --out directories to draw on this run's plots: one line per run and "
        "method, each run labelled MODEL @ HOST:PORT from its results.json (the directory name is "
        "appended where two labels are the same)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory (results.json, results.md, PNGs, cache.jsonl)",
    )


def parse_strengths(text: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0); raises EvalError on a non-number, negative, NaN/inf or repeat."""
    parts = [s.strip() for s in text.split(",")]
    out: list[float] = []
    for s in parts:
        try:
            v = float(s)
        except ValueError:
            raise EvalError(f"--strengths: {s!r} is not a number (expected e.g. 0,0.5,1)") from None
        if not math.isfinite(v) or v < 0:
            raise EvalError(f"--strengths: {s!r} is not a finite number >= 0")
        if v in out:
            raise EvalError(f"--strengths: {s!r} is listed twice")
        out.append(v)
    return tuple(out)


def _positive(name: str, text: str | None, kind: type = int):
    if text is None:
        return None
    try:
        v = kind(text)
    except ValueError:
        raise EvalError(
            f"{name} must be a {'whole ' if kind is int else ''}number > 0, got {text!r}"
        ) from None
    if not (math.isfinite(v) and v > 0):
        raise EvalError(f"{name} must be > 0, got {text!r}")
    return v


def _names(values: list[str] | None, valid, what: str) -> tuple[str, ...]:
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    for n in names:
        if n not in valid:
            raise EvalError(f"unknown {what} {n!r}; valid: {', '.join(valid)}")
    return tuple(dict.fromkeys(names))


def redact(command: str) -> str:
    """The command line with API key values replaced, fit to record in results.json."""
    return re.sub(r"(--(?:judge-)?api-key)(=|\s+)\S+", r"\1\2***", command)


def config_from_args(ns: argparse.Namespace, *, command: str = "") -> EvalConfig:
    """Validate parsed ``steer eval`` flags into an EvalConfig; raises EvalError (one line)."""
    from server.evaluation.methods import METHODS
    from server.evaluation.plots import load_compared
    from server.evaluation.suites import DEFAULT_SUITES, SUITES

    if ns.judge not in JUDGES:
        raise EvalError(f"unknown --judge {ns.judge!r}; valid: {', '.join(JUDGES)}")
    if ns.judge == "llm" and not ns.judge_url:
        raise EvalError(
            "--judge llm needs --judge-url URL (an OpenAI-compatible server running the judge model)"
        )
    if Path(ns.out).exists() and not Path(ns.out).is_dir():
        raise EvalError(f"--out {ns.out} exists and is not a directory")
    explicit = ns.strengths is not None
    return EvalConfig(
        base_url=ns.base_url,
        out=ns.out,
        model=ns.model,
        api_key=ns.api_key or os.environ.get("OPENAI_API_KEY") or "unused",
        suites=_names(ns.suites, SUITES, "suite") or DEFAULT_SUITES,
        strengths=parse_strengths(ns.strengths) if explicit else DEFAULT_STRENGTHS,
        strengths_explicit=explicit,
        methods=_names(ns.method, METHODS, "method") or ("none",),
        vector=ns.vector,
        limit=_positive("--limit", ns.limit),
        max_tokens=_positive("--max-tokens", ns.max_tokens),
        judge=ns.judge,
        judge_url=ns.judge_url,
        judge_model=ns.judge_model,
        judge_api_key=ns.judge_api_key,
        concurrency=_positive("--concurrency", ns.concurrency),
        timeout=_positive("--timeout", ns.timeout, float),
        command=redact(command),
        compare=load_compared(ns.compare or [], ns.out),
    )
