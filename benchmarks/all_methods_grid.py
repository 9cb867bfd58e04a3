"""Benchmark: one grid over every registered method × shots 1/2/4/8/16 × seeds 1-3 on one store, against
what the official loops spend per run.

- cached (fsl-cache): one ``extract --for`` every method (the shots and seeds asked, every view any method
  reads), then one ``grid`` over all of them. During the grid the backbone's image encoder is wrapped
  with a counter: it must stay at 0 (the text encoder still runs for the prompt methods, as it must).
- official loops: each run of the official code is its own process that loads the backbone and encodes
  what it reads: its train images once per augmented view it uses (Tip-Adapter's 10 cache views,
  CLAP's 20, ProLIP's 300, ...), the val images it selects on and the test images. That is a *lower
  bound*: the loops that re-augment every epoch (CoOp, CLIP-Adapter, LDC, SAFE, TaskRes, CAPT) encode
  their train images once per epoch, not once per view. The head's own time is the same on both sides
  (taken from the run records), so the official estimate is
  ``Σ_runs (record's fit time + encoded images × measured seconds per image)``.

The seconds per image are measured here on the same images through the same preprocessing (decode,
resize/crop, normalise, forward), batch 32. Methods run with their ``quick`` options (few epochs) so
that 24 methods × 15 runs fit in minutes on 2 cores; longer schedules raise both sides by the same head
time, so the ratio printed is the one for short schedules (the least favourable to the cache).

    python benchmarks/all_methods_grid.py [--model fsl-tiny-rn] [--validation kshot]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.backbones.backbone import Backbone
from fsl_cache.backbones.views import ViewRenderer
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.methods import get_method, list_methods

SHOTS, SEEDS = (1, 2, 4, 8, 16), (1, 2, 3)


def quick_options(methods: list[str]) -> dict[str, list]:
    return {f"{m}.{k}": [v] for m in methods for k, v in get_method(m).cls.quick.items()}


def seconds_per_image(model: str, paths: list[Path], batch: int = 32) -> float:
    """Decode, preprocess and encode ``paths`` (pooled embedding), as an official loop does per image."""
    backbone = load_backbone(model, "none")
    center = ViewRenderer(backbone.preprocess_cfg).center
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            images = torch.stack([center(Image.open(p).convert("RGB")) for p in paths[i : i + batch]])
            backbone.encode_taps(images, ("pooled",))
    return (time.perf_counter() - started) / len(paths)


def official_images(record: dict) -> int:
    """Images one official run encodes (lower bound): train × views it reads, val if it selects, test."""
    method, splits = record["method"], record["splits"]
    needs = get_method(method).needs(record["dataset"], record.get("options") or {})
    train_views = sum(v.views for v in needs.train_views) or (0 if method == "zero_shot" else 1)
    val = splits.get("val") or {}
    return (
        len(splits["train"]["split_index"]) * train_views
        + len(val.get("split_index", ())) * (val != {})
        + splits["test"]["n"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fsl-tiny-rn")
    parser.add_argument("--validation", default=None, choices=["none", "kshot", "full"])
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else list_methods()
    if args.validation == "none":
        methods = [m for m in methods if get_method(m).cls.validation_free.exists]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {len(methods)} methods")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_demo_dataset(root / "demo")
        common = dict(model=args.model, pretrained="none", cache_dir=root / "cache")
        started = time.perf_counter()
        api.extract(
            f"imagefolder:{data}",
            for_methods=methods,
            shots=SHOTS,
            seeds=SEEDS,
            workers=0,
            progress=False,
            **common,
        )
        extract_s = time.perf_counter() - started

        encoded = [0]
        encode = Backbone.encode_taps

        def counting(self, images, taps):
            encoded[0] += len(images)
            return encode(self, images, taps)

        Backbone.encode_taps = counting
        started = time.perf_counter()
        result = api.grid(
            methods,
            datasets=[f"imagefolder:{data}"],
            shots=SHOTS,
            seeds=SEEDS,
            options=quick_options(methods),
            validation=args.validation,
            extract=False,
            runs_dir=root / "runs",
            **common,
        )
        grid_s = time.perf_counter() - started
        Backbone.encode_taps = encode

        records = [json.loads(p.read_text()) for p in (root / "runs").glob("*/*/*/*/record.json")]
        per_image = seconds_per_image(args.model, sorted((data / "train").glob("*/*.png"))[:128])
        images = sum(official_images(r) for r in records)
        head_s = sum(r["timings"]["fit_s"] for r in records)
        official_s = head_s + images * per_image
        print(
            f"grid: {len(records)} runs ({len(methods)} methods × {len(SHOTS)} shots × {len(SEEDS)} seeds), "
            f"failed {result.count('failed')}; images encoded during the grid: "
            f"{encoded[0]}"
        )
        print(f"cached: extract {extract_s:.1f} s + grid {grid_s:.1f} s = {extract_s + grid_s:.1f} s")
        print(
            f"official (lower bound): heads {head_s:.1f} s + {images:,} images × {1000 * per_image:.2f} ms = "
            f"{official_s:.1f} s"
        )
        print(f"ratio official ÷ cached: {official_s / (extract_s + grid_s):.2f}×")


if __name__ == "__main__":
    main()
