"""A frozen open_clip CLIP model and the feature taps fsl-cache extracts from it (METHODS §1.1)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import QuickGELU, VisionTransformer

from fsl_cache.backbones.encoder import ZS_SCALE
from fsl_cache.backbones.taps import TOKENS
from fsl_cache.backbones.tiny import TINY_MODELS
from fsl_cache.backbones.weights import WeightsSource
from fsl_cache.errors import BackboneError, UsageError, did_you_mean

POOLED = "pooled"
PREPROJ = "preproj"
"""The pooled feature before the image tower's last projection (ProLIP, METHODS §2.10): RN the attention
pool's output before ``c_proj``, ViT ``ln_post`` of the class token before ``proj``."""
RN_LAYERS = (1, 2, 3, 4)


@dataclass(eq=False, repr=False)
class Backbone:
    """A frozen CLIP model (``eval()``, no gradients) with its identity and feature taps.

    Tap names: ``pooled`` (the un-normalised ``encode_image`` output), ``rn/layer1``…``rn/layer4``
    for ResNets, ``vit/block01``…``vit/blockNN`` for ViTs (1-based: ``vit/block06`` is the output
    of ``transformer.resblocks[5]``, CLS token first, e.g. ``[197, 768]`` for ViT-B/16), and
    ``preproj`` (``pooled`` before the last projection, :meth:`projection`) and, for ViTs, ``vit/tokens``
    (the input of ``ln_pre``, same shape as a block's output).
    """

    model: torch.nn.Module
    """The open_clip ``CLIP`` model, on ``device``, weights in ``dtype`` (open_clip's mixed casting)."""
    arch: str
    """Architecture name (``RN50``) or the ``hf-hub:``/``local-dir:`` spec it came from."""
    pretrained: str
    """The weights argument as given (tag, path, ``none``); the spec itself for hf-hub:/local-dir:."""
    kind: str
    """``rn`` or ``vit``."""
    random_init: bool
    """True for ``pretrained="none"``: features are meaningless for real use."""
    preprocess_cfg: dict
    """JSON-able image preprocessing: size, mode, mean, std, interpolation, resize_mode, fill_color."""
    quick_gelu: bool
    """Whether the built model uses QuickGELU (OpenAI-trained weights need it)."""
    embed_dim: int
    """Dimension D of ``pooled`` and of the text classifier rows."""
    image_size: int
    """Square input side in pixels."""
    num_blocks: int | None
    """Transformer blocks of a ViT image tower; ``None`` for ResNets."""
    tokenizer: Callable
    """open_clip tokenizer: list of strings → ``LongTensor[N, context_length]``."""
    device: torch.device
    dtype: torch.dtype
    """Compute dtype: images are cast to it and taps are returned in it."""
    notes: tuple[str, ...]
    """Facts to announce to the user (random weights, non-weights-only loading, overrides)."""
    weights: WeightsSource
    """Where the weights came from; identifies them in ``fingerprint_parts``."""
    model_cfg: dict | None = None
    """open_clip architecture config, kept for ``hf-hub:``/``local-dir:`` whose name does not pin it."""
    _fingerprint: dict | None = field(default=None, init=False)

    def __repr__(self) -> str:
        return (
            f"Backbone({self.arch!r}, pretrained={self.pretrained!r}, kind={self.kind!r}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    # --- identity ---------------------------------------------------------------------------------

    def fingerprint_parts(self) -> dict:
        """JSON-able parts that identify the features this backbone computes.

        ``arch``, ``weights`` (source plus SHA-256 of the weights file, or of the state dict for
        ``none``), the resolved ``preprocess`` config, ``quick_gelu`` and ``embed_dim``. Raises
        rather than returning anything that does not identify the weights.
        """
        if self._fingerprint is None:
            parts = {
                "arch": "local-dir" if self.weights.kind == "local-dir" else self.arch,
                "weights": self.weights.identity(self.model),
                "preprocess": copy.deepcopy(self.preprocess_cfg),
                "quick_gelu": self.quick_gelu,
                "embed_dim": self.embed_dim,
            }
            if self.model_cfg is not None:
                parts["model_cfg"] = copy.deepcopy(self.model_cfg)
            self._fingerprint = parts
        return copy.deepcopy(self._fingerprint)

    @property
    def logit_scale(self) -> float:
        """CLIP's zero-shot logit scale: ``logit_scale.exp()`` of the loaded weights (100 for random weights and
        the tiny test models)."""
        if self.fixed_logit_scale:
            return ZS_SCALE
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def fixed_logit_scale(self) -> bool:
        # Random weights carry open_clip's untrained init exp(log(1/0.07)) ≈ 14.3, which no released CLIP uses;
        # the tiny models stand in for CLIP in tests and the demo, whose recipes assume its 100 (the shapes
        # model learnt 19.4). 100 also keeps their stores and runs as they were.
        return self.random_init or self.arch in TINY_MODELS

    # --- taps -------------------------------------------------------------------------------------

    def taps(self) -> list[str]:
        """Every tap this backbone can produce, ``pooled`` first (``preproj``, ``vit/tokens`` last: positions index
        blocks)."""
        if self.kind == "rn":
            return [POOLED] + [f"rn/layer{k}" for k in RN_LAYERS] + [PREPROJ]
        return [POOLED] + [self._vit_tap(i) for i in range(self.num_blocks)] + [PREPROJ, TOKENS]

    @property
    def dense_tap(self) -> str:
        """The map entering the pooling layer: ``rn/layer4``, or the input of a ViT's last block."""
        if self.kind == "rn":
            return "rn/layer4"
        if self.num_blocks < 2:
            raise BackboneError(f"{self.arch} has a single block: no block output enters the last one")
        return self._vit_tap(self.num_blocks - 2)

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last projection ``(W0 [D, D_pre], bias [D] or None)``, fp32 on CPU: ``pooled = preproj W0ᵀ + bias``.

        RN: the attention pool's ``c_proj`` (with its bias); ViT: ``proj`` transposed (no bias).
        """
        visual = self.model.visual
        if self.kind == "rn":
            c_proj = visual.attnpool.c_proj
            return c_proj.weight.detach().float().cpu().clone(), c_proj.bias.detach().float().cpu().clone()
        self._check_token_pool()
        return visual.proj.detach().float().cpu().T.contiguous(), None

    def _check_token_pool(self) -> None:
        visual = self.model.visual
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.proj is None:
            raise BackboneError(
                f"{self.arch} pools its ViT tokens another way than CLIP's class token + proj: no 'preproj' tap"
            )

    @contextmanager
    def _grabbing_preproj(self, wanted: bool) -> Iterator[dict]:
        """Inside the block, forwards leave in the yielded dict what ``preproj`` is computed from.

        RN: the map entering the attention pool (:meth:`_preproj` pools it again without ``c_proj``);
        ViT: the class token after ``ln_post``.
        """
        grabbed: dict[str, torch.Tensor] = {}
        if not wanted:
            yield grabbed
            return
        visual = self.model.visual
        if self.kind == "rn":

            def pool_input(module, args):
                grabbed[PREPROJ] = args[0]

            hook = visual.attnpool.register_forward_pre_hook(pool_input)
        else:
            self._check_token_pool()

            def class_token(module, args, output):  # ln_post runs on all tokens, or on the pooled one
                grabbed[PREPROJ] = output[:, 0] if output.dim() == 3 else output

            hook = visual.ln_post.register_forward_hook(class_token)
        try:
            yield grabbed
        finally:
            hook.remove()

    @contextmanager
    def _grabbing_tokens(self, wanted: bool) -> Iterator[dict]:
        """Inside the block, forwards leave the input of a ViT's ``ln_pre`` in the yielded dict."""
        grabbed: dict[str, torch.Tensor] = {}
        if not wanted:
            yield grabbed
            return

        def ln_pre_input(module, args):
            grabbed[TOKENS] = args[0]

        hook = self.model.visual.ln_pre.register_forward_pre_hook(ln_pre_input)
        try:
            yield grabbed
        finally:
            hook.remove()

    def _preproj(self, grabbed: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":
            return grabbed
        attnpool = self.model.visual.attnpool
        eye = torch.eye(attnpool.c_proj.in_features, device=grabbed.device, dtype=grabbed.dtype)
        identity = {"c_proj.weight": eye, "c_proj.bias": torch.zeros_like(eye[0])}
        return torch.func.functional_call(attnpool, identity, (grabbed,))

    def tap_shape(self, tap: str) -> tuple[int, ...]:
        """Per-image shape of ``tap`` (no batch axis), from the architecture without a forward."""
        index = self._tap_indices([tap])[tap]
        if tap == POOLED:
            return (self.embed_dim,)
        visual = self.model.visual
        if tap == PREPROJ:
            return (visual.attnpool.c_proj.in_features if self.kind == "rn" else visual.proj.shape[0],)
        if self.kind == "rn":
            channels = getattr(visual, f"layer{index}")[-1].bn3.num_features
            side = _rn_stem_side(self.image_size) // 2 ** (index - 1)  # layer2..4 halve (avg-pool)
            return (channels, side, side)
        grid_h, grid_w = visual.grid_size
        return (grid_h * grid_w + 1, visual.transformer.width)  # +1: the CLS token

    def encode_taps(self, images: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """Compute ``taps`` for ``images [B, 3, H, W]``: ``{tap: [B, *tap_shape(tap)]}``.

        One forward through ``model.forward_intermediates``, stopping after the last block needed
        when ``pooled`` is not asked for. Tensors stay on ``device`` in ``dtype``.
        """
        indices = self._tap_indices(taps)
        x = images.to(self.device, self.dtype)
        with (
            torch.no_grad(),
            self._grabbing_preproj(PREPROJ in indices) as grabbed,
            self._grabbing_tokens(TOKENS in indices) as tokens,
        ):
            blocks = sorted({i for t, i in indices.items() if t not in (POOLED, PREPROJ, TOKENS)})
            want_pooled = POOLED in indices or PREPROJ in indices  # preproj is grabbed on the way
            if not blocks:
                out = {POOLED: self.model.encode_image(x, normalize=False)}
            elif self.kind == "rn":
                out = self._rn_taps(x, blocks, want_pooled)
            else:
                out = self._vit_taps(x, blocks, want_pooled)
            if PREPROJ in indices:
                out[PREPROJ] = self._preproj(grabbed[PREPROJ])
            out.update(tokens)
        return {t: out[t].to(self.dtype) for t in indices}

    def _rn_taps(self, x: torch.Tensor, layers: list[int], want_pooled: bool) -> dict:
        # open_clip 3.3's ModifiedResNet.forward_intermediates inverts stop_early (False truncates
        # at the last index asked for, then attnpool runs on the wrong map). Asking for layer4
        # whenever pooled is wanted makes the result right for either behaviour.
        asked = sorted(set(layers) | ({4} if want_pooled else set()))
        res = self.model.forward_intermediates(
            image=x,
            image_indices=asked,
            normalize=False,
            intermediates_only=not want_pooled,
            stop_early=False,
        )
        out = {f"rn/layer{k}": t for k, t in zip(asked, res["image_intermediates"], strict=True)}
        if want_pooled:
            out[POOLED] = res["image_features"]  # attnpool output, un-normalised
        return out

    def _vit_taps(self, x: torch.Tensor, blocks: list[int], want_pooled: bool) -> dict:
        res = self.model.forward_intermediates(
            image=x,
            image_indices=blocks,
            normalize=False,
            intermediates_only=not want_pooled,
            stop_early=not want_pooled,
            image_output_fmt="NLC",
            image_output_extra_tokens=True,
        )
        pairs = zip(blocks, res["image_intermediates_prefix"], res["image_intermediates"], strict=True)
        out = {
            self._vit_tap(i): torch.cat([cls, patches], dim=1)  # [B, 1 + HW, W], CLS first
            for i, cls, patches in pairs
        }
        if want_pooled:
            out[POOLED] = res["image_features"]  # ln_post(CLS) @ proj, un-normalised
        return out

    def _vit_tap(self, block: int) -> str:
        digits = max(2, len(str(self.num_blocks)))
        return f"vit/block{block + 1:0{digits}d}"

    def _tap_indices(self, taps: Sequence[str]) -> dict[str, int]:
        """``{tap: forward_intermediates index}`` in the order asked (RN 1..4, ViT 0-based)."""
        if isinstance(taps, str):
            raise UsageError(f"taps must be a list of tap names, got the string {taps!r}")
        if not taps:
            raise UsageError("No taps asked for")
        # Position in taps() (pooled first) is K for rn/layerK and NN for vit/blockNN.
        valid = {t: i for i, t in enumerate(self.taps())}
        unknown = [t for t in taps if t not in valid]
        if unknown:
            raise did_you_mean(unknown[0], valid, what=f"tap for {self.arch}")
        offset = 0 if self.kind == "rn" else 1  # ViT indices are 0-based block numbers
        return {t: valid[t] - offset for t in dict.fromkeys(taps)}

    # --- text -------------------------------------------------------------------------------------

    def text_classifier(
        self, classnames: Sequence[str], templates: Sequence[str | Callable], *, batch_size: int = 512
    ) -> torch.Tensor:
        """Zero-shot classifier ``W [C, D]``, fp32 on CPU (METHODS §1.3).

        Per class: fill every template (``"a photo of a {}."`` or a callable), encode, L2-normalise
        each embedding, average, L2-normalise again. Class names are used as given.
        """
        return class_weights(self.template_embeddings(classnames, templates, batch_size=batch_size))

    def template_embeddings(
        self, classnames: Sequence[str], templates: Sequence[str | Callable], *, batch_size: int = 512
    ) -> torch.Tensor:
        """Raw text embeddings ``[C, T, D]`` of every template filled with every class, un-normalised, fp32 on CPU."""
        if not classnames or not templates:
            raise UsageError("text_classifier needs at least one class name and one template")
        texts = [_fill(t, c) for c in classnames for t in templates]
        return self._encode_texts(texts, batch_size).view(len(classnames), len(templates), -1)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 512) -> torch.Tensor:
        """Text embeddings ``[T, D]`` of whole sentences, un-normalised, fp32 on CPU."""
        return self._encode_texts(list(texts), batch_size)

    def _encode_texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
                # Normalising in fp32 even for fp16 models; the originals do it in fp16.
                chunks.append(self.model.encode_text(tokens, normalize=False).float().cpu())
        return torch.cat(chunks)


def class_weights(per_template: torch.Tensor) -> torch.Tensor:
    """Zero-shot class weights ``[C, D]`` from raw per-template embeddings ``[C, T, D]`` (METHODS §1.3):
    L2-normalise each, average over templates, L2-normalise again."""
    return F.normalize(F.normalize(per_template.float(), dim=-1).mean(dim=1), dim=-1)


def _fill(template: str | Callable, classname: str) -> str:
    if callable(template):
        return template(classname)
    if "{}" not in template:
        raise UsageError(f"Template {template!r} has no '{{}}' placeholder for the class name")
    return template.format(classname)


def _rn_stem_side(image_size: int) -> int:
    """Side after ModifiedResNet's stem: a stride-2 3x3 conv (padding 1), then AvgPool2d(2)."""
    return ((image_size - 1) // 2 + 1) // 2


# --- building a Backbone from a loaded model --------------------------------------------------------


def visual_kind(model: torch.nn.Module, arch: str) -> str:
    """``rn`` or ``vit`` from the image tower's class; raise for towers the taps do not cover."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, ModifiedResNet):
        return "rn"
    if isinstance(visual, VisionTransformer):
        return "vit"
    raise BackboneError(
        f"{arch} has a {type(visual).__name__} image tower; fsl-cache supports "
        "open_clip's ModifiedResNet (RN*) and VisionTransformer (ViT-*) towers"
    )


def describe_model(model: torch.nn.Module, arch: str) -> dict:
    """The Backbone fields read off a built model: kind, sizes, activation, preprocessing."""
    kind = visual_kind(model, arch)
    visual = model.visual
    size = visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise BackboneError(f"{arch} takes {height}x{width} inputs; only square inputs are supported")
    return {
        "kind": kind,
        "image_size": int(height),
        "num_blocks": len(visual.transformer.resblocks) if kind == "vit" else None,
        "embed_dim": int(visual.output_dim),
        "quick_gelu": any(isinstance(m, QuickGELU) for m in model.modules()),
        "preprocess_cfg": jsonable_preprocess(visual.preprocess_cfg),
    }


def jsonable_preprocess(cfg: dict) -> dict:
    """open_clip's preprocess config with tuples as lists and a square ``size`` as an int."""
    out = {}
    for key, value in sorted(cfg.items()):
        if isinstance(value, tuple | list):
            value = list(value)
            if key == "size" and len(set(value)) == 1:
                value = value[0]
        out[key] = value
    return out
