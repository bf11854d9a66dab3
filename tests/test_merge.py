"""steer.merge and `steer merge`: METHODS.md section 6 identities on tiny random qwen2 and llama
checkpoints, a cross-check of every method mergekit also has against mergekit's own merge, atomic
output under failure and SIGKILL, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

from server.cli import main
from steer.merge import MergeError, MergeRequest, ops, run_merge
from steer.merge import run as merge_run
from steer.models import ModelFingerprint
from steer.vectors import SafetyVector

VOCAB = 96
# Tiny SVDs on a busy 2-core machine are ~100x slower with two intra-op threads than with one.
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _perturb(model, scale: float, seed: int):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def ck(request, tmp_path_factory, tiny_tokenizer):
    """base; ft = base + tau; surrogate = base + noise, aligned = surrogate + sigma; aligned0 = base + sigma
    (surrogate = base: sigma is then computed the same way here and by mergekit)."""
    root = tmp_path_factory.mktemp(f"merge-{request.param}")
    base = make_model(request.param, VOCAB)
    sigma_model = _perturb(base, 0.02, seed=2)
    surrogate = _perturb(base, 0.01, seed=3)
    models = {
        "base": base,
        "ft": _perturb(base, 0.02, seed=1),
        "surrogate": surrogate,
        "aligned0": sigma_model,
    }
    aligned = copy.deepcopy(surrogate)
    with torch.no_grad():
        for (_, p), (_, s), (_, b) in zip(aligned.named_parameters(), sigma_model.named_parameters(),
                                          base.named_parameters(), strict=True):
            p.add_(s - b)
    models["aligned"] = aligned
    paths = {}
    for name, m in models.items():
        paths[name] = root / name
        m.save_pretrained(paths[name])
    tiny_tokenizer.save_pretrained(paths["ft"])
    return SimpleNamespace(root=root, kind=request.param, **paths)


def _merge(ck, out: Path, method: str, *, sigma="aligned", **params) -> dict[str, torch.Tensor]:
    sig = {"aligned": {"aligned": str(ck.aligned), "surrogate": str(ck.surrogate)},
           "aligned0": {"aligned": str(ck.aligned0), "surrogate": str(ck.base)}, None: {}}[sigma]
    run_merge(MergeRequest(method=method, out=str(out), ft=str(ck.ft), base=str(ck.base), params=params, **sig))
    return _weights(out)


def _assert_equal(a: dict, b: dict, *, exact=True, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


# ---------------------------------------------------------------- pure math (no checkpoints)


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))[0]


def test_interference_weight_is_one_for_orthogonal_subspaces_and_falls_with_overlap():
    u, v = _orthonormal(8, 0), _orthonormal(8, 1)
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    tau = (u[:, :4] * s) @ v[:, :4].T  # rank 4 of 8: gamma 0.5 keeps exactly its triplets
    weights = []
    for angle in (0.0, 0.2, 0.5, 1.0, math.pi / 2):
        # rotate sigma's subspaces from the orthogonal complement of tau's towards tau's own
        us = math.cos(angle) * u[:, 4:] + math.sin(angle) * u[:, :4]
        vs = math.cos(angle) * v[:, 4:] + math.sin(angle) * v[:, :4]
        sigma = (us * s) @ vs.T
        weights.append(ops.interference_weight(tau, sigma, gamma=0.5, scale=1.0))
    assert weights[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in zip(weights, weights[1:-1], strict=False)), weights
    assert ops.interference_weight(tau, torch.zeros_like(tau), gamma=0.5, scale=200.0) == 1.0


@pytest.mark.parametrize("shape", [(12, 12), (20, 8), (8, 30)])
def test_cheap_interference_equals_explicit_m(shape):
    g = torch.Generator().manual_seed(sum(shape))
    tau, sigma = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g,
                                                                                 dtype=torch.float64)
    cheap, k = ops.interference_sum(tau, sigma, 0.5)
    m = ops.interference_matrix(tau, sigma, 0.5)
    assert m.shape == (k, k)
    assert cheap == pytest.approx(float(m.abs().sum()), rel=1e-9)


def test_dare_mask_is_mergekits_bernoulli_mask():
    # Same seed, same draw: mergekit's bernoulli(density=1-p) on the global generator and ours on a
    # private one give the same mask; ours then rescales survivors by 1/(1-p) (the DARE paper).
    from mergekit.sparsify import bernoulli

    delta = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1234)
    theirs = bernoulli(delta, density=0.7)
    ours = ops.dare(delta, 0.3, torch.Generator().manual_seed(1234))
    torch.testing.assert_close(ours * 0.7, theirs)
    kept = (ours != 0).float().mean()
    assert 0.6 < kept < 0.8


def test_safe_lora_projection_never_forms_out_by_out():
    g = torch.Generator().manual_seed(0)
    sigma, delta = torch.randn(50, 6, generator=g), torch.randn(50, 6, generator=g)
    proj, cos = ops.safe_lora_projection(delta, sigma)
    c = sigma @ sigma.T / torch.linalg.norm(sigma)  # the (out, out) matrix, here only to check
    torch.testing.assert_close(proj, c @ delta, rtol=1e-4, atol=1e-4)
    assert -1 <= cos <= 1


# ---------------------------------------------------------------- identities on checkpoints


def test_enchtable_beta_zero_and_zero_sigma_return_ft(ck, tmp_path):
    ft = _weights(ck.ft)
    _assert_equal(_merge(ck, tmp_path / "b0", "enchtable", beta=0.0), ft)
    run_merge(MergeRequest(method="enchtable", out=str(tmp_path / "s0"), ft=str(ck.ft), base=str(ck.base),
                           aligned=str(ck.surrogate), surrogate=str(ck.surrogate)))
    _assert_equal(_weights(tmp_path / "s0"), ft)


def test_enchtable_default_records_w_per_matrix(ck, tmp_path):
    out = tmp_path / "e"
    merged = _merge(ck, out, "enchtable", interference_scale=1.0)
    card = json.loads((out / "merge_card.json").read_text())
    ft, tau_norm = _weights(ck.ft), card["global"]["norm_tau"]
    assert card["method"] == "enchtable" and card["parameters"]["beta"] == 0.1
    assert card["global"]["sigma_factor"] == pytest.approx(0.1 * tau_norm / card["global"]["norm_sigma"])
    two_d = [k for k, t in ft.items() if t.dim() == 2]
    assert set(card["tensors"]) == set(two_d)
    assert all(0 < r["w"] <= 1 for r in card["tensors"].values())
    key = two_d[0]
    sigma = _weights(ck.aligned)[key] - _weights(ck.surrogate)[key]
    expected = ft[key] + card["tensors"][key]["w"] * card["global"]["sigma_factor"] * sigma
    torch.testing.assert_close(merged[key], expected)


def test_task_arithmetic_scale_and_resta_alias(ck, tmp_path):
    ft = _weights(ck.ft)
    _assert_equal(_merge(ck, tmp_path / "s0", "task_arithmetic", scale=0.0), ft)
    merged = _merge(ck, tmp_path / "s", "resta", scale=0.5)
    al, su = _weights(ck.aligned), _weights(ck.surrogate)
    _assert_equal(merged, {k: ft[k] + 0.5 * (al[k] - su[k]) for k in ft}, exact=False)
    card = json.loads((tmp_path / "s" / "merge_card.json").read_text())
    assert card["method"] == "task_arithmetic" and card["requested_method"] == "resta"
    # --ada: s = beta ||tau|| / ||sigma|| over the whole model
    merged = _merge(ck, tmp_path / "ada", "resta", ada=True, beta=0.2)
    base = _weights(ck.base)
    norm = lambda ts: math.sqrt(sum(float(t.double().square().sum()) for t in ts))  # noqa: E731
    s = 0.2 * norm(ft[k] - base[k] for k in ft) / norm(al[k] - su[k] for k in ft)
    assert json.loads((tmp_path / "ada" / "merge_card.json").read_text())["global"]["sigma_factor"] == pytest.approx(s)
    _assert_equal(merged, {k: ft[k] + s * (al[k] - su[k]) for k in ft}, exact=False)


def test_keys_missing_or_reshaped_in_an_input_come_from_ft(ck, tmp_path):
    wide = make_model(ck.kind, VOCAB + 8)  # same architecture, resized vocabulary
    wide.save_pretrained(tmp_path / "wide")
    out = tmp_path / "o"
    run_merge(MergeRequest(method="linear", out=str(out), ft=str(ck.ft), base=str(tmp_path / "wide")))
    merged, ft = _weights(out), _weights(ck.ft)
    copied = json.loads((out / "merge_card.json").read_text())["copied_from_ft"]
    reshaped = {k for k, t in ft.items() if t.shape[0] == VOCAB}
    assert reshaped and set(copied) == reshaped
    assert all(torch.equal(merged[k], ft[k]) for k in reshaped)
    assert not any(torch.equal(merged[k], ft[k]) for k in ft.keys() - reshaped)


def test_linear_and_slerp_endpoints(ck, tmp_path):
    ft, base = _weights(ck.ft), _weights(ck.base)
    for method in ("linear", "slerp"):
        _assert_equal(_merge(ck, tmp_path / f"{method}1", method, sigma=None, **{"lambda": 1.0}), ft)
        _assert_equal(_merge(ck, tmp_path / f"{method}0", method, sigma=None, **{"lambda": 0.0}), base)


def test_ties_and_dare_reduce_to_task_arithmetic(ck, tmp_path):
    ft = _weights(ck.ft)
    # one task vector, nothing trimmed or dropped: base + tau = ft
    _assert_equal(_merge(ck, tmp_path / "t", "ties", sigma=None, density=1.0), ft, exact=False)
    _assert_equal(_merge(ck, tmp_path / "d", "dare", sigma=None, drop_p=0.0), ft, exact=False)
    # with sigma, p = 0: dare is theta_ft + scale * sigma
    dare = _merge(ck, tmp_path / "ds", "dare", drop_p=0.0, scale=0.3)
    ta = _merge(ck, tmp_path / "ta", "task_arithmetic", scale=0.3)
    _assert_equal(dare, ta, exact=False)


def test_dare_is_seeded_and_drops_p(ck, tmp_path):
    a = _merge(ck, tmp_path / "a", "dare", sigma=None, drop_p=0.5, seed=7)
    b = _merge(ck, tmp_path / "b", "dare", sigma=None, drop_p=0.5, seed=7)
    c = _merge(ck, tmp_path / "c", "dare", sigma=None, drop_p=0.5, seed=8)
    _assert_equal(a, b)
    base = _weights(ck.base)
    key = next(k for k, t in base.items() if t.dim() == 2)
    assert not torch.equal(a[key], c[key])
    dropped = (a[key] == base[key]).float().mean()
    assert 0.4 < dropped < 0.6


def test_safe_lora_leaves_high_cosine_layers_untouched(ck, tmp_path):
    # sigma from a weight vector: equal to tau on layer 0 (cos(C tau, tau) ~ 0.7, above the threshold),
    # a random rank-2 matrix elsewhere (C projects tau onto 2 directions: cos well below 0.5); stored
    # low-rank, so the --vector path and delta = B @ A are exercised too
    ft, base = _weights(ck.ft), _weights(ck.base)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for k in ft:
        if ft[k].dim() == 2 and ".layers." in k:
            if ".layers.0." in k:
                tensors[f"delta.{k}"] = ft[k] - base[k]
            else:
                tensors[f"lora_A.{k}"] = torch.randn(2, ft[k].shape[1], generator=g)
                tensors[f"lora_B.{k}"] = torch.randn(ft[k].shape[0], 2, generator=g)
    cfg = json.loads((ck.ft / "config.json").read_text())
    fp = ModelFingerprint(cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], "0" * 64)
    vpath = SafetyVector("sv", "weight", fp, tensors).save(tmp_path / "vec")
    out = tmp_path / "o"
    run_merge(MergeRequest(method="safe_lora", out=str(out), ft=str(ck.ft), base=str(ck.base), vector=str(vpath)))
    merged, card = _weights(out), json.loads((out / "merge_card.json").read_text())
    decisions = card["tensors"]
    assert any(r["projected"] for r in decisions.values()) and not all(r["projected"] for r in decisions.values())
    for k, r in decisions.items():
        assert (r["cos"] > 0.5) == (not r["projected"])
        assert torch.equal(merged[k], ft[k]) != r["projected"], k
    assert all(not decisions[k]["projected"] for k in decisions if ".layers.0." in k)
    for k in ft.keys() - decisions.keys():  # not in the vector (1-D, embeddings): ft unchanged
        assert torch.equal(merged[k], ft[k])


def test_somf_mask(ck, tmp_path):
    ft, base = _weights(ck.ft), _weights(ck.base)
    ones, zeros = tmp_path / "ones.safetensors", tmp_path / "zeros.safetensors"
    save_file({k: torch.ones_like(t) for k, t in ft.items()}, ones)
    save_file({k: torch.zeros_like(t) for k, t in ft.items() if ".layers.1." not in k}, zeros)
    req = dict(method="somf", ft=str(ck.ft), base=str(ck.base))
    run_merge(MergeRequest(out=str(tmp_path / "o1"), mask=str(ones), **req))
    _assert_equal(_weights(tmp_path / "o1"), ft)
    run_merge(MergeRequest(out=str(tmp_path / "o0"), mask=str(zeros), **req))
    merged = _weights(tmp_path / "o0")
    for k in ft:  # zero mask: back to base; no mask for the key: ft unchanged
        assert torch.allclose(merged[k], ft[k] if ".layers.1." in k else base[k], atol=1e-6), k
    # a soft mask: base + tau * m / mean(m) per tensor (the reference's rescale), or base + m * tau without it
    g = torch.Generator().manual_seed(7)
    soft = {k: torch.rand(t.shape, generator=g) for k, t in ft.items()}
    save_file(soft, tmp_path / "soft.safetensors")
    for rescale in (True, False):
        out = tmp_path / f"soft-{rescale}"
        run_merge(MergeRequest(out=str(out), mask=str(tmp_path / "soft.safetensors"), params={"rescale": rescale},
                               **req))
        merged = _weights(out)
        for k in ft:
            m = soft[k] / soft[k].mean() if rescale else soft[k]
            torch.testing.assert_close(merged[k], base[k] + m * (ft[k] - base[k]), atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("method,params", [("linear", {"lambda": 0.3}), ("slerp", {"lambda": 0.3}),
                                           ("task_arithmetic", {"scale": 0.7}), ("somf", {})])
def test_rowwise_methods_merge_large_tensors_in_row_blocks(ck, tmp_path, monkeypatch, method, params):
    """With a tiny block size every matrix is merged (and written) a block of rows at a time, each block
    read from the inputs by byte range: the result is the whole-tensor merge's."""
    req = dict(method=method, ft=str(ck.ft), base=str(ck.base), params=params)
    if method == "somf":
        mask = tmp_path / "mask.safetensors"
        g = torch.Generator().manual_seed(5)
        save_file({k: torch.rand(t.shape, generator=g) for k, t in _weights(ck.ft).items()}, mask)
        req["mask"] = str(mask)
    elif method == "task_arithmetic":
        req.update(aligned=str(ck.aligned), surrogate=str(ck.surrogate))
    run_merge(MergeRequest(out=str(tmp_path / "whole"), **req))
    seen = []
    real = merge_run._row_blocks
    monkeypatch.setattr(merge_run, "_row_blocks", lambda shape: seen.append(shape) or real(shape))
    monkeypatch.setenv("STEER_MERGE_CHUNK_ELEMENTS", "100")  # blocks of a few rows; 7-row blocks of 16 wide
    run_merge(MergeRequest(out=str(tmp_path / "blocks"), **req))
    assert seen and all(len(s) == 2 for s in seen)  # the matrices went through the block path
    _assert_equal(_weights(tmp_path / "blocks"), _weights(tmp_path / "whole"), exact=method != "slerp",
                  atol=1e-6)


