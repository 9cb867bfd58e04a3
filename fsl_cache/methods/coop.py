"""CoOp (METHODS §2.5): learnable prompt context through the frozen text encoder of the store's backbone.

[CODE] KaiyangZhou/CoOp trainers/coop.py::PromptLearner, TextEncoder, CustomCLIP. Image embeddings
come from the cache; the text encoder runs every step (gradients reach the context vectors only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..training import FitTask, TaskInfo, TrainResult, TrainSettings, seeded_init
from ..training.head import Head
from .base import FitResult, Method, ValidationFree
from .clip_adapter import ClipAdapter, DasslTrainOptions
from .options import check_range
from .registry import register_method

Position = Literal["end", "middle", "front"]


# ---------------------------------------------------------------------------- frozen text encoder


class TextEncoder(nn.Module):
    """``ln_final(transformer(P + pos))[eot] @ text_projection`` of an open_clip ``CLIP`` on prompt embeddings.

    [PROPOSED] exact speed-up: the causal mask lets no position attend to a later one, so the
    output at ``eot`` depends on positions ``0..eot`` only. Running ``length = max eot + 1``
    positions (positional embedding and mask sliced) gives the same EOT features as 77.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        needed = (
            "token_embedding",
            "positional_embedding",
            "transformer",
            "ln_final",
            "text_projection",
            "attn_mask",
        )
        if (
            any(not hasattr(model, n) for n in needed)
            or getattr(model, "text_pool_type", "argmax") != "argmax"
        ):
            raise UsageError(
                f"CoOp needs an OpenAI-style CLIP text tower (argmax pooling); "
                f"{type(model).__name__} has none"
            )
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.positional_embedding = model.positional_embedding
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask.clone(), persistent=False)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.positional_embedding.dtype

    def forward(self, prompts: torch.Tensor, eot: torch.Tensor, *, length: int | None = None) -> torch.Tensor:
        """Text features ``[C, D]`` of prompt embeddings ``[C, L, W]`` read at ``eot`` ``[C]``.

        ``length`` truncates the sequences (must exceed every ``eot``); ``None`` runs all ``L``.
        """
        n = prompts.shape[1] if length is None else length
        x = prompts[:, :n].to(self.dtype) + self.positional_embedding[:n]
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=mask))  # [C, n, W]
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [C, W]
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # [C, D]


# ---------------------------------------------------------------------------- prompt learner


def name_lengths(tokenizer, classnames: list[str]) -> list[int]:
    """BPE tokens per class name ([CODE] ``len(_tokenizer.encode(name))``): tokenised alone, EOT index − 1."""
    return (tokenizer(classnames).argmax(dim=-1) - 1).tolist()


def assemble(
    prefix: torch.Tensor, ctx: torch.Tensor, suffix: torch.Tensor, *, position: str, name_lens: list[int]
) -> torch.Tensor:
    """Prompt embeddings ``[C, L, W]`` from SOS ``[C, 1, W]``, ctx ``[M, W]`` / ``[C, M, W]``, suffix ``[C, L-1-M, W]``.

    ``end``: ``[SOS, ctx, name, ., EOS, pad]``; ``middle``: ctx split in halves around the name;
    ``front``: ``[SOS, name, ctx, ., EOS, pad]`` ([CODE] PromptLearner.forward).
    """
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    half = ctx.shape[1] // 2
    prompts = []
    for i, n in enumerate(name_lens):
        name, rest = suffix[i : i + 1, :n], suffix[i : i + 1, n:]
        if position == "middle":
            parts = [prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest]
        else:
            parts = [prefix[i : i + 1], name, ctx[i : i + 1], rest]
        prompts.append(torch.cat(parts, dim=1))
    return torch.cat(prompts, dim=0)


