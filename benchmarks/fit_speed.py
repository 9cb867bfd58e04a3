"""Benchmark: a grid of Tip-Adapter-F configurations on cached features vs the official re-encoding loop.

Both sides run the RN50 architecture (random weights, ``pretrained="none"``) at its 224 px input on
the same small images (generated at 32 px and upsampled by the preprocessing), the same few-shot
images and the same number of epochs:

- cached (fsl-cache): one ``extract`` (1 + max(10, epochs) tip views per train image, center views of
  val and test), then one ``fit tip_adapter_f`` per configuration on the cached tensors;
- official style (Tip-Adapter ``main.py``, transcribed): every run builds its cache keys from 10
  augmented passes, encodes val and test, and re-encodes freshly augmented train images every epoch.

The official runs are independent of the configuration, so ``--official-configs`` of them are timed
and the grid's total is that per-run time times the grid size (pass ``--official-configs 24`` to time
all). The table also shows the official code with its own ``load_cache``/``load_pre_feat`` flags on,
which reuse keys and val/test features across runs but still re-encode every training epoch.

    python benchmarks/fit_speed.py [--classes 4] [--shots 4] [--epochs 10] [--configs 24]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.methods.tip_adapter import build_values, search_alpha_beta, search_grid, tip_logits

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------- data


def make_images(
    root: Path, *, classes: int, per_split: dict[str, int], size: int = 32, seed: int = 0
) -> Path:
    """An imagefolder dataset of small class-coloured noise images with train/val/test folders."""
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            hue = rng.integers(0, 255, 3)
            for i in range(count):
                pixels = np.clip(hue + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (root / "classnames.txt").write_text("".join(f"class {c}\n" for c in range(classes)))
    return root


def few_shot_images(work: Path, *, classes: int, shots: int) -> Path:
    """The benchmarks' dataset: ``shots`` train and test images per class, ``min(shots, 4)`` val."""
    return make_images(
        work / "data", classes=classes, per_split={"train": shots, "val": min(shots, 4), "test": shots}
    )


class Images(Dataset):
    """(path, label) read from disk with a transform on every access, like Dassl's DatasetWrapper."""

    def __init__(self, items: list[tuple[Path, int]], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), label


# ---------------------------------------------------------------------------- the official style


