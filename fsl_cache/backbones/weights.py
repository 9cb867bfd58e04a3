"""Where a backbone's weights come from, how they are fetched offline, and how they are identified.

A weights identity is content-based (SHA-256 of the file bytes, or of the state dict for random
init) so that a cache is keyed by what was computed, not by a name that could point elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants
import open_clip
import torch
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.factory import _find_checkpoint_in_dir
from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

from fsl_cache.errors import BackboneError

HF_CONFIG_NAME = "open_clip_config.json"

_FILE_SHA256: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) → digest


@dataclass(frozen=True)
class WeightsSource:
    """One resolved source of weights."""

    kind: str
    """``tag`` | ``file`` | ``openai-jit`` | ``hf-hub`` | ``local-dir`` | ``none``."""
    path: Path | None = None
    """The file the weights are read from; ``None`` only for ``none``."""
    tag: str | None = None
    """open_clip's cleaned tag (``laion2b_s34b_b79k``) for ``kind == "tag"``."""
    repo: str | None = None
    """Hugging Face repo id for ``kind == "hf-hub"``."""

    def identity(self, model: torch.nn.Module) -> dict:
        """JSON-able identity: the source kind plus a SHA-256 of the weights' bytes."""
        if self.kind == "none":
            return {"source": "none", "state_dict_sha256": state_dict_sha256(model)}
        if self.path is None:
            raise BackboneError(f"Weights of kind '{self.kind}' have no file to identify them by")
        ident = {"source": self.kind, "sha256": file_sha256(self.path)}
        if self.tag:
            ident["tag"] = self.tag
        if self.repo:
            ident["repo"] = self.repo
        return ident


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_SHA256:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _FILE_SHA256[key] = digest.hexdigest()
    return _FILE_SHA256[key]


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every state-dict entry's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (OpenAI's original CLIP ``.pt``), False for ``torch.save`` files.

    Both are zips; only TorchScript ones carry ``code/`` and ``constants.pkl`` entries.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def openai_release_name(sha256: str) -> str | None:
    """The OpenAI release (``RN50``) whose download URL carries this SHA-256, if any."""
    for arch in open_clip.list_pretrained_models_by_tag("openai"):
        url = open_clip.get_pretrained_url(arch, "openai")
        if url and url.split("/")[-2] == sha256:
            return arch
    return None


# --- the Hugging Face Hub ---------------------------------------------------------------------------


@contextmanager
def hub_access() -> Iterator[str | None]:
    """Yield why the Hub is offline, or None when it may be reached.

    A Hub host that does not resolve counts as offline: huggingface_hub would otherwise retry
    every missing file for about 45 s before failing. Only the local cache is used then.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        yield "HF_HUB_OFFLINE is set"
        return
    reason = _hub_unresolvable()
    if reason is None:
        yield None
        return
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = False


def _hub_unresolvable() -> str | None:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy resolves names, not us
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} cannot be resolved (no network?)"
    return None


def _why_unavailable(offline: str | None, cause: Exception, where: str) -> str:
    if offline:
        return f"{offline} and {where} has no copy"
    return f"not in {where} and the download failed: {first_line(cause)}"


def _cache_flag(cache_dir: str | None) -> str:
    return f" --cache-dir {cache_dir}" if cache_dir else ""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened: never a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- tags -----------------------------------------------------------------------------------------


def resolve_tag(arch: str, tag: str, *, cache_dir: str | None) -> Path:
    """The local file for ``arch``/``tag``, downloaded by open_clip's own resolver when online."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if cfg.get("file"):  # a local file (the tiny models' 'shapes'): no network, not even a DNS lookup
        return Path(cfg["file"])
    with hub_access() as offline:
        try:
            path = download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as exc:  # open_clip wraps every hub/URL failure differently
            raise missing_tag_error(arch, tag, cfg, cache_dir=cache_dir, offline=offline, cause=exc) from exc
    if not path:
        raise BackboneError(f"open_clip has no download location for {arch} '{tag}'")
    return Path(path)


def missing_tag_error(
    arch: str, tag: str, cfg: dict, *, cache_dir: str | None, offline: str | None, cause: Exception
) -> BackboneError:
    """One line saying exactly what to download, where to, and the local-file alternative."""
    local = "or pass a local weights file instead (--pretrained /path/to/weights.safetensors or .pt)"
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():  # open_clip prefers the Hub to URLs when it can
        repo, filename = os.path.split(hub)  # 'org/repo/' or 'org/repo/file', as open_clip reads it
        # open_clip falls back to this file name, which every repo it lists carries.
        command = f"hf download {repo} {filename or HF_WEIGHTS_NAME}{_cache_flag(cache_dir)}"
        why = _why_unavailable(offline, cause, cache_dir or "the default Hugging Face cache")
        return BackboneError(
            f"Weights {arch} '{tag}' are not available ({why}). They come from the "
            f"Hugging Face repo {repo}: run `{command}`, {local}."
        )
    url = cfg.get("url", "")
    folder = cache_dir or "~/.cache/clip"  # open_clip's default for URL downloads
    target = f"{folder}/{os.path.basename(url)}"
    why = _why_unavailable(None, cause, folder)
    return BackboneError(
        f"Weights {arch} '{tag}' are not available ({why}). "
        f"Download {url} to {target} (`curl -L -o {target} {url}`), {local}."
    )


