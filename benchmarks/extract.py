"""Extraction throughput vs a pure ``forward_intermediates`` pass, and storage cost per view and codec.

Measured in one process, interleaved round by round, on the real RN50 and ViT-B/16 architectures
with random weights (the same compute as pretrained ones), over the same images:

- ``extract ÷ forward``: images/s of the extraction path (decode, render, encode, zero-shot logits,
  fp16 cast, digests, store writes) over images/s of decode + preprocess + ``encode_taps`` alone,
  the latter timed on the main thread and on a helper thread (where extraction runs its forwards);
  the faster one counts. Target ≥ 0.90.
- bytes per image per view of every array, and the compression ratio and single-core encode speed
  of each codec considered on the maps this run produced.

Usage: ``python benchmarks/extract.py [--images 32] [--rounds 3] [--models RN50,ViT-B-16]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsl_cache.backbones.encoder import Encoder
from fsl_cache.backbones.views import ViewRenderer
from fsl_cache.datasets import open_image
from fsl_cache.extraction import ExtractOptions, prepare_extraction
from fsl_cache.extraction.runner import RunStats, run_job
from fsl_cache.store.store import StoreWriter


def make_images(root: Path, n: int) -> None:
    """An imagefolder with ``n`` test images (256×192 JPEG, like a small photo) and 1 train/val image per class."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 1), ("val", 1), ("test", n // 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def pure_forward(bb, paths: list[Path], taps: tuple[str, ...], batch: int) -> float:
    """Seconds for decode + preprocess + ``encode_taps`` over ``paths``."""
    renderer = ViewRenderer(bb.preprocess_cfg)
    started = time.perf_counter()
    for first in range(0, len(paths), batch):
        x = torch.stack([renderer.center(open_image(p)) for p in paths[first : first + batch]])
        bb.encode_taps(x.to(bb.dtype), taps)
    return time.perf_counter() - started


def extraction(prepared, job, batch: int, store_dir: Path) -> float:
    """Seconds :func:`run_job` spends on ``job``, written into a fresh store at ``store_dir``."""
    writer = StoreWriter(store_dir, fmt=prepared.options.format, manifest=prepared.manifest)
    text = {
        n: prepared.backbone.text_classifier(list(prepared.spec.classnames), list(t))
        for n, t in prepared.spec.templates.items()
    }
    stats = RunStats()
    run_job(
        job,
        spec=prepared.spec,
        writer=writer,
        encoder=Encoder(prepared.backbone, text, np.dtype(np.float16)),
        renderer=ViewRenderer(prepared.backbone.preprocess_cfg),
        aug_seed=0,
        batch_size=batch,
        workers=0,
        skip_bad=False,
        stats=stats,
        advance=lambda n: None,
    )
    writer.close()
    return stats.seconds


def codec_ratios(data: np.ndarray) -> dict[str, tuple[float, float]]:
    """``{codec: (compression ratio, encode MB/s on one core)}`` for one sample of an array."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    encoders = {
        "zstd-1": numcodecs.Zstd(level=1).encode,
        "zstd--1": numcodecs.Zstd(level=-1).encode,
        "lz4+shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE, typesize=2).encode,
        "gzip-1+shuffle (hdf5)": lambda b: numcodecs.GZip(1).encode(numcodecs.Shuffle(2).encode(b)),
    }
    raw = data.tobytes()
    out = {}
    for name, encode in encoders.items():
        started = time.perf_counter()
        encoded = encode(raw)
        out[name] = len(raw) / len(encoded), len(raw) / (time.perf_counter() - started) / 1e6
    return out


def bench(model: str, images: int, batch: int, rounds: int, tmp: Path) -> None:
    torch.manual_seed(0)
    root = tmp / "imgs"
    if not root.exists():
        make_images(root, images)
    for_methods = ["ldc"] if model.startswith("RN") else ["ldc", "safe"]
    prepared = prepare_extraction(
        f"imagefolder:{root}",
        root=None,
        model=model,
        pretrained="none",
        cache_dir=tmp / f"cache-{model}",
        options=ExtractOptions(for_methods=tuple(for_methods), workers=0, shots=(1,), seeds=(1,)),
    )
    job = next(j for j in prepared.plan.jobs if j.pool.name == "test")
    paths = [prepared.spec.path("test", int(i)) for i in job.pool.indices]
    bb = prepared.backbone
    load = os.getloadavg()
    seconds = {"main": 0.0, "helper": 0.0, "extraction": 0.0}
    with ThreadPoolExecutor(1) as pool:
        sides = {
            "main": lambda r: pure_forward(bb, paths, job.taps, batch),
            # extraction runs its forwards on a helper thread: time a pure forward there too
            "helper": lambda r: pool.submit(pure_forward, bb, paths, job.taps, batch).result(),
            "extraction": lambda r: extraction(
                prepared, job, batch, prepared.store_dir.with_name(f"{prepared.store_dir.name}-{r}")
            ),
        }
        for side in sides.values():  # warm-up: the first full pass on a thread ran 1.5-3x slower here
            side("warm")
        order = list(sides)
        for r in range(rounds):  # interleaved and rotated, so all sides see the same load from other jobs
            for side in order[r % 3 :] + order[: r % 3]:
                seconds[side] += sides[side](r)
    main, helper, ext = seconds.values()
    n = len(paths) * rounds
    fwd = min(main, helper)
    print(f"\n== {model} (random weights), {len(paths)} images x {rounds} rounds, taps {', '.join(job.taps)}")
    print(
        f"load average before / after: {' '.join(f'{x:.1f}' for x in load)} / "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"pure forward_intermediates: {n / main:7.2f} img/s on the main thread, {n / helper:7.2f} on a helper thread"
    )
    print(
        f"extraction:                 {n / ext:7.2f} img/s   "
        f"ratio extract/(faster forward) = {fwd / ext:.3f} (target >= 0.90)"
    )
    print(
        f"{'array':<40} {'bytes/img/view':>15} {'codec':>8}   codecs considered: ratio @ encode speed, one core"
    )
    from fsl_cache.store.backend import open_backend

    backend = open_backend(prepared.store_dir.with_name(f"{prepared.store_dir.name}-0"), "zarr", mode="r")
    for spec in job.arrays:
        per_view = spec.nbytes // (spec.shape[0] * spec.shape[1])
        sample = np.asarray(backend.open(spec.name)[: min(8, spec.shape[0])])
        ratios = (
            codec_ratios(sample) if sample.dtype == np.float16 and per_view >= 1 << 16 else {}
        )  # maps, tokens
        text = "  ".join(f"{k} {ratio:.2f}x @{speed:.0f} MB/s" for k, (ratio, speed) in ratios.items())
        print(f"{spec.name.split('/views/center/')[-1]:<40} {per_view:>15,} {spec.codec:>8}   {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--models", default="RN50,ViT-B-16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved forward / extraction rounds")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            bench(model, args.images, args.batch, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
