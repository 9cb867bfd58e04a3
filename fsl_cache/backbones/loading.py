"""``load_backbone``: every way open_clip names a CLIP model, resolved offline-first and frozen."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg

from fsl_cache.backbones.backbone import Backbone, describe_model
from fsl_cache.backbones.catalog import config_kind, list_models
from fsl_cache.backbones.tiny import SHAPES_NOTE, SHAPES_TAG, TINY_MODELS
from fsl_cache.backbones.weights import (
    WeightsSource,
    describe_mismatch,
    file_sha256,
    first_line,
    is_torchscript_archive,
    openai_release_name,
    resolve_hf_hub,
    resolve_local_dir,
    resolve_tag,
    weights_file_error,
)
from fsl_cache.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED
from fsl_cache.errors import BackboneError, FslError, UsageError, did_you_mean

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RANDOM_INIT_SEED = 0
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Preprocessing a tag carries; 'size' always comes from the built model, as open_clip does.
_TAG_PREPROCESS_KEYS = {f.name for f in fields(PreprocessCfg)} - {"size"}
# open_clip messages that our own notes already say better.
_REDUNDANT = ("No pretrained weights loaded", "Ignoring `pretrained=")


@dataclass
class _Spec:
    """A backbone request resolved to an architecture and a local weights source."""

    arch: str
    name: str  # what open_clip.create_model / get_tokenizer get: arch or 'hf-hub:…'/'local-dir:…'
    pretrained: str
    weights: WeightsSource
    model_cfg: dict | None = None
    force_quick_gelu: bool = False
    force_preprocess: dict | None = None
    notes: list[str] = field(default_factory=list)


def load_backbone(
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> Backbone:
    """Build a frozen CLIP backbone from anything open_clip accepts, without surprises offline.

    ``model``: an open_clip architecture (``RN50``, ``ViT-B-16``, ``fsl-tiny-rn``), ``hf-hub:org/repo``
    or ``local-dir:DIR`` (a folder with ``open_clip_config.json`` and weights). ``pretrained``: a tag
    (``openai``, ``laion2b_s34b_b79k``), a weights file (open_clip state dict ``.pt``/``.bin``,
    ``.safetensors``, or an OpenAI TorchScript ``.pt``), ``local-dir:DIR``, or ``none`` for a
    deterministic random init. ``precision`` is the compute dtype: ``fp32``, ``bf16``, or ``fp16``
    (CUDA only: on CPU it raises rather than silently computing something else).

    Raises :class:`UsageError` for unknown names (with a suggestion) and :class:`BackboneError` for
    weights that cannot be had or read, saying what to download and where.
    """
    target, dtype = _target(device, precision)
    spec = resolve_spec(model, pretrained, cache_dir=cache_dir)
    with _announced(spec.notes):
        clip = _build(spec, target, precision, cache_dir)
    clip.eval().requires_grad_(False)
    return Backbone(
        model=clip,
        arch=spec.arch,
        pretrained=spec.pretrained,
        random_init=spec.weights.kind == "none",
        tokenizer=LazyTokenizer(spec, cache_dir),
        device=target,
        dtype=dtype,
        notes=tuple(spec.notes),
        weights=spec.weights,
        model_cfg=spec.model_cfg,
        **describe_model(clip, spec.arch),
    )


def load_architecture(model: str = DEFAULT_MODEL) -> Backbone:
    """The Backbone of architecture ``model`` on the meta device: taps and their shapes, no weights.

    Nothing is read, downloaded or initialised, so sizing a store (``fsl-cache plan``) costs no memory
    and no network. The tokenizer is left out: nothing can be encoded with it.
    """
    arch = _known_arch(model)
    with torch.device("meta"), _announced([]):
        clip = open_clip.create_model(arch, device="meta", load_weights=False, pretrained_text=False)
    return Backbone(
        model=clip,
        arch=arch,
        pretrained="none",
        random_init=True,
        tokenizer=None,
        device=torch.device("meta"),
        dtype=torch.float32,
        notes=(),
        weights=WeightsSource("none"),
        **describe_model(clip, arch),
    )


def _target(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    if precision not in PRECISIONS:
        raise did_you_mean(precision, PRECISIONS, what="precision")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"Unknown device '{device}' (use cpu, cuda or cuda:N)") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"Device '{device}' asked for, but torch {torch.__version__} sees no CUDA device")
    if target.type == "cuda" and target.index is None:  # so tensors' devices compare equal to it
        target = torch.device("cuda", torch.cuda.current_device())
    if precision == "fp16" and target.type == "cpu":
        raise UsageError(
            "Precision fp16 needs a CUDA device (CPU fp16 is emulated and slow); use fp32 or bf16 on CPU"
        )
    return target, PRECISIONS[precision]


# --- resolving the request --------------------------------------------------------------------------


def resolve_spec(model: str, pretrained: str, *, cache_dir: str | None) -> _Spec:
    """Turn (model, pretrained) into an architecture and a local weights source, or raise."""
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise UsageError("pretrained must be a tag (e.g. openai), a weights file, local-dir:DIR or none")
    notes: list[str] = []
    model, pretrained = _schema_from_pretrained(model, pretrained, notes)
    if model.startswith(HF_HUB) or model.startswith(LOCAL_DIR):
        spec = _schema_spec(model, pretrained, cache_dir=cache_dir)
    else:
        spec = _named_spec(_known_arch(model), pretrained, cache_dir=cache_dir)
    spec.notes[:0] = notes
    return spec


def _schema_from_pretrained(model: str, pretrained: str, notes: list[str]) -> tuple[str, str]:
    """Be lenient: ``pretrained="local-dir:DIR"``, ``"hf-hub:…"`` or a config folder names the model."""
    spec = pretrained
    if not spec.startswith((HF_HUB, LOCAL_DIR)) and _is_dir(spec):
        spec = LOCAL_DIR + spec
    if not spec.startswith((HF_HUB, LOCAL_DIR)):
        return model, pretrained
    if model not in (DEFAULT_MODEL, spec):  # only the signature's default
        notes.append(f"model '{model}' ignored: the architecture comes from {spec}")
    return spec, spec


def _schema_spec(model: str, pretrained: str, *, cache_dir: str | None) -> _Spec:
    if not model.split(":", 1)[1].strip():
        raise UsageError(f"'{model}' names no repo or folder after the colon")
    notes = []
    if pretrained not in (DEFAULT_PRETRAINED, model):  # only the signature's default here
        notes.append(f"pretrained '{pretrained}' ignored: {model.split(':')[0]}: models carry their weights")
    if model.startswith(HF_HUB):
        repo = model[len(HF_HUB) :]
        folder = resolve_hf_hub(repo, cache_dir=cache_dir)
        path, cfg = resolve_local_dir(folder)
        source = WeightsSource("hf-hub", path, repo=repo)
    else:
        folder = _user_path(model[len(LOCAL_DIR) :], resolve=True)
        path, cfg = resolve_local_dir(folder)
        model, source = LOCAL_DIR + str(folder), WeightsSource("local-dir", path)
    _check_tower(model, cfg)
    # Both build from the folder: an hf-hub snapshot is a local-dir, so no network is touched.
    return _Spec(
        arch=model, name=LOCAL_DIR + str(folder), pretrained=model, weights=source, model_cfg=cfg, notes=notes
    )


def _user_path(text: str, *, resolve: bool = False) -> Path:
    """``text`` with ``~`` expanded; a :class:`BackboneError` for a path no file system can have."""
    if "\0" in text:
        raise BackboneError(f"Weights path {text!r} contains a NUL byte")
    try:
        path = Path(text).expanduser()
        return path.resolve() if resolve else path
    except (RuntimeError, OSError) as err:  # an unknown ~user, a symlink loop
        raise BackboneError(f"Cannot use the path {text}: {err}") from None


def _is_dir(text: str) -> bool:
    try:
        return _user_path(text).is_dir()
    except BackboneError:
        return False  # then it is no folder; the weights lookup says why it is nothing else either


def _known_arch(model: str) -> str:
    arch = model.strip().replace("/", "-")  # open_clip spells OpenAI's ViT-B/16 as ViT-B-16
    if arch not in open_clip.list_models():
        raise did_you_mean(model, [info.name for info in list_models()], what="model")
    _check_tower(arch, open_clip.get_model_config(arch))
    return arch


def _check_tower(name: str, cfg: dict) -> None:
    """Fail before any download for towers the taps do not cover."""
    if config_kind(cfg) is None:
        raise BackboneError(
            f"{name} has a timm or CoCa image tower; fsl-cache supports open_clip's "
            "ModifiedResNet (RN*) and VisionTransformer (ViT-*) CLIP models"
        )


def _named_spec(arch: str, pretrained: str, *, cache_dir: str | None) -> _Spec:
    if pretrained.strip().lower() == "none":
        note = (
            f"pretrained='none': {arch} has RANDOM weights (seed {RANDOM_INIT_SEED}); "
            "its features are for tests and demos only"
        )
        return _Spec(arch, arch, pretrained, WeightsSource("none"), notes=[note])
    if open_clip.get_pretrained_cfg(arch, pretrained):
        return _tag_spec(arch, pretrained, cache_dir=cache_dir)
    path = _user_path(pretrained)
    if path.is_file():
        return _file_spec(arch, pretrained, path)
    if Path(pretrained).suffix in WEIGHTS_SUFFIXES or "/" in pretrained or "\\" in pretrained:
        raise BackboneError(f"Weights file not found: {pretrained}")
    tags = [*open_clip.list_pretrained_tags_by_model(arch), "none"]
    raise did_you_mean(pretrained, tags, what=f"pretrained tag for {arch}")


def _tag_spec(arch: str, tag: str, *, cache_dir: str | None) -> _Spec:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    path = resolve_tag(arch, tag, cache_dir=cache_dir)
    clean = tag.lower().replace("-", "_")  # open_clip's own tag normalisation
    spec = _Spec(
        arch,
        arch,
        tag,
        WeightsSource("tag", path, tag=clean),
        force_preprocess={k: cfg[k] for k in _TAG_PREPROCESS_KEYS if k in cfg},
    )
    if arch in TINY_MODELS and clean == SHAPES_TAG:
        spec.notes.append(SHAPES_NOTE.format(arch=arch))
    if cfg.get("quick_gelu") and not open_clip.get_model_config(arch).get("quick_gelu"):
        # open_clip builds GELU here and only warns; the weights were trained with QuickGELU.
        spec.force_quick_gelu = True
        spec.notes.append(f"QuickGELU enabled: {arch} '{tag}' weights were trained with it")
    return spec


def _file_spec(arch: str, pretrained: str, path: Path) -> _Spec:
    if is_torchscript_archive(path):
        note = (
            f"{path.name} is a TorchScript archive (OpenAI format): loaded with torch.jit.load, "
            "which is not weights-only and can run code from the file; load only files you trust"
        )
        spec = _Spec(arch, arch, pretrained, WeightsSource("openai-jit", path), notes=[note])
        release = openai_release_name(file_sha256(path))
        if release:
            spec.notes.append(f"{path.name} is OpenAI's {release} release (SHA-256 as in its URL)")
        return spec
    spec = _Spec(arch, arch, pretrained, WeightsSource("file", path))
    quick = f"{arch}-quickgelu"
    if not open_clip.get_model_config(arch).get("quick_gelu") and quick in open_clip.list_models():
        spec.notes.append(f"{arch} uses GELU; if {path.name} holds OpenAI-trained weights, use {quick}")
    return spec


# --- building the model -----------------------------------------------------------------------------


def _build(spec: _Spec, device: torch.device, precision: str, cache_dir: str | None) -> torch.nn.Module:
    try:
        if spec.weights.kind == "openai-jit":
            return _load_openai_jit(spec, device, precision)
        if spec.weights.kind == "none":
            return _random_model(spec.arch, device, precision)
        file_given = spec.weights.kind in ("tag", "file")
        return open_clip.create_model(
            spec.name,
            pretrained=str(spec.weights.path) if file_given else None,
            precision=precision,
            device=device,
            force_quick_gelu=spec.force_quick_gelu,
            force_preprocess_cfg=spec.force_preprocess,
            cache_dir=cache_dir,
            require_pretrained=True,
        )  # never a silent random init
    except FslError:
        raise
    except Exception as exc:
        raise _build_error(spec, exc, cache_dir) from exc


def _build_error(spec: _Spec, exc: Exception, cache_dir: str | None) -> BackboneError:
    """One line for a failed build: what is wrong with the weights file, if there is one."""
    try:
        expected = _meta_shapes(spec.name, cache_dir=cache_dir)
    except Exception:
        expected = None
    if spec.weights.path is None or expected is None:
        return BackboneError(f"Cannot build {spec.arch}: {first_line(exc)}")
    return weights_file_error(spec.weights.path, spec.arch, expected, exc)


def _random_model(arch: str, device: torch.device, precision: str) -> torch.nn.Module:
    # The CPU generator alone initialises (the model moves to `device` afterwards); forking it
    # keeps the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(RANDOM_INIT_SEED)
        return open_clip.create_model(
            arch, pretrained=None, precision=precision, device=device, pretrained_text=False
        )


def _load_openai_jit(spec: _Spec, device: torch.device, precision: str) -> torch.nn.Module:
    path = spec.weights.path
    try:
        clip = open_clip.openai.load_openai_model(str(path), precision=precision, device=device)
    except Exception as exc:
        raise BackboneError(
            f"{path} is a TorchScript archive but not a loadable OpenAI CLIP model: {first_line(exc)}"
        ) from exc
    found = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    mismatch = describe_mismatch(found, _meta_shapes(spec.arch))
    if mismatch:
        match = next((a for a in _openai_archs() if _meta_shapes(a) == found), None)
        hint = f"; it matches {match}: pass that as the model" if match else ""
        raise BackboneError(f"{path} holds a different architecture than {spec.arch}: {mismatch}{hint}")
    # load_openai_model sets only mean/std; OpenAI's preprocessing is open_clip's default config.
    set_model_preprocess_cfg(clip, asdict(PreprocessCfg(size=clip.visual.image_size)))
    return clip


def _openai_archs() -> list[str]:
    return [*open_clip.list_pretrained_models_by_tag("openai"), *TINY_MODELS]


def _meta_shapes(name: str, *, cache_dir: str | None = None) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of architecture ``name``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = open_clip.create_model(
            name, device="meta", load_weights=False, pretrained_text=False, cache_dir=cache_dir
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class LazyTokenizer:
    """open_clip's tokenizer for ``spec``, built on its first call: reading the BPE vocabulary takes a
    tenth of a second that encoding images (``predict``, most of stage one) never needs."""

    def __init__(self, spec: _Spec, cache_dir: str | None) -> None:
        self.spec, self.cache_dir, self._built = spec, cache_dir, None

    def __call__(self, texts, *args, **kwargs) -> torch.Tensor:
        if self._built is None:
            try:
                self._built = open_clip.get_tokenizer(self.spec.name, cache_dir=self.cache_dir)
            except Exception as exc:
                raise BackboneError(
                    f"Cannot build the tokenizer for {self.spec.arch}: {first_line(exc)}"
                ) from exc
        return self._built(texts, *args, **kwargs)


@contextmanager
def _announced(notes: list[str]):
    """Turn open_clip's logging and warnings while building into ``notes`` instead of stderr."""
    collect = _OpenClipRecords()
    root = logging.getLogger()
    root.addFilter(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeFilter(collect)
    said = collect.messages + [str(w.message) for w in caught if "open_clip" in w.filename]
    notes.extend(m for m in dict.fromkeys(said) if not m.startswith(_REDUNDANT))


class _OpenClipRecords(logging.Filter):
    """Swallow open_clip's root-logger warnings, keeping their text."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and "open_clip" in record.pathname:
            self.messages.append(first_line(Exception(record.getMessage()), limit=300))
            return False
        return True
