"""Benchmark: a 24-configuration grid of SAFE or LDC on cached tensors vs re-encoding every step (official style).

Both sides run the same head code, the same random-weight backbone at its real size (RN50 or
ViT-B/16, ``pretrained="none"``: the compute of the real weights), the same few-shot images and the
same number of optimiser steps per configuration:

- cached (fsl-cache): one ``extract`` (1 + views per train image, center views of val and test), then
  the grid: LDC's 24 configurations (lr × weight decay × loss weights) through ``grid`` (groups of 8
  sharing the opened splits), SAFE's 24 (lr × wd) points in one ``fit safe`` call;
- official style (``ldc_train.py``; SAFE's training loop): every configuration is its own run whose
  training batches are freshly augmented images pushed through the frozen backbone at every step,
  and val (selection, searches) and test (final evaluation) are encoded whenever they are read.
  Implemented by handing the same method live sources (decode, transform, ``encode_taps``) instead of
  the cached ones, so only the re-encoding differs; the cached side also writes its run records.

Official runs are independent of the configuration, so ``--official-configs`` of them are timed and
the grid's total is the mean per-run time times the grid size (both numbers are printed).

    python benchmarks/grid_speed.py --method ldc --model RN50 [--classes 4] [--shots 4] [--epochs 2] [--fused]
    python benchmarks/grid_speed.py --method safe --model ViT-B-16 [--iterations 16] [--grid-chunk 1]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fit_speed import few_shot_images
from PIL import Image
from torchvision import transforms

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.evaluation.scoring import predict
from fsl_cache.methods import get_method
from fsl_cache.runs.request import task_info
from fsl_cache.splits.protocol import build_splits, test_split
from fsl_cache.store import FeatureStore
from fsl_cache.training import FitTask

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = {"ldc": (0.8, 1.0), "safe": (0.5, 1.0)}
"""[CODE] ldc_train.py RandomResizedCrop(scale=(0.8, 1)); SAFE: RandomResizedCrop at CLIP's default."""


class LiveViews:
    """A source that decodes, transforms and encodes its images at every batch (the official loop)."""

    def __init__(self, backbone, paths: list[Path], taps: tuple[str, ...], transform) -> None:
        self.backbone, self.paths, self.taps, self.transform, self.num_views = (
            backbone,
            paths,
            taps,
            transform,
            2,
        )
        self.encoded = 0

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, positions, views=None) -> dict[str, torch.Tensor]:
        images = torch.stack([self.transform(Image.open(self.paths[p]).convert("RGB")) for p in positions])
        self.encoded += len(positions)
        return {tap: t.float() for tap, t in self.backbone.encode_taps(images, self.taps).items()}


def official_transforms(method: str) -> tuple:
    """(train augmentation, evaluation preprocessing) of the official loop."""
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                224, scale=CROP_SCALE[method], interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    evaluation = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    return train, evaluation


def grid_options(method: str, args) -> list[dict]:
    """24 configurations: LDC lr × weight decay × loss weights; SAFE lr × wd (one fit trains them all)."""
    if method == "ldc":
        grid = itertools.product(
            (1e-4, 3e-4, 1e-3, 3e-3), (1e-4, 1e-3, 1e-2), ((1.0,) * 5, (1.0, 1.0, 1.0, 0.5, 0.5))
        )
        return [
            {
                "epochs": args.epochs,
                "batch_size": args.batch,
                "lr": lr,
                "weight_decay": wd,
                "loss_lambda": lam,
                "fused": args.fused,
            }
            for lr, wd, lam in grid
        ]
    lrs, wds = (1e-4, 1e-5, 1e-6, 1e-7), (0.0, 1e-3, 1e-5, 1e-4, 1e-2, 1e-1)
    return [
        {
            "iterations": args.iterations,
            "batch_size": args.batch,
            "eval_every": 0,
            "lrs": (lr,),
            "wds": (wd,),
            "grid_chunk": args.grid_chunk,
        }
        for lr, wd in itertools.product(lrs, wds)
    ]


def extract(root: Path, cache: Path, args) -> float:
    started = time.perf_counter()
    views = 1 + (args.epochs if args.method == "ldc" else 8)
    api.extract(
        f"imagefolder:{root}",
        model=args.model,
        pretrained="none",
        for_methods=[args.method],
        views=views,
        shots=(args.shots,),
        seeds=(1,),
        cache_dir=cache,
        workers=0,
        batch_size=32,
        progress=False,
    )
    return time.perf_counter() - started


