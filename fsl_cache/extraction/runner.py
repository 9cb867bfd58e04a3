"""Run an extraction plan: decode and augment in loader workers, encode, write shard by shard.

Batches never cross shard boundaries and each view's augmentation is seeded by its own identity,
so a resumed run computes every remaining shard exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..backbones.encoder import Encoder
from ..backbones.views import ViewRenderer, sample_params
from ..datasets import BadImageError, DatasetSpec, open_image
from ..errors import DatasetError
from ..interrupts import die_with_parent
from ..store.quantise import quantise
from ..store.store import ShardBlocks, StoreWriter
from .plan import SHARD_SAMPLES, Job


@dataclass
class RunStats:
    images: int = 0
    seconds: float = 0.0
    skipped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class ViewDataset(Dataset):
    """Row ``r`` of a job's pool → its ``V`` rendered views and their parameters."""

    def __init__(self, spec: DatasetSpec, job: Job, renderer: ViewRenderer, *, seed: int) -> None:
        self.spec, self.job, self.renderer, self.seed = spec, job, renderer, seed

    def __len__(self) -> int:
        return self.job.pool.size

    def __getitem__(self, row: int):
        index = int(self.job.pool.indices[row])
        path = self.spec.path(self.job.pool.split, index)
        views = self.job.views
        try:
            img = open_image(path)
        except BadImageError as err:
            # Raised here it would lose its type across the worker boundary; the main process decides.
            blank = torch.zeros(views, 3, self.renderer.size, self.renderer.size)
            return row, blank, np.zeros((views, 5), np.int32), str(err)
        policy = self.job.custom_policy or self.job.policy
        params = sample_params(
            policy,
            views=views,
            width=img.width,
            height=img.height,
            seed=self.seed,
            split=self.job.pool.split,
            index=index,
        )
        return row, self.renderer.render(img, params, policy=policy), params, ""


