"""What a method sees while it fits: the train and selection splits of one (shots, seed) draw.

The test split is deliberately absent. Under ``--protocol coop`` nothing a method can reach reads a
test tensor; the engine evaluates the finished head on test once. Only ``--protocol paper`` hands a
method whose official code selects on test (Tip-Adapter-F's epoch oracle) the test split as
``oracle``, and the run is flagged as such.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import load_backbone
from ..errors import StoreError, UsageError
from ..splits.refs import SplitRef
from ..store.reads import read_rows
from ..store.text import DESCRIPTIONS_COUNT, DESCRIPTIONS_MEAN, per_template_name
from .data import DEFAULT_MEMORY_BUDGET, ViewSource, open_views
from .trainer import SharedBatches


@dataclass(frozen=True)
class TaskInfo:
    """The facts of a fit that do not depend on tensors."""

    dataset: str
    """Dataset name as the store records it (``eurosat``, ``imagefolder:/abs/dir``)."""
    classnames: tuple[str, ...]
    shots: int
    seed: int
    protocol: str
    """``coop`` (no test reads before the final evaluation) or ``paper`` (the official quirks)."""
    embed_dim: int
    backbone: dict = field(default_factory=dict)
    """The store manifest's backbone section (arch, pretrained, kind, ...)."""
    zs_scale: float = 100.0
    """CLIP logit scale the store's zero-shot logits use."""
    store_fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class EarlierRun:
    """A finished run of another method on this very task (same store, shots, seed, protocol, device and
    library versions), which a method may start from instead of repeating it (SAFE-A: SAFE's run)."""

    path: Path
    key: str
    """Its run fingerprint."""
    record: dict
    tensors: dict[str, torch.Tensor]
    """Its saved head state."""


