"""Save the demo model's refusal-ablated variant as a checkpoint: the first unsafe "fine-tune" of the
demo scenario (a model whose safety was removed, to restore with a safety vector).

The refusal direction (the shipped activation vector's middle layer, as ``steer distill`` uses to
generate its training answers) is projected out of every weight that writes into the residual stream
(``steer.distill.answers.orthogonalize``). Written once to ``~/.cache/steer/models/<demo>-ablated``
(never committed); prints the directory.

    .venv/bin/python bench/ablated_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from steer.demo import cache_dir, ensure_demo_model
from steer.distill.answers import orthogonalize, refusal_direction
from steer.models import fingerprint, load_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ensure_demo_model()
    ap.add_argument("--out", default=str(cache_dir() / "models" / f"{src.name}-ablated"))
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    if (out / "ablation.json").exists():
        print(out)
        return 0
    model, tok = load_model(src, dtype=torch.bfloat16)
    fp = fingerprint(model)
    with torch.no_grad():
        r, record = refusal_direction(model, tok, fp, ROOT / "vectors" / "refusal.json", explicit=True)
        orthogonalize(model, r)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "ablation.json").write_text(json.dumps({"from": str(src), "from_fingerprint": fp.to_dict(),
                                                    "direction": record}, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
