"""APE (METHODS §2.10): training-free adaptive prior refinement: a Tip-style cache on selected channels,
each shot's value weighted by how much zero-shot CLIP disagrees with it.

[CODE] yangyangyang127/APE main.py::APE, utils.py::cal_criterion, extract_features.py
(``extract_few_shot_feature``: keys = mean of 10 augmented views, normalised), configs/*.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training import FitTask, Head, TaskInfo
from .base import FitResult, Method, ValidationFree
from .needs import Needs, ViewNeed
from .options import ConfigError, MethodConfig, check_range
from .registry import register_method
from .tip_adapter import build_keys, build_values, search_grid, search_split
from .zs_lp import cached_views

APE_VIEWS = 10
"""[CODE] configs augment_epoch 10: tip-policy views averaged into each key."""
REFERENCE_DIM = 1024
"""The RN50 width the configs' channel counts Q were chosen for."""


@dataclass(frozen=True)
class ApeDefaults:
    """One row of APE's ``configs/*.yaml`` (the fields APE and APE-T read)."""

    search_scale: tuple[float, float, float]
    """[S_beta, S_alpha, S_gamma]."""
    search_steps: tuple[int, int, int]
    init_alpha: float
    free_channels: int
    """training_free_feat_num (for D = 1024)."""
    free_w: tuple[float, float]
    """w_training_free: weights of −similarity and +variance in the channel criterion."""
    train_channels: int
    """training_feat_num (APE-T, for D = 1024)."""
    lr: float
    epochs: int
    eps: float


def _row(scale, alpha, free, w, train, lr, epochs, eps, steps=(200, 20, 20)) -> ApeDefaults:
    return ApeDefaults(tuple(map(float, scale)), steps, alpha, free, w, train, lr, epochs, eps)


# [CODE] APE configs/*.yaml @70460de (init_beta 1, init_gamma 0.1, w_training (0.2, 0.8) everywhere)
APE_TABLE: dict[str, ApeDefaults] = {
    "caltech101": _row((7, 7, 1), 1, 800, (0.5, 0.5), 900, 1e-3, 30, 1e-3),
    "dtd": _row((7, 7, 1), 3, 400, (0.5, 0.5), 700, 1e-3, 20, 1e-3),
    "eurosat": _row((30, 5, 1.5), 1, 700, (0.9, 0.1), 900, 1e-3, 200, 1e-3),
    "fgvc_aircraft": _row((20, 10, 1), 5, 800, (0.1, 0.9), 900, 1e-3, 30, 1e-3),
    "food101": _row((7, 7, 1), 0.8, 700, (0.3, 0.7), 900, 1e-4, 30, 1e-3),
    "imagenet": _row((7, 7, 0.5), 2, 500, (0.7, 0.3), 500, 1e-4, 20, 1e-3, steps=(200, 20, 5)),
    "oxford_flowers": _row((7, 7, 1), 3, 700, (0.4, 0.6), 800, 1e-3, 60, 1e-3),
    "oxford_pets": _row((7, 7, 1), 2, 800, (0.7, 0.3), 800, 1e-4, 30, 2e-3),
    "stanford_cars": _row((10, 7, 1), 1, 500, (0.6, 0.4), 800, 1e-3, 30, 5e-3),
    "sun397": _row((10, 7, 1), 1, 800, (0.7, 0.3), 800, 1e-4, 30, 1e-3),
    "ucf101": _row((10, 7, 1.5), 2, 700, (0.3, 0.7), 800, 1e-3, 30, 2e-3),
}
APE_DEFAULT = _row((7, 7, 1), 1, 700, (0.5, 0.5), 800, 1e-3, 30, 1e-3)
"""[PROPOSED] Datasets outside the table: the table's most common values."""
TRAIN_W = (0.2, 0.8)
"""[CODE] w_training, every config."""


def ape_defaults(dataset: str) -> ApeDefaults:
    return APE_TABLE.get(dataset, APE_DEFAULT)


def scaled_channels(channels: int, dim: int) -> int:
    """Q for width ``dim``: the config's Q for D = 1024, scaled by ``dim / 1024`` ([PROPOSED]; exact for RN50)."""
    return max(1, min(dim, round(channels * dim / REFERENCE_DIM)))


