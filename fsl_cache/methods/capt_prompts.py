"""CAPT's student and objective as the official code trains them (METHODS §2.9.2), on cached image features.

[CODE] greatest-gourmet/CAPT ``trainers/sple_promptkd.py``: ``VLPromptLearner_SPLE`` (context with DPC
decoupling), the IVLP text encoder's deep prompts, ``parse_sple_batch_train`` (confusion mining and
batch widening), ``CustomSPLECLIP.forward`` (centroid mixing and the symmetric InfoNCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import POOLED
from ..backbones.taps import TOKENS
from ..errors import UsageError
from .capt_visual import PromptedImageEncoder
from .coop import CoOpHead, TextEncoder, assemble

# ---------------------------------------------------------------------------- text side


class DeepPromptTextEncoder(TextEncoder):
    """:class:`~fsl_cache.methods.coop.TextEncoder` with deep text prompts ([CODE] IVLP ``VPT_shallow``).

    Before block ``i`` (``1 ≤ i ≤ len(deep)``) the context positions ``1..n_ctx`` are replaced by
    ``deep[i-1]``; block 0 reads the prompt learner's context. The causal mask keeps truncation exact.
    """

    @property
    def depth(self) -> int:
        """Blocks of the text transformer."""
        return len(self.transformer.resblocks)

    def forward(
        self,
        prompts: torch.Tensor,
        eot: torch.Tensor,
        deep: torch.Tensor | None = None,
        *,
        length: int | None = None,
    ) -> torch.Tensor:
        """Text features ``[C, D]`` of prompts ``[C, L, W]`` with deep prompts ``[J, n_ctx, W]`` (J < depth)."""
        if deep is None or len(deep) == 0:
            return super().forward(prompts, eot, length=length)
        n = prompts.shape[1] if length is None else length
        x = prompts[:, :n].to(self.dtype) + self.positional_embedding[:n]  # [C, n, W]
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        batch_first = getattr(self.transformer, "batch_first", True)
        n_ctx = deep.shape[1]
        for i, block in enumerate(self.transformer.resblocks):
            if 1 <= i <= len(deep):
                ctx = deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], ctx, x[:, 1 + n_ctx :]], dim=1)
            x = block(x if batch_first else x.transpose(0, 1), attn_mask=mask)
            x = x if batch_first else x.transpose(0, 1)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [C, W]
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # [C, D]


def context_init(model: nn.Module, tokenizer, words: str, n_ctx: int) -> torch.Tensor:
    """Token embeddings ``[n_ctx, W]`` of ``words``.

    [CODE] ``embedding[0, 1 : 1 + n_ctx]`` of ``tokenize(ctx_init)``."""
    tokens = tokenizer([words.replace("_", " ")])  # [1, 77]
    count = int(tokens.argmax(dim=-1)) - 1
    if count != n_ctx:
        raise UsageError(f"ctx_init {words!r} is {count} tokens; n_ctx is {n_ctx} (make them equal)")
    with torch.no_grad():
        embedding = model.token_embedding(tokens.to(model.token_embedding.weight.device)).float()
    return embedding[0, 1 : 1 + n_ctx].clone()


class CaptPromptHead(CoOpHead):
    """``scale · f̂ · t̂ᵀ`` with CAPT's student text side: context (``n_ctx`` tokens, ``ctx_init``), deep text
    prompts in the first ``text_depth`` blocks and, with ``dpc_weight``, DPC's decoupled context.

    DPC ``loop+converse`` ([CODE] ``VLPromptLearner_SPLE.forward``): the parameter ``ctx`` holds the mixed
    prompt, the encoder reads ``(ctx − (1 − w)·pre_ctx) / w``; ``ctx`` starts at ``pre_ctx`` (SPLE_INIT),
    so the first forward sees the initial context and SGD moves the read context 1/w² as fast.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        classnames: list[str],
        *,
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        text_depth: int = 9,
        dpc_weight: float | None = 0.2,
        scale: float = 100.0,
        truncate: bool = True,
        visual_depth: int = 0,
        visual_prompts: int = 4,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            classnames,
            n_ctx=n_ctx,
            csc=False,
            position="end",
            scale=scale,
            truncate=truncate,
        )
        self.text_encoder = DeepPromptTextEncoder(model)
        ctx = self.prompt_learner.ctx
        if ctx_init:
            ctx.data.copy_(context_init(model, tokenizer, ctx_init, n_ctx))
        depth = max(1, min(text_depth, self.text_encoder.depth))
        # [CODE] IVLP: VPT_shallow ~ N(0, 0.02) in blocks 1..depth-1
        self.deep = nn.Parameter(torch.empty(depth - 1, n_ctx, ctx.shape[-1]).normal_(std=0.02))
        self.dpc_weight = dpc_weight
        if dpc_weight is not None:
            self.register_buffer("pre_ctx", ctx.detach().clone())  # [n_ctx, W]
        if visual_depth > 0:
            self.image_encoder = PromptedImageEncoder(model.visual)
            depth = min(visual_depth, self.image_encoder.depth)
            # [CODE] IVLP: visual prompts ~ N(0, 0.02), one set per block 0..depth-1
            shape = (depth, visual_prompts, self.image_encoder.width)
            self.visual_prompts = nn.Parameter(torch.empty(shape).normal_(std=0.02))
            self.inputs = (POOLED, TOKENS)  # pooled: the default teacher's zero-shot ranking
        self.aux: dict[str, torch.Tensor] = {}

    def start_from(self, ctx: torch.Tensor, deep: torch.Tensor | None) -> None:
        """Start from another run's prompts: the encoder reads ``ctx`` first (DPC's ``pre_ctx`` is ``ctx``);
        ``deep`` replaces the first deep prompts (the rest keep their init)."""
        param = self.prompt_learner.ctx
        if ctx.shape != param.shape:
            raise UsageError(
                f"the initial context is {tuple(ctx.shape)}, this head's {tuple(param.shape)} (set n_ctx)"
            )
        with torch.no_grad():
            param.copy_(ctx)
            if self.dpc_weight is not None:
                self.pre_ctx.copy_(ctx)
            if deep is not None and len(deep) and len(self.deep):
                if deep.shape[1:] != self.deep.shape[1:]:
                    raise UsageError(
                        f"the initial deep prompts are {tuple(deep.shape)}, this head's {tuple(self.deep.shape)}"
                    )
                n = min(len(deep), len(self.deep))
                self.deep[:n].copy_(deep[:n])
        self._cache = None

    @property
    def visual_depth(self) -> int:
        """Blocks whose input holds learned visual prompts (0: the cached pooled embedding is the image feature)."""
        return len(self.visual_prompts) if hasattr(self, "visual_prompts") else 0

    def train(self, mode: bool = True) -> CaptPromptHead:
        super().train(mode)
        if self.visual_depth:
            self.image_encoder.eval()  # frozen backbone: only the prompts train
        return self

    def image_features(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised image features ``[B, D]``: the prompted ViT on cached tokens, or the cached embedding."""
        if not self.visual_depth:
            return F.normalize(x[POOLED], dim=-1)
        return F.normalize(self.image_encoder(x[TOKENS], self.visual_prompts).float(), dim=-1)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The prompts and buffers; the frozen encoders come back from the store's backbone."""
        return {k: v for k, v in super().saved_state().items() if not k.startswith("image_encoder.")}

    @property
    def text_depth(self) -> int:
        """Blocks that read learned context: block 0 (``ctx``) plus one per deep prompt."""
        return 1 + len(self.deep)

    def context(self) -> torch.Tensor:
        """The context the encoder reads ``[n_ctx, W]`` (DPC-decoupled when ``dpc_weight`` is set)."""
        ctx = self.prompt_learner.ctx
        if self.dpc_weight is None:
            return ctx
        w = self.dpc_weight
        return (ctx - (1.0 - w) * self.pre_ctx) / w

    def text_features(self) -> torch.Tensor:
        learner = self.prompt_learner
        prompts = assemble(
            learner.token_prefix, self.context(), learner.token_suffix, position="end", name_lens=[]
        )
        return self.text_encoder(prompts, learner.eot, self.deep, length=self.length).float()

    def _eval_text(self) -> torch.Tensor:
        ctx, deep = self.prompt_learner.ctx, self.deep
        key = (ctx._version, ctx.data_ptr(), deep._version, deep.data_ptr(), ctx.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.text_features())
        return self._cache[1]

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        text = self.text_features() if training else self._eval_text()
        f = self.image_features(x)  # [B, D]
        if training:
            self.aux = {"text": text, "image": f}  # the loss widens the batch against these class features
        return self.scale * f @ F.normalize(text, dim=-1).T  # [B, C]


# ---------------------------------------------------------------------------- confusion mining


def mine_negatives(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    topk: int = 8,
    fill: int = 2,
    generator: torch.Generator,
) -> list[list[int]]:
    """Hard-negative classes per sample ([CODE] ``parse_sple_batch_train``).

    Per sample in batch order: the teacher's top-``topk`` classes minus the label, minus every class
    already in the batch (its labels and the negatives mined for earlier samples). When fewer than
    ``fill`` remain, random classes not in the batch are added: ``C − 1`` draws of
    ``random.randint(1, C − 1)`` (class 0 is never drawn), stopping at ``fill``.
    """
    num_classes = teacher_logits.shape[1]
    in_batch = [int(y) for y in labels]
    top = teacher_logits.topk(min(topk, num_classes), dim=1).indices.tolist()  # softmax keeps the order
    mined = []
    for i, y in enumerate(in_batch[: len(top)]):
        negatives = []
        for c in top[i]:
            if c != y and c not in in_batch:
                negatives.append(c)
                in_batch.append(c)
        if len(negatives) < fill:
            for _ in range(num_classes - 1):
                c = 1 + int(torch.randint(num_classes - 1, (1,), generator=generator))
                if len(negatives) >= fill:
                    break
                if c not in in_batch:
                    negatives.append(c)
                    in_batch.append(c)
        mined.append(negatives)
    return mined


def widen_batch(
    features: torch.Tensor,
    labels: torch.Tensor,
    negatives: list[list[int]],
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[f_i; one random bank image of each negative class of i]`` for each sample ``i`` in order, and labels.

    ``features`` ``[B, D]``, ``bank`` ``[N, D]`` with ``bank_labels`` ``[N]``; returns ``[B + Σ n_i, D]``.
    """
    order = torch.argsort(bank_labels, stable=True)
    counts = torch.bincount(bank_labels, minlength=int(bank_labels.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    rows, out_labels, picks = [], [], []
    for i, negs in enumerate(negatives):
        rows.append(("batch", i))
        out_labels.append(int(labels[i]))
        for c in negs:
            if c >= len(counts) or counts[c] == 0:
                raise UsageError(f"the bank holds no image of class {c}")
            pick = int(starts[c]) + int(torch.randint(int(counts[c]), (1,), generator=generator))
            rows.append(("bank", len(picks)))
            picks.append(int(order[pick]))
            out_labels.append(c)
    chosen = bank[torch.tensor(picks, dtype=torch.long, device=bank.device)] if picks else bank[:0]
    parts = [features[j : j + 1] if kind == "batch" else chosen[j : j + 1] for kind, j in rows]
    return torch.cat(parts), torch.tensor(out_labels, dtype=torch.long, device=features.device)


# ---------------------------------------------------------------------------- semantic guidance and loss


def mix_centroids(
    text: torch.Tensor, centroids: torch.Tensor, *, scale: float = 1.0, generator: torch.Generator
) -> torch.Tensor:
    """``t_i + scale · (Σ_k A_ik c_k + b_i)``: a fresh ``nn.Linear(K → N)`` applied to the centroids' columns.

    [CODE] ``proj = nn.Linear(topk.size(0), text.size(0)); text + proj(topk.T).T``, re-initialised every
    forward: ``A ~ U(±1/√K)`` ``[N, K]`` and ``b ~ U(±1/√K)`` ``[N]`` (torch's Linear init), the bias
    added to every dimension. ``text`` ``[N, D]``, ``centroids`` ``[K, D]``.
    """
    n, k = text.shape[0], centroids.shape[0]
    bound = 1.0 / k**0.5
    a = (torch.rand(n, k, generator=generator) * 2 - 1) * bound
    b = (torch.rand(n, generator=generator) * 2 - 1) * bound
    a, b = a.to(text), b.to(text)
    return text + scale * (a @ centroids.to(text) + b[:, None])


def capt_infonce(image: torch.Tensor, text: torch.Tensor, *, scale: float) -> torch.Tensor:
    """``(CE(s, arange) + CE(sᵀ, arange)) / 2`` with ``s = scale · image @ textᵀ`` ``[N, N]`` ([CODE] sple_loss).

    Row ``i`` of ``text`` is the (mixed) text feature of image ``i``'s label; repeated labels stay negatives.
    """
    logits = scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
