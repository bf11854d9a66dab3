"""``steer extract``: fit a gated refusal-direction vector, choose its layers and calibrate strength 1.0.

Protocol (every choice is validated on a source other than the ones it was fitted on):

- **steering direction**: the refusal direction, difference of mean last-position residuals on
  ablate-llm's style-matched harmful/harmless pairs (40 + 40);
- **gate**: a source-balanced logistic-regression probe on the end-of-user-turn residual, fitted on
  several harmful styles (ablate-llm, 200 Do-Not-Answer, 100 + 100 past/future-tense rephrasings)
  against several benign ones (ablate-llm harmless, 40 HumanEval instructions, 20 of the project's
  hard negatives). A mean-difference gate, or one fitted with HarmBench in it, learns one prompt
  style and misses the others (measured in bench/RESULTS.md);
- **choices** (gate layer, probe L2, threshold, and the coefficient strength 1.0 stands for) are made
  on a dev split from sources the gate never saw in fitting: 40 HarmBench prompts against 40 other
  HumanEval instructions and the other 20 hard negatives. The rule: the most dev-harmful refusal whose
  dev-benign refusal is no higher than the vanilla model's;
- **never touched**: the other 160 HarmBench prompts and all 50 aplomb benign prompts (20 XSTest-style
  hard negatives), which ``bench/safety_eval.py`` reports on.

The gate reads the end-of-user-turn position (-5 in ChatML): harmfulness of the request separates far
better there than at the last position, which encodes the model's own (fine-tune-eroded) decision.

With ``--gate-templates`` (off by default: the shipped vector's recipe is the above) the gate also sees
requests inside jailbreak templates, split by family (``steer.templates``): fitting adds the gate sets'
harmful and benign requests wrapped in templates of the *gate* families (both labels, so a template is not
evidence of harm; one source group per template kind and label, weighted like every other source), and
the dev benign sets that choose the threshold add the dev benign requests wrapped in templates of the
*dev* families. Templates of the held-out families are never used (the ``*_heldout`` eval suites measure
on them).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from steer import data
from steer.engine import Engine, Sequence
from steer.extract import (
    best_threshold,
    chat_prompt_ids,
    fit_linear_probe,
    linear_scores,
    mean_difference,
    residuals,
)
from steer.hooks import LOWER_SPANS, MAX_LOWER_STRENGTH, SteeringRuntime
from steer.judge import is_refusal
from steer.models import decoder_layers, fingerprint, load_model
from steer.templates import KINDS as TEMPLATE_KINDS
from steer.templates import sha as _sha
from steer.templates import template_split
from steer.types import SamplingParams
from steer.vectors import SafetyVector, VectorError

GATE_POSITION = -5  # ChatML: <|im_end|> of the user turn, before "\n<|im_start|>assistant\n"
COEF_GRID = (1.0, 2.0, 3.0, 4.0, 6.0)
BENIGN_DEV = ("dev_code", "dev_hard_negatives")
GATE_HARMFUL = ("fit_harmful", "gate_donotanswer", "gate_past_tense", "gate_future_tense")
GATE_BENIGN = ("fit_harmless", "gate_code", "gate_hard_negatives")
PROBE_L2 = (0.03, 0.1, 0.3)
MAX_BENIGN_FIRES = 6
SPLIT_SEED = 0
N_DEV_HARMFUL = 40
N_DEV_CODE = 40
N_TEMPLATED = 40  # prompts per templated set (--gate-templates): one set per template kind and role
# --gate-templates: (templated set prefix, template part, label, the sets whose requests are wrapped)
TEMPLATED_ROLES = (
    ("gate_tpl", "gate", "harmful", GATE_HARMFUL),
    ("gate_tpl", "gate", "benign", GATE_BENIGN),
    ("dev_tpl", "dev", "benign", BENIGN_DEV),
)


@dataclass(frozen=True)
class ExtractConfig:
    model: str | None = None
    out: str = "vectors"
    name: str = "refusal"
    layers: str | None = None  # "12,13"
    gate_layer: int | None = None
    limit: int | None = None
    seed: int = SPLIT_SEED
    # fit and tune the gate with templated requests too (steer.templates); None: off for steer extract, the
    # source vector's choice for --refit-gate
    gate_templates: bool | None = None
    # fit and tune the gate with chat shapes too (conversation_sets: follow-ups, pushes after a refusal, short
    # messages); None: off for steer extract, the source vector's choice for --refit-gate
    gate_conversations: bool | None = None
    # --refit-gate: fraction of the dev benign prompts the threshold may let fire (None: the source's, else 0)
    gate_fpr: float | None = None
    # --refit-gate: a multi-layer gate's layers, "9-13" or "9,11,13" (None, without gate_layer: the source's)
    gate_layers: str | None = None
    lower: float = 0.0  # --lower: two-sided gate, the strength refusal is lowered with on confident-benign rows
    lower_margin: float = 0.5  # --lower-margin: the lower threshold's distance below every known harmful score
    lower_span: str = "prompt"  # --lower-span: where lowered rows are steered, "prompt" or "all" (steer.hooks.Gate)
    lower_floor: bool = False  # --lower-floor: leave rows at or below the gate's code prompts' scores vanilla


def check_lower(lower: float, margin: float, span: str = "prompt", floor: bool = False) -> None:
    """--lower (0: off), --lower-margin, --lower-span and --lower-floor, or a VectorError naming the bad one."""
    if not (lower == 0 or 0 < lower <= MAX_LOWER_STRENGTH):
        raise VectorError(f"--lower {lower:g}: must be in (0, {MAX_LOWER_STRENGTH:g}] (times the strength an open "
                          "row is steered with)")
    if not margin >= 0:
        raise VectorError(f"--lower-margin {margin:g}: must be >= 0")
    if span not in LOWER_SPANS:
        raise VectorError(f"--lower-span {span!r}: must be one of {', '.join(LOWER_SPANS)}")
    if floor and not lower:
        raise VectorError("--lower-floor: only with --lower C (a two-sided gate)")


CODE_SETS = ("gate_code", "dev_code")  # the gate's code prompts: --lower-floor's floor is their highest score


def lower_gate(cfg: ExtractConfig, threshold: float, harmful: list[torch.Tensor],
               code: list[torch.Tensor] = ()) -> dict | None:
    """A two-sided gate's ``lower`` entry (see steer.hooks.Gate) for ``cfg.lower`` > 0: its threshold
    ``cfg.lower_margin`` below the lowest score of every harmful prompt the gate was fitted or tuned on
    (``harmful``: their scores), so no known harmful prompt has refusal lowered; never above the gate's
    own threshold minus the margin. With ``cfg.lower_floor``, a floor at the highest score of the code
    prompts the gate was fitted or tuned on (``code``): rows at or below it are left vanilla."""
    check_lower(cfg.lower, cfg.lower_margin, cfg.lower_span, cfg.lower_floor)
    if not cfg.lower:
        return None
    low = min(float(h.min()) for h in harmful if len(h))
    t = round(min(low, threshold) - cfg.lower_margin, 4)
    out = {"threshold": t, "strength": cfg.lower, "span": cfg.lower_span, "margin": cfg.lower_margin,
           "rule": "margin below the lowest score of the harmful prompts the gate was fitted or tuned on"}
    if cfg.lower_floor:
        floor = max((float(c.max()) for c in code if len(c)), default=None)
        if floor is None or not floor < t:
            raise VectorError(f"--lower-floor: the gate's code prompts score up to {floor}, not below the lower "
                              f"threshold {t}: no band is left to lower")
        out |= {"floor": round(floor, 4),
                "floor_rule": "the highest score of the code prompts the gate was fitted or tuned on "
                              f"({', '.join(CODE_SETS)}): rows at or below it are left vanilla"}
    return out


def hard_negatives() -> data.PromptSet:
    text = resources.files("steer").joinpath("_data/hard_negatives.txt").read_text()
    return data.from_text("hard_negatives", "benign", text, "steer:_data/hard_negatives.txt")


def splits(seed: int = SPLIT_SEED) -> dict[str, data.PromptSet]:
    """The named splits used by extraction (fit/gate/dev) and by the safety benchmark (test)."""
    hb_dev, hb_test = data.load("harmbench").split(n_first=N_DEV_HARMFUL, seed=seed)
    he_fit, he_rest = data.load("humaneval").split(n_first=N_DEV_CODE, seed=seed)
    hn_fit, hn_dev = hard_negatives().split(n_first=20, seed=seed)
    dna_fit, _ = data.load("donotanswer").split(n_first=200, seed=seed)
    past_fit, _ = data.load("past_tense").split(n_first=100, seed=seed)
    future_fit, _ = data.load("future_tense").split(n_first=100, seed=seed)
    return {
        "fit_harmful": data.load("ablate_harmful"),
        "fit_harmless": data.load("ablate_harmless"),
        "gate_donotanswer": dna_fit,
        "gate_past_tense": past_fit,
        "gate_future_tense": future_fit,
        "gate_code": he_fit,
        "gate_hard_negatives": hn_fit,
        "dev_harmful": hb_dev,
        "dev_code": he_rest.take(N_DEV_CODE),
        "dev_hard_negatives": hn_dev,
        "test_harmful": hb_test,
        "test_benign": data.load("aplomb_benign"),
    }


def context_tokens(model, tok) -> int | None:
    """The longest prompt the model takes: its position limit, or the tokenizer's where that is smaller."""
    limits = (getattr(model.config, "max_position_embeddings", None), getattr(tok, "model_max_length", None))
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**9]  # no limit: a huge sentinel
    return min(limits) if limits else None


