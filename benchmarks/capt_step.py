"""Benchmark: one ``capt`` training step (``visual_depth=0``) on cached embeddings vs from image files.

Both sides run the ViT-B-16 architecture (random weights, ``pretrained="none"``) and the same step
of the official objective: context + deep text prompts (9 blocks, DPC) through the text encoder over
the base classes, confusion mining from the teacher's logits, one bank image per mined class, the
centroid mix and the symmetric InfoNCE, then SGD.

- cached (fsl-cache): the batch's and the bank images' embeddings are cached tensors; the teacher's
  logits are the cached embedding times the zero-shot text weights;
- from images (what the official loop does per step): decode the batch's PNGs, augment them
  (random resized crop + flip), decode and resize the mined bank images (test transform), run the
  image encoder on the widened batch and the teacher (here: the same backbone's zero-shot) on the batch.

    python benchmarks/capt_step.py [--classes 50] [--batch 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from fsl_cache.backbones import load_backbone
from fsl_cache.methods.capt_prompts import (
    CaptPromptHead,
    capt_infonce,
    mine_negatives,
    mix_centroids,
    widen_batch,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def png_bytes(rng: np.random.Generator, size: int = 256) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def step(head, optimizer, f, labels, teacher, bank, bank_labels, centroids, generator, encode=None):
    """One capt step; ``encode(indices)`` turns bank rows into embeddings when they come from images."""
    logits = head({"pooled": f})  # text encoder runs over every class (aux keeps the features)
    negatives = mine_negatives(teacher, labels, topk=8, fill=2, generator=generator)
    image, widened = widen_batch(
        F.normalize(f, dim=-1), labels, negatives, bank, bank_labels, generator=generator
    )
    if encode is not None:  # the official loop encodes the widened batch's images
        image = F.normalize(encode(len(image)), dim=-1)
    text = mix_centroids(F.normalize(head.aux["text"][widened], dim=-1), centroids, generator=generator)
    loss = capt_infonce(image, text, scale=100.0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return logits, len(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-16", "none")
    names = [f"class {c}" for c in range(args.classes)]
    head = CaptPromptHead(bb.model, bb.tokenizer, names, text_depth=9, dpc_weight=0.2).train()
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=2e-3, momentum=0.9)
    d, g = bb.model.text_projection.shape[1], torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(args.classes, d, generator=g), dim=-1)
    bank_labels = torch.arange(args.classes).repeat_interleave(16)
    bank = F.normalize(torch.randn(len(bank_labels), d, generator=g), dim=-1)
    centroids = F.normalize(torch.randn(5, d, generator=g), dim=-1)
    labels = torch.randperm(args.classes, generator=g)[: args.batch]
    rng = np.random.default_rng(0)
    files = [png_bytes(rng) for _ in range(64)]
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.08, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]  # fmt: skip
    )
    test_tf = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )

    def images(n: int, tf) -> torch.Tensor:
        return torch.stack(
            [tf(Image.open(io.BytesIO(files[i % len(files)])).convert("RGB")) for i in range(n)]
        )

    def encode_widened(n: int) -> torch.Tensor:
        batch = torch.cat([images(args.batch, train_tf), images(n - args.batch, test_tf)])
        with torch.no_grad():
            return bb.model.encode_image(batch)

    timings, widths = {}, []
    for mode in ("cached", "images"):
        seconds = []
        for i in range(args.steps + 1):
            start = time.perf_counter()
            if mode == "cached":
                f = torch.randn(args.batch, d, generator=g)
                teacher = 100.0 * F.normalize(f, dim=-1) @ text.T
                _, n = step(head, optimizer, f, labels, teacher, bank, bank_labels, centroids, g)
                widths.append(n)
            else:
                with torch.no_grad():
                    f = bb.model.encode_image(images(args.batch, train_tf))
                    teacher = (
                        100.0
                        * F.normalize(bb.model.encode_image(images(args.batch, train_tf)), dim=-1)
                        @ text.T
                    )
                step(
                    head,
                    optimizer,
                    f,
                    labels,
                    teacher,
                    bank,
                    bank_labels,
                    centroids,
                    g,
                    encode=encode_widened,
                )
            if i:  # the first step warms up
                seconds.append(time.perf_counter() - start)
        timings[mode] = float(np.median(seconds))
    load = os.getloadavg()[0]
    print(f"classes {args.classes}, batch {args.batch} -> widened {np.mean(widths):.1f}, load {load:.1f}")
    for mode, s in timings.items():
        print(f"{mode:>7}: {s:.3f} s/step")
    print(f"ratio images/cached: {timings['images'] / timings['cached']:.1f}x")


if __name__ == "__main__":
    main()
