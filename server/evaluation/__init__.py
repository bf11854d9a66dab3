"""``steer eval``: safety and utility evaluation of any OpenAI-compatible endpoint.

    steer eval --base-url http://127.0.0.1:8000/v1 --out runs/demo [--suites harmbench aplomb humaneval]
               [--strengths 0,0.5,1,1.5,2] [--method none self-reminder] [--limit N] [--judge refusal|llm]
               [--compare DIR [DIR ...]]

``--compare`` draws earlier runs' pooled results (their results.json) on this run's plots, one line per
run and method. A rerun with the same ``--out`` answers from its cache.jsonl, so adding ``--compare`` to
a finished run's command redraws its plots without new answers (the endpoint is still checked).

Modules: ``config`` (flags, validation), ``suites`` (recorded splits), ``endpoint`` (checks, the
``safety`` probe, requests), ``methods`` (client-side baselines), ``cache`` (resume), ``judges``,
``sandbox`` (HumanEval execution), ``runner`` (the run), ``report`` (JSON, markdown, plots).
"""

from __future__ import annotations

import argparse

from server.evaluation.config import EvalConfig, EvalError, add_arguments, config_from_args

__all__ = ["EvalConfig", "EvalError", "add_arguments", "config_from_args", "run_eval", "run_from_args"]


def run_eval(cfg: EvalConfig):
    """Run one evaluation; returns the output directory (see :mod:`server.evaluation.runner`)."""
    from server.evaluation.runner import run_eval as _run

    return _run(cfg)


def run_from_args(ns: argparse.Namespace, *, command: str = ""):
    """Validate parsed ``steer eval`` flags and run; raises EvalError with a one-line message."""
    return run_eval(config_from_args(ns, command=command))