class FitTask:
    """Train split, selection split (few-shot val, or full val under ``paper``), text weights, views."""

    def __init__(
        self,
        store,
        info: TaskInfo,
        *,
        train: SplitRef,
        val: SplitRef | None,
        oracle: SplitRef | None = None,
        device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        classes: np.ndarray | None = None,
        view_counts: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.info = info
        self.train = train
        self._val = val
        self.oracle = oracle
        """The test split, present only under ``--protocol paper`` for methods that select on it."""
        self.device = torch.device(device)
        self.memory_budget = memory_budget
        self.warnings: list[str] = []
        self._text: dict[str, torch.Tensor] = {}
        self._backbone: Any = None
        self._shared: dict[tuple, ViewSource] | None = None
        self.classes = None if classes is None else np.asarray(classes, dtype=np.int64)
        """Store class indices this task classifies (``None``: all); ``--protocol base2novel`` sets them."""
        self.view_counts = dict(view_counts or {})
        """Views per train image the method reads under each policy (what it declares it needs): a store that
        holds more, extracted for other methods, gives the same run (``{}``: every stored view)."""
        self.find_run: Callable[[str, Any], EarlierRun | None] | None = None
        """Set by the run engine: the finished run of (method, config) on this task, if any."""

    @property
    def val(self) -> SplitRef:
        """The selection split; reading it under ``--validation none`` is an error (nothing may select on val)."""
        if self._val is None:
            raise UsageError(
                "This fit reads the validation split, which --validation none withholds: drop the -o options "
                "that select on val (select=best, search=true, ...) or use --validation kshot or full"
            )
        return self._val

    @property
    def has_val(self) -> bool:
        """False under ``--validation none``."""
        return self._val is not None

    def restricted(
        self, classes: np.ndarray, *, train: SplitRef | None = None, val: SplitRef | None = None
    ) -> FitTask:
        """The same store and backbone, classifying only the store classes ``classes`` (relabelled 0..n-1).

        Without ``train``/``val`` the new task has empty ones (e.g. base-to-novel's novel classes, text only).
        """
        classes = np.asarray(classes, dtype=np.int64)
        names = tuple(self.store.manifest["dataset"]["classnames"][i] for i in classes)
        info = replace(self.info, classnames=names)
        empty = lambda s: SplitRef(s.name, s.pool, s.rows[:0], s.labels[:0], s.split_index[:0])  # noqa: E731
        task = FitTask(
            self.store,
            info,
            train=train or empty(self.train),
            val=val or (empty(self._val) if self._val is not None else None),
            device=self.device,
            memory_budget=self.memory_budget,
            classes=classes,
            view_counts=self.view_counts,
        )
        task._backbone, task.warnings = self._backbone, self.warnings
        return task

    def earlier_run(self, method: str, config) -> EarlierRun | None:
        """The finished run of ``method`` with the resolved ``config`` on this very task (``None``: none)."""
        return None if self.find_run is None else self.find_run(method, config)

    def warn(self, message: str) -> None:
        """Record a caveat in the run record (e.g. fewer cached views than epochs)."""
        if message not in self.warnings:
            self.warnings.append(message)

    def text(self, template_set: str = "tip") -> torch.Tensor:
        """Zero-shot class weights ``[C, D]`` (L2-normalised rows) for ``template_set``."""
        if template_set not in self._text:
            name = f"text/{template_set}"
            if not self.store.has(name):
                sets = sorted(n.split("/", 1)[1] for n in self.store.arrays if n.startswith("text/"))
                raise UsageError(f"Store has no template set '{template_set}'. Available: {', '.join(sets)}")
            text = torch.from_numpy(read_rows(self.store, name, None)).float()
            self._text[template_set] = text if self.classes is None else text[torch.from_numpy(self.classes)]
        return self._text[template_set]

    def text_raw(self, template_set: str) -> torch.Tensor:
        """Raw (un-normalised) per-template text embeddings ``[C, T, D]`` of ``template_set``."""
        name = per_template_name(template_set)
        if not self.store.has(name):
            self.text(template_set)  # names the sets there are when this one is not
            raise UsageError(
                f"Store has no raw per-template embeddings of '{template_set}' ({name}): extract with --for "
                "a method that declares them (clap, zs_lp, taskres, cross_modal, ape), or pick another templates"
            )
        return self._class_rows(name)

    def descriptions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-class mean of the L2-normalised ``--descriptions`` sentence embeddings ``[C, D]`` and sentence
        counts ``[C]``, or ``None`` when the store was extracted without a description file."""
        if not self.store.has(DESCRIPTIONS_MEAN):
            return None
        return self._class_rows(DESCRIPTIONS_MEAN), self._class_rows(DESCRIPTIONS_COUNT)

    def _class_rows(self, name: str) -> torch.Tensor:
        rows = torch.from_numpy(read_rows(self.store, name, None))
        return rows if self.classes is None else rows[torch.from_numpy(self.classes)]

    def num_views(self, policy: str) -> int:
        """Views per train image under ``policy`` the method reads (0 if the store has none)."""
        stored = int(self.store.manifest.get("views", {}).get(f"{self.train.pool}/{policy}", 0))
        return min(stored, self.view_counts.get(policy, stored))

    def views(
        self,
        split: SplitRef,
        *,
        policy: str = "center",
        taps: tuple[str, ...] = ("pooled",),
        views: int | None = None,
    ) -> ViewSource:
        """The ``taps`` of ``split`` under ``policy`` as batches (in memory when they fit): its first ``views``
        views (default: the method's :attr:`view_counts`)."""
        views = views or self.view_counts.get(policy)
        key = (split.pool, split.rows.tobytes(), policy, tuple(taps), views)
        if self._shared is not None and key in self._shared:
            return self._shared[key]
        source = open_views(
            self.store,
            split,
            policy=policy,
            taps=taps,
            views=views,
            memory_budget=self.memory_budget,
            device=self.device,
        )
        if self._shared is None:
            return source
        self._shared[key] = SharedBatches(source)
        return self._shared[key]

    def train_source(self, policy: str, *, taps: tuple[str, ...], epochs: int) -> ViewSource:
        """The train views a training loop cycles through: the method's declared views, or one per epoch when
        its schedule is longer and the store holds them. Records when views repeat across epochs."""
        declared = self.view_counts.get(policy)
        cycled = None if declared is None else max(declared, 1 + epochs)
        source = self.views(self.train, policy=policy, taps=taps, views=cycled)
        if policy != "center" and 0 < source.num_views - 1 < epochs:
            self.warn(
                f"{source.num_views - 1} cached '{policy}' views for {epochs} epochs: views repeat every "
                f"{source.num_views - 1} epochs (approximation of fresh augmentation, METHODS §1.6)"
            )
        return source

    @contextmanager
    def sharing_views(self) -> Iterator[None]:
        """Inside the block, equal ``views`` requests return one :class:`SharedBatches` (read once, held once)."""
        self._shared = {}
        try:
            yield
        finally:
            self._shared = None

    def center(self, split: SplitRef, tap: str = "pooled") -> torch.Tensor:
        """The center-view ``tap`` of every image of ``split``, float32 ``[N, ...]``, in memory."""
        source = self.views(split, policy="center", taps=(tap,))
        return source.batch(np.arange(len(split)))[tap].cpu()

    def train_views(self, policy: str, tap: str = "pooled", *, views: range | None = None) -> torch.Tensor:
        """Cached views of the train images under ``policy``, float32 ``[N, V, ...]`` (``views`` selects some)."""
        source = self.views(self.train, policy=policy, taps=(tap,))
        chosen = range(source.num_views) if views is None else views
        positions = np.arange(len(self.train))
        return torch.stack(
            [source.batch(positions, np.full(len(positions), v))[tap].cpu() for v in chosen], dim=1
        )

    def backbone(self):
        """The store's backbone re-loaded from its manifest (for methods that need the text encoder).

        Refuses when the loaded backbone does not fingerprint like the one the store was made with.
        """
        if self._backbone is None:
            meta = self.info.backbone
            # the store's own compute dtype where the device allows it (random-init identities hash the weights)
            fp16 = self.device.type == "cuda" and meta.get("compute_dtype") == "float16"
            precision = "fp16" if fp16 else "fp32"
            backbone = load_backbone(
                meta["arch"], meta["pretrained"], device=str(self.device), precision=precision
            )
            expected = self.store.manifest["fingerprint_parts"].get("backbone")
            if backbone.fingerprint_parts() != expected:
                raise StoreError(
                    f"The backbone {meta['arch']}/{meta['pretrained']} loaded now does not match the "
                    f"one store {self.store.root.name} was extracted with (weights or preprocessing "
                    "changed); extract again"
                )
            self._backbone = backbone
        return self._backbone