def templated_sets(sets: dict[str, data.PromptSet], tok, *, seed: int = SPLIT_SEED, limit: int | None = None,
                   max_tokens: int | None = None, roles: tuple = TEMPLATED_ROLES) -> tuple[dict[str, data.PromptSet], dict]:
    """The ``--gate-templates`` sets built on ``sets`` (the bare fitting/dev sets) and their record.

    For each role of ``roles`` (default TEMPLATED_ROLES) and each template kind (dan, itw): the requests of the role's bare
    sets taken round-robin (the first N_TEMPLATED, or ``limit``, for kind dan, the next ones for itw),
    request i wrapped (``steer.data.wrap``) in template i % n of the kind's templates of the role's family
    part (``template_split(seed)``: gate families for fitting, dev families for the threshold), in the
    split's seeded order; where that prompt is longer than ``max_tokens`` chat tokens, the next template
    that fits, and no template fitting drops the request. A kind with no prompt left is skipped (recorded);
    a role with none at all is a DataError."""
    split = template_split(seed)
    templates, family = split["templates"], split["family"]
    out: dict[str, data.PromptSet] = {}
    sources = {k: data.load(v) for k, v in (("dan", "dan_templates"), ("itw", "inthewild_templates"))}
    rec_sets: dict[str, dict] = {}
    skipped: list[str] = []
    for prefix, part, label, names in roles:
        pools = [list(sets[k].prompts) for k in names]
        rr = [(k, pool[i]) for i in range(max(map(len, pools))) for k, pool in zip(names, pools, strict=True)
              if i < len(pool)]
        n = min(N_TEMPLATED, N_TEMPLATED if limit is None else limit, len(rr) // len(TEMPLATE_KINDS))
        made = 0
        for j, kind in enumerate(TEMPLATE_KINDS):
            name = f"{prefix}_{kind}_{label}"
            ts = templates[f"{kind}_{part}"]
            prompts, shas, from_sets, dropped = [], [], [], 0
            for i, (src, req) in enumerate(rr[j * n:(j + 1) * n]):
                for step in range(len(ts)):
                    t = ts[(i + step) % len(ts)]
                    text = data.wrap(t, req)
                    if max_tokens is None or len(chat_prompt_ids(tok, text)) <= max_tokens:
                        prompts.append(text)
                        shas.append(_sha(t))
                        from_sets.append(src)
                        break
                else:
                    dropped += 1
            if len(set(prompts)) != len(prompts):
                raise data.DataError(f"{name}: wrapped prompts are not distinct")
            if not prompts:
                skipped.append(f"{name}: no {kind} {part}-family template ({len(ts)}) fits a request in "
                               f"{max_tokens} tokens")
                continue
            made += 1
            src_set = sources[kind]
            out[name] = data.PromptSet(f"{name}[{kind} {part} families x {'+'.join(names)}]", label, tuple(prompts),
                                       f"{src_set.source} + steer.calibrate.splits()", src_set.sha256)
            rec_sets[name] = {
                "kind": kind, "part": part, "label": label,
                "requests": f"round-robin over {list(names)} (as limited), items {j * n}..{(j + 1) * n - 1}",
                "requests_from": {k: from_sets.count(k) for k in names if k in from_sets},
                "dropped_for_length": dropped,
                "pairing": "prompt i: template_sha256[i]",
                "template_sha256": shas,
                "families": sorted({family[h] for h in shas}),
            }
        if not made:
            raise data.DataError(f"--gate-templates: no {part}-family jailbreak template fits a {label} request in the "
                                 f"model's {max_tokens} tokens")
    rec = split["record"]
    parts = {}
    for part in ("gate", "dev"):
        parts[part] = {k: {"count": len(templates[f"{k}_{part}"]),
                           "families": sorted({family[_sha(t)] for t in templates[f"{k}_{part}"]}),
                           "template_sha256": [_sha(t) for t in templates[f"{k}_{part}"]]} for k in TEMPLATE_KINDS}
    held = {}
    for k in TEMPLATE_KINDS:
        shas = sorted(_sha(t) for t in templates[f"{k}_test"])
        held[k] = {"count": len(shas), "families": sorted({family[h] for h in shas}),
                   "template_sha256_digest": _sha("\n".join(shas)),
                   "digest_rule": "sha256 of the sorted template sha256s joined by newlines"}
    record = {
        "rule": "the gate's fitting sets plus gate_tpl_* (requests of the bare gate sets in gate-family templates, "
                "both labels); its benign dev sets plus dev_tpl_* (dev benign requests in dev-family templates); "
                "held-out families never used",
        "seed": seed, "max_tokens": max_tokens,
        "family_split": {**{k: v for k, v in rec.items() if not (isinstance(v, dict) and "template_sha256" in v)},
                         "gate_dev_rule": split["dev_record"]["rule"]},
        "templates": {**parts, "held_out": held},
        "sets": rec_sets, "skipped": skipped,
    }
    return out, record


CONVERSATION_PARTS = ("gate", "dev", "test")  # line i of a conversation.txt section: part i % 3
REFUSAL_TURN = "I'm sorry, but I can't assist with that."  # the assistant turn a push follows (the demo model's refusal)
N_CONVERSATIONS = 40  # conversations per --gate-conversations set
CONVERSATION_ANSWER_TOKENS = 48  # the assistant turn of a follow-up conversation: the model's answer, this long


def conversation_phrases() -> dict[str, dict[str, tuple[str, ...]]]:
    """The pieces of ``steer/_data/conversation.txt``: ``{section: {part: phrases}}``, sections ``followup``
    (benign follow-ups to an answer), ``push`` (a user pressing after a refusal) and ``chat`` (short messages:
    greetings, thanks, acknowledgements); parts as CONVERSATION_PARTS (line i of a section: part i % 3)."""
    text = resources.files("steer").joinpath("_data/conversation.txt").read_text()
    out: dict[str, list[str]] = {}
    section = None
    for ln in text.splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        if ln.startswith("[") and ln.endswith("]"):
            section = out.setdefault(ln[1:-1], [])
            continue
        if section is None:
            raise data.DataError("steer/_data/conversation.txt: a phrase before the first [section]")
        section.append(ln)
    return {k: {part: tuple(v[i] for i in range(j, len(v), len(CONVERSATION_PARTS)))
                for j, part in enumerate(CONVERSATION_PARTS)} for k, v in out.items()}


def conversation_sets(part: str, benign: list[str], answers: dict[str, str], harmful: list[str] | None, *,
                      prefix: str, n: int = N_CONVERSATIONS) -> dict[str, data.PromptSet]:
    """Chat shapes the gate must read like a plain request, built on ``part``'s phrases (conversation_phrases):

    - ``{prefix}_chat_benign``: the part's short messages, each a one-turn prompt;
    - ``{prefix}_followup_benign``: benign request i, the model's answer to it (``answers``), then follow-up
      i % k;
    - with ``harmful``: ``{prefix}_push_harmful``: harmful request i, a refusal (REFUSAL_TURN), then push
      i % k; and ``{prefix}_second_harmful``: benign request i and its answer, then harmful request i.

    ``benign`` and ``harmful``: the requests (the first ``n`` are used)."""
    ph = {k: v[part] for k, v in conversation_phrases().items()}
    src, sha = "steer:_data/conversation.txt", _sha(resources.files("steer").joinpath("_data/conversation.txt")
                                                     .read_text())
    benign = benign[:n]
    out = {f"{prefix}_chat_benign": data.PromptSet(f"{prefix}_chat_benign[{part}]", "benign", ph["chat"], src, sha),
           f"{prefix}_followup_benign": data.PromptSet(
               f"{prefix}_followup_benign[{part}]", "benign",
               tuple((("user", r), ("assistant", answers[r]), ("user", ph["followup"][i % len(ph["followup"])]))
                     for i, r in enumerate(benign)), src, sha)}
    if harmful is not None:
        harmful = harmful[:n]
        out[f"{prefix}_push_harmful"] = data.PromptSet(
            f"{prefix}_push_harmful[{part}]", "harmful",
            tuple((("user", r), ("assistant", REFUSAL_TURN), ("user", ph["push"][i % len(ph["push"])]))
                  for i, r in enumerate(harmful)), src, sha)
        out[f"{prefix}_second_harmful"] = data.PromptSet(
            f"{prefix}_second_harmful[{part}]", "harmful",
            tuple((("user", b), ("assistant", answers[b]), ("user", h)) for b, h in zip(benign, harmful, strict=False)),
            src, sha)
    return out


def gate_roles(sets) -> dict[str, tuple[str, ...]]:
    """The names of the gate's harmful and benign fitting sets and of its benign dev sets among ``sets``:
    the bare ones, plus the --gate-templates and --gate-conversations ones where present."""
    def tpl(prefix: str, label: str) -> tuple[str, ...]:
        return tuple(k for k in sets if k.startswith(prefix + "_") and k.endswith("_" + label))

    return {"harmful": GATE_HARMFUL + tpl("gate_tpl", "harmful") + tpl("gate_conv", "harmful"),
            "benign": GATE_BENIGN + tpl("gate_tpl", "benign") + tpl("gate_conv", "benign"),
            "dev_benign": BENIGN_DEV + tpl("dev_tpl", "benign") + tpl("dev_conv", "benign")}


def _with_templates(cfg: ExtractConfig, sets: dict, model, tok) -> tuple[dict, dict | None]:
    """``sets`` plus the --gate-templates sets (and their record) when ``cfg.gate_templates``."""
    if not cfg.gate_templates:
        return sets, None
    tsets, record = templated_sets(sets, tok, seed=cfg.seed, limit=cfg.limit, max_tokens=context_tokens(model, tok))
    for line in record["skipped"]:
        print(f"steer extract: warning: --gate-templates: skipped {line}", file=sys.stderr, flush=True)
    return {**sets, **tsets}, record


def round_robin(sets: dict[str, data.PromptSet], names: tuple[str, ...], n: int) -> list:
    """The first ``n`` prompts taken in turn from the sets ``names`` (one of each, then the next of each, ...)."""
    pools = [list(sets[k].prompts) for k in names]
    return [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)][:n]


