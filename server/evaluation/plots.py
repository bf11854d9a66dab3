"""The runs ``--compare`` names, and the trade-off plots: one line per (run, method) through the
strengths, with 95% Wilson intervals as error bars."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from server.evaluation.config import EvalError

POOLS = {"unsafe_rate": ("harmful", "jailbreak"), "over_refusal_rate": ("benign",), "pass@1": ("utility",)}


def _err(points: list[dict]) -> list[list[float]]:
    """matplotlib's asymmetric error bars [[below...], [above...]] from Wilson intervals."""
    return [[p["rate"] - p["ci95"][0] for p in points], [p["ci95"][1] - p["rate"] for p in points]]


# ---------------------------------------------------------------- runs to compare and plot lines


@dataclass(frozen=True)
class ComparedRun:
    """An earlier run named by ``--compare``: what its plot lines and its record here need."""

    dir: str
    endpoint: dict
    command: str
    created: str
    methods: tuple[str, ...]
    pooled: tuple[dict, ...]


def _point_ok(p) -> bool:
    """A pooled point the plots can draw: method, strength, metric, and a rate with its interval."""
    if not (isinstance(p, dict) and isinstance(p.get("method"), str) and p.get("metric") in POOLS):
        return False
    if not isinstance(p.get("strength"), int | float | str) or "rate" not in p:
        return False
    if p["rate"] is None:
        return True
    ci = p.get("ci95")
    return (
        isinstance(p["rate"], int | float)
        and isinstance(ci, list)
        and len(ci) == 2
        and all(isinstance(v, int | float) for v in ci)
    )


def load_compared(dirs: Sequence[str], out: str) -> tuple[ComparedRun, ...]:
    """Read each ``--compare`` directory's results.json; raises EvalError (one line) for a missing
    directory, no or unreadable results.json, another format, or no pooled points to draw."""
    runs: list[ComparedRun] = []
    seen = {Path(out).resolve(): "--out"}
    for d in dirs:
        path = Path(d)
        if not path.exists():
            raise EvalError(f"--compare {d}: no such directory")
        if not path.is_dir():
            raise EvalError(f"--compare {d} is not a directory")
        if path.resolve() in seen:
            what = "this run's --out directory" if seen[path.resolve()] == "--out" else "listed twice"
            raise EvalError(f"--compare {d} is {what}")
        seen[path.resolve()] = d
        f = path / "results.json"
        if not f.is_file():
            raise EvalError(
                f"--compare {d}: no results.json there (not a finished `steer eval` output directory)"
            )
        try:
            res = json.loads(f.read_text(encoding="utf-8"))
        except OSError as e:
            raise EvalError(f"--compare {f}: cannot read it ({e.strerror or e})") from None
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise EvalError(f"--compare {f} is not valid JSON ({e})") from None
        if not isinstance(res, dict) or "format_version" not in res:
            raise EvalError(f"--compare {f} has no format_version: not a `steer eval` results.json")
        if res["format_version"] != 1:
            raise EvalError(
                f"--compare {f}: format_version {res['format_version']!r}, expected 1 "
                "(written by another version of steer eval)"
            )
        ep = res.get("endpoint")
        if not (
            isinstance(ep, dict) and isinstance(ep.get("base_url"), str) and isinstance(ep.get("model"), str)
        ):
            raise EvalError(
                f"--compare {f} has no endpoint record (endpoint.base_url, endpoint.model) to label it"
            )
        pooled = res.get("pooled")
        if not (isinstance(pooled, list) and pooled and all(_point_ok(p) for p in pooled)):
            raise EvalError(
                f"--compare {f} has no pooled results to plot (`pooled`: method, strength, metric, rate, ci95)"
            )
        runs.append(
            ComparedRun(
                dir=d,
                endpoint={"base_url": ep["base_url"], "model": ep["model"]},
                command=str(res.get("command") or ""),
                created=str(res.get("created") or ""),
                methods=tuple(dict.fromkeys(p["method"] for p in pooled)),
                pooled=tuple(pooled),
            )
        )
    return tuple(runs)