class ShardBatchSampler(Sampler):
    """Batches of rows that stay inside one shard, over the shards still to do."""

    def __init__(self, job: Job, shards: list[int], samples_per_batch: int) -> None:
        self.job, self.shards, self.step = job, shards, samples_per_batch

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            start, stop = self.job.shard_rows(shard)
            for first in range(start, stop, self.step):
                yield list(range(first, min(first + self.step, stop)))

    def __len__(self) -> int:
        sizes = [stop - start for start, stop in map(self.job.shard_rows, self.shards)]
        return sum(-(-size // self.step) for size in sizes)


def _init_worker(parent: int, worker_id: int) -> None:
    """Decoding workers hold nothing to clean up, so they follow the main process: it stops them on
    Ctrl-C or SIGTERM (a worker that died of the signal first would make torch raise in the main
    process), and the kernel kills them when it dies, instead of them decoding on for seconds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)
    sys.excepthook = partial(_quiet_hand_over_errors, sys.excepthook)


def _quiet_hand_over_errors(default, kind, value, traceback) -> None:
    """A worker hands batches to the main process over a socket (multiprocessing's resource sharer, whose
    thread reports through ``sys.excepthook``); when the main process stops mid hand-over that socket breaks,
    which is the stop working, not an error to print under the main process's clean exit message. A real
    failure of a worker reaches the main process through the loader."""
    if not issubclass(kind, (OSError, EOFError)):
        default(kind, value, traceback)


def _collate(batch):
    rows, views, params, errors = zip(*batch)
    return list(rows), torch.stack(views), np.stack(params), list(errors)


def run_job(
    job: Job,
    *,
    spec: DatasetSpec,
    writer: StoreWriter,
    encoder: Encoder,
    renderer: ViewRenderer,
    aug_seed: int,
    batch_size: int,
    workers: int,
    skip_bad: bool,
    stats: RunStats,
    advance: Callable[[int], None],
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Compute and write every unfinished shard of ``job`` that this rank owns."""
    shards = [s for s in range(job.num_shards) if s % world_size == rank and not writer.is_done(job.id, s)]
    if not shards:
        return
    for spec_ in job.arrays:
        writer.create(spec_)
    by_suffix = {a.name.split(f"/views/{job.policy}/", 1)[1]: a for a in job.arrays}
    per_batch = max(1, batch_size // job.views)
    loader = DataLoader(
        ViewDataset(spec, job, renderer, seed=aug_seed),
        batch_sampler=ShardBatchSampler(job, shards, per_batch),
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        worker_init_fn=partial(_init_worker, os.getpid()),
    )
    blocks: ShardBlocks | None = None
    started = time.perf_counter()
    with closing(_encoded_ahead(loader, encoder, job.taps)) as batches:
        for (rows, views, params, errors), out in batches:
            shard = rows[0] // SHARD_SAMPLES
            if blocks is None or blocks.marker.shard != shard:
                blocks = writer.begin_shard(job.id, shard, *job.shard_rows(shard))
            blocks.marker.skipped += _check_errors(job, rows, errors, skip_bad=skip_bad, stats=stats)
            b, v = views.shape[:2]
            for name, data in out.items():
                data, spec_ = data.reshape((b, v) + data.shape[1:]), by_suffix[name]
                if spec_.dtype == "int8":  # --dense-precision int8: codes, and their scales beside them
                    scales = by_suffix[f"scale/{name}"]
                    data, per_channel = quantise(data, scales.shape[2:])
                    blocks.write(scales, rows[0], per_channel)
                blocks.write(spec_, rows[0], data)
            if "aug_params" in by_suffix:
                blocks.write(by_suffix["aug_params"], rows[0], params)
            stats.images += b * v
            advance(b * v)
            if rows[-1] + 1 == blocks.marker.stop:
                writer.commit(blocks.finish())
                blocks = None
    stats.seconds += time.perf_counter() - started


class _Abandoned(Exception):
    """Raised inside a forward that nobody will wait for."""


def _encoded_ahead(loader: Iterable, encoder: Encoder, taps: tuple[str, ...]) -> Iterator[tuple[tuple, dict]]:
    """``(batch, encoder output)`` in loader order; batch k+1's forward runs on a helper thread
    while the caller writes batch k (close the generator when done with it).

    Writing RN50 maps through zarr (chunk copies, zstd-1, CRC32C, files) cost ~8 ms/img on top of
    ~67 ms/img of forward on 2 cores, all of it between forwards. Every store write and commit stays
    on the caller's (main) thread, so Ctrl-C and the kill tests' fault points land where they did;
    the helper only computes. On exit the helper's forward is abandoned at its next module call,
    so an interrupt does not wait for a whole batch.
    """
    stop = threading.Event()
    hooks = _abandon_when(stop, encoder.backbone.model)
    pool = ThreadPoolExecutor(1, thread_name_prefix="fsl-cache-encode")
    try:
        pending = None
        for batch in loader:
            ahead = batch, pool.submit(encoder, batch[1].flatten(0, 1), taps)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = ahead
        if pending is not None:
            yield pending[0], pending[1].result()
    finally:
        stop.set()
        pool.shutdown(wait=True)  # milliseconds: a running forward stops at its next module
        for hook in hooks:
            hook.remove()


def _abandon_when(stop: threading.Event, model: torch.nn.Module) -> list:
    """Hooks that make a forward of ``model`` raise :class:`_Abandoned` at its next module once ``stop`` is set."""

    def check(module, args) -> None:
        if stop.is_set():
            raise _Abandoned

    return [module.register_forward_pre_hook(check) for module in model.modules()]


def _check_errors(
    job: Job, rows: list[int], errors: list[str], *, skip_bad: bool, stats: RunStats
) -> list[int]:
    """The split indices of the unreadable images in the batch (an error unless ``skip_bad``)."""
    found = []
    for row, error in zip(rows, errors):
        if not error:
            continue
        if not skip_bad:
            raise DatasetError(f"{error} (pass --skip-bad to skip unreadable images and record them)")
        skipped = stats.skipped.setdefault(job.pool.name, [])
        index = int(job.pool.indices[row])
        found.append(index)
        if index not in skipped:
            skipped.append(index)
    return found
