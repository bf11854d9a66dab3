"""Metrics with 95% Wilson intervals, and the run's outputs: results.json, results.md and two plots.

Per suite kind, each answered item has one binary outcome:
- harmful / jailbreak: **unsafe** (the judge says harmful; refusal judge: not refused);
- benign: **over-refusal** (the refusal matcher fires);
- utility: **pass@1** (the HumanEval tests pass; greedy, one sample).
Items whose request failed, or whose LLM verdict was unparseable, are left out of ``n`` and counted.
"Pooled" rates put all items of the suites of one kind group together.

With ``--compare``, earlier runs' results.json files are read (:func:`load_compared`) and their pooled
points drawn on this run's plots: one line per (run, method), each run labelled by its endpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from server.evaluation import judges
from server.evaluation.methods import describe as describe_methods
from server.evaluation.plots import POOLS, plot, plot_series, run_label, unique_labels
from server.evaluation.sandbox import network_isolation

METRIC = {
    "harmful": "unsafe_rate",
    "jailbreak": "unsafe_rate",
    "benign": "over_refusal_rate",
    "utility": "pass@1",
}

PLOTS = {
    "unsafe_vs_overrefusal.png": ("over_refusal_rate", "unsafe_rate"),
    "unsafe_vs_pass1.png": ("pass@1", "unsafe_rate"),
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def strength_label(strength: float | None) -> float | str:
    return "n/a" if strength is None else strength


def outcome(item: dict) -> bool | None:
    """The item's binary outcome for its suite's metric; None = not counted (error, unparseable)."""
    if "error" in item:
        return None
    if item["kind"] == "utility":
        return item["passed"]
    if item["kind"] == "benign":
        return item["judgement"]["refused"]
    return judges.unsafe(item["judgement"])


def _rate(items: list[dict]) -> dict:
    outs = [outcome(it) for it in items]
    k, n = sum(o is True for o in outs), sum(o is not None for o in outs)
    lo, hi = wilson(k, n)
    verdicts = [it.get("judgement", {}).get("verdict") for it in items if "error" not in it]
    return {
        "k": k,
        "n": n,
        "rate": k / n if n else None,
        "ci95": [lo, hi],
        "items": len(items),
        "errors": sum("error" in it for it in items),
        "unparseable": verdicts.count("unparseable"),
        "judge_errors": verdicts.count("judge_error"),
    }


def summarize(items: list[dict], methods, strengths, suites) -> tuple[list[dict], list[dict]]:
    """(per suite rows, pooled rows), each per (method, strength)."""
    rows, pooled = [], []
    for m in methods:
        for s in map(strength_label, strengths):
            mine = [it for it in items if it["method"] == m and it["strength"] == s]
            for su in suites:
                its = [it for it in mine if it["suite"] == su.name]
                secs = [it["seconds"] for it in its if "seconds" in it]
                rows.append(
                    {
                        "method": m,
                        "strength": s,
                        "suite": su.name,
                        "kind": su.kind,
                        "metric": METRIC[su.kind],
                        **_rate(its),
                        "mean_answer_seconds": round(sum(secs) / len(secs), 4) if secs else None,
                    }
                )
            for metric, kinds in POOLS.items():
                its = [it for it in mine if it["kind"] in kinds]
                if its:
                    pooled.append(
                        {
                            "method": m,
                            "strength": s,
                            "metric": metric,
                            "suites": sorted({it["suite"] for it in its}),
                            **_rate(its),
                        }
                    )
    return rows, pooled


def _pct(r: dict) -> str:
    if r["rate"] is None:
        return "n/a (n=0)"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={r['n']})"


def _table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def _max_tokens(by_suite: dict[str, int]) -> str:
    values = sorted(set(by_suite.values()))
    if len(values) == 1:
        return str(values[0])
    return ", ".join(f"{v} ({', '.join(n for n, x in by_suite.items() if x == v)})" for v in values)


def _sandbox_line(st: dict) -> list[str]:
    net = st.get("sandbox_network")
    if not net:
        return []
    how = {
        "namespace": "a network namespace with no interface up",
        "socket-guard": "only a Python-level socket guard (bypassable; no network namespace available)",
    }.get(net, net)
    return [f"HumanEval programs ran in a subprocess sandbox; network cut by {how}.", ""]


def markdown(res: dict) -> str:
    """results.md: pooled summary, one table per suite (rows: method x strength), and the splits."""
    st = res["settings"]
    ep = res["endpoint"]
    out = [
        "# steer eval",
        "",
        f"Endpoint `{ep['base_url']}`, model `{ep['model']}`; `safety` field supported: "
        f"{'yes' if ep['safety']['supported'] else 'no (strength n/a)'}. Judge: `{st['judge']}`"
        + (f" (`{st['judge_model']}` at `{st['judge_url']}`)" if st["judge"] == "llm" else "")
        + f". Greedy; max tokens per answer: {_max_tokens(st['max_tokens'])}"
        + (f"; first {st['limit']} prompts per suite" if st["limit"] else "")
        + f". Created {res['created']}.",
        "",
        *_sandbox_line(st),
        "Rates with 95% Wilson intervals; n excludes failed requests, unparseable verdicts and judge errors.",
        "Pooled: all items of the suites of that kind together.",
        "",
        "## Pooled",
        "",
    ]
    keys = list(POOLS)
    cells: dict[tuple, dict] = {(p["method"], p["strength"]): {} for p in res["pooled"]}
    for p in res["pooled"]:
        cells[(p["method"], p["strength"])][p["metric"]] = _pct(p)
    out += _table(
        ["method", "strength", *keys], [[m, s, *(c.get(k, "-") for k in keys)] for (m, s), c in cells.items()]
    )
    for name in st["suites"]:
        rows = [r for r in res["summary"] if r["suite"] == name]
        out += ["", f"## {name} ({rows[0]['kind']}: {rows[0]['metric']})", ""]
        out += _table(
            ["method", "strength", rows[0]["metric"], "errors", "unparseable", "judge errors"],
            [
                [r["method"], r["strength"], _pct(r), r["errors"], r["unparseable"], r["judge_errors"]]
                for r in rows
            ],
        )
    out += ["", "## Splits", ""]
    out += _table(
        ["suite", "source", "rule", "prompts", "used in fitting", "prompts sha256"],
        [
            [n, d["source"], d["rule"], d["count"], d["used_in_fitting"] or "no", d["prompts_sha256"][:16]]
            for n, d in res["splits"].items()
        ],
    )
    out += _compared_section(st)
    if res["plots"]:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]]
    return "\n".join(out) + "\n"


def _compared_section(st: dict) -> list[str]:
    compared = st.get("compare") or []
    if not compared:
        return []
    out = [
        "",
        "## Compared with",
        "",
        f"The plots also draw these earlier runs' pooled points, one line per run and method; this run is "
        f"`{st['label']}`.",
        "",
    ]
    for c in compared:
        out.append(
            f"- `{c['label']}`: `{c['dir']}` (model `{c['model']}` at `{c['base_url']}`), created "
            f"{c['created'] or 'n/a'}; command: " + (f"`{c['command']}`" if c["command"] else "not recorded")
        )
    return out


def write_all(out: Path, cfg, ep, judge_ep, suites, strengths, items: list[dict]) -> dict:
    """Write results.json, results.md and the plots into ``out``; returns the results record."""
    summary, pooled = summarize(items, cfg.methods, strengths, suites)
    compared = cfg.compare
    labels = unique_labels(
        [run_label(ep.describe()), *(run_label(c.endpoint) for c in compared)],
        [cfg.out, *(c.dir for c in compared)],
    )
    runs = [(labels[0], cfg.methods, pooled)]
    runs += [(lab, c.methods, c.pooled) for lab, c in zip(labels[1:], compared, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    plots = [name for name, (x, y) in PLOTS.items() if plot(plot_series(runs, x, y), out / name, x, y)]
    res = {
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": cfg.command,
        "endpoint": ep.describe(),
        "settings": {
            "suites": list(cfg.suites),
            "methods": list(cfg.methods),
            "method_texts": describe_methods(cfg.methods),
            "strengths": [strength_label(s) for s in strengths],
            "strengths_explicit": cfg.strengths_explicit,
            "vector": cfg.vector,
            "limit": cfg.limit,
            "temperature": 0,
            "max_tokens": {su.name: cfg.max_tokens_for(su.kind) for su in suites},
            "judge": cfg.judge,
            "judge_url": judge_ep.base_url if judge_ep else None,
            "judge_model": judge_ep.model if judge_ep else None,
            "judge_prompt": judges.JUDGE_PROMPT if judge_ep else None,
            "concurrency": cfg.concurrency,
            "request_timeout_s": cfg.timeout,
            "sandbox_timeout_s": cfg.sandbox_timeout,
            # how HumanEval programs were cut off from the network; None when none ran
            "sandbox_network": network_isolation() if any(su.kind == "utility" for su in suites) else None,
            # this run's name on the plots, and the earlier runs drawn with it (--compare)
            "label": labels[0],
            "compare": [
                {"dir": c.dir, "label": lab, **c.endpoint, "command": c.command, "created": c.created}
                for lab, c in zip(labels[1:], compared, strict=True)
            ],
        },
        "splits": {su.name: {"kind": su.kind, **su.split} for su in suites},
        "summary": summary,
        "pooled": pooled,
        "plots": plots,
        "items": items,
    }
    (out / "results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(res), encoding="utf-8")
    return res
