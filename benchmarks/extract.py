"""Extraction throughput vs a pure ``forward_intermediates`` pass, and storage cost per view and codec.

Measured side by side in one run, on the real RN50 and ViT-B/16 architectures with random weights
(the same compute as pretrained ones), over the same images:

- ``extract ÷ forward``: images/s of the extraction path (decode, render, encode, zero-shot logits,
  fp16 cast, digests, store writes) over images/s of decode + preprocess + ``encode_taps`` alone.
  Target ≥ 0.90.
- bytes per image per view of every array, and the compression ratio of each codec considered on
  the maps this run produced (zstd-1, blosc-lz4 + bitshuffle, HDF5 gzip-1 + shuffle, none).

Usage: ``python benchmarks/extract.py [--images 32] [--models RN50,ViT-B-16]`` (a few minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsl_cache.extraction import ExtractOptions, ViewRenderer, prepare_extraction
from fsl_cache.extraction.run import Encoder, RunStats, run_job
from fsl_cache.datasets import open_image
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
    renderer = ViewRenderer(bb.preprocess_cfg)
    started = time.perf_counter()
    for first in range(0, len(paths), batch):
        x = torch.stack([renderer.center(open_image(p)) for p in paths[first : first + batch]])
        bb.encode_taps(x.to(bb.dtype), taps)
    return len(paths) / (time.perf_counter() - started)


def extraction(prepared, batch: int) -> tuple[float, object]:
    job = next(j for j in prepared.plan.jobs if j.pool.name == "test")
    writer = StoreWriter(prepared.store_dir, fmt=prepared.options.format, manifest=prepared.manifest)
    text = {n: prepared.backbone.text_classifier(list(prepared.spec.classnames), list(t)) for n, t in prepared.spec.templates.items()}
    stats = RunStats()
    run_job(job, spec=prepared.spec, writer=writer, encoder=Encoder(prepared.backbone, text, np.dtype(np.float16)),
            renderer=ViewRenderer(prepared.backbone.preprocess_cfg), aug_seed=0, batch_size=batch, workers=0,
            skip_bad=False, stats=stats, advance=lambda n: None)
    writer.close()
    return stats.images_per_s, job


def codec_ratios(data: np.ndarray) -> dict[str, float]:
    import numcodecs

    raw = data.tobytes()
    out = {"none": 1.0}
    out["zstd-1"] = len(raw) / len(numcodecs.Zstd(level=1).encode(raw))
    out["blosc-lz4+bitshuffle"] = len(raw) / len(numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE, typesize=2).encode(raw))
    out["gzip-1+shuffle (hdf5)"] = len(raw) / len(numcodecs.GZip(1).encode(numcodecs.Shuffle(2).encode(raw)))
    return out


def bench(model: str, images: int, batch: int, tmp: Path) -> None:
    torch.manual_seed(0)
    root = tmp / "imgs"
    if not root.exists():
        make_images(root, images)
    for_methods = ["ldc"] if model.startswith("RN") else ["ldc", "safe"]
    prepared = prepare_extraction(f"imagefolder:{root}", root=None, model=model, pretrained="none",
                                  cache_dir=tmp / f"cache-{model}", options=ExtractOptions(for_methods=tuple(for_methods), workers=0, shots=(1,), seeds=(1,)))
    job = next(j for j in prepared.plan.jobs if j.pool.name == "test")
    paths = [prepared.spec.path("test", int(i)) for i in job.pool.indices]
    bb = prepared.backbone
    pure_forward(bb, paths[:batch], job.taps, batch)  # warm-up
    fwd = pure_forward(bb, paths, job.taps, batch)
    ext, _ = extraction(prepared, batch)
    print(f"\n== {model} (random weights), {len(paths)} images, taps {', '.join(job.taps)}")
    print(f"pure forward_intermediates: {fwd:7.2f} img/s")
    print(f"extraction:                 {ext:7.2f} img/s   ratio extract/forward = {ext / fwd:.3f} (target >= 0.90)")
    print(f"{'array':<40} {'bytes/img/view':>15}   codec ratios")
    from fsl_cache.store.backend import open_backend

    backend = open_backend(prepared.store_dir, "zarr", mode="r")
    for spec in job.arrays:
        per_view = spec.nbytes // (spec.shape[0] * spec.shape[1])
        sample = np.asarray(backend.open(spec.name)[: min(8, spec.shape[0])])
        ratios = codec_ratios(sample) if sample.dtype == np.float16 else {}
        text = "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if k != "none")
        print(f"{spec.name.split('/views/center/')[-1]:<40} {per_view:>15,}   {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--models", default="RN50,ViT-B-16")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            bench(model, args.images, args.batch, Path(tmp))


if __name__ == "__main__":
    main()