def test_tsv_and_model_stock_run(ck, tmp_path):
    base, ft, al, su = (_weights(d) for d in (ck.base, ck.ft, ck.aligned, ck.surrogate))
    tsv = _merge(ck, tmp_path / "tsv", "tsv")
    ms = _merge(ck, tmp_path / "ms", "model_stock")
    ts = json.loads((tmp_path / "ms" / "merge_card.json").read_text())["tensors"]
    for k in base:
        tau, sigma = ft[k] - base[k], al[k] - su[k]
        want = ops.tsv_delta(tau, sigma) if tau.dim() == 2 else (tau + sigma) / 2
        torch.testing.assert_close(tsv[k], base[k] + want, msg=k)
        cos = torch.nn.functional.cosine_similarity(tau.reshape(1, -1), sigma.reshape(1, -1)).item()
        assert ts[k]["t"] == pytest.approx(2 * cos / (1 + cos), abs=1e-4)
        torch.testing.assert_close(ms[k], base[k] + ts[k]["t"] * (tau + sigma) / 2, msg=k)


# ---------------------------------------------------------------- cross-check against mergekit

# (our method, our params, mergekit method, mergekit per-model params for [ft, base+sigma], global params)
# dare / dare_ties run with p = 0 here: the full pipelines draw their masks from different generators
# in a different tensor order, so masks cannot match; test_dare_mask_is_mergekits_bernoulli_mask shows
# the mask itself is mergekit's, and test_dare_is_seeded_and_drops_p its statistics. TIES uses equal
# weights: mergekit applies them before sign election (arcee-ai/mergekit#474), we after.
CROSS = [
    ("task_arithmetic", {"scale": 0.7}, "task_arithmetic", [{"weight": 1.0}, {"weight": 0.7}], {}),
    ("ties", {}, "ties", [{"weight": 1.0, "density": 0.5}] * 2, {}),
    ("ties", {"density": 0.3, "lambda": 0.8}, "ties", [{"weight": 1.0, "density": 0.3}] * 2, {"lambda": 0.8}),
    ("breadcrumbs", {"scale": 0.6}, "breadcrumbs",
     [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.5}], {}),
    ("dare", {"drop_p": 0.0, "scale": 0.5}, "dare_linear", [{"weight": 1.0, "density": 1.0},
                                                           {"weight": 0.5, "density": 1.0}], {}),
    ("dare_ties", {"drop_p": 0.0}, "dare_ties", [{"weight": 1.0, "density": 1.0}] * 2, {}),
    ("model_stock", {}, "model_stock", [{}, {}], {}),
]