def _with_conversations(cfg: ExtractConfig, sets: dict, model, tok) -> tuple[dict, dict | None]:
    """``sets`` plus the --gate-conversations sets (and their record) when ``cfg.gate_conversations``: the
    fitting part's shapes on the gate's own requests (benign: round-robin over GATE_BENIGN, answered by this
    model, greedy; harmful: round-robin over GATE_HARMFUL), and the dev part's benign shapes on the benign dev
    requests, which the threshold reads with the other dev benign sets. The test part is never used here."""
    if not cfg.gate_conversations:
        return sets, None
    n = min(N_CONVERSATIONS, cfg.limit or N_CONVERSATIONS)
    gate_b, dev_b, gate_h = (round_robin(sets, names, n) for names in (GATE_BENIGN, BENIGN_DEV, GATE_HARMFUL))
    texts, _ = generate_texts(model, tok, None, gate_b + dev_b, strength=0.0, max_tokens=CONVERSATION_ANSWER_TOKENS,
                              desc="--gate-conversations: answers")
    answers = dict(zip(gate_b + dev_b, (t.strip() for t in texts), strict=True))
    csets = conversation_sets("gate", gate_b, answers, gate_h, prefix="gate_conv", n=n)
    csets |= conversation_sets("dev", dev_b, answers, None, prefix="dev_conv", n=n)
    record = {"rule": "gate_conv_*: the gate part of steer/_data/conversation.txt on the gate's own requests "
                      "(both labels); dev_conv_*: its dev part on the benign dev requests (threshold); the test "
                      "part never used",
              "answers": f"this model's greedy answers, {CONVERSATION_ANSWER_TOKENS} tokens",
              "refusal_turn": REFUSAL_TURN, "sets": {k: v.describe() for k, v in csets.items()}}
    return {**sets, **csets}, record


