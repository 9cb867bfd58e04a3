"""``fsl-cache predict`` on one image from a run folder, against the floor it cannot go under.

The floor is a bare ``python -c "import torch, open_clip"``: predict must encode the image, so it needs
both. The two commands run interleaved (``--rounds`` times each, warm file cache) and the script prints
the medians and their ratio, so that both see the same load.

    python benchmarks/predict_startup.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def demo_run(root: Path) -> tuple[Path, Path]:
    from fsl_cache import api
    from fsl_cache.datasets import make_demo_dataset

    data = make_demo_dataset(root / "data")
    tiny = dict(model="fsl-tiny-rn", pretrained="none", progress=False)
    api.extract(
        f"imagefolder:{data}",
        cache_dir=root / "cache",
        for_methods=["tip_adapter"],
        shots=(2,),
        seeds=(1,),
        workers=0,
        **tiny,
    )
    (run,) = api.fit(
        "tip_adapter",
        dataset=f"imagefolder:{data}",
        shots=2,
        seeds=[1],
        cache_dir=root / "cache",
        runs_dir=root / "runs",
        **tiny,
    )
    return run.run_dir, next((data / "test").glob("*/*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, image = demo_run(Path(tmp))
        predict = [sys.executable, "-m", "fsl_cache.cli", "predict", str(run_dir), str(image)]
        floor = [sys.executable, "-c", "import torch, open_clip"]
        timed(predict)  # warms the file cache for both
        times: dict[str, list[float]] = {"predict": [], "import torch, open_clip": []}
        for _ in range(args.rounds):
            times["predict"].append(timed(predict))
            times["import torch, open_clip"].append(timed(floor))
    load = os.getloadavg()[0]
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:>24}: median {medians[name]:.2f} s  (runs {', '.join(f'{v:.2f}' for v in values)})")
    ratio = medians["predict"] / medians["import torch, open_clip"]
    print(f"predict ÷ floor: {ratio:.2f}  (load {load:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