# ---------------------------------------------------------------------------- formulas


def cross_class_similarity(groups: list[torch.Tensor]) -> torch.Tensor:
    """S ``[D]``: mean over pairs (x, y) from different classes of ``x ⊙ y`` ([CODE] cal_criterion's 4 loops).

    ``groups[c]`` holds class c's samples ``[m_c, D]`` (APE: the text weight and the shots' keys).
    """
    sums = torch.stack([g.sum(0) for g in groups])  # [C, D]
    total = sums.sum(0)
    pairs = total * total - (sums * sums).sum(0)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    count = float(sizes.sum() ** 2 - (sizes * sizes).sum())
    return pairs / count


def channel_criterion(similarity: torch.Tensor, text: torch.Tensor, w: tuple[float, float]) -> torch.Tensor:
    """``J = −w₀ S + w₁ Var_c(t_c)`` per channel (``torch.var`` over classes, unbiased)."""
    return (-1) * w[0] * similarity + w[1] * torch.var(text, dim=0)


def select_channels(criterion: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` channels of highest criterion, in ``torch.topk`` order."""
    return torch.topk(criterion, k=count).indices


def shot_divergence(keys: torch.Tensor, text: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``Σ_c L log₂((L + 1e-6) / (softmax(k' t'ᵀ) + 1e-6))`` per shot ``[N]`` (selected, renormalised k', t')."""
    key_logits = (keys @ text.T).softmax(1)  # no temperature, [CODE] R_F'W'
    return torch.sum(values * torch.log2((values + 1e-6) / (key_logits + 1e-6)), dim=1)


def ape_cache_logits(affinity: torch.Tensor, values: torch.Tensor, divergence: torch.Tensor, *, beta, gamma):
    """``exp(−β(1 − A)) (L ⊙ exp(γ·KL))``."""
    soft = values * (divergence[:, None] * gamma).exp()
    return ((-1) * (beta - beta * affinity)).exp() @ soft


class ApeHead(Head):
    """``scale · f̂ Tᵀ + α · exp(−β(1 − f' K'ᵀ)) (L ⊙ exp(γ·KL))`` with ``'``: the selected channels, renormalised."""

    inputs = ("pooled",)

    def __init__(self, text, keys, values, divergence, channels, *, alpha, beta, gamma, scale):
        super().__init__()
        self.register_buffer("text", text.float().clone())  # [C, D], all channels
        self.register_buffer("keys", keys.float().clone())  # [N, Q], selected + renormalised
        self.register_buffer("values", values.float().clone())  # [N, C]
        self.register_buffer("divergence", divergence.float().clone())  # [N]
        self.register_buffer("channels", channels.long().clone())  # [Q]
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("scale", scale)):
            self.register_buffer(name, torch.tensor(float(value)))

    def parts(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(zero-shot logits, affinity ``f' K'ᵀ``) for raw embeddings ``[B, D]``."""
        clip = self.scale * F.normalize(pooled, dim=-1) @ self.text.T
        return clip, F.normalize(pooled[:, self.channels], dim=-1) @ self.keys.T

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        clip, affinity = self.parts(x["pooled"])
        cache = ape_cache_logits(affinity, self.values, self.divergence, beta=self.beta, gamma=self.gamma)
        return clip + cache * self.alpha


def search_ape(
    clip, affinity, values, divergence, labels, *, betas, alphas, gammas
) -> tuple[float, float, float, float]:
    """(β, α, γ, accuracy %) of the first strict maximum, β-major then α then γ ([CODE] APE's triple loop)."""
    best = (0.0, 0.0, 0.0, 0.0)  # acc, beta, alpha, gamma
    alpha_t = torch.tensor(alphas, dtype=clip.dtype)
    for beta in betas:
        expo = ((-1) * (beta - beta * affinity)).exp()  # [B, N]
        caches = torch.stack([expo @ (values * (divergence[:, None] * g).exp()) for g in gammas])  # [G, B, C]
        logits = clip[None, None] + alpha_t[:, None, None, None] * caches[None]  # [A, G, B, C]
        correct = (logits.argmax(-1) == labels).sum(-1)  # [A, G]
        for i, alpha in enumerate(alphas):
            for j, gamma in enumerate(gammas):
                acc = 100.0 * int(correct[i, j]) / max(len(labels), 1)
                if acc > best[0]:
                    best = (acc, beta, alpha, gamma)
    return best[1], best[2], best[3], best[0]


def gamma_grid(scale: float, steps: int) -> list[float]:
    """``[i · scale / steps for i < steps]`` (starts at 0, [CODE] gamma_list)."""
    return [i * scale / steps for i in range(steps)]


# ---------------------------------------------------------------------------- method


@dataclass(frozen=True)
class ApeConfig(MethodConfig):
    search_scale: tuple[float, float, float] | None = None
    """Upper ends [S_beta, S_alpha, S_gamma] of the grids; default per dataset (APE configs/*.yaml)."""
    search_steps: tuple[int, int, int] | None = None
    """Grid sizes for β, α, γ; default (200, 20, 20), ImageNet (200, 20, 5)."""
    channels: int | None = None
    """Q, channels kept; default the config's training_free_feat_num scaled by D/1024."""
    w: tuple[float, float] | None = None
    """Criterion weights (similarity, variance); default the config's w_training_free."""
    init_alpha: float | None = None
    """α (with β = 1, γ = 0.1) when search is off; default per dataset."""
    search: bool = True
    """Search β, α, γ on the selection split; false keeps (1, init_alpha, 0.1) and reads no val."""
    views: int = APE_VIEWS
    """Cached tip views (1..N) averaged into each key ([CODE] augment_epoch 10)."""
    templates: str = "tip"
    """Template set of the text weights (pooled with the store's --descriptions sentences when it has them)."""

    def __post_init__(self) -> None:
        check_range("views", self.views, low=1)
        if self.channels is not None:
            check_range("channels", self.channels, low=1)
        if self.search_steps is not None and any(s < 1 for s in self.search_steps):
            raise ConfigError(f"option search_steps must be >= 1, got {self.search_steps}")

    def resolved(self, info: TaskInfo) -> ApeConfig:
        row = ape_defaults(info.dataset)
        fill = {
            "search_scale": row.search_scale,
            "search_steps": row.search_steps,
            "channels": scaled_channels(row.free_channels, info.embed_dim),
            "w": row.free_w,
            "init_alpha": row.init_alpha,
        }
        return dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})


APE_TEXT = (
    "[CODE] text weights pool the Tip templates with the CuPL sentences of the store's --descriptions file "
    "(extract_features.py::extract_text_feature); a store extracted without one gives the Tip-template "
    "weights alone (record: text_source).",
)

APE_DEVIATIONS = APE_TEXT + (
    "[PROPOSED] coop protocol: the search runs on the few-shot val (min(k,4) per class); the code searches the "
    "full val split, and on ImageNet the test set (kept under --protocol paper).",
    "[PROPOSED] Q for widths other than 1024 is the config's value scaled by D/1024 (the configs are for RN50).",
    "[PROPOSED] the 10 key views are pre-extracted tip-policy views 1..10 (exact in distribution); fp32 on "
    "cached fp16 embeddings; CoOp seeds 1-3 (the code uses seed 1 for the draw).",
    "[CODE] the criterion's cross-class mean is computed in closed form (Σ_x Σ_y − Σ_c within-class), equal to "
    "the code's loops; unequal per-class shot counts are allowed.",
)


def described_weights(
    per_template: torch.Tensor, description_mean: torch.Tensor, description_count: torch.Tensor
) -> torch.Tensor:
    """[CODE] extract_text_feature: per class, the templates' and the description sentences' normalised
    embeddings averaged together (``T + n_c`` of them, so longer lists weigh more), normalised."""
    count = description_count.double().unsqueeze(1)
    total = F.normalize(per_template.double(), dim=-1).sum(1) + count * description_mean.double()
    return F.normalize(total / (per_template.shape[1] + count), dim=-1).float()


def ape_text(task: FitTask, template_set: str) -> torch.Tensor:
    """APE's class text weights ``[C, D]``: with the store's descriptions when it has them."""
    described = task.descriptions()
    if described is None:
        return task.text(template_set)
    return described_weights(task.text_raw(template_set), *described)


def text_source(task: FitTask, template_set: str) -> dict:
    """Where :func:`ape_text` took the weights from, for the run record."""
    record = task.store.manifest.get("descriptions")
    if record is None:
        return {"text_source": f"templates:{template_set}"}
    return {"text_source": f"templates:{template_set}+descriptions", "descriptions_sha256": record["sha256"]}


def ape_cache(task: FitTask, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys ``[N, D]``: mean of tip views 1..views, normalised; one-hot values ``[N, C]``)."""
    count = cached_views(task, "tip", views)
    keys = build_keys(task.train_views("tip", views=range(1, 1 + count)))
    return keys, build_values(task.train.labels, task.info.num_classes)


@register_method
class Ape(Method):
    name = "ape"
    description = (
        "APE: training-free cache on Q selected channels (inter-class similarity vs text variance), shots "
        "weighted by zero-shot disagreement; β, α, γ searched on val (§2.10)."
    )
    Config = ApeConfig
    deviations = APE_DEVIATIONS
    validation_free = ValidationFree(
        "[CODE] β = 1, α = the configs' init_alpha, γ = 0.1: main.py's values before its search",
        {"search": False},
    )
    paper_protocol = (
        "β, α, γ searched on the full val split (when the store has val_full); ImageNet searches on test, "
        "as main.py does (its 'val' features are ImageNet's val = test)."
    )
    paper_full_val = True
    paper_test_oracle = True
    trains = False
    min_views = {"tip": 2}

    needed = Needs(train_views=(ViewNeed("tip", 1 + APE_VIEWS, ("pooled",)),), text_raw=("tip",))
    quick = {"search_steps": (10, 5, 5)}

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> ApeHead:
        scalars = {k: float(state[k]) for k in ("alpha", "beta", "gamma", "scale")}
        return ApeHead(
            state["text"], state["keys"], state["values"], state["divergence"], state["channels"], **scalars
        )

    def resolve(self, info: TaskInfo) -> ApeConfig:
        return self.config.resolved(info)

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        cfg = self.config.resolved(task.info)
        keys, values = ape_cache(task, cfg.views)
        text = ape_text(task, cfg.templates)
        labels = task.train.labels.long()
        groups = [
            torch.cat([text[c : c + 1], keys[labels == c]]).double() for c in range(task.info.num_classes)
        ]
        criterion = channel_criterion(cross_class_similarity(groups).float(), text, cfg.w)
        channels = select_channels(criterion, min(cfg.channels, text.shape[1]))
        keys_sel = F.normalize(keys[:, channels], dim=-1)
        text_sel = F.normalize(text[:, channels], dim=-1)  # [CODE] new_clip_weights.norm(dim=0): per class
        divergence = shot_divergence(keys_sel, text_sel, values)
        head = ApeHead(
            text, keys_sel, values, divergence, channels,
            alpha=cfg.init_alpha, beta=1.0, gamma=0.1, scale=task.info.zs_scale,
        )  # fmt: skip
        selection = {"channels": len(channels), "w": list(cfg.w)} | text_source(task, cfg.templates)
        if not cfg.search:
            return FitResult(head, selection=selection | {"alpha": cfg.init_alpha, "beta": 1.0, "gamma": 0.1})
        split = search_split(task)
        with torch.no_grad():
            clip, affinity = head.parts(task.center(split))
        s_beta, s_alpha, s_gamma = cfg.search_scale
        n_beta, n_alpha, n_gamma = cfg.search_steps
        beta, alpha, gamma, acc = search_ape(
            clip, affinity, values, divergence, split.labels.long(),
            betas=search_grid(s_beta, n_beta), alphas=search_grid(s_alpha, n_alpha),
            gammas=gamma_grid(s_gamma, n_gamma),
        )  # fmt: skip
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            getattr(head, name).fill_(value)
        selection |= {
            "alpha": alpha,
            "beta": beta,
            "gamma": gamma,
            "search_acc": acc,
            "search_on": split.name,
        }
        return FitResult(head, selection=selection)
