"""Benchmark: fused exact LDC RN adapters vs the plain ``Conv1×1 → BN2d → ReLU → AvgPool`` modules.

Real RN50 sizes (layer1..4 maps 256×56², 512×28², 1024×14², 2048×7², all → 2048×7×7), random tensors,
fp32 on CPU, batch 16 by default. Two measurements, plain and fused interleaved in one process so
both see the same machine load (the repeats' medians are reported, and the ratio of the best runs, with
the load average):

- ``adapters``: the four MAF adapters + WF fusion, forward + backward of a random linear loss
  (the maps take no gradient, as in LDC training);
- ``head``: the whole LDC-RN50 head train step (four adapters, frozen attnpool of a random-weight
  RN50, MAF head, ICD, ALF, the 5-term LDC loss, AdamW step) — what ``fit ldc`` runs per batch.

Peak memory is the process's peak RSS above the RSS just before the step (``VmHWM`` is reset
through ``/proc/self/clear_refs`` before every step), i.e. what one step adds on top of its inputs.

    python benchmarks/ldc_adapter.py [--batch 16] [--repeats 5] [--parts adapters,head]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from fsl_cache.methods.ldc_adapter import ConvAdapter
from fsl_cache.methods.ldc_fused import FusedConvAdapter
from fsl_cache.methods.ldc_modules import RNMultiLevel, fuse_levels

CHANNELS, SIDES = (256, 512, 1024, 2048), (56, 28, 14, 7)


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Give freed heap pages back to the OS (glibc), so one variant's peak does not hide the other's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(step) -> tuple[float, float]:
    """(seconds, peak MB added) of one call of ``step``."""
    trim()
    reset_peak()
    base = rss_kb("VmRSS:")
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    return dt, (rss_kb("VmHWM:") - base) / 1024


def fuse(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every pooled :class:`ConvAdapter` replaced by a :class:`FusedConvAdapter`."""
    module = copy.deepcopy(module)
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is ConvAdapter and isinstance(child[3], nn.AvgPool2d):
                fused = FusedConvAdapter(
                    child[0].in_channels, child[0].out_channels, pool=child[3].kernel_size
                )
                fused.load_state_dict(child.state_dict())
                fused.train(child.training)
                setattr(parent, name, fused)
    return module


def adapters_step(adapters: nn.ModuleList, maps, probe: torch.Tensor):
    def step():
        for p in adapters.parameters():
            p.grad = None
        out = fuse_levels([a(x) for a, x in zip(adapters, maps)], "wf")
        (out * probe).sum().backward()

    return step


def head_step(head: nn.Module, maps, pooled, labels, opt):
    from fsl_cache.methods.ldc import ldc_loss

    inputs = dict(zip(head.inputs, [pooled, *maps]))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ldc_loss(head(inputs), labels, lambdas=(1.0,) * 5)
        loss.backward()
        opt.step()

    return step


def build_head(num_classes: int = 10):
    from fsl_cache.backbones import load_backbone
    from fsl_cache.methods.ldc import LDCHead

    visual = load_backbone("RN50", pretrained="none").model.visual
    trunk = RNMultiLevel(CHANNELS, SIDES, attnpool=copy.deepcopy(visual.attnpool).float(), embed_dim=1024)
    text = nn.functional.normalize(torch.randn(num_classes, 1024), dim=-1)
    head = LDCHead(
        trunk,
        taps=("rn/layer1", "rn/layer2", "rn/layer3", "rn/layer4"),
        text=text,
        scale=100.0,
        maf_hidden=1024,
    )
    return head.train()


def compare(name: str, make_step, repeats: int) -> dict:
    """Interleave plain and fused steps (one warm-up each), medians of ``repeats``."""
    steps = {"plain": make_step(False), "fused": make_step(True)}
    for s in steps.values():
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    peaks: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, s in steps.items():
            dt, mb = measure(s)
            times[k].append(dt)
            peaks[k].append(mb)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: statistics.median(v) for k, v in peaks.items()}
    print(
        f"{name:9s} plain {med['plain'] * 1e3:8.0f} ms (runs {', '.join(f'{t * 1e3:.0f}' for t in times['plain'])}), "
        f"peak +{peak['plain']:6.0f} MB"
    )
    print(
        f"{'':9s} fused {med['fused'] * 1e3:8.0f} ms (runs {', '.join(f'{t * 1e3:.0f}' for t in times['fused'])}), "
        f"peak +{peak['fused']:6.0f} MB"
    )
    best = {k: min(v) for k, v in times.items()}  # least disturbed by other load on a shared machine
    print(
        f"{'':9s} speed-up {med['plain'] / med['fused']:.2f}x median, {best['plain'] / best['fused']:.2f}x best "
        f"(target >= 2), memory {peak['fused'] / max(peak['plain'], 1e-9):.2f}x (target <= 0.5)"
    )
    return {"speedup": med["plain"] / med["fused"], "memory": peak["fused"] / max(peak["plain"], 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="adapters,head")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    maps = [torch.randn(b, c, s, s).relu_() for c, s in zip(CHANNELS, SIDES)]  # post-ReLU like real maps
    print(
        f"LDC-RN50 adapters, batch {b}, fp32, {torch.get_num_threads()} threads, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
    )
    parts = args.parts.split(",")
    if "adapters" in parts:
        plain = nn.ModuleList(ConvAdapter(c, 2048, pool=s // 7) for c, s in zip(CHANNELS, SIDES)).train()
        fused = fuse(plain)
        probe = torch.randn(b, 2048, 7, 7)
        compare("adapters", lambda f: adapters_step(fused if f else plain, maps, probe), args.repeats)
    if "head" in parts:
        head = build_head()
        pooled, labels = torch.randn(b, 1024), torch.randint(0, 10, (b,))

        def make(f):
            h = fuse(head) if f else copy.deepcopy(head)
            opt = torch.optim.AdamW([p for p in h.parameters() if p.requires_grad], lr=1e-4, eps=1e-4)
            return head_step(h, maps, pooled, labels, opt)

        compare("head", make, args.repeats)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
