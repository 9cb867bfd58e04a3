"""Benchmark: what ``extract --dense-precision int8`` costs LDC and SAFE, against the fp16 store.

On the shapes world's shifted colour × texture set (``make_shapes_dataset``) and the tiny CLIP trained on it
(``fsl-tiny-rn``, ``--pretrained shapes``: real features, not random ones), the same images are extracted
twice for ``ldc,safe`` (fp16, and int8 dense maps with per-channel scales), then each method is fitted on each
store with the same seed and options (the demo's short schedules) and scored on the test split. Printed per
method and head output: test top-1 on both stores, the accuracy change, and the max |logit| drift over the test
set, twice: ``same head`` (the fp16-trained head scored on the int8 maps: the quantisation alone) and
``refit`` (a head trained and scored on the int8 store: what a user of that store gets). Also the stores'
bytes on disk.

    python benchmarks/lossy_dense.py [--shots 4] [--seeds 1,2,3] [--counts 16,4,30] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from fsl_cache import api
from fsl_cache.cli import DEMO_OPTIONS
from fsl_cache.datasets.shapes import make_shapes_dataset
from fsl_cache.evaluation.scoring import predict
from fsl_cache.methods import FitTask
from fsl_cache.methods.base import fit_together
from fsl_cache.runs.request import FitRequest, resolve_run, task_info
from fsl_cache.splits import build_splits, test_split
from fsl_cache.store.store import FeatureStore

METHODS = ("ldc", "safe")


def demo_options(method: str) -> dict:
    return {k.split(".", 1)[1]: v[0] for k, v in DEMO_OPTIONS.items() if k.startswith(method + ".")}


def fit_head(fs: FeatureStore, method: str, *, shots: int, seed: int):
    """The head ``fit`` would train on ``fs`` (coop protocol, CPU), without writing a run."""
    request = FitRequest(
        method, dataset=fs.manifest["dataset"]["name"], shots=shots, options=demo_options(method)
    )
    run = resolve_run(request, fs, seed=seed)
    splits = build_splits(fs, run.info.cls, shots=shots, seed=seed, protocol="coop")
    info = task_info(fs, shots=shots, seed=seed, protocol="coop")
    task = FitTask(
        fs, info, train=splits.train, val=splits.val, device=torch.device("cpu"), memory_budget=request.budget
    )
    (fitted,) = fit_together([run.method], task, seed=seed)
    return fitted.head, task


def test_logits(head, task: FitTask) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ref = test_split(task.store)
    return predict(head, task.views(ref, taps=head.inputs)), torch.as_tensor(ref.labels)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--counts", default="16,4,30", help="train,val,test images per class (12 classes)")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the data and stores here (default: a temp dir)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # the numbers are deterministic for a thread count; one is the tests' choice
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="lossy_dense-"))
    counts = dict(zip(("train", "val", "test"), map(int, args.counts.split(","))))
    data = make_shapes_dataset(out / "data", counts=counts)
    stores = {}
    for precision in ("same", "int8"):
        stores[precision] = api.extract(
            f"imagefolder:{data}",
            model="fsl-tiny-rn",
            pretrained="shapes",
            for_methods=METHODS,
            shots=(args.shots,),
            seeds=tuple(seeds),
            dense_precision=precision,
            cache_dir=out / f"cache-{precision}",
            workers=0,
            progress=False,
        ).store
    fp16, int8 = FeatureStore.open(stores["same"]), FeatureStore.open(stores["int8"])
    dense = sorted(int8.quantised)
    on_disk = {
        k: sum(s.arrays[n]["stored_bytes"] for n in dense) for k, s in (("fp16", fp16), ("int8", int8))
    }
    scales = sum(int8.arrays[int8.quantised[n]]["stored_bytes"] for n in dense)
    print(
        f"{len(dense)} dense maps on disk: fp16 {on_disk['fp16'] / 2**20:.2f} MiB, "
        f"int8 {on_disk['int8'] / 2**20:.2f} MiB + scales {scales / 2**20:.2f} MiB "
        f"= {(on_disk['int8'] + scales) / on_disk['fp16']:.2f}x"
    )
    print(
        f"{'method':<6} {'seed':>4} {'head':<10} {'fp16 top1':>9} {'int8 top1':>9} {'change':>7} "
        f"{'|logit| max':>11} {'drift same head':>15} {'drift refit':>11}"
    )
    for method in METHODS:
        for seed in seeds:
            head, task16 = fit_head(fp16, method, shots=args.shots, seed=seed)
            head8, task8 = fit_head(int8, method, shots=args.shots, seed=seed)
            ref, labels = test_logits(head, task16)
            same, _ = test_logits(head, task8)
            refit, _ = test_logits(head8, task8)
            for name in ref:
                a, b = top1(ref[name], labels), top1(refit[name], labels)
                print(
                    f"{method:<6} {seed:>4} {name:<10} {a:>9.2f} {b:>9.2f} {b - a:>+7.2f} "
                    f"{ref[name].abs().max().item():>11.3f} {(same[name] - ref[name]).abs().max().item():>15.4f} "
                    f"{(refit[name] - ref[name]).abs().max().item():>11.4f}"
                )


if __name__ == "__main__":
    main()
