"""CAPT-C (METHODS §2.9.3 [PROPOSED]): Confusion-Aware Prompt Tuning rebuilt on cached features.

This is **not** the official CAPT code: method ``capt`` trains the official objective (prompt tuning
with confusion-mined negatives, §2.9.2); this design, until issue 13 named ``capt``, is ``capt_c``.
It keeps every module and data flow of the paper's figure: the Confusion Bank (built from zero-shot
predictions on the cached train views, refreshed from the model every ``refresh_every`` epochs), SEM
(difference/commonality pair prompts through the frozen text encoder, class-level refinement,
image-level confusion score, the semantic expert), SAM (retrieval of confusing bank samples, never
the query's own views; the Diff-Manner Adapter; the sample expert) and MGDE (top-2 router over the
ZS, semantic and sample experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..training import FitTask, TaskInfo, TrainData, TrainSettings, seeded_init, train
from ..training.settings import Schedule
from .base import FitResult, Method, ValidationFree
from .capt_modules import (
    COMMONALITY_TEMPLATE,
    DIFFERENCE_TEMPLATE,
    CaptHead,
    encode_pair_texts,
    load_balance,
    load_descriptions,
    pair_sentences,
    spherical_kmeans,
    symmetric_infonce,
)
from .confusion_bank import ConfusionBank, build_bank, confusable_classes
from .needs import Needs, ViewNeed
from .options import TrainOptions, check_range
from .registry import register_method

DESIGN = "CAPT-C [PROPOSED] cached-feature design (METHODS §2.9.3); not the official CAPT code"


@dataclass(frozen=True)
class CaptCConfig(TrainOptions):
    epochs: int = 50
    """[PROPOSED] §2.9.3 recipe: 50 epochs."""
    batch_size: int = 64
    """[PROPOSED] §2.9.3 recipe: batch 64."""
    lr: float = 1e-3
    """[PROPOSED] AdamW learning rate 1e-3."""
    weight_decay: float = 1e-4
    """[PROPOSED] AdamW weight decay 1e-4."""
    schedule: Schedule = "cosine_iter"
    """[PROPOSED] cosine per iteration."""
    templates: str = "tip"
    """Template set of the class weights W (the store's text/<set>)."""
    pairs_per_class: int = 5
    """K_p: confusable classes N_K(c) kept per class (pair prompts encoded per class)."""
    pairs_per_image: int = 3
    """K_s: semantic confusion pairs kept per image (top of the image-level confusion score)."""
    retrieve: int = 4
    """K_r: confusing bank samples retrieved per image (SAM)."""
    tau: float = 0.07
    """Temperature of the retrieval weights and of the local branch's attention."""
    refresh_every: int = 10
    """E_r: rebuild the bank from the current model's predictions every E_r epochs (closed loop); 0 = never."""
    bank_views: int = 5
    """Cached coop views per train image that populate the bank (view 0 = center); bounds its memory."""
    hidden_ratio: int = 4
    """Expert MLPs are D → D/hidden_ratio → D."""
    expert_weight: float = 0.5
    """Weight of each expert's own CE (semantic and sample) in the loss."""
    hn_weight: float = 0.5
    """λ_hn: weight of the hard-negative symmetric InfoNCE (batch + one bank view of 2 confusable classes each)."""
    lb_weight: float = 0.1
    """Weight of the MGDE load-balancing term log 3 − H(mean r)."""
    random_vectors: bool = True
    """Training only: W̃ += random_scale · R · K_5 with R ~ U(±1/√5) re-drawn every step
    ([CODE] CAPT 'random vectors')."""
    random_scale: float = 0.1
    """Scale of the random vectors."""
    kmeans: int = 5
    """Centroids of the commonality embeddings the random vectors mix (k-means, cosine)."""
    local: bool = True
    """Use the local Diff-Manner branch when the store caches dense_embed (disabled and recorded otherwise)."""
    descriptions: str | None = None
    """Path to a CAPT descriptions JSON of difference sentences ({class: ['The difference between A and B is ...']})."""
    commonalities: str | None = None
    """Path to a CAPT descriptions JSON of commonality sentences (same format); template fallback otherwise."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "pairs_per_class",
            "pairs_per_image",
            "retrieve",
            "bank_views",
            "hidden_ratio",
            "kmeans",
        ):
            check_range(name, getattr(self, name), low=1)
        for name in ("refresh_every", "expert_weight", "hn_weight", "lb_weight", "random_scale"):
            check_range(name, getattr(self, name), low=0)
        check_range("tau", self.tau, low=0, strict_low=True)


class IndexedViews:
    """A train :class:`ViewSource` whose batches also carry ``image_id`` (split positions), so retrieval can
    leave out the query's own views."""

    def __init__(self, source) -> None:
        self.source, self.num_views = source, source.num_views

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        return {
            **self.source.batch(positions, views),
            "image_id": torch.as_tensor(np.asarray(positions, np.int64)),
        }


@register_method
class CaptC(Method):
    name = "capt_c"
    description = (
        "CAPT-C [PROPOSED]: confusion bank + semantic/sample confusion experts routed by MGDE on cached "
        "coop views (§2.9.3; not the official CAPT code)."
    )
    Config = CaptCConfig
    deviations = (
        f"[PROPOSED] {DESIGN}: the official CAPT tunes prompts with confusion-mined negatives (method capt, "
        "§2.9.2); no equivalence and no comparable anchors. Runs recorded as 'capt' before issue 13 are this "
        "method and load and report as capt_c.",
        "[PROPOSED] pair prompts and N_K are fixed at epoch 0 (zero-shot bank, encoded once); the closed-loop "
        "refresh updates the bank's counts and cells (confusion scores and retrieval candidates).",
        "[PROPOSED] the bank holds the first bank_views cached coop views per train image (memory bound).",
        "[PROPOSED] the sample expert's local branch needs cached dense_embed; without it only the global branch runs.",
        "[PROPOSED] each epoch trains on one cached coop view per image (view sampler, METHODS §1.6).",
        "[PROPOSED] fallback pair templates when no LLM descriptions are given.",
    )
    validation_free = ValidationFree("[PROPOSED] last epoch", {"select": "last"})
    paper_protocol = (
        "Same as coop: CAPT-C has no official code to reproduce; its own setting is --protocol base2novel."
    )
    min_views = {"coop": 2}
    needs_backbone = True
    base2novel = True

    quick = {"epochs": 2}
    needed = Needs(train_views=(ViewNeed("coop", 51, ("pooled",)),))

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> CaptHead:
        """Every CAPT-C tensor is saved (bank included); the config gives the sizes the buffers do not."""
        cfg, text = bundle.meta["config"], state["text"]
        grid = None
        if "dense_embed" in bundle.inputs:
            length = bundle.meta["tap_shapes"]["dense_embed"][0]
            grid = round(length**0.5)
        bank = None
        if "bank_keys" in state:  # the sample expert ran: a bank of the saved size (its values load next)
            entries = len(state["bank_true"])
            empty = torch.zeros(entries, dtype=torch.long)
            bank = ConfusionBank(
                state["counts"], torch.zeros(text.shape[0], text.shape[0]), empty, empty, empty, empty
            )
        return CaptHead(
            text,
            state["e_dif"],
            state["e_com"],
            state["pairs"],
            bank,
            state.get("bank_keys"),
            state.get("class_mean"),
            scale=float(state["scale"]),
            pairs_per_image=int(cfg["pairs_per_image"]),
            retrieve_k=int(cfg["retrieve"]),
            tau=float(cfg["tau"]),
            hidden=max(1, text.shape[1] // int(cfg["hidden_ratio"])),
            grid=grid,
            centroids=state["centroids"] if len(state["centroids"]) else None,
            random_scale=float(cfg["random_scale"]) if cfg["random_vectors"] else 0.0,
        )

    def resolve(self, info: TaskInfo) -> CaptCConfig:
        return self.config

    def train_settings(self, task: FitTask) -> TrainSettings:
        return self.config.train_settings(policy="coop")

    # ------------------------------------------------------------------ fit

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        settings = self.train_settings(task)
        self.task, self.notes = task, {"design": DESIGN}
        taps = self._taps(task)
        self.source = task.train_source("coop", taps=taps, epochs=settings.epochs)
        head = self.build_head(task, generator=generator)
        self.head, self.refreshes = head, []
        self.noise = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        head.generator = self.noise
        result = train(
            head,
            TrainData(IndexedViews(self.source), task.train.labels),
            settings=settings,
            generator=generator,
            selector=self.selector(task, head),
            loss_fn=self.loss,
            device=task.device,
            on_epoch=self._refresh,
        )
        selection = {
            "epoch": result.best_epoch,
            "val_acc": result.best_score,
            **self.notes,
            "bank_refreshes": self.refreshes,
        }
        return FitResult(result.head, selection=selection, history=result.history)

    def _taps(self, task: FitTask) -> tuple[str, ...]:
        """``pooled``, plus ``dense_embed`` when the local branch can run on every pool the fit reads."""
        pools = {(task.train.pool, "coop"), ("test", "center")}
        if task.has_val:  # --validation none reads no val, not even its maps
            pools.add((task.val.pool, "center"))
        has = all(task.store.has(f"images/{p}/views/{v}/dense_embed") for p, v in pools)
        self.grid = None
        if self.config.local and has:
            length = task.store.arrays[f"images/{task.train.pool}/views/coop/dense_embed"]["shape"][2]
            side = int(round(length**0.5))
            self.grid = side if side * side == length else None
        why = (
            "enabled"
            if self.grid
            else "disabled: option local=false"
            if not self.config.local
            else "disabled: the store caches no dense_embed"
            if not has
            else "disabled: tokens are not a square grid"
        )
        self.local_note = why
        return ("pooled", "dense_embed") if self.grid else ("pooled",)

    def build_head(self, task: FitTask, *, generator: torch.Generator) -> CaptHead:
        cfg = self.config
        text = task.text(cfg.templates)  # W [C, D]
        views = min(cfg.bank_views, self.source.num_views)
        feats = task.train_views("coop", views=range(views))  # [N, Vb, D]
        f_hat = F.normalize(feats, dim=-1)
        labels = task.train.labels
        bank = build_bank(task.info.zs_scale * f_hat @ text.T, labels)  # epoch 0: zero-shot predictions
        pairs = confusable_classes(bank.counts, bank.soft, text, k=cfg.pairs_per_class)
        e_dif, e_com = self._pair_embeddings(task, pairs)
        class_mean = torch.zeros_like(text).index_add_(0, labels, f_hat[:, 0])
        centroids = (
            spherical_kmeans(e_com.mean(dim=1), cfg.kmeans, generator=generator)
            if cfg.random_vectors
            else None
        )
        self.bank_views = views
        self.notes |= {
            "local_branch": self.local_note,
            "bank_views": views,
            "bank_initial": bank.to_json(task.info.classnames),
            "pairs": {
                task.info.classnames[c]: [task.info.classnames[o] for o in row]
                for c, row in enumerate(pairs.tolist())
            },
        }
        with seeded_init(generator):
            head = CaptHead(
                text,
                e_dif,
                e_com,
                pairs,
                bank,
                feats.reshape(-1, feats.shape[-1]),
                class_mean,
                scale=task.info.zs_scale,
                pairs_per_image=cfg.pairs_per_image,
                retrieve_k=cfg.retrieve,
                tau=cfg.tau,
                hidden=max(1, text.shape[1] // cfg.hidden_ratio),
                grid=self.grid,
                centroids=centroids,
                random_scale=cfg.random_scale if cfg.random_vectors else 0.0,
            )
        self._index_bank(bank)
        return head

    def _pair_embeddings(self, task: FitTask, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SEM: ``E^dif``, ``E^com`` ``[C, K_p, D]`` through the frozen text encoder (encoded once)."""
        cfg, names = self.config, list(task.info.classnames)
        backbone = task.backbone()  # refuses a backbone that differs from the store's
        encode = lambda texts: backbone.text_classifier(texts, ["{}"])  # noqa: E731  one sentence per "class"
        given = {}
        for key, path, template in (
            ("dif", cfg.descriptions, DIFFERENCE_TEMPLATE),
            ("com", cfg.commonalities, COMMONALITY_TEMPLATE),
        ):
            found = load_descriptions(path, names) if path else None
            sentences = pair_sentences(pairs, names, given=found, template=template)
            given[key] = encode_pair_texts(encode, sentences, tuple(pairs.shape))
            used = sum((c, o) in (found or {}) for c, row in enumerate(pairs.tolist()) for o in row)
            self.notes.setdefault("pair_texts", {})[key] = {
                "llm_pairs": used,
                "template_pairs": pairs.numel() - used,
            }
        return given["dif"], given["com"]

    # ------------------------------------------------------------------ the closed loop

    def _index_bank(self, bank: ConfusionBank) -> None:
        order = torch.argsort(bank.true, stable=True)
        counts = torch.bincount(bank.true, minlength=self.task.info.num_classes)
        self._by_class = (order, torch.cumsum(counts, 0) - counts, counts)

    @torch.no_grad()
    def _refresh(self, epoch: int, head: CaptHead) -> None:
        """Every ``refresh_every`` epochs: re-predict the bank views with the current model and rebuild the bank."""
        every = self.config.refresh_every
        if not every or epoch == 0 or epoch % every:
            return
        head.eval()
        n, device = len(self.source), self.task.device
        logits = torch.empty(n, self.bank_views, self.task.info.num_classes)
        for v in range(self.bank_views):
            for start in range(0, n, 1024):
                pos = np.arange(start, min(start + 1024, n))
                x = {
                    k: t.to(device)
                    for k, t in IndexedViews(self.source).batch(pos, np.full(len(pos), v)).items()
                }
                logits[pos, v] = head(x)["capt"].float().cpu()
        head.train()
        bank = build_bank(logits, self.task.train.labels)
        head.set_bank(bank)
        self.refreshes.append({"epoch": epoch, **bank.to_json(self.task.info.classnames)})

    # ------------------------------------------------------------------ losses

    def loss(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``CE(capt) + w_e·Σ CE(expert) + λ_hn·L_hn + λ_lb·L_lb`` (METHODS §2.9.3 step 5)."""
        cfg, head = self.config, self.head
        loss = F.cross_entropy(outputs["capt"], labels)
        experts = ("semantic", "sample") if head.sample_expert else ("semantic",)
        loss = loss + cfg.expert_weight * sum(F.cross_entropy(outputs[e], labels) for e in experts)
        if cfg.hn_weight > 0 and head.sample_expert:
            loss = loss + cfg.hn_weight * self._hard_negative_loss(labels)
        return loss + cfg.lb_weight * load_balance(head.aux["router"])

    def _hard_negative_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """InfoNCE over the batch plus one bank view from each of the top-2 confusable classes of each label."""
        head, device = self.head, labels.device
        negative = head.pairs[labels][:, :2].reshape(-1)  # [2B]
        order, starts, counts = self._by_class
        neg_cpu = negative.cpu()
        pick = starts[neg_cpu] + (torch.rand(len(neg_cpu), generator=self.noise) * counts[neg_cpu]).long()
        entry = order[pick.clamp(max=len(order) - 1)]
        img, view = entry // self.bank_views, entry % self.bank_views
        x = {k: t.to(device) for k, t in self.source.batch(img.numpy(), view.numpy()).items()}
        f_hat = F.normalize(x["pooled"], dim=-1)
        anchor, _, confusers, omega = head.confusion_pairs(head.scale * f_hat @ head.text.T)
        z = head.sample_embedding(
            f_hat, anchor, confusers, omega, image_id=img.to(device), tokens=x.get("dense_embed")
        )
        features = torch.cat([head.aux["z_sample"], z])
        return symmetric_infonce(
            features, torch.cat([labels, negative]), head.aux["w_tilde"], scale=float(head.scale)
        )

    # ------------------------------------------------------------------ base-to-novel

    def novel_head(self, fitted: FitResult, task: FitTask) -> CaptHead:
        """§2.9.3 step 7: novel rows of the bank are empty, N_K from W Wᵀ, E^dif/E^com from text, sample expert off."""
        cfg, base = self.config, fitted.head
        text = task.text(cfg.templates)
        c = text.shape[0]
        pairs = confusable_classes(
            torch.zeros(c, c, dtype=torch.long), torch.zeros(c, c), text, k=cfg.pairs_per_class
        )
        self.notes = {}
        e_dif, e_com = self._pair_embeddings(task, pairs)
        head = CaptHead(
            text,
            e_dif,
            e_com,
            pairs,
            None,
            None,
            None,
            scale=task.info.zs_scale,
            pairs_per_image=cfg.pairs_per_image,
            retrieve_k=cfg.retrieve,
            tau=cfg.tau,
            hidden=max(1, text.shape[1] // cfg.hidden_ratio),
        )
        head.gamma.data.copy_(base.gamma.data)  # class-agnostic parts transfer
        head.semantic_mlp.load_state_dict(base.semantic_mlp.state_dict())
        head.router.data.copy_(base.router.data)
        return head.eval()
