"""ProLIP (METHODS §2.10): fine-tune CLIP's last visual projection on cached pre-projection features.

[CODE] astra-vision/ProLIP methods/ProLIP.py (``VisProjRN``, ``VisProjViT``, ``ProLIP.forward``,
``search_init_hp``), main.py (train transform, ``clip_classifier``), configs/experiments/
few_shot_no_val_lr1e-5_lambda_1_N.yaml (validation-free setting), few_shot_few_val.yaml (search_lr).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..store.reads import read_rows
from ..training import FitTask, Head
from .base import FitResult, Method, ValidationFree
from .needs import Needs, ViewNeed
from .options import MethodConfig, check_range
from .registry import register_method

SCALE = 100.0
"""[CODE] ``logits = 100. * image_features @ text_weights``."""
PROLIP_VIEWS = 301
"""Center + the code's ``aug_views`` 300 augmented views per support image (tip policy: crop 0.5-1 + flip)."""
SEARCH_LRS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
"""[CODE] ``search_init_hp`` learning rates (outer loop)."""
SEARCH_LAMBDAS = (10.0, 1.0, 0.1, 0.01, 0.001, 0.0001, 0.0)
"""[CODE] ``search_init_hp`` regularisation weights (inner loop)."""

# ---------------------------------------------------------------------------- formulas


def prolip_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """``100 · normalize(x Wᵀ + b) Tᵀ`` for one ``W [D, D_pre]`` or a stack ``[G, D, D_pre]`` (→ ``[G, N, C]``)."""
    z = x @ weight.transpose(-1, -2) + bias
    return SCALE * F.normalize(z, dim=-1) @ text.T


def prolip_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    weight0: torch.Tensor,
    bias: torch.Tensor,
    text: torch.Tensor,
    lam: torch.Tensor | float,
) -> torch.Tensor:
    """``CE(100 · normalize(Wx + b) Tᵀ, y) + λ ‖W − W0‖²_F`` for each W of a stack ``[G, D, D_pre]`` (→ ``[G]``)."""
    logits = prolip_logits(x, weight, bias, text)  # [G, N, C]
    ce = F.cross_entropy(logits.transpose(1, 2), labels.expand(logits.shape[:2]), reduction="none").mean(1)
    return ce + lam * (weight - weight0).pow(2).sum(dim=(1, 2))


def lambda_value(lam: str, shots: int) -> float:
    """``1/N``, ``1/N2`` or a number; N is the shot count, as the code's ``1/shots`` and ``1/shots**2``."""
    if lam == "1/N":
        return 1.0 / shots
    if lam == "1/N2":
        return 1.0 / shots**2
    return float(lam)


def epoch_view(epoch: int, augmented: int) -> int:
    """The cached view an epoch trains on: [CODE] ``cnt`` steps to ``(epoch + 1) % aug_views`` (f1 … f299, f0);
    cached view 0 is the center view, so the code's f_j is cached view ``1 + j``."""
    return 1 + (epoch + 1) % augmented


class ProLIPHead(Head):
    """``100 · normalize(x Wᵀ + b) Tᵀ`` on the pre-projection tap (``b`` frozen: zero for ViTs)."""

    inputs = ("preproj",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, text: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.float().clone())
        self.register_buffer("bias", bias.float().clone())
        self.register_buffer("text", text.float().clone())

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return prolip_logits(x["preproj"], self.weight, self.bias, self.text)


# ---------------------------------------------------------------------------- training


