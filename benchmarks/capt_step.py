"""Benchmark: one ``capt`` training step on cached embeddings vs from image files, and visual_depth 9 vs 0.

Both sides run the ViT-B-16 architecture (random weights, ``pretrained="none"``) and the same step
of the official objective: context + deep text prompts (9 blocks, DPC) through the text encoder over
the base classes, confusion mining from the teacher's logits, one bank image per mined class, the
centroid mix and the symmetric InfoNCE, then SGD.

- cached (fsl-cache): the batch's and the bank images' embeddings are cached tensors; the teacher's
  logits are the cached embedding times the zero-shot text weights;
- from images (what the official loop does per step): decode the batch's PNGs, augment them
  (random resized crop + flip), decode and resize the mined bank images (test transform), run the
  image encoder on the widened batch and the teacher (here: the same backbone's zero-shot) on the batch.

Then, on ``--visual-model`` (default ``fsl-tiny-vit``), the same cached step with ``visual_depth=0`` (the
pooled cache) beside ``visual_depth=9`` (4 visual prompts in 9 blocks: the frozen ViT runs from the
cached pre-ln_pre tokens on the widened batch, gradients through it to the prompts), and beside
``visual_depth=9`` from images: the widened batch's PNGs decoded, augmented (train) or resized (bank),
patch-embedded, and the teacher (the same backbone) run on the batch, every step.

    python benchmarks/capt_step.py [--classes 50] [--batch 4] [--steps 5] [--part all|images|visual]
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
from fsl_cache.backbones.taps import TOKENS
from fsl_cache.methods.capt_prompts import (
    CaptPromptHead,
    capt_infonce,
    mine_negatives,
    mix_centroids,
    widen_batch,
)
from fsl_cache.methods.capt_visual import EncodedBank

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def png_bytes(rng: np.random.Generator, size: int = 256) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def step(head, optimizer, inputs, labels, teacher, bank, bank_labels, centroids, generator, encode=None):
    """One capt step; ``encode(indices)`` turns bank rows into embeddings when they come from images."""
    logits = head(inputs)  # text encoder runs over every class (aux keeps the text and image features)
    negatives = mine_negatives(teacher, labels, topk=8, fill=2, generator=generator)
    image, widened = widen_batch(head.aux["image"], labels, negatives, bank, bank_labels, generator=generator)
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
    parser.add_argument("--part", choices=("all", "images", "visual"), default="all")
    parser.add_argument("--visual-model", default="fsl-tiny-vit")
    args = parser.parse_args()
    if args.part in ("all", "images"):
        cached_vs_images(args)
    if args.part in ("all", "visual"):
        visual_depths(args)


def timed_steps(steps: int, run) -> float:
    """Median seconds of ``run()`` over ``steps`` calls after one warm-up call."""
    seconds = []
    for i in range(steps + 1):
        start = time.perf_counter()
        run()
        if i:
            seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def visual_depths(args) -> None:
    """The cached step with visual_depth 0 and 9 on the same batches, bank and mining."""
    torch.manual_seed(0)
    bb = load_backbone(args.visual_model, "none")
    names = [f"class {c}" for c in range(args.classes)]
    d, g = bb.embed_dim, torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(args.classes, d, generator=g), dim=-1)
    bank_labels = torch.arange(args.classes).repeat_interleave(16)
    tokens = torch.randn(len(bank_labels), *bb.tap_shape(TOKENS), generator=g).half()
    centroids = F.normalize(torch.randn(5, d, generator=g), dim=-1)
    labels = torch.randperm(args.classes, generator=g)[: args.batch]
    side = bb.image_size
    train_tf, test_tf = image_transforms(side)
    rng = np.random.default_rng(0)
    files = [png_bytes(rng, size=side * 2) for _ in range(64)]

    def encode_from_images(n: int, head) -> torch.Tensor:  # the official loop: decode, augment, patch-embed
        batch = torch.cat([decoded(files, args.batch, train_tf), decoded(files, n - args.batch, test_tf)])
        with torch.no_grad():
            tokens = bb.encode_taps(batch, [TOKENS])[TOKENS]
        return head.image_encoder(tokens, head.visual_prompts)

    timings, widths = {}, {}
    for depth in (0, 9, "9 from images"):
        from_images = depth == "9 from images"
        depth = 9 if from_images else depth
        head = CaptPromptHead(bb.model, bb.tokenizer, names, text_depth=9, visual_depth=depth).train()
        optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=2e-3, momentum=0.9)
        if depth:
            bank = EncodedBank(
                tokens,
                lambda t, h=head: h.image_encoder(t, h.visual_prompts),
                dim=d,
                device=torch.device("cpu"),
            )
        else:
            bank = F.normalize(torch.randn(len(bank_labels), d, generator=g), dim=-1)
        sizes: list[int] = []

        def run(head=head, optimizer=optimizer, bank=bank, sizes=sizes, from_images=from_images) -> None:
            rows = torch.randint(len(tokens), (args.batch,), generator=g)
            inputs = {"pooled": torch.randn(args.batch, d, generator=g), TOKENS: tokens[rows]}
            encode = None
            if from_images:
                with torch.no_grad():
                    teacher = bb.model.encode_image(decoded(files, args.batch, train_tf))
                teacher = 100.0 * F.normalize(teacher, dim=-1) @ text.T
                encode = lambda n, h=head: encode_from_images(n, h)  # noqa: E731
            else:
                teacher = 100.0 * F.normalize(inputs["pooled"], dim=-1) @ text.T
            out = step(
                head, optimizer, inputs, labels, teacher, bank, bank_labels, centroids, g, encode=encode
            )
            sizes.append(out[1])

        key = "9 from images" if from_images else depth
        timings[key], widths[key] = timed_steps(args.steps, run), float(np.mean(sizes))
    print(f"{args.visual_model}, classes {args.classes}, batch {args.batch}, load {os.getloadavg()[0]:.1f}")
    print("visual_depth=0 | visual_depth=9 cached | visual_depth=9 from images")
    print(" | ".join(f"{timings[k]:.3f} s/step" for k in (0, 9, "9 from images")))
    print(
        f"ratios: 9 cached / 0 = {timings[9] / timings[0]:.1f}x, 9 from images / 9 cached = "
        f"{timings['9 from images'] / timings[9]:.1f}x"
    )
    print(f"widened batch {widths[0]:.1f} | {widths[9]:.1f} | {widths['9 from images']:.1f}")
    per_image = {k: timings[k] / widths[k] for k in timings}  # the mining differs, so the widths do
    print(f"per widened image: 9 from images / 9 cached = {per_image['9 from images'] / per_image[9]:.1f}x")


def image_transforms(side: int):
    """The official loop's train (random resized crop + flip) and bank/test (resize + center crop) transforms."""
    train = [transforms.RandomResizedCrop(side, scale=(0.08, 1.0)), transforms.RandomHorizontalFlip()]
    test = [transforms.Resize(side), transforms.CenterCrop(side)]
    tail = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(train + tail), transforms.Compose(test + tail)


def decoded(files: list[bytes], n: int, tf) -> torch.Tensor:
    return torch.stack([tf(Image.open(io.BytesIO(files[i % len(files)])).convert("RGB")) for i in range(n)])


def cached_vs_images(args) -> None:
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
    train_tf, test_tf = image_transforms(224)

    def images(n: int, tf) -> torch.Tensor:
        return decoded(files, n, tf)

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
                _, n = step(head, optimizer, {"pooled": f}, labels, teacher, bank, bank_labels, centroids, g)
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
                    {"pooled": f},
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
