"""Refusal-direction extraction (Arditi et al. 2024, METHODS.md 5.1) and gate fitting.

The residual stream is read at the *input* of each decoder layer, at the last prompt position (the
end of the chat template's assistant header), accumulated in float32. The direction at layer l is
``mean(harmful) - mean(harmless)``, kept raw (unnormalised) as in the reference code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from steer.data import Conversation
from steer.models import decoder_layers


def chat_prompt_ids(tokenizer, prompt: str | Conversation, system: str | None = None) -> list[int]:
    """Token ids of a chat prompt ending in the assistant header (generation prompt): one user turn, or a
    conversation (``steer.data.Conversation``: (role, content) turns ending in a user turn)."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [
        {"role": r, "content": c} for r, c in prompt]
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


@torch.inference_mode()
def residuals(
    model, tokenizer, prompts: Sequence[str], positions: tuple[int, ...] = (-1,), *, batch_size: int = 8,
    desc: str | None = "residuals",
) -> torch.Tensor:
    """(N, P, L, d) float32 residual stream at the input of every layer, at each offset in
    ``positions`` from the end of the chat-formatted prompt (-1: last position)."""
    n_layers = len(decoder_layers(model))
    ids_list = [chat_prompt_ids(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in tqdm(range(0, len(ids_list), batch_size), desc=desc, disable=desc is None, unit="batch"):
        chunk = ids_list[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(chunk):  # left padding: every row ends at the last column
            ids[j, width - len(x) :], mask[j, width - len(x) :] = torch.tensor(x), 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        hs = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
        # hidden_states[l] is the input of layer l for l < L (hidden_states[0] = embeddings)
        out.append(torch.stack([torch.stack([hs[ly][:, p].float() for ly in range(n_layers)], 1)
                                for p in positions], 1))
    return torch.cat(out)


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """(N1, ..., d), (N2, ..., d) -> (..., d) refusal directions."""
    return harmful.mean(0) - harmless.mean(0)


def cosine_scores(x: torch.Tensor, direction: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N,) cosine of (x - center) with direction (same formula the runtime gate uses)."""
    x = x - center
    return (x @ (direction / direction.norm())) / x.norm(dim=-1).clamp_min(1e-6)


def best_threshold(pos: torch.Tensor, neg: torch.Tensor, *, max_fpr: float = 0.0,
                   at_edge: bool = False) -> tuple[float, float]:
    """Threshold maximising true-positive rate subject to false-positive rate <= max_fpr.

    Returns (threshold, tpr). The threshold sits halfway between the allowed negative score and the
    next positive above it, so it does not hug either class; with ``at_edge`` it sits on the highest
    negative that must not fire (the loosest threshold at that false-positive rate: an operating point
    chosen for recall on positives milder than ``pos``).
    """
    neg_sorted = neg.sort(descending=True).values
    k = int(max_fpr * len(neg) + 1e-9)  # number of negatives allowed above the threshold
    edge = float(neg_sorted[k]) if k < len(neg) else float(neg.min()) - 1e-3
    above = pos[pos > edge]
    thr = (edge + float(above.min())) / 2 if len(above) and not at_edge else edge
    return thr, float((pos > thr).float().mean())


def fit_linear_probe(
    harmful: list[torch.Tensor], benign: list[torch.Tensor], *, l2: float = 0.1, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-balanced, L2-regularised logistic regression on (N_i, d) activation groups.

    Each group (one prompt source) carries equal total weight, so no single source's style dominates
    the probe. Features are standardised while fitting; the result is folded back into raw-activation
    space as ``(direction, center)`` with ``logit = (x - center) @ direction`` (the bias is folded
    into the center along the direction).
    """
    groups = [(x, 1.0) for x in harmful] + [(x, 0.0) for x in benign]
    X = torch.cat([x for x, _ in groups]).double().clone()  # clone: inputs may be inference tensors
    y = torch.cat([torch.full((len(x),), lab, dtype=torch.float64) for x, lab in groups])
    w = torch.cat([torch.full((len(x),), 1.0 / len(x), dtype=torch.float64) for x, _ in groups])
    w = w / w.sum()
    mu, sd = X.mean(0), X.std(0) + 1e-2
    Z = (X - mu) / sd
    coef = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(Z @ coef + bias, y, reduction="none") * w).sum()
        loss = loss + l2 * coef.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    direction = (coef.detach() / sd)  # logit = (x - mu) @ direction + bias
    center = mu - bias.detach() * direction / direction.pow(2).sum()
    return direction.float(), center.float()


def linear_scores(x: torch.Tensor, direction: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N,) probe logits (same formula the runtime gate uses with metric "linear")."""
    return (x - center) @ direction
