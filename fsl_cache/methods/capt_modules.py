"""CAPT-C's modules (METHODS §2.9.3 [PROPOSED]): SEM pair texts, the semantic and sample experts, MGDE.

Every expert's last layer is zero-initialised and the router starts at 0, so the untrained head
reproduces zero-shot CLIP exactly; training moves away from it only where it helps.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..training.head import Head
from .confusion_bank import ConfusionBank, retrieve

DIFFERENCE_TEMPLATE = "a photo of a {c}, unlike a {o}."
COMMONALITY_TEMPLATE = "a photo of a {c} or a {o}."
EXPERTS = ("zero_shot", "semantic", "sample")


# ---------------------------------------------------------------------------- SEM texts


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def load_descriptions(path: str | Path, classnames: list[str]) -> dict[tuple[int, int], list[str]]:
    """Pair sentences from a CAPT ``descriptions/<ds>_prompt_{distinct,common}.json`` file.

    Format ([CODE] CAPT ``descriptions/``): ``{class name: ["The difference between A and B is ...", ...]}``.
    The pair (A, B) of a sentence is A = the key and B = the longest class name following
    ``"between A and "``; sentences naming no known class are ignored. Names match case- and
    underscore-insensitively.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read CAPT descriptions {path}: {err}") from None
    index = {_key(n): i for i, n in enumerate(classnames)}
    by_length = sorted(index, key=len, reverse=True)
    out: dict[tuple[int, int], list[str]] = {}
    for name, sentences in data.items():
        a = index.get(_key(name))
        if a is None:
            continue
        for sentence in sentences if isinstance(sentences, list) else [sentences]:
            low = _key(sentence)
            at = low.find(f"between {_key(name)} and ")
            rest = low[at + len(f"between {_key(name)} and ") :] if at >= 0 else ""
            other = next((n for n in by_length if rest.startswith(n) and index[n] != a), None)
            if other is not None:
                out.setdefault((a, index[other]), []).append(sentence)
    return out


def pair_sentences(
    pairs: torch.Tensor, classnames: list[str], *, given: dict | None, template: str
) -> list[list[str]]:
    """Per (class, k) the sentences of pair ``(c, pairs[c, k])``: the user's if any, else ``template``."""
    names = [n.replace("_", " ") for n in classnames]
    out = []
    for c, row in enumerate(pairs.tolist()):
        for o in row:
            found = (given or {}).get((c, o))
            out.append(found or [template.format(c=names[c], o=names[o])])
    return out


def encode_pair_texts(encode, sentences: list[list[str]], shape: tuple[int, int]) -> torch.Tensor:
    """``[C, K_p, D]``: per pair, the mean of its normalised sentence embeddings, normalised (CLIP ensembling)."""
    flat = [s for group in sentences for s in group]
    emb = F.normalize(encode(flat).float(), dim=-1)
    sizes = torch.tensor([len(g) for g in sentences])
    owner = torch.repeat_interleave(torch.arange(len(sentences)), sizes)
    mean = torch.zeros(len(sentences), emb.shape[1]).index_add_(0, owner, emb) / sizes[:, None]
    return F.normalize(mean, dim=-1).view(*shape, -1)


def spherical_kmeans(x: torch.Tensor, k: int, *, generator: torch.Generator, iters: int = 20) -> torch.Tensor:
    """``k`` unit centroids of the rows of ``x`` under cosine similarity ([CODE] CAPT k-means, cosine)."""
    x = F.normalize(x, dim=-1)
    k = min(k, x.shape[0])
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=-1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centroids[j] = F.normalize(members.mean(dim=0), dim=-1)
    return centroids


# ---------------------------------------------------------------------------- experts


def zero_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """``d_in → hidden → d_out`` with GELU; the last layer starts at 0 (the expert starts as zero-shot)."""
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class DiffMannerAdapter(nn.Module):
    """SAM's Diff-Manner Adapter: global branch on ``f̂ − r̄``, local branch on dense tokens, fused by ``σ(α)``."""

    def __init__(self, dim: int, hidden: int, *, grid: int | None, tau: float) -> None:
        super().__init__()
        self.global_mlp = zero_mlp(dim, hidden, dim)
        self.grid, self.tau = grid, tau
        if grid is not None:
            self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.local_mlp = zero_mlp(dim, hidden, dim)
            self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, f_hat: torch.Tensor, r_bar: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        h_g = self.global_mlp(f_hat - r_bar)  # [B, D]
        if self.grid is None or tokens is None:
            return h_g
        b, length, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, self.grid, length // self.grid)
        x = tokens + self.dwconv(grid).flatten(2).transpose(1, 2)  # [B, L, D]
        # locations least explained by the confusers get the weight
        attn = (-(F.normalize(x, dim=-1) @ r_bar[:, :, None]).squeeze(-1) / self.tau).softmax(
            dim=-1
        )  # [B, L]
        h_l = self.local_mlp((attn[..., None] * x).sum(dim=1))
        a = torch.sigmoid(self.alpha)
        return a * h_l + (1 - a) * h_g