def _mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    mk_run(MergeConfiguration.model_validate(cfg), str(out),
           MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return _weights(out)


@pytest.mark.parametrize(("method", "params", "mk_method", "mk_models", "mk_params"), CROSS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CROSS)])
def test_matches_mergekit(ck, tmp_path, method, params, mk_method, mk_models, mk_params):
    ours = _merge(ck, tmp_path / "ours", method, sigma="aligned0", **params)
    models = [{"model": str(p), "parameters": mp} for p, mp in zip((ck.ft, ck.aligned0), mk_models, strict=True)]
    cfg = {"merge_method": mk_method, "base_model": str(ck.base), "models": models, "dtype": "float32",
           "parameters": mk_params}
    _assert_equal(ours, _mergekit(cfg, tmp_path / "mk"), exact=False, atol=1e-5)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolation_matches_mergekit(ck, tmp_path, method):
    lam = 0.3
    ours = _merge(ck, tmp_path / "ours", method, sigma=None, **{"lambda": lam})
    if method == "linear":
        cfg = {"merge_method": "linear", "models": [{"model": str(ck.base), "parameters": {"weight": 1 - lam}},
                                                     {"model": str(ck.ft), "parameters": {"weight": lam}}]}
    else:
        cfg = {"merge_method": "slerp", "base_model": str(ck.base),
               "models": [{"model": str(ck.base)}, {"model": str(ck.ft)}], "parameters": {"t": lam}}
    _assert_equal(ours, _mergekit({**cfg, "dtype": "float32"}, tmp_path / "mk"), exact=False, atol=1e-5)


