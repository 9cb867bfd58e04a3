"""Stage two's shared machinery: cached tensors as batches, the view sampler, the one trainer."""

from .data import DEFAULT_MEMORY_BUDGET, MemoryViews, StoreViews, ViewSource, open_views
from .head import Head, seeded_init
from .sampler import ViewSampler, epoch_batches
from .settings import TrainSettings
from .task import EarlierRun, FitTask, TaskInfo
from .trainer import Member, Selector, SharedBatches, TrainData, TrainResult, cross_entropy, train, train_many

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "EarlierRun",
    "FitTask",
    "Head",
    "Member",
    "MemoryViews",
    "Selector",
    "SharedBatches",
    "StoreViews",
    "TaskInfo",
    "TrainData",
    "TrainResult",
    "TrainSettings",
    "ViewSampler",
    "ViewSource",
    "cross_entropy",
    "epoch_batches",
    "open_views",
    "seeded_init",
    "train",
    "train_many",
]