def encode(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    with torch.no_grad():
        for images, target in loader:
            feats.append(model.encode_image(images))
            labels.append(target)
    return torch.cat(feats), torch.cat(labels)


def official_run(model, tokenize, data: dict, cfg: dict, *, epochs: int, classes: int) -> dict[str, float]:
    """Tip-Adapter main.py for one configuration: keys, val/test features, Tip-Adapter, Tip-Adapter-F."""
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                224, scale=(0.5, 1), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    test_tf = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        text = F.normalize(
            model.encode_text(tokenize([f"a photo of a class {c}." for c in range(classes)])), dim=-1
        )
    cache_loader = DataLoader(Images(data["train"], train_tf), batch_size=256, shuffle=False)
    keys = F.normalize(torch.stack([encode(model, cache_loader)[0] for _ in range(10)]).mean(0), dim=-1)
    values = build_values(torch.tensor([y for _, y in data["train"]]), classes)
    t_keys = time.perf_counter()
    val_f, val_y = encode(model, DataLoader(Images(data["val"], test_tf), batch_size=64))
    test_f, test_y = encode(model, DataLoader(Images(data["test"], test_tf), batch_size=64))
    val_f, test_f = F.normalize(val_f, dim=-1), F.normalize(test_f, dim=-1)
    t_vt = time.perf_counter()
    betas, alphas = search_grid(12, 200), search_grid(10, 20)
    search_alpha_beta(val_f @ keys.T, 100 * val_f @ text.T, values, val_y, betas=betas, alphas=alphas)

    adapter = torch.nn.Linear(keys.shape[1], keys.shape[0], bias=False)
    adapter.weight = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW(
        adapter.parameters(), lr=cfg["lr"], eps=1e-4, weight_decay=cfg["weight_decay"]
    )
    loader = DataLoader(Images(data["train"], train_tf), batch_size=256, shuffle=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    alpha, beta = cfg["init_alpha"], cfg["init_beta"]
    for _ in range(epochs):
        for images, target in loader:
            with torch.no_grad():
                f = F.normalize(model.encode_image(images), dim=-1)
            logits = 100 * f @ text.T + ((-1) * (beta - beta * adapter(f))).exp() @ values * alpha
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            tip_logits(test_f, adapter.weight, values, text, alpha=alpha, beta=beta).argmax(1)
    with torch.no_grad():
        search_alpha_beta(adapter(val_f), 100 * val_f @ text.T, values, val_y, betas=betas, alphas=alphas)
    end = time.perf_counter()
    return {"keys": t_keys - t0, "val_test": t_vt - t_keys, "train": end - t_vt, "total": end - t0}


# ---------------------------------------------------------------------------- fsl-cache


def config_grid(n: int) -> list[dict]:
    grid = itertools.product((5e-4, 1e-3, 2e-3), (1.0, 2.0), (1.0, 3.0), (0.01, 0.0))
    return [{"lr": lr, "init_alpha": a, "init_beta": b, "weight_decay": wd} for lr, a, b, wd in grid][:n]


def cached_runs(
    root: Path, work: Path, grid: list[dict], *, shots: int, epochs: int
) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    api.extract(
        f"imagefolder:{root}",
        model="RN50",
        pretrained="none",
        for_methods=["tip_adapter_f"],
        views=1 + max(10, epochs),
        shots=(shots,),
        seeds=(1,),
        cache_dir=work / "cache",
        workers=0,
        batch_size=64,
        progress=False,
    )
    extract_s = time.perf_counter() - t0
    fits = []
    for cfg in grid:
        t = time.perf_counter()
        api.fit(
            "tip_adapter_f",
            dataset=f"imagefolder:{root}",
            model="RN50",
            pretrained="none",
            shots=shots,
            seeds=[1],
            options={**cfg, "epochs": epochs},
            cache_dir=work / "cache",
            runs_dir=work / "runs",
            progress=False,
        )
        fits.append(time.perf_counter() - t)
    return extract_s, fits


def few_shot_items(root: Path, work: Path, shots: int) -> dict:
    """The exact images the cached run used (its store's CoOp split, in order), for the official side."""
    from fsl_cache.store import FeatureStore

    store = FeatureStore.open(next((work / "cache").glob("*/*")))
    try:
        wanted = {
            "train": store.read(f"splits/k{shots}_s1/train"),
            "val": store.read(f"splits/k{shots}_s1/val"),
            "test": store.read("images/test/split_index"),
        }
        return {
            split: _pool_items(store, root, pool, wanted[split])
            for split, pool in (("train", "train_pool"), ("val", "val_pool"), ("test", "test"))
        }
    finally:
        store.close()


def _pool_items(store, root: Path, pool: str, split_index: np.ndarray) -> list[tuple[Path, int]]:
    rows = np.searchsorted(store.read(f"images/{pool}/split_index"), split_index)
    paths, labels = store.read(f"images/{pool}/paths", rows), store.read(f"images/{pool}/labels", rows)
    return [(root / p, int(y)) for p, y in zip(paths, labels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--configs", type=int, default=24)
    parser.add_argument("--official-configs", type=int, default=1, help="official runs timed per repeat")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternate both sides this often; report the minimum"
    )
    args = parser.parse_args()
    torch.manual_seed(0)  # the official loop draws its augmentations from the global RNG

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = few_shot_images(work, classes=args.classes, shots=args.shots)
        grid = config_grid(args.configs)
        backbone = load_backbone("RN50", "none")
        cached, official = [], []
        for r in range(args.repeats):  # alternating, so both sides meet the same machine load
            cached.append(cached_runs(root, work / f"run{r}", grid, shots=args.shots, epochs=args.epochs))
            data = few_shot_items(root, work / f"run{r}", args.shots)
            official += [
                official_run(
                    backbone.model, backbone.tokenizer, data, cfg, epochs=args.epochs, classes=args.classes
                )
                for cfg in grid[: args.official_configs]
            ]
    report(args, data, cached, official)


def report(args, data, cached: list[tuple[float, list[float]]], official: list[dict]) -> None:
    """Minimum over repeats on each side (the least disturbed measurement), then the ratio table."""
    per_run = min(official, key=lambda o: o["total"])
    extract_s = min(e for e, _ in cached)
    fits = [min(f[i] for _, f in cached) for i in range(len(cached[0][1]))]
    n_train, n_vt = len(data["train"]), len(data["val"]) + len(data["test"])
    print(
        f"RN50 (random weights, 224 px), {args.classes} classes x {args.shots} shots = {n_train} train images, "
        f"{n_vt} val+test images, {args.epochs} epochs, torch threads {torch.get_num_threads()}, "
        f"min of {len(cached)} repeat(s)"
    )
    print(
        f"cached:   extract {extract_s:.1f} s once (all repeats: {', '.join(f'{e:.1f}' for e, _ in cached)}), "
        f"then {np.mean(fits):.2f} s per configuration"
    )
    timed = ", ".join(f"{o['total']:.1f}" for o in official)
    print(
        f"official: {per_run['total']:.1f} s per run = keys {per_run['keys']:.1f} + val/test "
        f"{per_run['val_test']:.1f} + training {per_run['train']:.1f} (runs timed: {timed})"
    )
    views = 1 + max(10, args.epochs)
    enc_cached, enc_keys, enc_train = n_train * (1 + views) + n_vt, 10 * n_train, args.epochs * n_train
    n = len(fits)
    print(
        f"image encodes (load-independent cross-check): cached {enc_cached} once; official {enc_keys} keys + "
        f"{n_vt} val/test + {enc_train} training per run -> {n} configs: "
        f"{n * (enc_keys + n_vt + enc_train) / enc_cached:.1f}x as shipped, "
        f"{(enc_keys + n_vt + n * enc_train) / enc_cached:.1f}x with its own caches"
    )
    print()
    print(
        f"{'configs':>8} {'cached s':>10} {'official s':>11} {'ratio':>7} {'official+own caches s':>22} {'ratio':>7}"
    )
    for n in sorted({1, len(fits)}):
        cached_s = extract_s + sum(fits[:n])
        shipped = n * per_run["total"]
        own_cache = per_run["keys"] + per_run["val_test"] + n * per_run["train"]
        note = "" if n <= len(official) else f"   (official: per-run time x{n})"
        print(
            f"{n:>8} {cached_s:>10.1f} {shipped:>11.1f} {shipped / cached_s:>6.1f}x {own_cache:>22.1f} "
            f"{own_cache / cached_s:>6.1f}x{note}"
        )


if __name__ == "__main__":
    main()