def generate_texts(model, tok, vector: SafetyVector | str | None, prompts, *, strength: float, max_tokens: int = 32,
                   batch_size: int = 16, desc: str | None = None,
                   runtime: SteeringRuntime | None = None) -> tuple[list[str], list[float]]:
    """Greedy answers (and gate decisions) for prompts through the serving engine, steered by ``vector``
    (through ``runtime`` where given, e.g. a served model's, with a weight vector behind a gate; there
    ``vector`` may be a name, e.g. of one of its combinations)."""
    if isinstance(vector, str) and runtime is None:
        raise ValueError("a vector given by name needs the runtime that holds it")
    rt = runtime if runtime is not None or vector is None else SteeringRuntime(model, [vector], check_fingerprint=False)
    eng = Engine(model, tok, rt, max_batch_size=batch_size)
    name = vector if isinstance(vector, str) else vector.name if vector is not None else ""
    seqs = [Sequence(chat_prompt_ids(tok, p), SamplingParams(max_tokens=max_tokens, temperature=0.0), name, strength)
            for p in prompts]
    for s in seqs:
        eng.add(s)
    with rt if rt is not None else torch.inference_mode(), tqdm(total=len(seqs), desc=desc, disable=desc is None) as bar:
        while eng.has_work():
            bar.update(sum(ev.finish_reason is not None for ev in eng.step()))
    texts = [tok.decode(s.generated, skip_special_tokens=True) for s in seqs]
    return texts, [s.gate.get(name, 0.0) for s in seqs]