class PromptLearner(nn.Module):
    """Learnable context ``ctx`` (``[M, W]``, or ``[C, M, W]`` class-specific) plus frozen token embeddings.

    Placeholder prompts ``"X X … X {name}."`` are tokenised; ``token_prefix`` (SOS) and
    ``token_suffix`` (name, ``.``, EOS, padding) are their frozen embeddings.
    """

    def __init__(
        self, model: nn.Module, tokenizer, classnames: list[str], *, n_ctx: int, csc: bool, position: str
    ) -> None:
        super().__init__()
        names = [name.replace("_", " ") for name in classnames]
        tokens = tokenizer([" ".join(["X"] * n_ctx) + " " + name + "." for name in names])  # [C, 77]
        with torch.no_grad():
            embedding = model.token_embedding(
                tokens.to(model.token_embedding.weight.device)
            ).float()  # [C, 77, W]
        width = embedding.shape[-1]
        # [CODE] nn.init.normal_(ctx_vectors, std=0.02), generic [M, W] or class-specific [C, M, W]
        self.ctx = nn.Parameter(torch.empty(*((len(names),) if csc else ()), n_ctx, width).normal_(std=0.02))
        self.register_buffer("token_prefix", embedding[:, :1].clone())  # [C, 1, W]  SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone())  # [C, 77-1-M, W]
        self.register_buffer("eot", tokens.argmax(dim=-1))  # [C]
        self.position = position
        self.name_lens = name_lengths(tokenizer, names)

    def forward(self) -> torch.Tensor:
        return assemble(
            self.token_prefix, self.ctx, self.token_suffix, position=self.position, name_lens=self.name_lens
        )


# ---------------------------------------------------------------------------- head


