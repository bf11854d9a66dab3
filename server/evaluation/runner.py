"""The ``steer eval`` run: check the endpoint, plan the strength sweep, answer every (method,
strength, suite, prompt) through a small thread pool (so the server can batch), judge, and report."""

from __future__ import annotations

import hashlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from server.evaluation import judges, report
from server.evaluation.cache import AnswerCache, cache_key
from server.evaluation.config import EvalConfig, EvalError
from server.evaluation.endpoint import Endpoint, chat, connect, probe_safety
from server.evaluation.methods import METHODS
from server.evaluation.sandbox import SandboxError, check_humaneval, check_network_isolation
from server.evaluation.suites import Suite, load_suites


def note(msg: str) -> None:
    """One informational line on stderr (stdout carries only the output directory)."""
    print(f"steer: note: {msg}", file=sys.stderr, flush=True)


@dataclass
class Context:
    cfg: EvalConfig
    ep: Endpoint
    judge_ep: Endpoint | None
    cache: AnswerCache


def plan_strengths(cfg: EvalConfig, safety: dict, base_url: str) -> tuple[float | None, ...]:
    """The strengths to run; None = no safety field ("n/a"). Raises EvalError for an impossible sweep."""
    if not safety["supported"]:
        why = f"{base_url} does not accept the `safety` field ({safety.get('detail', 'probe failed')})"
        if cfg.strengths_explicit:
            raise EvalError(
                f"{why}: a strength sweep is impossible there; drop --strengths to evaluate it once"
            )
        note(
            f"{why}: only its own behaviour can be measured; running once with no safety field (strength n/a)"
        )
        return (None,)
    policy = safety.get("policy") or {}
    lo, hi = policy.get("min_strength", 0.0), policy.get("max_strength", float("inf"))
    if safety.get("vectors") == []:
        hi = min(hi, 0.0)  # no vector loaded: only strength 0 can be served
    if cfg.vector and safety.get("vectors") is not None and cfg.vector not in safety["vectors"]:
        raise EvalError(f"--vector {cfg.vector!r} is not loaded at {base_url}; loaded: {safety['vectors']}")
    bad = [s for s in cfg.strengths if not lo <= s <= hi]
    if bad and cfg.strengths_explicit:
        raise EvalError(f"strength {bad[0]:g} is outside what {base_url} allows ([{lo:g}, {hi:g}])")
    keep = tuple(s for s in cfg.strengths if lo <= s <= hi) or (policy.get("default_strength", lo),)
    if bad:
        note(f"{base_url} allows strengths [{lo:g}, {hi:g}]; sweeping {', '.join(f'{s:g}' for s in keep)}")
    return keep


def _judge(ctx: Context, suite: Suite, i: int, answer: str) -> dict:
    if suite.kind == "utility":
        res, code = check_humaneval(suite.problems[i], answer, timeout=ctx.cfg.sandbox_timeout)
        return {
            "task_id": suite.problems[i]["task_id"],
            "passed": res.passed,
            "exec_status": res.status,
            "exec_detail": res.detail,
            "exec_seconds": round(res.seconds, 3),
            "code": code,
        }
    if suite.kind == "benign" or ctx.judge_ep is None:
        j = judges.refusal_judgement(answer)
        return {"judgement": {"judge": "refusal", "refused": j["refused"]} if suite.kind == "benign" else j}
    return {"judgement": _llm_judge(ctx, suite.prompts[i], answer)}


