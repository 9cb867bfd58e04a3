"""SAFE-A (METHODS §2.8): Tip-Adapter-F on SAFE's blended embeddings.

[PAPER] SAFE Eq. 5–10: keys ``normalize(β·AttnPool_O(G(X_K)) + AttnPool_F(G(X_K)))`` from the ``tip``
views, test feature the same blend, Tip's logits with the frozen ``W_c``. Stage 1 is SAFE
(:func:`.safe.fit_safe`); stage 2 runs :class:`.tip_adapter_f.TipAdapterF` unchanged on a view of the
task in which ``pooled`` *is* the blended embedding of the cached dense map. When a finished ``safe``
run with the same stage-1 options exists on the same task, stage 1 is that run (the record names it):
the same head, selection and random draws as training it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..console import training_notice
from ..splits import SplitRef
from ..training import FitTask, Head, MemoryViews, TaskInfo, ViewSource
from .base import FitResult, Method, ValidationFree
from .needs import Needs
from .options import check_range
from .registry import register_method
from .safe import SAFE_DEVIATIONS, TRAIN_POLICY, Safe, SafeConfig, SafeHead, dense_tap, fit_safe, reuse_safe
from .tip_adapter import AUGMENT_VIEWS, TIP_DEVIATIONS, TipAdapterConfig, TipHead, tip_defaults, tip_views
from .tip_adapter_f import TipAdapterF, TipAdapterFConfig

EMBED_BATCH = 256
"""Images per batch when turning cached dense maps into blended embeddings."""


@dataclass(frozen=True)
class SafeAConfig(SafeConfig, TipAdapterConfig):
    tip_epochs: int | None = None
    """Tip-Adapter-F epochs of stage 2; default per dataset (20, EuroSAT 100; Tip configs/*.yaml)."""
    tip_batch_size: int = 256
    """[CODE] Tip-Adapter-F batch size."""
    tip_lr: float = 1e-3
    """[CODE] Tip-Adapter-F AdamW learning rate."""
    tip_eps: float = 1e-4
    """[CODE] Tip-Adapter-F AdamW epsilon."""
    tip_weight_decay: float = 0.01
    """[CODE] torch AdamW default (Tip-Adapter-F does not set it)."""
    precompute: bool = True
    """Run the frozen AttnPool_O/F once over every cached view and train stage 2 on the stored embeddings
    (false: recompute them from the dense maps for every batch; same numbers, less memory)."""

    def __post_init__(self) -> None:
        SafeConfig.__post_init__(self)
        TipAdapterConfig.__post_init__(self)
        check_range("tip_batch_size", self.tip_batch_size, low=1)
        for name in ("tip_lr", "tip_weight_decay"):
            check_range(name, getattr(self, name), low=0)
        check_range("tip_eps", self.tip_eps, low=0, strict_low=True)
        if self.tip_epochs is not None:
            check_range("tip_epochs", self.tip_epochs, low=0)

    def resolved(self, dataset: str) -> SafeAConfig:
        """Tip's per-dataset search scales, init alpha/beta and epochs for the fields left at ``None``."""
        row = tip_defaults(dataset)
        fill = {
            "search_scale": row.search_scale,
            "init_beta": row.init_beta,
            "init_alpha": row.init_alpha,
            "tip_epochs": row.epochs,
        }
        return dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})

    def tip_config(self) -> TipAdapterFConfig:
        """Stage 2's Tip-Adapter-F options."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(TipAdapterConfig)}
        return TipAdapterFConfig(
            **shared,
            epochs=self.tip_epochs,
            batch_size=self.tip_batch_size,
            lr=self.tip_lr,
            eps=self.tip_eps,
            weight_decay=self.tip_weight_decay,
        )


# ---------------------------------------------------------------------------- stage 2's view of the task


class EmbeddedViews:
    """A dense-map source seen through SAFE: ``{"pooled": β·AttnPool_O(F) + AttnPool_F(F)}`` per batch."""

    def __init__(self, source: ViewSource, safe: SafeHead) -> None:
        self.source, self.safe, self.num_views = source, safe, source.num_views

    def __len__(self) -> int:
        return len(self.source)

    @torch.no_grad()
    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        dense = self.source.batch(positions, views)
        device = self.safe.text.device
        return {"pooled": self.safe.embed({k: v.to(device) for k, v in dense.items()}).cpu()}


def precompute(source: EmbeddedViews) -> MemoryViews:
    """Every view of every image embedded once: ``{"pooled": [N, V, D]}`` in memory."""
    n, v = len(source), source.num_views
    views = []
    for view in range(v):
        parts = [
            source.batch(np.arange(s, min(s + EMBED_BATCH, n)), np.full(min(EMBED_BATCH, n - s), view))[
                "pooled"
            ]
            for s in range(0, n, EMBED_BATCH)
        ]
        views.append(torch.cat(parts))
    return MemoryViews({"pooled": torch.stack(views, dim=1)})


class EmbeddedTask(FitTask):
    """``task`` as Tip-Adapter-F sees it in SAFE-A: the ``pooled`` tap is SAFE's blended embedding."""

    def __init__(self, task: FitTask, safe: SafeHead, *, stored: bool) -> None:
        super().__init__(
            task.store,
            task.info,
            train=task.train,
            val=task.val,
            oracle=task.oracle,
            device=task.device,
            memory_budget=task.memory_budget,
            view_counts=task.view_counts,
        )
        self.warnings, self._text = task.warnings, task._text  # shared: warnings reach the run record
        self.safe, self.stored = safe, stored
        self._done: dict[tuple, MemoryViews] = {}

    def views(
        self,
        split: SplitRef,
        *,
        policy: str = "center",
        taps: tuple[str, ...] = ("pooled",),
        views: int | None = None,
    ) -> ViewSource:
        if tuple(taps) != ("pooled",):
            raise ValueError(f"SAFE-A's stage 2 reads only the blended 'pooled' embedding, not {taps}")
        source = EmbeddedViews(
            super().views(split, policy=policy, taps=self.safe.inputs, views=views), self.safe
        )
        if not self.stored:
            return source
        key = (split.name, split.pool, policy, views)
        if key not in self._done:
            self._done[key] = precompute(source)
        return self._done[key]


# ---------------------------------------------------------------------------- head and method


class SafeAHead(Head):
    """Tip-Adapter-F logits on SAFE's blended embedding of the cached dense map."""

    def __init__(self, safe: SafeHead, tip: TipHead) -> None:
        super().__init__()
        self.inputs = safe.inputs
        self.safe, self.tip = safe, tip

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tip({"pooled": self.safe.embed(x)})

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"safe.{k}": v for k, v in self.safe.saved_state().items()},
            **{f"tip.{k}": v for k, v in self.tip.saved_state().items()},
        }


@register_method
class SafeA(Method):
    name = "safe_a"
    description = (
        "SAFE-A: SAFE, then Tip-Adapter-F on SAFE's blended embeddings (keys from tip views); "
        "alpha/beta searched on val (§2.8)."
    )
    Config = SafeAConfig
    deviations = (
        SAFE_DEVIATIONS
        + TIP_DEVIATIONS
        + (
            "[PROPOSED] stage 2 (no recipe in the paper): Tip-Adapter-F's official recipe on blended embeddings, "
            "keys from tip views 1..10, epoch and alpha/beta selected on the few-shot val.",
            "[PROPOSED] AttnPool_F is frozen after SAFE; the blended tip-view embeddings are computed once "
            "(option precompute).",
        )
    )
    validation_free = ValidationFree(
        "none: SAFE-A picks SAFE's lr x wd grid point, stopping iteration and Tip's alpha, beta on val",
        options=None,
    )
    paper_protocol = (
        "Same as coop: SAFE's protocol selects on the few-shot val; Tip-F's test oracle is not used."
    )
    min_views = {TRAIN_POLICY: 1, "tip": 1 + AUGMENT_VIEWS}

    quick = Safe.quick | {"tip_epochs": 1}
    builds_on = Safe.name

    @classmethod
    def needs(cls, dataset: str = "", options: dict | None = None) -> Needs:
        tip = tip_views(dataset)
        return Needs(
            eval_taps=Safe.needed.eval_taps,
            train_views=Safe.needed.train_views + (dataclasses.replace(tip, taps=("pooled", "dense")),),
        )

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> SafeAHead:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

        return SafeAHead(Safe.rebuild_head(bundle, part("safe."), backbone), TipHead.from_state(part("tip.")))

    def resolve(self, info: TaskInfo) -> SafeAConfig:
        return self.config.resolved(info.dataset)

    def earlier_config(self) -> SafeConfig:
        """Stage 1: a ``safe`` run with these options trains exactly what SAFE-A's stage 1 would."""
        return self.config.safe_options()

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        cfg = self.config.resolved(task.info.dataset)
        stage1 = self.earlier_config()
        earlier = task.earlier_run(self.builds_on, stage1)
        if earlier is None:
            safe, safe_selection, history = fit_safe(task, stage1, generator=generator)
        else:
            training_notice(f"safe_a: stage 1 is the finished safe run {earlier.path} (same settings)")
            safe, safe_selection, history = reuse_safe(task, stage1, earlier, generator=generator)
        tip = TipAdapterF(cfg.tip_config()).fit(
            EmbeddedTask(task, safe, stored=cfg.precompute), generator=generator
        )
        selection = {"safe": safe_selection, "tip": tip.selection, "dense_tap": dense_tap(task)}
        if earlier is not None:
            selection["safe_run"] = {"run_dir": str(earlier.path), "run_fingerprint": earlier.key}
        return FitResult(
            SafeAHead(safe, tip.head),
            selection=selection,
            history=history + [{"stage": "tip", **h} for h in tip.history],
        )
