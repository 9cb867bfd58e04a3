"""CAPT (METHODS §2.9.2): the official training objective, with everything that can be cached read from the cache.

[CODE] greatest-gourmet/CAPT ``trainers/sple_promptkd.py::StackSPLE_PromptKD``: prompt tuning of the
student's text side (context + deep text prompts, DPC decoupling), batches widened by confusion-mined
negatives (the teacher's top-8 classes, one bank image each), LLM-sentence centroids mixed into the
text features by a fresh random linear layer, symmetric image–text InfoNCE. The image features are
the store's cached embeddings (``visual_depth=0``) or, with deep visual prompts, the frozen ViT run from
the cached ``vit/tokens`` (:mod:`.capt_visual`); the text encoder runs every step.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..backbones.taps import TOKENS
from ..errors import UsageError
from ..splits.protocol import pool_for, split_ref, subset_classes, whole_pool
from ..store.reads import read_rows
from ..store.store import MANIFEST, FeatureStore
from ..training import FitTask, TrainData, TrainSettings, open_views, seeded_init, train
from ..training.settings import Optimizer, Schedule
from .base import FitResult, Method, ValidationFree
from .capt_c import IndexedViews
from .capt_modules import COMMONALITY_TEMPLATE, spherical_kmeans
from .capt_prompts import CaptPromptHead, capt_infonce, mine_negatives, mix_centroids, widen_batch
from .capt_visual import EncodedBank
from .needs import Needs, ViewNeed
from .options import ConfigError, TrainOptions, check_range
from .registry import register_method
from .zero_shot import ZeroShotHead


@dataclass(frozen=True)
class CaptConfig(TrainOptions):
    epochs: int = 20
    """[CODE] OPTIM.MAX_EPOCH 20 (vit_b16_c2_ep20_batch4_4+4ctx)."""
    batch_size: int = 4
    """[CODE] batch 4 images before widening (each adds its mined negatives)."""
    lr: float = 2e-3
    """[CODE] OPTIM.LR 0.002."""
    optimizer: Optimizer = "sgd"
    """[CODE] OPTIM.NAME sgd."""
    weight_decay: float = 5e-4
    """[CODE] Dassl OPTIM.WEIGHT_DECAY 5e-4."""
    momentum: float = 0.9
    """[CODE] Dassl OPTIM.MOMENTUM 0.9."""
    schedule: Schedule = "cosine_epoch"
    """[CODE] cosine, stepped once per epoch."""
    warmup: int = 1
    """[CODE] OPTIM.WARMUP_EPOCH 1."""
    warmup_lr: float = 1e-5
    """[CODE] constant warm-up at 1e-5."""
    n_ctx: int = 4
    """[CODE] N_CTX_TEXT 4 context tokens."""
    ctx_init: str = "a photo of a"
    """[CODE] CTX_INIT: words whose token embeddings start the context (must be n_ctx tokens; '' = N(0, 0.02))."""
    text_depth: int = 9
    """[CODE] PROMPT_DEPTH_TEXT 9: the context plus deep prompts in blocks 1..8 (capped at the encoder's depth)."""
    visual_depth: int = 0
    """Deep visual prompts (4 tokens, N(0, 0.02)) in the first N ViT blocks, run from the cached pre-ln_pre
    tokens ([CODE] PROMPT_DEPTH_VISION 9); 0 = image features straight from the pooled cache."""
    visual_prompts: int = 4
    """[CODE] N_CTX_VISION 4 visual prompt tokens per block."""
    dpc: bool = True
    """[CODE] STACK.MODE loop+converse: the encoder reads (ctx − (1 − w)·ctx_init) / w."""
    dpc_weight: float = 0.2
    """[CODE] STACK.WEIGHT 0.2 (w above)."""
    topk: int = 8
    """[CODE] SPLE.INFER_TOPK 8: teacher classes mined per sample (minus the label and in-batch classes)."""
    fill: int = 2
    """[CODE] random classes added when fewer than this many negatives remain."""
    init: str | None = None
    """A promptkd, coop or capt run folder (or export) whose prompts start training ([CODE] the official setting
    starts from PromptKD prompts, SPLE_INIT); none = ctx_init and N(0, 0.02) deep prompts."""
    teacher: str | None = None
    """ARCH/PRETRAINED of another store of the same dataset whose zero-shot logits rank the negatives;
    none = the student's own zero-shot logits."""
    descriptions: str | None = None
    """CAPT descriptions: a <ds>_prompt_common.json file or the folder holding it ({class: [sentences]});
    none = template sentences."""
    centroids: int = 5
    """[CODE] k-means clusters (cosine) of the per-class sentence embeddings."""
    centroid_scale: float = 1.0
    """Scale of the random centroid mix added to the text features ([CODE] 1.0; the notebook 0.1); 0 = off."""
    templates: str = "tip"
    """Template set of the zero-shot text: the default teacher and the novel classes under base2novel."""
    truncate: bool = True
    """[PROPOSED] Run the text encoder on max(eot)+1 positions instead of 77 (exact under the causal mask)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_ctx", "text_depth", "topk", "centroids", "visual_prompts"):
            check_range(name, getattr(self, name), low=1)
        for name in ("fill", "centroid_scale", "visual_depth"):
            check_range(name, getattr(self, name), low=0)
        check_range("dpc_weight", self.dpc_weight, low=0, high=1, strict_low=True)
        if self.teacher is not None and "/" not in self.teacher:
            raise ConfigError(
                f"option teacher takes ARCH/PRETRAINED (e.g. ViT-L-14/openai), got {self.teacher!r}"
            )


def mode_of(visual_depth: int) -> str:
    """The run record's ``mode``: which image side ran."""
    if visual_depth == 0:
        return "visual_depth=0: text prompts only; image features are the store's cached pooled embeddings"
    return (
        f"visual_depth={visual_depth}: deep visual prompts in the first {visual_depth} ViT blocks, run from "
        "the store's cached pre-ln_pre tokens (the batch's coop views, the bank's center views)"
    )


def visual_needs(options: dict | None) -> bool:
    """Whether ``-o`` options ask for deep visual prompts (the store then needs ``vit/tokens``)."""
    return int((options or {}).get("visual_depth", 0) or 0) > 0


@register_method
class Capt(Method):
    name = "capt"
    description = (
        "CAPT as its official code trains it: context + deep text prompts (DPC), batches widened by the "
        "teacher's confusion-mined classes, sentence centroids, symmetric InfoNCE; cached images (§2.9.2)."
    )
    Config = CaptConfig
    deviations = (
        "[CODE] the official student is ViT-B/16 with deep visual prompts and VPT_image_trans (512→768) read "
        "against the ViT-L/14 teacher's text encoder with PromptSRC prompts; here the store's own backbone "
        "gives both sides (its text encoder with the learned prompts, its cached image embedding), so no "
        "projection is trained.",
        "[PROPOSED] visual_depth defaults to 0: no visual prompts, the image features are the cached pooled "
        "embeddings (the official code tunes 4 visual prompts in 9 blocks: -o visual_depth=9). With "
        "visual_depth > 0 the prompts run from the cached pre-ln_pre tokens of the batch's cached coop view "
        "(and of the bank's center views), and sit after the class token (the code appends them at the end; "
        "the same features, as attention ignores token order after the positional embedding). ResNet stores "
        "refuse visual_depth > 0.",
        "[PROPOSED] without -o init=RUN the context starts at ctx_init ('a photo of a') and the deep text prompts "
        "at N(0, 0.02); the official setting starts from PromptKD/PromptSRC prompts (SPLE_INIT), which -o "
        "init=RUN of a promptkd run reproduces on the cache; DPC's pre_ctx is that start.",
        "[PROPOSED] the teacher's ranking is the store's zero-shot logits of the batch's cached view (or of the "
        "teacher store's center view with -o teacher); the official teacher is the PromptSRC-tuned ViT-L/14 run "
        "on the augmented image, its text features also mixed with random centroids.",
        "[PROPOSED] the bank is the train split's center-view cached embeddings, or with visual_depth > 0 its "
        "cached pre-ln_pre tokens run through the prompted ViT when picked (the whole train split when the "
        "store has --full-train arrays, else the few-shot train split, recorded); the official bank reads all "
        "train images of the class from disk with the test transform.",
        "[PROPOSED] each epoch trains on one cached coop view per image (view sampler, METHODS §1.6) instead of "
        "a fresh random crop.",
        "[PROPOSED] sentence centroids: k-means (cosine, capped at the class count) seeded by the run's generator "
        "(kmeans_pytorch draws its own init); without -o descriptions, template sentences (recorded); classes "
        "missing from a descriptions file use template sentences (the official code fails on them).",
        "[CODE] the Diff-Manner Adapter (adapter_scale 0) and the MoE are built by the official code but neither "
        "trained nor used; they are left out (our trained versions are in capt_c).",
        "[CODE] kept from the official code: random fill draws classes 1..C−1 (never class 0), repeated labels "
        "stay InfoNCE negatives, the centroid mix is not re-normalised.",
        "[PROPOSED] fp32 training (the official PREC fp16); the epoch is selected on the few-shot val.",
        "[PROPOSED] base2novel: novel classes use the frozen zero-shot text (templates option) on the cached "
        "embedding, the code's frozen teacher-format path without the teacher; the visual prompts are not used "
        "for novel classes.",
    )
    validation_free = ValidationFree(
        "[PROPOSED] last epoch (the code keeps the best val epoch, TEST.FINAL_MODEL best_val)",
        {"select": "last"},
    )
    paper_protocol = "Same as coop: CAPT's own setting is --protocol base2novel."
    min_views = {"coop": 2}
    needs_backbone = True
    base2novel = True

    quick = {"epochs": 1, "batch_size": 8}
    needed = Needs(train_views=(ViewNeed("coop", 21, ("pooled",)),))

    @classmethod
    def needs(cls, dataset: str = "", options: dict | None = None) -> Needs:
        """With visual_depth > 0 also the pre-ln_pre tokens of the center view of every pool (bank, val, test)
        and of the train views the batches are drawn from."""
        if not visual_needs(options):
            return cls.needed
        (views,) = cls.needed.train_views
        return Needs(eval_taps=("pooled", TOKENS), train_views=(replace(views, taps=("pooled", TOKENS)),))

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> CaptPromptHead:
        cfg, bb = bundle.meta["config"], backbone()
        return CaptPromptHead(
            bb.model,
            bb.tokenizer,
            bundle.classnames,
            n_ctx=int(cfg["n_ctx"]),
            ctx_init="",  # the saved context replaces it
            text_depth=int(cfg["text_depth"]),
            dpc_weight=float(cfg["dpc_weight"]) if cfg["dpc"] else None,
            scale=float(state["scale"]),
            truncate=bool(cfg["truncate"]),
            visual_depth=int(cfg.get("visual_depth", 0)),
            visual_prompts=int(cfg.get("visual_prompts", 4)),
        )

    def train_settings(self, task: FitTask) -> TrainSettings:
        return self.config.train_settings(policy="coop")

    def build_head(self, task: FitTask, *, generator: torch.Generator) -> CaptPromptHead:
        cfg, backbone = self.config, task.backbone()
        with seeded_init(generator):
            head = CaptPromptHead(
                backbone.model,
                backbone.tokenizer,
                list(task.info.classnames),
                n_ctx=cfg.n_ctx,
                ctx_init=cfg.ctx_init,
                text_depth=cfg.text_depth,
                dpc_weight=cfg.dpc_weight if cfg.dpc else None,
                scale=task.info.zs_scale,
                truncate=cfg.truncate,
                visual_depth=cfg.visual_depth,
                visual_prompts=cfg.visual_prompts,
            )
        if cfg.init is not None:
            ctx, deep = prompts_of_run(cfg.init)
            head.start_from(ctx, deep)
        return head

    # ------------------------------------------------------------------ fit

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        cfg, settings = self.config, self.train_settings(task)
        if cfg.visual_depth and task.store.manifest["backbone"].get("kind") != "vit":
            raise UsageError(
                f"capt visual_depth={cfg.visual_depth} prompts ViT blocks; store {task.store.root.name} is of "
                f"{task.store.manifest['backbone'].get('arch')}: use visual_depth=0 (text prompts only)"
            )
        head = self.build_head(task, generator=generator)
        source = task.train_source(settings.policy, taps=head.inputs, epochs=settings.epochs)
        self.head = head
        self.noise = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        self.bank, self.bank_labels, bank_note = self._bank(task)
        self.zs_text = task.text(cfg.templates)
        self.teacher, teacher_note = self._teacher(task)
        self.centroid_vectors, sentences_note = self._centroids(task, generator=generator)
        self.widths: list[int] = []
        result = train(
            head,
            TrainData(IndexedViews(source), task.train.labels),
            settings=settings,
            generator=generator,
            selector=self.selector(task, head),
            loss_fn=self.loss,
            device=task.device,
        )
        selection = {
            "epoch": result.best_epoch,
            "val_acc": result.best_score,
            "mode": mode_of(head.visual_depth),
            "teacher": teacher_note,
            "bank": bank_note,
            "sentences": sentences_note,
            "text_depth": head.text_depth,
            "init": cfg.init or f"ctx_init {cfg.ctx_init!r}, deep prompts N(0, 0.02)",
            "dpc": f"loop+converse, weight {cfg.dpc_weight}" if cfg.dpc else "off",
            "text_length": head.length,
            "mean_widened_batch": float(np.mean(self.widths)) if self.widths else None,
        }
        return FitResult(result.head, selection=selection, history=result.history)

    def _bank(self, task: FitTask) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Center-view cached embeddings of the train split (the whole one when the store has it) and labels."""
        if task.store.has("images/train_full/views/center/pooled"):
            ref = whole_pool(task.store, "train", "train_full")
            if task.classes is not None:
                ref = subset_classes(ref, task.classes)
            note = f"whole train split (train_full, {len(ref)} images)"
        else:
            ref = task.train
            note = (
                f"few-shot train split ({len(ref)} images): the store has no train_full arrays "
                "(extract with --full-train for the code's whole-train bank)"
            )
        labels = ref.labels.to(task.device)
        if not self.head.visual_depth:
            return F.normalize(task.center(ref), dim=-1).to(task.device), labels, note
        head = self.head
        tokens = task.center(ref, TOKENS).to(torch.float16)  # as stored: half the memory of float32
        bank = EncodedBank(
            tokens,
            lambda t: head.image_encoder(t, head.visual_prompts),
            dim=int(head.image_encoder.proj.shape[1]),
            device=torch.device(task.device),
        )
        return bank, labels, note

    def _teacher(self, task: FitTask) -> tuple[torch.Tensor | None, str]:
        """``[N_train, C]`` teacher logits of a teacher store, or ``None``: the batch's own zero-shot logits."""
        cfg = self.config
        if cfg.teacher is None:
            return None, f"the student's own zero-shot logits ({cfg.templates} templates) of each cached view"
        store = open_teacher_store(task.store, cfg.teacher)
        try:
            logits = teacher_logits(store, task, templates=cfg.templates)
        finally:
            store.close()
        note = f"{cfg.teacher} zero-shot logits ({cfg.templates} templates, center view) from store {store.root.name}"
        return logits, note

    def _centroids(self, task: FitTask, *, generator: torch.Generator) -> tuple[torch.Tensor | None, dict]:
        """k-means (cosine) centroids ``[K, D]`` of the per-class sentence embeddings ([CODE] ``topk``)."""
        cfg = self.config
        if cfg.centroid_scale == 0:
            return None, {"source": "off (centroid_scale=0)"}
        names = [n.replace("_", " ") for n in task.info.classnames]
        given = load_common_sentences(cfg.descriptions, names) if cfg.descriptions else {}
        text = self.zs_text
        sentences, from_file = [], 0
        for c, name in enumerate(names):
            if name.lower() in given:
                sentences.append(given[name.lower()])
                from_file += 1
            else:
                sentences.append(template_sentences(c, names, text))
        backbone = task.backbone()
        per_class = torch.stack(
            [F.normalize(backbone.encode_texts(s).mean(dim=0), dim=-1) for s in sentences]
        )  # [C, D]  [CODE] encode_text, mean over the class's sentences, normalise
        centroids = spherical_kmeans(per_class, cfg.centroids, generator=generator).to(task.device)
        note = {
            "source": "descriptions" if cfg.descriptions else "templates",
            "path": cfg.descriptions,
            "classes_from_file": from_file,
            "classes_from_templates": len(names) - from_file,
            "centroids": len(centroids),
            "scale": cfg.centroid_scale,
        }
        return centroids, note

    # ------------------------------------------------------------------ the loss

    def loss(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Symmetric InfoNCE between the widened batch's image features and their labels' (mixed) text features."""
        cfg, head = self.config, self.head
        f = head.aux["image"]  # [B, D], normalised
        if self.teacher is None:  # the cached view's zero-shot logits [B, C]
            teacher = head.scale * F.normalize(inputs["pooled"], dim=-1) @ self.zs_text.to(f).T
        else:
            teacher = self.teacher[inputs["image_id"].cpu()]
        negatives = mine_negatives(
            teacher.detach().cpu(), labels.cpu(), topk=cfg.topk, fill=cfg.fill, generator=self.noise
        )
        image, widened = widen_batch(f, labels, negatives, self.bank, self.bank_labels, generator=self.noise)
        self.widths.append(len(image))
        text = F.normalize(head.aux["text"][widened], dim=-1)  # [N, D]
        if self.centroid_vectors is not None:
            text = mix_centroids(text, self.centroid_vectors, scale=cfg.centroid_scale, generator=self.noise)
        return capt_infonce(image, text, scale=float(head.scale))

    # ------------------------------------------------------------------ base-to-novel

    def novel_head(self, fitted: FitResult, task: FitTask) -> ZeroShotHead:
        """Novel classes: the frozen zero-shot text on the cached pooled embedding (whatever visual_depth)."""
        return ZeroShotHead(task.text(self.config.templates), scale=task.info.zs_scale)


def prompts_of_run(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The context CAPT's encoder read (``[M, W]``) and the deep prompts (``[J, M, W]`` or ``None``) of a
    ``promptkd``, ``coop`` or ``capt`` run folder or export."""
    folder = Path(path)
    meta = next((folder / n for n in ("record.json", "bundle.json") if (folder / n).is_file()), None)
    if meta is None or not (folder / "head.safetensors").is_file():
        raise UsageError(
            f"capt -o init: {folder} is not a run folder or export (record.json + head.safetensors)"
        )
    info = json.loads(meta.read_text())
    if info.get("method") not in ("promptkd", "coop", "capt"):
        raise UsageError(
            f"capt -o init takes a promptkd, coop or capt run; {folder} is a {info.get('method')} run"
        )
    state = load_file(str(folder / "head.safetensors"))
    ctx = state["prompt_learner.ctx"].float()
    if ctx.dim() != 2:
        raise UsageError(
            f"capt -o init: {folder} learned class-specific contexts (csc); capt needs one context"
        )
    if "pre_ctx" in state:  # a capt run with DPC: what its encoder read
        w = float(info["config"]["dpc_weight"])
        ctx = (ctx - (1.0 - w) * state["pre_ctx"].float()) / w
    return ctx, state["deep"].float() if "deep" in state else None


def open_teacher_store(student: FeatureStore, teacher: str) -> FeatureStore:
    """The finished store of ``teacher`` (``ARCH/PRETRAINED``) on the student's dataset, beside the student's store."""
    dataset = student.manifest["dataset"]["name"]
    arch, _, pretrained = teacher.partition("/")
    found = []
    for path in sorted(student.root.parent.glob(f"*/{MANIFEST}")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        bb = m.get("backbone", {})
        if m.get("dataset", {}).get("name") == dataset and (bb.get("arch"), bb.get("pretrained")) == (
            arch,
            pretrained,
        ):
            found.append(path.parent)
    if not found:
        cache_dir = student.root.parent.parent
        raise UsageError(
            f"No {teacher} store of {dataset} for the capt teacher; extract it first: fsl-cache extract "
            f"--dataset {shlex.quote(dataset)} --model {arch} --pretrained {shlex.quote(pretrained)} "
            f"--cache-dir {shlex.quote(str(cache_dir))} (with the student store's --shots/--seeds)"
        )
    if len(found) > 1:
        raise UsageError(
            f"Several {teacher} stores of {dataset}: {', '.join(p.name for p in found)}; keep one"
        )
    return FeatureStore.open(found[0])


def teacher_logits(store: FeatureStore, task: FitTask, *, templates: str) -> torch.Tensor:
    """``scale · f̂ Wᵀ`` ``[N_train, C]`` of the task's train images (matched by split index) in the teacher store."""
    if list(store.manifest["dataset"]["classnames"]) != list(task.store.manifest["dataset"]["classnames"]):
        raise UsageError(f"teacher store {store.root.name} lists other classes than the student's")
    pool = pool_for(store, "train")
    if pool is None:
        raise UsageError(f"teacher store {store.root.name} has no train images")
    ref = split_ref(store, "train", pool, task.train.split_index)  # raises when an image is missing
    f = open_views(store, ref, policy="center", taps=("pooled",)).batch(np.arange(len(ref)))["pooled"]
    text = torch.from_numpy(read_rows(store, f"text/{templates}", None)).float()
    if task.classes is not None:
        text = text[torch.from_numpy(task.classes)]
    scale = float(store.manifest.get("zs_scale", 100.0))
    return scale * F.normalize(f.float().cpu(), dim=-1) @ F.normalize(text, dim=-1).T


def template_sentences(c: int, names: list[str], text: torch.Tensor, *, pairs: int = 5) -> list[str]:
    """Commonality sentences for class ``c`` without an LLM file: the class alone, and with each of its
    ``pairs`` text-nearest classes."""
    sim = text @ text[c]
    sim[c] = -float("inf")
    others = sim.argsort(descending=True)[: min(pairs, len(names) - 1)].tolist()
    return [f"a photo of a {names[c]}."] + [
        COMMONALITY_TEMPLATE.format(c=names[c], o=names[o]) for o in others
    ]


def load_common_sentences(path: str, names: list[str]) -> dict[str, list[str]]:
    """``{lower-case class name: sentences}`` from CAPT's ``<ds>_prompt_common.json`` (or the folder holding one)."""
    target = Path(path)
    if target.is_dir():
        found = sorted(target.glob("*_prompt_common.json"))
        if len(found) != 1:
            raise UsageError(
                f"{target} holds {len(found)} *_prompt_common.json files; pass the file itself with -o descriptions"
            )
        target = found[0]
    try:
        data = json.loads(target.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read CAPT descriptions {target}: {err}") from None
    out = {}
    for name, sentences in data.items():
        items = sentences if isinstance(sentences, list) else [sentences]
        items = [s for s in items if isinstance(s, str) and s.strip()]
        if items:
            out[name.replace("_", " ").lower()] = items
    if not any(n.lower() in out for n in names):
        raise UsageError(f"{target} names none of the dataset's classes")
    return out