class CaptHead(Head):
    """CAPT-C on cached features: ZS, semantic and sample experts routed top-2 by MGDE.

    Outputs ``{"capt", "zero_shot", "semantic", "sample"}`` logits ``[B, C]`` (``capt`` is the headline).
    """

    def __init__(
        self,
        text: torch.Tensor,
        e_dif: torch.Tensor,
        e_com: torch.Tensor,
        pairs: torch.Tensor,
        bank: ConfusionBank | None,
        bank_keys: torch.Tensor | None,
        class_mean: torch.Tensor | None,
        *,
        scale: float,
        pairs_per_image: int,
        retrieve_k: int,
        tau: float,
        hidden: int,
        grid: int | None = None,
        centroids: torch.Tensor | None = None,
        random_scale: float = 0.0,
    ) -> None:
        super().__init__()
        c, d = text.shape
        self.register_buffer("text", text.float().clone())  # W [C, D]
        self.register_buffer("e_dif", e_dif.float())  # [C, K_p, D]
        self.register_buffer("e_com", e_com.float())
        self.register_buffer("pairs", pairs.long())  # N_K [C, K_p]
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.k_s, self.k_r, self.tau = min(pairs_per_image, pairs.shape[1]), retrieve_k, tau
        self.gamma = nn.Parameter(torch.zeros(d))  # class-level refinement, starts at W̃ = W
        self.semantic_mlp = zero_mlp(3 * d, hidden, d)
        self.sample_expert = bank is not None
        self.router = nn.Parameter(torch.zeros(len(EXPERTS), d))  # G, starts uniform
        self.register_buffer("centroids", centroids.float() if centroids is not None else torch.zeros(0, d))
        self.random_scale = random_scale
        self.generator: torch.Generator | None = None
        self.aux: dict[str, torch.Tensor] = {}
        if self.sample_expert:
            self.adapter = DiffMannerAdapter(d, hidden, grid=grid, tau=tau)
            self.register_buffer("bank_keys", F.normalize(bank_keys.float(), dim=-1).half())  # [M, D]
            self.register_buffer("class_mean", F.normalize(class_mean.float(), dim=-1))  # [C, D]
            self.set_bank(bank)
        else:
            self.register_buffer("counts", torch.zeros(c, c, dtype=torch.long))
        self.inputs = ("pooled", "dense_embed") if grid is not None else ("pooled",)

    # ---------------------------------------------------------------- bank

    def set_bank(self, bank: ConfusionBank) -> None:
        """Install (or refresh: the closed loop) the bank's counts and per-entry predictions."""
        for name, value in (
            ("counts", bank.counts.long()),
            ("bank_true", bank.true.long()),
            ("bank_pred", bank.pred.long()),
            ("bank_img", bank.img.long()),
        ):
            if hasattr(self, name) and name in self._buffers:
                self._buffers[name].copy_(value)
            else:
                self.register_buffer(name, value.clone())

    # ---------------------------------------------------------------- pieces of the forward

    def refined_text(self) -> torch.Tensor:
        """``W̃ = normalize(W + γ ⊙ (Ē^dif − Ē^com))`` (+ the training-only random vectors)."""
        w = self.text + self.gamma * (self.e_dif.mean(dim=1) - self.e_com.mean(dim=1))
        if self.training and self.random_scale > 0 and len(self.centroids):
            k = self.centroids.shape[0]
            bound = 1.0 / math.sqrt(k)  # [CODE] nn.Linear(5→n) default init, re-drawn every forward
            r = (torch.rand(w.shape[0], k, generator=self.generator) * 2 - 1).to(w.device) * bound
            w = w + self.random_scale * r @ self.centroids
        return F.normalize(w, dim=-1)

    def confusion_pairs(
        self, s_zs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ĉ ``[B]``, the top-K_s pair slots ``[B, K_s]``, their classes ``[B, K_s]`` and weights ω ``[B, K_s]``."""
        p = s_zs.softmax(dim=-1)
        anchor = p.argmax(dim=-1)
        cand = self.pairs[anchor]  # [B, K_p]
        row = self.counts[anchor].float()  # [B, C]
        stat = row.gather(1, cand) / row.sum(dim=1, keepdim=True).clamp(min=1.0)
        score = p.gather(1, cand) * (1.0 + stat)
        top, slot = score.topk(self.k_s, dim=-1)
        return anchor, slot, cand.gather(1, slot), top.softmax(dim=-1)

    def semantic(self, f_hat, anchor, slot, omega, w_tilde) -> torch.Tensor:
        g_d = (omega[..., None] * self.e_dif[anchor[:, None], slot]).sum(dim=1)  # [B, D]
        g_c = (omega[..., None] * self.e_com[anchor[:, None], slot]).sum(dim=1)
        z = f_hat + self.semantic_mlp(torch.cat([f_hat, g_d, g_c], dim=-1))
        return self.scale * F.normalize(z, dim=-1) @ w_tilde.T

    def sample_embedding(
        self, f_hat, anchor, confusers, omega, *, image_id=None, tokens=None
    ) -> torch.Tensor:
        """``normalize(f̂ + h)``: the sample expert's image feature after the Diff-Manner Adapter."""
        r_bar, _ = retrieve(
            f_hat,
            anchor,
            confusers,
            omega,
            keys=self.bank_keys.float(),
            true=self.bank_true,
            pred=self.bank_pred,
            img=self.bank_img,
            class_mean=self.class_mean,
            k=self.k_r,
            tau=self.tau,
            image_id=image_id,
        )
        return F.normalize(f_hat + self.adapter(f_hat, r_bar, tokens), dim=-1)

    def route(self, f_hat: torch.Tensor, experts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """MGDE: ``r = softmax(G f̂)``, top-2 renormalised ([CODE] CAPT MoE); logits and the full ``r``."""
        gate = f_hat @ self.router.T  # [B, 3]
        if not self.sample_expert:
            gate = gate.masked_fill(torch.tensor([False, False, True], device=gate.device), float("-inf"))
        r = gate.softmax(dim=-1)
        top, idx = r.topk(2, dim=-1)
        w = top / top.sum(dim=-1, keepdim=True)
        stacked = torch.stack(experts, dim=1)  # [B, E, C]
        chosen = stacked.gather(1, idx[..., None].expand(-1, -1, stacked.shape[-1]))
        return (w[..., None] * chosen).sum(dim=1), r

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f_hat = F.normalize(x["pooled"], dim=-1)  # [B, D]
        s_zs = self.scale * f_hat @ self.text.T  # E0: zero-shot
        anchor, slot, confusers, omega = self.confusion_pairs(s_zs)
        w_tilde = self.refined_text()
        s_sem = self.semantic(f_hat, anchor, slot, omega, w_tilde)
        experts = [s_zs, s_sem]
        if self.sample_expert:
            z = self.sample_embedding(
                f_hat, anchor, confusers, omega, image_id=x.get("image_id"), tokens=x.get("dense_embed")
            )
            experts.append(self.scale * z @ w_tilde.T)
            self.aux = {"z_sample": z, "w_tilde": w_tilde}
        else:
            experts.append(s_sem)  # placeholder: the router masks it out
            self.aux = {"w_tilde": w_tilde}
        s_capt, r = self.route(f_hat, experts)
        self.aux["router"] = r
        return dict(zip(("capt",) + EXPERTS, [s_capt] + experts))


def load_balance(r: torch.Tensor) -> torch.Tensor:
    """``log E − H(mean_i r_i)`` over the experts in use: 0 when the router spreads load evenly; has a gradient.

    [PROPOSED] corrected version of the official MoE term (which detaches the router logits).
    """
    used = r[:, r.sum(dim=0) > 0] if r.shape[0] else r
    mean = used.mean(dim=0).clamp(min=1e-12)
    return math.log(used.shape[1]) + (mean * mean.log()).sum()


def symmetric_infonce(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Image↔text InfoNCE (τ = 1/scale) between features ``z`` ``[B, D]`` and ``text[labels]``.

    Duplicated labels share one text row: image→text is CE over the batch's distinct classes,
    text→image a soft target spread over that class's images.
    """
    classes, index = labels.unique(return_inverse=True)
    logits = scale * z @ text[classes].T  # [B, U]
    i2t = F.cross_entropy(logits, index)
    target = F.one_hot(index, len(classes)).float().T  # [U, B]
    target = target / target.sum(dim=1, keepdim=True)
    t2i = -(target * logits.T.log_softmax(dim=-1)).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)