# ---------------------------------------------------------------- output format


def test_output_loads_in_transformers_with_card_and_tokenizer(ck, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "o"
    assert main(["merge", "--method", "enchtable", "--out", str(out), "--ft", str(ck.ft), "--base", str(ck.base),
                 "--aligned", str(ck.aligned), "--surrogate", str(ck.surrogate)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    written = _weights(out)
    for k, v in model.state_dict().items():
        if k in written:
            assert torch.equal(v, written[k]), k
    assert len(AutoTokenizer.from_pretrained(out)) > 0
    card = json.loads((out / "merge_card.json").read_text())
    assert card["command"].startswith("steer merge --method enchtable")
    assert set(card["inputs"]) == {"ft", "base", "aligned", "surrogate"}
    assert len(card["inputs"]["ft"]["sha256"]["model.safetensors"]) == 64
    assert {"steer_version", "created", "parameters", "tensors"} <= card.keys()


def test_sharded_bf16_ft_keeps_layout_and_dtype(ck, tmp_path):
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(ck.ft).to(torch.bfloat16)
    ft_dir = tmp_path / "ft16"
    ft.save_pretrained(ft_dir, max_shard_size="100KB")
    assert len(list(ft_dir.glob("*.safetensors"))) > 1
    out = tmp_path / "o"
    run_merge(MergeRequest(method="task_arithmetic", out=str(out), ft=str(ft_dir), aligned=str(ck.aligned),
                           surrogate=str(ck.surrogate), params={"scale": 0.5}))
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in ft_dir.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((ft_dir / "model.safetensors.index.json").read_text())["weight_map"]
    merged = _weights(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    AutoModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------- failure leaves nothing behind


def test_failure_mid_merge_leaves_no_output(ck, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = merge_run.merge_tensor

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(merge_run, "merge_tensor", failing)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk on fire"):
        _merge(ck, out, "enchtable")
    assert list(tmp_path.iterdir()) == []


_KILLED = """
import sys, time
from pathlib import Path
import steer.merge.run as r
real, n = r.merge_tensor, [0]
def slow(*a, **k):
    n[0] += 1
    if n[0] == 5:
        Path(sys.argv[1]).write_text("mid-merge")
        time.sleep(120)
    return real(*a, **k)
r.merge_tensor = slow
from server.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_merge_leaves_no_output(ck, tmp_path):
    out, marker = tmp_path / "o", tmp_path / "marker"
    args = ["merge", "--method", "ties", "--out", str(out), "--ft", str(ck.ft), "--base", str(ck.base)]
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_KILLED), str(marker), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the merge never reached its fifth tensor"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    assert [p.name for p in tmp_path.glob(".o.partial-*")]  # the killed merge's partial dir, never --out
    assert main(args) == 0  # a later merge to the same --out succeeds and clears the stale partial
    assert out.is_dir() and not list(tmp_path.glob(".o.partial-*"))


# ---------------------------------------------------------------- user errors: one line, exit 1


def _error(capsys, args: list[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err and err[-1].startswith("steer: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_user_errors_are_one_line(ck, tmp_path, capsys):
    common = ["--out", str(tmp_path / "o"), "--ft", str(ck.ft)]
    sig = ["--aligned", str(ck.aligned), "--surrogate", str(ck.surrogate)]
    base = ["--base", str(ck.base)]
    cases = [
        (["--method", "frankenmerge", *common, *base], "unknown merge method 'frankenmerge'"),
        (["--method", "enchtable", *common, *sig], "needs --base"),
        (["--method", "enchtable", *common, *base], "needs a safety vector"),
        (["--method", "enchtable", *common, *base, *sig, "--beta", "-1"], "--beta -1.0 must be >= 0"),
        (["--method", "enchtable", *common, *base, *sig, "--beta", "nan"], "must be a finite number"),
        (["--method", "enchtable", *common, *base, *sig, "--density", "0.5"], "--density does not apply"),
        (["--method", "ties", *common, *base, "--density", "0"], "must be in (0, 1]"),
        (["--method", "dare", *common, *base, "--drop-p", "1"], "must be in [0, 1)"),
        (["--method", "linear", *common, *base, "--lambda", "1.5"], "--lambda 1.5 must be in [0, 1]"),
        (["--method", "safe_lora", *common, *base, *sig, "--threshold", "2"], "must be in [-1, 1]"),
        (["--method", "resta", *common, *base, *sig, "--ada", "--scale", "2"], "cannot be combined"),
        (["--method", "linear", *common, *base, *sig], "does not apply to --method linear"),
        (["--method", "enchtable", *common, *base, "--aligned", str(ck.aligned)], "go together"),
        (["--method", "somf", *common, *base, "--mask", str(tmp_path / "none.safetensors")], "no such file"),
        (["--method", "linear", *common, "--base", str(tmp_path / "missing")], "not a directory"),
        (["--method", "linear", *common, "--base", str(tmp_path)], "no config.json"),
        (["--method", "linear", "--out", str(ck.ft), "--ft", str(ck.ft), *base], "already exists"),
        (["--method", "linear", "--out", str(ck.ft), "--ft", str(ck.ft), *base, "--force"], "is the --ft input"),
        (["--method", "resta", *common, "--vector", str(tmp_path / "v.json")], "no such file"),
    ]
    for args, message in cases:
        line = _error(capsys, ["merge", *args])
        assert message in line, (args, line)
    assert not (tmp_path / "o").exists()


def test_mismatched_architecture_is_refused(ck, tmp_path, capsys):
    other = make_model("llama" if ck.kind == "qwen2" else "qwen2", VOCAB)
    other.save_pretrained(tmp_path / "other")
    line = _error(capsys, ["merge", "--method", "linear", "--out", str(tmp_path / "o"), "--ft", str(ck.ft),
                           "--base", str(tmp_path / "other")])
    assert "different architecture" in line and "model_type" in line


def test_activation_vector_is_refused(ck, tmp_path):
    cfg = json.loads((ck.ft / "config.json").read_text())
    fp = ModelFingerprint(cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], "0" * 64)
    vpath = SafetyVector("act", "activation", fp, {"layers.1": torch.ones(cfg["hidden_size"])}).save(tmp_path)
    with pytest.raises(MergeError, match="'activation' vector"):
        run_merge(MergeRequest(method="resta", out=str(tmp_path / "o"), ft=str(ck.ft), vector=str(vpath)))


def test_force_replaces_existing_output(ck, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_merge(MergeRequest(method="linear", out=str(out), ft=str(ck.ft), base=str(ck.base), force=True))
    assert not (out / "stale.txt").exists() and (out / "merge_card.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