def run_label(endpoint: dict) -> str:
    """A run's name on the plots: ``MODEL @ HOST:PORT`` of its endpoint record (the URL's host and
    port as written, without credentials or path)."""
    host = urlsplit(endpoint["base_url"]).netloc.rpartition("@")[2] or endpoint["base_url"]
    return f"{endpoint['model']} @ {host}"


def unique_labels(labels: Sequence[str], dirs: Sequence[str]) -> list[str]:
    """``labels`` with each repeated one suffixed by its run's directory name, `` (NAME)``, or by the
    directory as given where two names are the same too; e.g. one endpoint evaluated twice."""
    counts = Counter(labels)
    names = [Path(d).resolve().name or str(d) for d in dirs]
    out = []
    for lab, d, name in zip(labels, dirs, names, strict=True):
        if counts[lab] == 1:
            out.append(lab)
            continue
        group = [n for lb, n in zip(labels, names, strict=True) if lb == lab]
        out.append(f"{lab} ({name if group.count(name) == 1 else d})")
    final = Counter(out)  # a suffixed label that happens to equal another: number them
    if any(c > 1 for c in final.values()):
        out = [f"{lab} #{i + 1}" if final[lab] > 1 else lab for i, lab in enumerate(out)]
    return out


def plot_series(
    runs: Sequence[tuple[str, Sequence[str], Sequence[dict]]], x_metric: str, y_metric: str
) -> list[dict]:
    """The lines of one plot, from ``runs`` = [(run label, methods, pooled points)]: one per (run,
    method) with both metrics at some strength, in run then method order, each ``{"run", "method",
    "label", "points": [(strength, x point, y point)]}``. The label is the method alone with one run
    (the plot without --compare), else ``RUN: METHOD``. Points without a rate (n=0) are left out."""
    lines = []
    for run, methods, pooled in runs:
        get = {(p["method"], p["strength"], p["metric"]): p for p in pooled if p["rate"] is not None}
        for m in methods:
            strengths = [s for (mm, s, k) in get if mm == m and k == x_metric and (m, s, y_metric) in get]
            if strengths:
                lines.append(
                    {
                        "run": run,
                        "method": m,
                        "label": m if len(runs) == 1 else f"{run}: {m}",
                        "points": [(s, get[(m, s, x_metric)], get[(m, s, y_metric)]) for s in strengths],
                    }
                )
    return lines


def plot(lines: list[dict], path: Path, x_metric: str, y_metric: str) -> bool:
    """Draw :func:`plot_series` lines through their strengths, with 95% CIs; False (nothing written)
    when there is no line. With several runs, a run keeps one colour and a method one line style."""
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(ln["run"] for ln in lines))
    methods = list(dict.fromkeys(ln["method"] for ln in lines))
    fig, ax = plt.subplots(figsize=(6, 4.5) if len(runs) == 1 else (7.5, 5.5))
    for ln in lines:
        style = {"marker": "o"}
        if len(runs) > 1:
            i = methods.index(ln["method"])
            style = {
                "color": f"C{runs.index(ln['run']) % 10}",
                "marker": "osD^v"[i % 5],
                "linestyle": ("-", "--", ":", "-.")[i % 4],
            }
        strengths, xs, ys = zip(*ln["points"], strict=True)
        ax.errorbar(
            [p["rate"] for p in xs],
            [p["rate"] for p in ys],
            xerr=_err(xs),
            yerr=_err(ys),
            capsize=3,
            label=ln["label"],
            **style,
        )
        for s, x, y in zip(strengths, xs, ys, strict=True):
            label = s if isinstance(s, str) else f"{s:g}"
            ax.annotate(
                f"s={label}", (x["rate"], y["rate"]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    x_name, y_name = x_metric.replace("_", " "), y_metric.replace("_", " ")
    ax.set(
        xlabel=x_name,
        ylabel=y_name,
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title=f"{y_name} vs {x_name}",
    )
    ax.grid(alpha=0.3)
    if len(runs) == 1:
        ax.legend(title="method")
    else:
        ax.legend(title="run: method", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
