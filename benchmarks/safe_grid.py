"""Benchmark: SAFE's lr × wd grid per training step, and the paper recipe extrapolated from it.

Synthetic cached maps of the right shape stand in for a store (the step does not depend on the
values): ``fsl-tiny-rn`` (layer4 256×2×2, attention pool to 64) or RN50 (2048×7×7 to 1024), 10
classes × ``--shots`` images, flip views, the paper's 12-point grid. It prints

- for each chunking the trainer can pick, one real run of :func:`train_grid` over ``2 * --iterations``
  steps with a val scoring half-way, each step's end time-stamped: the median step is the seconds per
  grid step (all 12 points), the half-way step's excess is one scoring, and the rest of the run is
  paid once (copies of the grid, the timing probe). A short run's total would bury the per-step cost
  under the one-offs (RN50 over 10 steps: 3.3x pure by total, 1.1x by step);
- the 12,800-step recipe from them (once + 12,800 steps + 128 scorings, one every 100 steps);
- the head's pure forward + backward (one member, batch 8, no optimiser) per point, the floor a
  grid step is compared with.

    python benchmarks/safe_grid.py --model fsl-tiny-rn --iterations 150
    python benchmarks/safe_grid.py --model RN50 --iterations 5 --chunks 0,1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d

from fsl_cache.methods import safe
from fsl_cache.methods.pooling import _rn_tail
from fsl_cache.methods.safe import GridData, SafeConfig, train_grid
from fsl_cache.training import MemoryViews

SHAPES = {"fsl-tiny-rn": (256, 2, 4, 64), "RN50": (2048, 7, 32, 1024)}
"""Model → (channels, spatial size, heads, output width) of its layer4 map and attention pool."""
RECIPE = 12800


def grid_setup(model: str, shots: int, classes: int = 10):
    channels, size, heads, out = SHAPES[model]
    torch.manual_seed(0)
    frozen = _rn_tail(SimpleNamespace(attnpool=AttentionPool2d(size, channels, heads, out).eval()))
    labels = torch.arange(classes).repeat_interleave(shots)
    train = torch.randn(len(labels), 2, channels, size, size)
    val = torch.randn(len(labels), 1, channels, size, size)
    text = F.normalize(torch.randn(classes, out), dim=-1)
    data = GridData(MemoryViews({"t": train}), labels, MemoryViews({"t": val}), labels, text, "t")
    return frozen, data


@contextlib.contextmanager
def step_stamps() -> Iterator[list[float]]:
    """Time-stamp the end of every step of the SAFE trainer while the block runs."""
    stamps: list[float] = []
    original = safe.training_steps

    @contextlib.contextmanager
    def stamped(total: int, label: str):
        with original(total, label) as advance:

            def step_done(count: int) -> None:
                stamps.append(time.perf_counter())
                advance(count)

            yield step_done

    safe.training_steps = stamped
    try:
        yield stamps
    finally:
        safe.training_steps = original


def grid_costs(frozen, data, chunk: int, n: int) -> tuple[float, float, float]:
    """Seconds per grid step, per val scoring and once per run, from one run of 2n steps scored at n."""
    config = SafeConfig(iterations=2 * n, grid_chunk=chunk, eval_every=n)
    with step_stamps() as stamps:
        start = time.perf_counter()
        train_grid(frozen, data, config, config.grid(), generator=torch.Generator().manual_seed(1))
        total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    step = statistics.median(steps)
    scoring = steps[n - 2] - step  # the interval ending at step n
    return step, scoring, total - 2 * n * step - 2 * scoring


def pure_step_seconds(frozen, data, repeats: int = 10) -> float:
    """One member's forward + backward on a batch of 8 (no optimiser, no data loading)."""
    tail = frozen.stacked(1).requires_grad_(True)
    x, y = data.train.arrays["t"][:8, 0], data.labels[:8]

    def step() -> None:
        logits = 100.0 * F.normalize(tail(x), dim=-1) @ data.text.T
        F.cross_entropy(logits[0], y).backward()
        for p in tail.params.values():
            p.grad = None

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="fsl-tiny-rn")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=150, help="half the steps of each timed run (>= 2)")
    parser.add_argument(
        "--chunks", default="0,1,12", help="grid_chunk values (0: the trainer's timed choice)"
    )
    args = parser.parse_args()
    frozen, data = grid_setup(args.model, args.shots)
    print(
        f"{args.model}, {args.shots} shots, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    pure = pure_step_seconds(frozen, data)
    print(
        f"pure forward+backward, one point, batch 8: {1e3 * pure:.1f} ms (x12 points: {12e3 * pure:.1f} ms)"
    )
    scorings = RECIPE // SafeConfig.eval_every
    for chunk in (int(c) for c in args.chunks.split(",")):
        step, scoring, once = grid_costs(frozen, data, chunk, args.iterations)
        recipe = once + RECIPE * step + scorings * scoring
        print(
            f"grid_chunk {chunk:>2}: {1e3 * step:.1f} ms per grid step (12 points) = "
            f"{1e3 * step / 12:.2f} ms per point-step, {step / (12 * pure):.2f}x pure; "
            f"val scoring {1e3 * scoring:.0f} ms, one-off {once:.1f} s; paper recipe {RECIPE:,} steps "
            f"+ {scorings} scorings ~ {recipe:.0f} s  (load {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