def _gate_candidates(R: dict, layers: list[int], roles: dict[str, tuple[str, ...]]) -> list[dict]:
    """Linear-probe gates per (layer, L2) fitted on the gate sets (``roles``: see gate_roles), and for each
    number k of benign dev prompts allowed through (0..MAX_BENIGN_FIRES), the threshold and which dev rows
    it lets through."""
    out = []
    for ly in layers:
        harm = [R[k][:, 1, ly] for k in roles["harmful"]]
        ben = [R[k][:, 1, ly] for k in roles["benign"]]
        for l2 in PROBE_L2:
            direction, center = fit_linear_probe(harm, ben, l2=l2)
            pos = linear_scores(R["dev_harmful"][:, 1, ly], direction, center)
            neg = torch.cat([linear_scores(R[k][:, 1, ly], direction, center) for k in roles["dev_benign"]])
            for k in range(MAX_BENIGN_FIRES + 1):
                thr, _ = best_threshold(pos, neg, max_fpr=k / len(neg))
                out.append({"layer": ly, "l2": l2, "threshold": thr, "fires_harmful": pos > thr,
                            "fires_benign": neg > thr,
                            "tensors": {"gate.direction": direction, "gate.center": center}})
    return out


def _search(model, tok, sets, R, dirs, steer_layers, fp, name, gate_layers) -> tuple[dict, float, list]:
    """Pick gate (layer, threshold) and coefficient: the most dev-harmful refusal whose dev-benign refusal
    is no higher than the vanilla model's. Only rows a gate lets through can change, so each row's
    answer is generated once vanilla and once per coefficient with the gate forced open."""
    harmful = list(sets["dev_harmful"].prompts)
    roles = gate_roles(sets)
    benign = [p for k in roles["dev_benign"] for p in sets[k].prompts]
    cands = _gate_candidates(R, gate_layers, roles)
    maybe = torch.stack([c["fires_benign"] for c in cands]).any(0)  # benign rows some gate lets through
    rows = harmful + [p for p, m in zip(benign, maybe.tolist(), strict=True) if m]
    van, _ = generate_texts(model, tok, None, rows, strength=0.0, desc="dev vanilla")
    van_ref = torch.tensor([is_refusal(t) for t in van])
    steered = {}
    for coef in COEF_GRID:
        v = SafetyVector(name, "activation", fp, dict(dirs), {"coefficient": coef})  # ungated: gate forced open
        texts, _ = generate_texts(model, tok, v, rows, strength=1.0, desc=f"dev coef {coef}")
        steered[coef] = torch.tensor([is_refusal(t) for t in texts])
    nh = len(harmful)
    van_benign_rate = float(van_ref[nh:].sum()) / len(benign)  # rows no gate opens never refuse in vanilla dev
    log, best = [], None
    for c in cands:
        fires = torch.cat([c["fires_harmful"], c["fires_benign"][maybe]])
        for coef, st in steered.items():
            ref = torch.where(fires, st, van_ref)
            hr, br = float(ref[:nh].float().mean()), float(ref[nh:].sum()) / len(benign)
            row = {"gate_layer": c["layer"], "l2": c["l2"], "threshold": round(c["threshold"], 4), "coefficient": coef,
                   "dev_harmful_refusal": hr, "dev_benign_refusal": br,
                   "benign_gate_fires": int(c["fires_benign"].sum())}
            log.append(row)
            key = (hr, -row["benign_gate_fires"], -coef)
            if br <= van_benign_rate and (best is None or key > best[0]):
                best = (key, c, coef)
    # steering moved no dev refusal at any coefficient (e.g. a model whose refusal direction was ablated,
    # or a tiny random model): the vector is written, but it is worth saying that it cannot steer here
    no_effect = all(bool(torch.equal(st, van_ref)) for st in steered.values())
    summary = {"vanilla_dev_harmful_refusal": float(van_ref[:nh].float().mean()),
               "vanilla_dev_benign_refusal": van_benign_rate, "steering_changed_no_dev_answer": no_effect,
               "grid": log}
    if no_effect:
        print("steer extract: warning: steering changed no dev refusal at any coefficient "
              f"({', '.join(map(str, COEF_GRID))}); the direction does not steer this model (for a fine-tune, "
              "keep the aligned model's direction: --refit-gate)", file=sys.stderr, flush=True)
    return best[1], best[2], summary