# --- schemas --------------------------------------------------------------------------------------


def resolve_hf_hub(repo: str, *, cache_dir: str | None) -> Path:
    """The local snapshot folder of ``hf-hub:repo`` (config and weights), fetched if online.

    The folder is then loaded as a ``local-dir:``, so building the model touches no network.
    """
    with hub_access() as offline:
        try:
            config = download_pretrained_from_hf(repo, filename=HF_CONFIG_NAME, cache_dir=cache_dir)
            download_pretrained_from_hf(repo, cache_dir=cache_dir)
        except Exception as exc:
            why = _why_unavailable(offline, exc, cache_dir or "the default Hugging Face cache")
            raise BackboneError(
                f"hf-hub:{repo} is not available ({why}). Run `hf download {repo}"
                f"{_cache_flag(cache_dir)}`, or download the repo's files into a folder and pass "
                "--model local-dir:FOLDER."
            ) from exc
    return Path(config).parent


def resolve_local_dir(folder: Path) -> tuple[Path, dict]:
    """(weights file, model_cfg) of a ``local-dir:`` folder, checked before open_clip sees it."""
    if not folder.is_dir():
        raise BackboneError(f"local-dir: folder not found: {folder}")
    config = folder / HF_CONFIG_NAME
    if not config.is_file():
        raise BackboneError(
            f"local-dir:{folder} has no {HF_CONFIG_NAME} (expected "
            '{"model_cfg": {...}, "preprocess_cfg": {...}} next to the weights)'
        )
    # The same choice open_clip makes, so the file hashed is the file loaded.
    weights = _find_checkpoint_in_dir(folder)
    if weights is None:
        raise BackboneError(
            f"local-dir:{folder} has no weights file (expected open_clip_model."
            f"safetensors or {HF_WEIGHTS_NAME})"
        )
    return Path(weights), _model_cfg(config)


def _model_cfg(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        return dict(config["model_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackboneError(
            f"{config_path} is not an open_clip config with a 'model_cfg' entry: {first_line(exc)}"
        ) from exc


# --- diagnosing a weights file that would not load ------------------------------------------------


def weights_file_error(
    path: Path, arch: str, expected: dict[str, tuple[int, ...]], cause: Exception
) -> BackboneError:
    """One line saying why ``path`` does not load into ``arch``: unreadable, or which keys differ."""
    foreign = _foreign_format(path)
    if foreign:
        return BackboneError(f"Cannot read weights file {path}: {foreign}")
    try:
        state = open_clip.factory.load_state_dict(str(path), weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            return _unreadable(path, exc)
        return BackboneError(
            f"{path} holds Python objects besides tensors, which weights-only "
            "loading refuses: save model.state_dict() (torch.save or safetensors)"
        )
    except Exception as exc:  # truncated zip, broken safetensors header
        return _unreadable(path, exc)
    mismatch = describe_mismatch({k: tuple(v.shape) for k, v in state.items()}, expected)
    if mismatch:
        return BackboneError(f"{path} does not fit architecture {arch}: {mismatch}")
    return BackboneError(f"Cannot load {path} into {arch}: {first_line(cause)}")


def _foreign_format(path: Path) -> str | None:
    """Why the file is no PyTorch/safetensors file at all, or None if its first bytes could be one."""
    with open(path, "rb") as f:
        head = f.read(9)
    # torch.save/TorchScript zips start with PK, legacy torch pickles with 0x80, and safetensors
    # with an 8-byte header length followed by a JSON '{'.
    if head.startswith(b"PK") or head[:1] == b"\x80" or head[8:9] == b"{":
        return None
    return f"not a PyTorch or safetensors file (it starts with {head[:8]!r})"


def _unreadable(path: Path, exc: Exception) -> BackboneError:
    return BackboneError(
        f"Cannot read weights file {path}: {first_line(exc)} (truncated download or corrupted file?)"
    )


def describe_mismatch(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    """'3 missing keys (e.g. a), 2 unexpected keys (e.g. b), …' or '' when the shapes all agree."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: file {found[k]}, expected {expected[k]})")
    return ", ".join(parts)