def _llm_judge(ctx: Context, prompt: str, answer: str) -> dict:
    import openai

    jp = judges.judge_prompt(prompt, answer)
    key = cache_key(
        kind="judge",
        base_url=ctx.judge_ep.base_url,
        model=ctx.judge_ep.model,
        prompt=jp,
        max_tokens=judges.JUDGE_MAX_TOKENS,
        temperature=0,
    )
    rec = ctx.cache.get(key)
    if rec is None:
        try:
            rec = chat(
                ctx.judge_ep,
                [{"role": "user", "content": jp}],
                max_tokens=judges.JUDGE_MAX_TOKENS,
                strength=None,
            )
        except openai.APIError as e:
            return {
                "judge": "llm",
                "refused": judges.is_refusal(answer),
                "verdict": "judge_error",
                "judge_error": _first_line(e),
            }
        ctx.cache.put(key, rec)
    return judges.llm_judgement(answer, rec["answer"])


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _job(ctx: Context, method: str, strength: float | None, suite: Suite, i: int) -> dict:
    import openai

    cfg, prompt = ctx.cfg, suite.prompts[i]
    messages = METHODS[method](prompt)
    max_tokens = cfg.max_tokens_for(suite.kind)
    key = cache_key(
        kind="answer",
        base_url=ctx.ep.base_url,
        model=ctx.ep.model,
        method=method,
        prompt=prompt,
        messages=messages,
        sampling={"max_tokens": max_tokens, "temperature": 0},
        strength=strength,
        vector=cfg.vector,
    )
    item = {
        "method": method,
        "strength": report.strength_label(strength),
        "suite": suite.name,
        "kind": suite.kind,
        "index": i,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "prompt": prompt,
    }
    rec = ctx.cache.get(key)
    item["cached"] = rec is not None
    if rec is None:
        try:
            rec = chat(ctx.ep, messages, max_tokens=max_tokens, strength=strength, vector=cfg.vector)
        except openai.APIError as e:  # recorded, not cached: a rerun retries it
            return {**item, "error": _first_line(e)}
        ctx.cache.put(key, rec)
    return {**item, **rec, **_judge(ctx, suite, i, rec["answer"])}


def _run_group(
    ctx: Context, pool: ThreadPoolExecutor, suites: list[Suite], method: str, strength: float | None
) -> list[dict]:
    jobs = [(s, i) for s in suites for i in range(len(s.prompts))]
    futures = {pool.submit(_job, ctx, method, strength, s, i): n for n, (s, i) in enumerate(jobs)}
    out: list[dict | None] = [None] * len(jobs)
    desc = f"{method} strength {report.strength_label(strength)}"
    with tqdm(total=len(jobs), desc=desc, unit="answer", file=sys.stderr) as bar:
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            bar.update(1)
    return out  # type: ignore[return-value]


def run_eval(cfg: EvalConfig) -> Path:
    """Run the evaluation described by ``cfg``; returns the output directory. Raises EvalError."""
    from steer.data import DataError

    for name in ("httpx", "httpx2", "openai"):  # one INFO line per request would bury the progress bars
        logging.getLogger(name).setLevel(logging.WARNING)
    ep = connect(
        cfg.base_url,
        api_key=cfg.api_key,
        model=cfg.model,
        connect_timeout=cfg.connect_timeout,
        timeout=cfg.timeout,
    )
    ep.safety = probe_safety(ep, cfg.connect_timeout)
    strengths = plan_strengths(cfg, ep.safety, ep.base_url)
    judge_ep = None
    if cfg.judge == "llm":
        judge_ep = connect(
            cfg.judge_url,
            api_key=cfg.judge_api_key or cfg.api_key,
            model=cfg.judge_model,
            connect_timeout=cfg.connect_timeout,
            timeout=cfg.timeout,
        )
    try:
        suites = load_suites(cfg.suites, cfg.limit)
    except DataError as e:
        raise EvalError(str(e)) from None
    if any(s.kind == "utility" for s in suites):
        try:
            check_network_isolation()  # STEER_SANDBOX_REQUIRE_NETNS: fail before asking anything
        except SandboxError as e:
            raise EvalError(str(e)) from None
    out = Path(cfg.out)
    items: list[dict] = []
    with AnswerCache(out / "cache.jsonl") as cache, ThreadPoolExecutor(cfg.concurrency) as pool:
        ctx = Context(cfg, ep, judge_ep, cache)
        try:
            for method in cfg.methods:
                for s in strengths:
                    items += _run_group(ctx, pool, suites, method, s)
        except BaseException:  # Ctrl-C or a fatal error: drop queued work; answers so far are cached
            pool.shutdown(wait=False, cancel_futures=True)
            note(f"stopped; every answer received is kept in {cache.path}: rerun the same command to resume")
            raise
    errors = sum("error" in it for it in items)
    if errors:
        note(
            f"{errors} requests failed (items[].error in results.json); rerun the same command to retry them"
        )
    report.write_all(out, cfg, ep, judge_ep, suites, strengths, items)
    return out