class CoOpHead(Head):
    """``scale · f̂ · t̂ᵀ`` with ``t = TextEncoder(PromptLearner())``; the encoder is frozen and kept in eval."""

    inputs = ("pooled",)

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        classnames: list[str],
        *,
        n_ctx: int = 16,
        csc: bool = False,
        position: str = "end",
        scale: float = 100.0,
        truncate: bool = True,
    ) -> None:
        super().__init__()
        self.prompt_learner = PromptLearner(
            model, tokenizer, classnames, n_ctx=n_ctx, csc=csc, position=position
        )
        self.text_encoder = TextEncoder(model)
        self.register_buffer("scale", torch.tensor(float(scale)))
        full = self.prompt_learner.token_suffix.shape[1] + 1 + n_ctx
        self.length = int(self.prompt_learner.eot.max()) + 1 if truncate else full
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> CoOpHead:
        super().train(mode)
        self.text_encoder.eval()  # [CODE] only prompt_learner is a train-mode model
        self._cache = None
        return self

    def text_features(self) -> torch.Tensor:
        """Class text features ``[C, D]`` (un-normalised), float32."""
        prompts = self.prompt_learner()  # [C, L, W]
        return self.text_encoder(prompts, self.prompt_learner.eot, length=self.length).float()

    def _eval_text(self) -> torch.Tensor:
        """Text features reused across eval batches while ``ctx`` is unchanged."""
        ctx = self.prompt_learner.ctx
        key = (ctx._version, ctx.data_ptr(), ctx.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.text_features())
        return self._cache[1]

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        text = self.text_features() if self.training and torch.is_grad_enabled() else self._eval_text()
        f = F.normalize(x["pooled"], dim=-1)  # [B, D]
        return self.scale * f @ F.normalize(text, dim=-1).T  # [B, C]

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen text encoder (re-loaded from the store's backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}


# ---------------------------------------------------------------------------- config and method


@dataclass(frozen=True)
class CoOpConfig(DasslTrainOptions):
    n_ctx: int = 16
    """Context tokens M ([CODE] N_CTX 16)."""
    csc: bool = False
    """Class-specific context ([C, M, W]) instead of one generic context ([CODE] CSC False)."""
    class_token_position: Position = "end"
    """Where the class name goes: end, middle (between the context halves) or front ([CODE] end)."""
    truncate: bool = True
    """[PROPOSED] Run the text encoder on max(eot)+1 positions instead of 77 (exact under the causal mask)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("n_ctx", self.n_ctx, low=1)


@register_method
class CoOp(Method):
    name = "coop"
    description = (
        "CoOp: 16 learnable context tokens through the frozen text encoder, SGD on cached coop views (§2.5)."
    )
    Config = CoOpConfig
    deviations = (
        "[PROPOSED] ctx trained in fp32 (the official PREC fp16 stores and updates ctx in fp16); the frozen text "
        "encoder runs in the re-loaded backbone's precision (fp16 on CUDA, fp32 on CPU).",
        "[PROPOSED] coop protocol: the epoch is selected on the few-shot val; the official code evaluates the "
        "last epoch (TEST.FINAL_MODEL last_step), which --protocol paper keeps.",
        "[PROPOSED] each epoch trains on one cached coop view per image (view sampler, METHODS §1.6); exact in "
        "distribution only with at least epochs + 1 cached views.",
        "[PROPOSED] text encoder truncated to max(eot)+1 positions (exact: causal mask); option truncate=false "
        "runs all 77.",
        "[PROPOSED] logit scale from the store (100 for OpenAI weights), like the cached zero-shot logits.",
    )
    validation_free = ValidationFree("[CODE] last epoch (TEST.FINAL_MODEL last_step)", {"select": "last"})
    paper_protocol = "the last epoch is evaluated (TEST.FINAL_MODEL last_step) instead of the best on val."
    min_views = {"coop": 2}
    needs_backbone = True

    quick = {"epochs": 1}
    needed = ClipAdapter.needed

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> CoOpHead:
        cfg, bb = bundle.meta["config"], backbone()
        return CoOpHead(
            bb.model,
            bb.tokenizer,
            bundle.classnames,
            n_ctx=int(cfg["n_ctx"]),
            csc=bool(cfg["csc"]),
            position=cfg["class_token_position"],
            scale=float(state["scale"]),
            truncate=bool(cfg["truncate"]),
        )

    def resolve(self, info: TaskInfo) -> CoOpConfig:
        return self.config.resolved_training(info)

    def build_head(self, task: FitTask, *, generator: torch.Generator) -> CoOpHead:
        cfg, backbone = self.config, task.backbone()  # refuses a backbone that differs from the store's
        with seeded_init(generator):  # ctx ~ N(0, 0.02) drawn from the run's generator
            return CoOpHead(
                backbone.model,
                backbone.tokenizer,
                list(task.info.classnames),
                n_ctx=cfg.n_ctx,
                csc=cfg.csc,
                position=cfg.class_token_position,
                scale=task.info.zs_scale,
                truncate=cfg.truncate,
            )

    base2novel = True

    def novel_head(self, fitted: FitResult, task: FitTask) -> CoOpHead:
        """[CODE] CoCoOp/CoOp base-to-novel: the learned generic context with the novel class names."""
        cfg, backbone = self.config, task.backbone()
        if cfg.csc:
            raise UsageError(
                "coop with csc=true learns one context per base class; it cannot name novel classes"
            )
        head = CoOpHead(
            backbone.model,
            backbone.tokenizer,
            list(task.info.classnames),
            n_ctx=cfg.n_ctx,
            csc=False,
            position=cfg.class_token_position,
            scale=task.info.zs_scale,
            truncate=cfg.truncate,
        )
        head.prompt_learner.ctx.data.copy_(fitted.head.prompt_learner.ctx.data)
        return head

    def train_settings(self, task: FitTask) -> TrainSettings:
        return self.config.resolved_training(task.info).train_settings(policy="coop")

    def finalize(self, result: TrainResult, task: FitTask) -> FitResult:
        select = self.config.resolved_training(task.info).select
        return FitResult(
            result.head,
            selection={
                "epoch": result.best_epoch,
                "val_acc": result.best_score,
                "select": select,
                "text_length": result.head.length,
            },
            history=result.history,
        )