@dataclass(frozen=True)
class ProLIPConfig(MethodConfig):
    lr: float = 1e-5
    """Adam learning rate ([CODE] validation-free setting lr_v 1e-5)."""
    lam: str = "1/N"
    """λ of ‖W − W0‖²_F: 1/N (the code's lambda_funct_1_N: 1/shots), 1/N2 (1/shots²) or a number."""
    search: bool = False
    """The code's K-shot-val setting (search_lr): train every lr 1e-2…1e-8 × λ 10…1e-4, 0 and keep the
    best on the few-shot val (first strict maximum); lr and lam are then ignored."""
    epochs: int = 300
    """Full-batch epochs, one cached view each ([CODE] train_epoch 300)."""
    eps: float = 1e-4
    """Adam epsilon ([CODE] eps=1e-4)."""
    templates: str = "tip"
    """Template set of the text weights (the store's text/<set>; [CODE] Tip-style clip_classifier)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, low=0)
        check_range("epochs", self.epochs, low=1)
        check_range("eps", self.eps, low=0)
        if self.lam not in ("1/N", "1/N2"):
            try:
                value = float(self.lam)
            except ValueError:
                raise UsageError(f"lam must be 1/N, 1/N2 or a number >= 0, got '{self.lam}'") from None
            check_range("lam", value, low=0)


def train_prolip(
    read_view,
    labels: torch.Tensor,
    *,
    weight0: torch.Tensor,
    bias: torch.Tensor,
    text: torch.Tensor,
    lrs: tuple[float, ...],
    lams: tuple[float, ...],
    epochs: int,
    eps: float,
    augmented: int,
) -> tuple[torch.Tensor, list[dict]]:
    """[CODE] ProLIP's loop for every (lr, λ) at once: ``W [len(lrs), len(lams), D, D_pre]`` and the history.

    Each lr is one Adam parameter group holding a ``[len(lams), D, D_pre]`` stack; the losses of the
    stack are summed, so every W gets exactly its own gradient and Adam step (both are per element).
    """
    weights = [nn.Parameter(weight0.expand(len(lams), *weight0.shape).clone()) for _ in lrs]
    optimizer = torch.optim.Adam([{"params": [w], "lr": lr} for w, lr in zip(weights, lrs)], eps=eps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    lam = torch.tensor(lams, dtype=weight0.dtype, device=weight0.device)
    history = []
    for epoch in range(epochs):
        x = read_view(epoch_view(epoch, augmented))
        losses = [prolip_loss(x, labels, w, weight0, bias, text, lam) for w in weights]
        optimizer.zero_grad()
        sum(loss.sum() for loss in losses).backward()
        optimizer.step()
        scheduler.step()
        history.append({"epoch": epoch, "loss": float(losses[0][0].detach())})
    return torch.stack([w.detach() for w in weights]), history


@register_method
class ProLIP(Method):
    name = "prolip"
    description = (
        "ProLIP: fine-tunes CLIP's last visual projection W (init W0) on cached pre-projection features, "
        "CE + λ‖W − W0‖², 300 full-batch Adam epochs on 300 views; lr 1e-5, λ = 1/N or the K-shot-val grid (§2.10)."
    )
    Config = ProLIPConfig
    deviations = (
        "[PROPOSED] fp32 training on cached (fp16) pre-projection features; the code trains the fp16 weights of "
        "the half-precision CLIP model, hence its Adam eps 1e-4, which is kept.",
        "[PROPOSED] the 300 augmented views are cached tip-policy views 1-300 (RandomResizedCrop 0.5-1 bicubic "
        "+ flip, exact in distribution); the code draws its own 300 once per task and cycles f1 … f299, f0.",
        "[PROPOSED] search: the grid is trained once and the best head kept; the code retrains the chosen "
        "(lr, λ) from W0 with the same deterministic loop, which gives the same head. If no grid point scores "
        "above 0 % the code fails (lr_v undefined); here the first point is kept.",
        "[PROPOSED] coop protocol: CoOp seeds 1-3 and the store's few-shot val (min(k, 4) per class); the "
        "code's search uses its own K-shot val.",
    )
    validation_free = ValidationFree(
        "[CODE] lr 1e-5, λ = 1/N, last epoch (few_shot_no_val_lr1e-5_lambda_1_N.yaml)",
        {"search": False, "lr": 1e-5, "lam": "1/N"},
    )
    paper_protocol = "Same as coop: the code trains a fixed setting (or searches on its K-shot val)."

    needed = Needs(
        eval_taps=("pooled", "preproj"), train_views=(ViewNeed("tip", PROLIP_VIEWS, ("preproj",)),)
    )
    min_views = {"tip": 2}
    quick = {"epochs": 5}

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> ProLIPHead:
        return ProLIPHead(state["weight"], state["bias"], state["text"])

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        cfg = self.config
        weight0, bias = projection(task)
        device = task.device
        text = task.text(cfg.templates).to(device)
        labels = task.train.labels.long().to(device)
        source = task.views(task.train, policy="tip", taps=("preproj",))
        augmented = source.num_views - 1
        if augmented < 1:
            raise UsageError("prolip needs augmented tip views of preproj: extract --for prolip")
        if augmented < cfg.epochs:
            task.warn(
                f"{augmented} cached 'tip' views for {cfg.epochs} epochs: views repeat every {augmented} "
                "epochs (the code cycles its 300 saved views the same way)"
            )
        positions = np.arange(len(task.train))

        def read_view(view: int) -> torch.Tensor:
            return source.batch(positions, np.full(len(positions), view))["preproj"].float().to(device)

        shots = task.info.shots
        lrs, lams = (
            (SEARCH_LRS, SEARCH_LAMBDAS) if cfg.search else ((cfg.lr,), (lambda_value(cfg.lam, shots),))
        )
        weights, history = train_prolip(
            read_view,
            labels,
            weight0=weight0.to(device),
            bias=bias.to(device),
            text=text,
            lrs=lrs,
            lams=lams,
            epochs=cfg.epochs,
            eps=cfg.eps,
            augmented=augmented,
        )
        selection = {"epoch": cfg.epochs - 1, "select": "last"}
        best = (0, 0)
        if cfg.search:
            val = task.center(task.val, "preproj").to(device)
            val_labels = task.val.labels.long().to(device)
            scores = prolip_logits(val, weights.flatten(0, 1), bias.to(device), text).argmax(-1) == val_labels
            accs = (100.0 * scores.float().mean(-1)).view(len(lrs), len(lams)).tolist()
            top = 0.0
            for i, j in np.ndindex(len(lrs), len(lams)):  # [CODE] lr outer, λ inner, `acc > best_acc`
                if accs[i][j] > top:
                    top, best = accs[i][j], (i, j)
            selection |= {"select": "search", "val_acc": accs[best[0]][best[1]], "search_on": task.val.name}
        selection |= {"lr": lrs[best[0]], "lambda": lams[best[1]]}
        head = ProLIPHead(weights[best].cpu(), bias, text.cpu())
        selection["weight_shift"] = float((head.weight.detach() - weight0).norm())
        return FitResult(head.eval(), selection=selection, history=history)


def projection(task: FitTask) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's ``W0 [D, D_pre]`` and frozen bias ``[D]`` (zeros where the projection has none: ViTs)."""
    if not task.store.has("proj/weight"):
        raise UsageError(
            "The store has no image projection W0 (proj/weight): extract it again with --for prolip"
        )
    weight0 = torch.from_numpy(read_rows(task.store, "proj/weight", None)).float()
    if task.store.has("proj/bias"):
        return weight0, torch.from_numpy(read_rows(task.store, "proj/bias", None)).float()
    return weight0, torch.zeros(weight0.shape[0])