def cached_grid(root: Path, cache: Path, runs: Path, configs: list[dict], args) -> float:
    started = time.perf_counter()
    common = dict(
        datasets=[f"imagefolder:{root}"],
        shots=[args.shots],
        seeds=[1],
        model=args.model,
        pretrained="none",
        cache_dir=cache,
        runs_dir=runs,
    )
    if args.method == "ldc":
        keys = sorted(configs[0])
        options = {k: sorted({c[k] for c in configs}, key=str) for k in keys}
        outcomes = api.grid(["ldc"], options=options, group_size=args.group_size, **common).outcomes
        assert len(outcomes) == len(configs) and all(o.status == "done" for o in outcomes), outcomes
    else:
        lrs = tuple(sorted({c["lrs"][0] for c in configs}))
        wds = tuple(sorted({c["wds"][0] for c in configs}))
        api.fit(
            "safe",
            dataset=common["datasets"][0],
            shots=args.shots,
            seeds=[1],
            model=args.model,
            pretrained="none",
            options={**configs[0], "lrs": lrs, "wds": wds},
            cache_dir=cache,
            runs_dir=runs,
            progress=False,
        )
    return time.perf_counter() - started


def official_run(store: FeatureStore, backbone, root: Path, config: dict, args) -> tuple[float, int]:
    """One configuration on freshly encoded images: training batches augmented and encoded at every step,
    val (selection, searches) and test (the final evaluation) encoded whenever they are read; returns
    (seconds, images encoded)."""
    started = time.perf_counter()
    info = task_info(store, shots=args.shots, seed=1, protocol="coop")
    cls = get_method(args.method).cls
    splits = build_splits(store, cls, shots=args.shots, seed=1, protocol="coop")
    task = FitTask(store, info, train=splits.train, val=splits.val)
    train_tf, eval_tf = official_transforms(args.method)
    live: list[LiveViews] = []

    def views(split, *, policy="center", taps=("pooled",)):
        paths = [root / p for p in store.read(f"images/{split.pool}/paths", split.rows)]
        live.append(LiveViews(backbone, paths, tuple(taps), train_tf if split is task.train else eval_tf))
        return live[-1]

    task.views = views
    method = cls(get_method(args.method).create(config).resolve(info))
    fitted = method.fit(task, generator=torch.Generator().manual_seed(1))
    predict(fitted.head, views(test_split(store), taps=fitted.head.inputs))
    return time.perf_counter() - started, sum(v.encoded for v in live)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=("ldc", "safe"), default="ldc")
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="LDC epochs per configuration")
    parser.add_argument("--iterations", type=int, default=16, help="SAFE iterations per configuration")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="LDC configurations trained in lockstep")
    parser.add_argument(
        "--fused", action="store_true", help="LDC's fused exact adapters (-o fused=true) on both sides"
    )
    parser.add_argument(
        "--grid-chunk",
        type=int,
        default=0,
        help="SAFE grid points stacked per pass (0: all 24; 1: one at a time, often faster on CPU)",
    )
    parser.add_argument("--official-configs", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)  # the official loop draws its augmentations from the global RNG
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = few_shot_images(work, classes=args.classes, shots=args.shots)
        configs = grid_options(args.method, args)
        load = os.getloadavg()
        extract_s = extract(root, work / "cache", args)
        grid_s = cached_grid(root, work / "cache", work / "runs", configs, args)
        backbone = load_backbone(args.model, "none")
        store = FeatureStore.open(next((work / "cache").glob("*/*")))
        try:
            official = [
                official_run(store, backbone, root, c, args) for c in configs[: args.official_configs]
            ]
        finally:
            store.close()
        report(args, configs, extract_s, grid_s, official, load)


def report(args, configs, extract_s: float, grid_s: float, official: list[tuple[float, int]], load) -> None:
    per_run = float(np.mean([s for s, _ in official]))
    if args.method == "ldc":
        steps = f"{args.epochs} epochs{', fused adapters' if args.fused else ''}"
    else:
        steps = f"{args.iterations} iterations, grid_chunk {args.grid_chunk}"
    print(
        f"{args.method} on {args.model} (random weights, 224 px), {args.classes} classes x {args.shots} shots, "
        f"batch {args.batch}, {steps} per configuration, torch threads {torch.get_num_threads()}, "
        f"load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        f"cached:   extract {extract_s:.1f} s once + {len(configs)}-configuration grid {grid_s:.1f} s "
        f"= {extract_s + grid_s:.1f} s"
    )
    timed = ", ".join(f"{s:.1f} s ({n} images encoded)" for s, n in official)
    print(
        f"official: {per_run:.1f} s per configuration (timed: {timed}); "
        f"x{len(configs)} = {per_run * len(configs):.1f} s"
    )
    print(
        f"ratio (official / cached, {len(configs)} configurations): "
        f"{per_run * len(configs) / (extract_s + grid_s):.2f}x"
    )


if __name__ == "__main__":
    main()