def extract_dtype() -> torch.dtype:
    """The dtype steer extract runs the model in (answers and residuals): bf16 where the CPU has oneDNN bf16
    kernels, float32 on the rest (AVX2-only hosts), where bf16 matmuls have no fast kernel: a --refit-gate
    --gate-conversations on the demo model spent 13 min on its 80 answers and about 18 s per 8-prompt
    residual batch in bf16 there (bench/RESULTS.md). Recorded in the manifest's provenance."""
    from steer.distill.answers import answer_dtype

    return answer_dtype("cpu")


def run_extract(cfg: ExtractConfig, *, command: str) -> Path:
    from steer.demo import ensure_demo_model

    t0 = time.time()
    model, tok = load_model(cfg.model or ensure_demo_model(), dtype=extract_dtype())
    n_layers = len(decoder_layers(model))
    all_sets = splits(cfg.seed)
    sets = {k: v.take(cfg.limit) for k, v in all_sets.items() if not k.startswith("test_")}
    sets, templated = _with_templates(cfg, sets, model, tok)
    sets, conversations = _with_conversations(cfg, sets, model, tok)
    R = {k: residuals(model, tok, s.prompts, (-1, GATE_POSITION), desc=k) for k, s in sets.items()}
    steer_layers = [int(x) for x in cfg.layers.split(",")] if cfg.layers else [round(0.55 * n_layers)]
    dirs = {f"layers.{ly}": mean_difference(R["fit_harmful"][:, 0, ly], R["fit_harmless"][:, 0, ly])
            for ly in steer_layers}
    gate_layers = [cfg.gate_layer] if cfg.gate_layer is not None else list(range(n_layers // 4, min(steer_layers) + 1))
    fp = fingerprint(model)
    cand, coef, search = _search(model, tok, sets, R, dirs, steer_layers, fp, cfg.name, gate_layers)
    gate = {"layer": cand["layer"], "threshold": cand["threshold"], "position": GATE_POSITION, "metric": "linear",
            "probe_l2": cand["l2"]}

    def score(k: str) -> torch.Tensor:  # gate scores of one set's prompts
        return linear_scores(R[k][:, 1, cand["layer"]], cand["tensors"]["gate.direction"], cand["tensors"]["gate.center"])

    harm = [score(k) for k in (*gate_roles(sets)["harmful"], "dev_harmful")]
    lower = lower_gate(cfg, cand["threshold"], harm, [score(k) for k in CODE_SETS])
    if lower is not None:
        gate["lower"] = lower
    config = {
        "coefficient": coef, "gate": gate, "mode": "add",
        "strength_semantics": "strength s adds s * coefficient * raw mean difference at each steered layer, "
                              "on rows whose prompt passes the gate",
    }
    test_sets = {k: v for k, v in all_sets.items() if k.startswith("test_")}
    prov = _provenance(cfg, {**sets, **test_sets}, steer_layers, search, command, time.time() - t0)
    prov["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if templated is not None:
        prov["gate_templates"] = templated
    if conversations is not None:
        prov["gate_conversations"] = conversations
    return SafetyVector(cfg.name, "activation", fp, {**dirs, **cand["tensors"]}, config, prov).save(cfg.out)


def run_refit_gate(cfg: ExtractConfig, source: str | Path, *, command: str) -> Path:
    """A copy of the gated activation vector ``source`` whose gate is refitted on ``cfg.model``.

    A gate reads the served model's residual stream, and a fine-tune moves it: the gate fitted on the
    aligned model misses harmful prompts on the fine-tune (measured in bench/RESULTS.md). The steering
    direction and coefficient are kept (the refusal direction transfers across fine-tunes); the probe is
    refitted with the same protocol and sets as ``steer extract`` at the source gate's layer (or
    ``cfg.gate_layer``, or the several layers of ``cfg.gate_layers``: a multi-layer gate) and L2 (with ``cfg.gate_templates``, the templated sets too, as ``steer extract
    --gate-templates``), and its threshold set at zero dev-benign fires (or on the highest dev benign score
    that leaves ``cfg.gate_fpr`` of them firing: recall on milder requests, such as Do-Not-Answer's, for a
    few fires on benign look-alikes; a fire steers a row, it does not always make it refuse, so choose it
    by the refusals it causes on dev, e.g. with bench/gated_calibrate.py). The new vector is made
    for ``cfg.model`` (its gate is valid only there); the provenance names the vector the direction
    came from and the model that was made on."""
    from steer.demo import ensure_demo_model

    t0 = time.time()
    if cfg.gate_fpr is not None and not 0.0 <= cfg.gate_fpr < 1.0:
        raise VectorError(f"--gate-fpr {cfg.gate_fpr}: must be in [0, 1) (the fraction of dev benign prompts the "
                          "gate may fire on)")
    if cfg.gate_layers is not None and cfg.gate_layer is not None:
        raise VectorError("--gate-layer and --gate-layers: give one (the last of --gate-layers decides)")
    layers = parse_layers(cfg.gate_layers) if cfg.gate_layers is not None else None
    src = SafetyVector.load(source)
    gcfg = src.config.get("gate")
    if src.kind != "activation" or not gcfg:
        raise VectorError(f"--refit-gate {source}: {src.name!r} is not a gated activation vector")
    if gcfg.get("also") is not None:
        raise VectorError(f"--refit-gate {source}: {src.name!r}'s gate is two gates AND-ed (--and-gates); refit "
                          "each of them and AND the two again")
    cfg, inherited = refit_settings(cfg, src)
    if inherited:
        print("steer extract: refitting the gate as the source made it: "
              + ", ".join(f"{k} {v}" for k, v in inherited.items())
              + " (give --gate-layers, --gate-templates/--no-gate-templates, "
                "--gate-conversations/--no-gate-conversations or --gate-fpr to change)",
              file=sys.stderr, flush=True)
    first = min(src.layer_directions())
    if layers is None:
        layers = ([cfg.gate_layer] if cfg.gate_layer is not None
                  else [int(x) for x in gcfg.get("layers", [gcfg["layer"]])])
    if not 1 <= layers[0] or layers[-1] > first:
        raise VectorError(f"gate layer(s) {_layer_text(layers)}: must be in 1..{first} (the first steered layer)")
    model, tok = load_model(cfg.model or ensure_demo_model(), dtype=extract_dtype())
    fp = fingerprint(model)
    src.check_model(fp, transfer=True)  # same architecture and shape, or a clear error
    l2 = float(gcfg.get("probe_l2", PROBE_L2[0]))
    position = int(gcfg.get("position", GATE_POSITION))
    names = GATE_HARMFUL + GATE_BENIGN + ("dev_harmful",) + BENIGN_DEV
    sets = {k: v.take(cfg.limit) for k, v in splits(cfg.seed).items() if k in names}
    sets, templated = _with_templates(cfg, sets, model, tok)
    sets, conversations = _with_conversations(cfg, sets, model, tok)
    roles = gate_roles(sets)
    # a multi-layer gate's feature: its layers' residuals at the gate position, concatenated in order
    R = {k: residuals(model, tok, s.prompts, (position,), desc=k)[:, 0, layers].flatten(1) for k, s in sets.items()}
    direction, center = fit_linear_probe([R[k] for k in roles["harmful"]], [R[k] for k in roles["benign"]], l2=l2)
    pos = linear_scores(R["dev_harmful"], direction, center)
    neg = torch.cat([linear_scores(R[k], direction, center) for k in roles["dev_benign"]])
    threshold, tpr = best_threshold(pos, neg, max_fpr=cfg.gate_fpr, at_edge=cfg.gate_fpr > 0)
    gate = {"layer": layers[-1], "threshold": threshold, "position": position, "metric": "linear", "probe_l2": l2}
    if len(layers) > 1:
        gate["layers"] = layers
    lower = lower_gate(cfg, threshold, [pos] + [linear_scores(R[k], direction, center) for k in roles["harmful"]],
                       [linear_scores(R[k], direction, center) for k in CODE_SETS])
    if lower is not None:
        gate["lower"] = lower
    tensors = {k: v for k, v in src.tensors.items() if not k.startswith("gate.")}
    tensors |= {"gate.direction": direction, "gate.center": center}
    prov = {
        "method": f"{src.name!r}'s steering direction and coefficient with its gate refitted on this model "
                  "(steer extract --refit-gate)",
        "direction_from": {"vector": src.name, "tensors_sha256": src.sha256, "model": src.model.to_dict()},
        "positions": {"gate": position},
        "datasets": {k: s.describe() for k, s in sets.items()},
        "split": {"seed": cfg.seed, "limit": cfg.limit},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dev": {"dev_harmful_gate_fires": tpr, "dev_benign_gate_fires": float((neg > threshold).float().mean()),
                "allowed_dev_benign_fires": cfg.gate_fpr, "dev_benign_n": len(neg)},
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
    }
    if inherited:
        prov["inherited_from_source"] = inherited
    if templated is not None:
        prov["gate_templates"] = templated
    if conversations is not None:
        prov["gate_conversations"] = conversations
    return SafetyVector(cfg.name, "activation", fp, tensors, {**src.config, "gate": gate}, prov).save(cfg.out)


def and_gates(primary: str | Path, other: str | Path, *, name: str, out: str | Path, command: str) -> Path:
    """A copy of the gated activation vector ``primary`` whose gate opens a row only where ``other``'s gate
    opens it too (``steer extract --and-gates``; ``steer.hooks.Gate``'s ``also``). Both are made for the same
    model, read the same prompt position, and ``other``'s gate layers are among ``primary``'s (its residuals
    are already there when ``primary``'s gate decides); neither gate may be two-sided or AND-ed already.
    No model is run: the probes are copied."""
    target = (Path(out) / f"{name}.json").resolve()
    if target in (Path(primary).resolve(), Path(other).resolve()):
        raise VectorError(f"--and-gates: {target} is one of the two inputs; give another --name or --out")
    from steer.hooks import Gate

    a, b = SafetyVector.load(primary), SafetyVector.load(other)
    gates = []
    for v, path in ((a, primary), (b, other)):
        g = Gate.of(v) if v.kind == "activation" else None  # the runtime's reading of each gate
        if g is None:
            raise VectorError(f"--and-gates {path}: {v.name!r} is not a gated activation vector")
        if g.lower_threshold is not None or g.also is not None:
            raise VectorError(f"--and-gates {path}: {v.name!r}'s gate is two-sided or AND-ed already")
        gates.append(g)
    ga, gb = gates
    if a.model != b.model:
        raise VectorError(f"--and-gates: {a.name!r} and {b.name!r} were made for different models")
    if not set(gb.layers) <= set(ga.layers):
        raise VectorError(f"--and-gates: {b.name!r}'s gate layers {list(gb.layers)} must be among {a.name!r}'s "
                          f"{list(ga.layers)}")
    if ga.position != gb.position:
        raise VectorError("--and-gates: the two gates read different prompt positions")
    also = {"layers": list(gb.layers), "threshold": gb.threshold, "metric": gb.metric, "from": b.name}
    tensors = dict(a.tensors) | {"gate.also.direction": b.tensors["gate.direction"],
                                 "gate.also.center": b.tensors["gate.center"]}
    prov = {**a.provenance, "and_gates": {
        "method": f"{a.name!r}'s gate AND {b.name!r}'s gate (steer extract --and-gates): a row is steered only "
                  "where both open",
        "primary": {"vector": a.name, "tensors_sha256": a.sha256},
        "also": {"vector": b.name, "tensors_sha256": b.sha256, "provenance": b.provenance},
        "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    vec = SafetyVector(name, "activation", a.model, tensors, {**a.config, "gate": {**a.config["gate"], "also": also}},
                       prov)
    Gate.of(vec)  # the runtime's own checks, before anything is written
    return vec.save(out)


def refit_settings(cfg: ExtractConfig, src: SafetyVector) -> tuple[ExtractConfig, dict]:
    """``cfg`` with the gate settings it leaves open (None) taken from the source vector ``src``, so that a
    refit makes the same kind of gate on another model: its layers (``gate.layers``, a multi-layer gate),
    whether it was fitted with templated requests (``provenance.gate_templates``) or chat shapes
    (``provenance.gate_conversations``) and the dev benign fire
    budget its threshold was set at (``provenance.dev.allowed_dev_benign_fires``; a gate made by steer extract
    has none: 0). Returns the config and what was inherited (empty where the source's settings are the
    plain ones: one layer, no templates or conversations, budget 0)."""
    gcfg = src.config.get("gate") or {}
    inherited: dict = {}
    if cfg.gate_layers is None and cfg.gate_layer is None and len(gcfg.get("layers", ())) > 1:
        inherited["gate_layers"] = _layer_text([int(x) for x in gcfg["layers"]])
    if cfg.gate_templates is None:
        tpl = "gate_templates" in src.provenance
        cfg = replace(cfg, gate_templates=tpl)
        if tpl:
            inherited["gate_templates"] = True
    if cfg.gate_conversations is None:
        conv = "gate_conversations" in src.provenance
        cfg = replace(cfg, gate_conversations=conv)
        if conv:
            inherited["gate_conversations"] = True
    if cfg.gate_fpr is None:
        fpr = float((src.provenance.get("dev") or {}).get("allowed_dev_benign_fires", 0.0))
        cfg = replace(cfg, gate_fpr=fpr)
        if fpr:
            inherited["gate_fpr"] = fpr
    return cfg, inherited


def parse_layers(text: str) -> list[int]:
    """"9-13" or "9,11,13" (or a mix, "5,9-13") -> increasing distinct layer indices; VectorError if not."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise VectorError(f"--gate-layers {text!r}: expected layers like 9-13 or 9,11,13") from None
    if not out or out != sorted(set(out)):
        raise VectorError(f"--gate-layers {text!r}: layers must be distinct and increasing")
    return out


def _layer_text(layers: list[int]) -> str:
    return ",".join(map(str, layers))


def _provenance(cfg, sets, steer_layers, search, command, seconds) -> dict:
    import transformers

    return {
        "method": "refusal-direction activation addition (Arditi et al. 2024) with a conditional gate "
                  "(conditional activation steering, arXiv 2409.05907)",
        "positions": {"direction": -1, "gate": GATE_POSITION},
        "layers": steer_layers,
        "datasets": {k: s.describe() for k, s in sets.items()},
        "split": {"seed": cfg.seed, "limit": cfg.limit, "held_out": [k for k in sets if k.startswith("test_")]},
        "dev": search,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
