"""The method contract: a small class registered by name that fits a head on cached tensors.

A method declares its ``name``, ``description``, ``Config`` (the ``-o`` options), its deviations
from the official code, what ``--protocol paper`` changes, and its setting under ``--validation none``
(``validation_free``: the ``-o`` options of its official validation-free setting, or why it has none).
Gradient-based methods implement :meth:`Method.build_head` (and, if needed,
:meth:`~Method.train_settings`, :meth:`~Method.loss`, :meth:`~Method.finalize`); the shared trainer
does the rest. Closed-form or search-based methods
override :meth:`Method.fit`. A method also says what it reads from the store (``needed``, or
:meth:`Method.needs` when it depends on the dataset), which is all ``extract --for`` writes, and
how its fitted head is rebuilt from the run's saved tensors (:meth:`Method.rebuild_head`), which is
all ``predict`` and ``export`` need.

A new method is one module in this package (found automatically) plus its test::

    @dataclass(frozen=True)
    class MyConfig(TrainOptions):
        epochs: int = 30
        \"\"\"Passes over the support set.\"\"\"

    @register_method
    class MyMethod(Method):
        name, description, Config = "my_method", "What it does (METHODS §x).", MyConfig
        deviations = ("[PROPOSED] how it differs from the official code.",)
        validation_free = ValidationFree("last epoch, as the official code", {"select": "last"})
        needed = Needs(train_views=(ViewNeed("tip", 31, ("pooled",)),))  # 1 + epochs tip views

        @classmethod
        def rebuild_head(cls, bundle, state, backbone):
            return MyHead(state["text"], scale=float(state["scale"]))  # tensors of saved_state()

        def build_head(self, task, *, generator):
            with seeded_init(generator):  # default inits drawn from the run's generator
                return MyHead(task.text("tip"), scale=task.info.zs_scale)

        def train_settings(self, task):
            return self.config.train_settings(policy="tip")  # which cached views train it
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..training import (
    FitTask,
    Head,
    Member,
    Selector,
    TaskInfo,
    TrainData,
    TrainResult,
    TrainSettings,
    train_many,
)
from ..training.trainer import cross_entropy
from .needs import Needs
from .options import MethodConfig, TrainOptions


@dataclass(frozen=True)
class ValidationFree:
    """What a method does under ``--validation none`` (no val split is read), declared once on its class."""

    setting: str
    """The setting and its source ([CODE]/[PAPER]/[PROPOSED]); or, when ``options`` is ``None``, why there is none."""
    options: Mapping[str, Any] | None = field(default_factory=dict)
    """``-o`` options that give the setting (the user's own ``-o`` come on top); ``None``: the method has no
    validation-free setting and ``--validation none`` is refused."""

    @property
    def exists(self) -> bool:
        return self.options is not None


@dataclass
class FitResult:
    """What a method hands back: the fitted head and how its choices were made."""

    head: Head
    selection: dict = field(default_factory=dict)
    """Chosen hyper-parameters / epoch and the selection scores behind them (for the run record)."""
    history: list[dict] = field(default_factory=list)
    """Per-epoch (or per-evaluation) training log."""
    paper_test_acc: float | None = None
    """[paper protocol] The test number the official code prints, when it is not the final head's
    accuracy (Tip-Adapter-F prints max(best oracle epoch, final))."""


class Method:
    """Base class of every method. Subclass, set the class attributes, decorate with ``@register_method``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    deviations: ClassVar[tuple[str, ...]] = ()
    """Every way this implementation differs from the official code, each tagged [CODE]/[PROPOSED]."""
    paper_protocol: ClassVar[str] = "Same as coop: the official code has no selection quirk to reproduce."
    validation_free: ClassVar[ValidationFree] = ValidationFree(
        "no validation-free setting declared", options=None
    )
    """The method under ``--validation none`` (``fsl-cache methods`` shows it); it reads no val there."""
    paper_full_val: ClassVar[bool] = False
    """Under ``--protocol paper``, select on the whole val split (when the store holds ``val_full``)."""
    paper_test_oracle: ClassVar[bool] = False
    """Under ``--protocol paper``, the method receives the test split as ``task.oracle``."""
    paper_sampling: ClassVar[str] = "coop"
    """Under ``--protocol paper``: ``coop`` (the store's CoOp splits) or ``lpclip`` (CoOp lpclip's np sampling)."""
    min_views: ClassVar[dict[str, int]] = {}
    """Fewest cached views per policy the method can run with at all (more are wanted: see needs)."""
    needs_backbone: ClassVar[bool] = False
    """The method runs part of the backbone online (CoOp's text encoder) via ``task.backbone()``."""
    trains: ClassVar[bool] = True
    """Whether the method runs the shared trainer (``fsl-cache methods`` shows it)."""
    base2novel: ClassVar[bool] = False
    """The method can classify classes it never trained on (``--protocol base2novel``): it overrides
    :meth:`novel_head`."""
    builds_on: ClassVar[str] = ""
    """A method whose finished run (with :meth:`earlier_config`) this one starts from when one exists on
    the same task, instead of repeating it (SAFE-A: SAFE); ``grid`` runs that method first."""

    needed: ClassVar[Needs] = Needs()
    """What the method reads from the store; stage one writes exactly this for ``--for NAME``."""
    quick: ClassVar[dict[str, Any]] = {}
    """``-o`` options that make a fit take seconds (smoke runs and the registry-wide contract tests)."""

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def needs(cls, dataset: str = "", options: dict | None = None) -> Needs:
        """Cached tensors this method reads on ``dataset`` with the ``-o`` ``options`` (override when view counts
        follow the dataset or an option adds a tap)."""
        return cls.needed

    @classmethod
    def rebuild_head(cls, bundle, state: dict[str, torch.Tensor], backbone: Callable[[], Any]) -> Head:
        """The fitted head for ``predict``/``export``, in its class but not yet loaded with ``state``.

        ``state`` holds the tensors :meth:`Head.saved_state` wrote, ``bundle.meta`` the run's config,
        class names, tap shapes and backbone, and ``backbone()`` re-loads the (fingerprint-checked)
        backbone for frozen parts a head does not save. The caller loads ``state`` into the head strictly.
        """
        raise NotImplementedError(f"{cls.__name__} must override rebuild_head() for predict and export")

    def resolve(self, info: TaskInfo) -> MethodConfig:
        """The config with per-dataset / per-shot defaults filled in (what the run fingerprint hashes)."""
        return self.config

    def earlier_config(self) -> MethodConfig | None:
        """The config of the :attr:`builds_on` run this fit can start from (``None``: it builds on none)."""
        return None

    # ------------------------------------------------------------------ the default, trained path

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        """Build the head, train it with the shared trainer, select on val, then :meth:`finalize`."""
        result = train_many([self.trainee(task, generator=generator)], device=task.device)[0]
        return self.finalize(result, task)

    def trainee(self, task: FitTask, *, generator: torch.Generator) -> Member:
        """The untrained head and everything the shared trainer needs for it (the default :meth:`fit`)."""
        head = self.build_head(task, generator=generator)
        settings = self.train_settings(task)
        source = task.train_source(settings.policy, taps=head.inputs, epochs=settings.epochs)
        return Member(
            head,
            TrainData(source, task.train.labels),
            settings,
            generator,
            None if settings.select == "last" else self.selector(task, head),
            self.loss,
        )

    def build_head(self, task: FitTask, *, generator: torch.Generator) -> Head:
        """The untrained head (build modules inside :func:`seeded_init` so init follows ``generator``)."""
        raise NotImplementedError(f"{type(self).__name__} must override fit() or build_head()")

    def train_settings(self, task: FitTask) -> TrainSettings:
        if not isinstance(self.config, TrainOptions):
            raise NotImplementedError(f"{type(self).__name__} must override train_settings()")
        return self.config.train_settings()

    def selector(self, task: FitTask, head: Head) -> Selector | None:
        """Model selection on the selection split (center view); ``None`` when the method keeps its last
        state (``select=last``), which reads no val. Override for other rules."""
        if self.train_settings(task).select == "last":
            return None
        return Selector(task.views(task.val, taps=head.inputs), task.val.labels, name=task.val.name)

    def loss(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return cross_entropy(outputs, labels)

    def novel_head(self, fitted: FitResult, task: FitTask) -> Head:
        """[base2novel] A head over the novel classes of ``task`` (``task.text()`` holds their weights) built
        from the head fitted on the base classes. Only methods with ``base2novel = True`` implement it."""
        raise NotImplementedError(f"{self.name} cannot classify classes it was not trained on")

    def finalize(self, result: TrainResult, task: FitTask) -> FitResult:
        """After training: post-hoc searches (e.g. Tip's alpha/beta on val). Default: keep the head."""
        return FitResult(
            result.head,
            selection={"epoch": result.best_epoch, "val_acc": result.best_score},
            history=result.history,
        )


def fit_together(methods: list[Method], task: FitTask, *, seed: int) -> list[FitResult]:
    """Fit several configurations on one task; equal to ``m.fit(task, generator=seeded(seed))`` for each.

    Methods on the default trained path share the opened splits. When their train views stream from
    the store they train in lockstep (:func:`~fsl_cache.training.train_many`), reading each batch once
    for all; views held in memory cost only a gather, so those fits run one after another, which keeps
    each head's weights in cache (LDC-RN50 heads in lockstep measured 0.75 s per step against 0.53 s
    alone on the CPU). Methods with their own :meth:`Method.fit` run one after another.
    """
    if not all(type(m).fit is Method.fit for m in methods):
        return [m.fit(task, generator=torch.Generator().manual_seed(seed)) for m in methods]
    with task.sharing_views():
        first = methods[0].trainee(task, generator=torch.Generator().manual_seed(seed))
        if not first.data.source.streams:
            fitted = [methods[0].finalize(train_many([first], device=task.device)[0], task)]
            return fitted + [m.fit(task, generator=torch.Generator().manual_seed(seed)) for m in methods[1:]]
        members = [first] + [
            m.trainee(task, generator=torch.Generator().manual_seed(seed)) for m in methods[1:]
        ]
        results = train_many(members, device=task.device)
        return [m.finalize(r, task) for m, r in zip(methods, results)]
