"""Backbones: taps against a hand-written forward, text classifier, weights sources and identity.

Everything runs offline on the tiny random-weight architectures; weights files are written here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch
from open_clip.pretrained import _pcfg
from safetensors.torch import save_file

from fsl_cache.backbones import TINY_MODELS, list_models, load_backbone
from fsl_cache.backbones.weights import openai_release_name
from fsl_cache.errors import BackboneError, UsageError


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _perturbed_state(backbone, seed: int = 1) -> dict[str, torch.Tensor]:
    """The backbone's weights plus seeded noise: weights that no init produces."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).contiguous()
        for k, v in backbone.model.state_dict().items()
    }


def _assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture(scope="module")
def rn():
    return load_backbone("fsl-tiny-rn", "none")


@pytest.fixture(scope="module")
def vit():
    return load_backbone("fsl-tiny-vit", "none")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- taps ---------------------------------------------------------------------------------------


def _manual_rn(model, x):
    """stem → layer1..4 → attnpool, module by module."""
    v = model.visual
    h = v.act1(v.bn1(v.conv1(x)))
    h = v.act2(v.bn2(v.conv2(h)))
    h = v.avgpool(v.act3(v.bn3(v.conv3(h))))
    out = {}
    for k in (1, 2, 3, 4):
        h = getattr(v, f"layer{k}")(h)
        out[f"rn/layer{k}"] = h
    out["pooled"] = v.attnpool(h)
    out["preproj"] = _attention_pool_before_c_proj(v.attnpool, h)
    return out


def _attention_pool_before_c_proj(pool, h):
    """CLIP's attention pool re-typed head by head: the mean token attends to [mean, positions]."""
    tokens = h.flatten(2).permute(0, 2, 1)  # [B, HW, C]
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + pool.positional_embedding
    q, k, v = pool.q_proj(tokens[:, :1]), pool.k_proj(tokens), pool.v_proj(tokens)
    q, k, v = (t.unflatten(-1, (pool.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, T, d]
    attention = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return (attention @ v).transpose(1, 2).flatten(2)[:, 0]


def _manual_vit(model, x):
    """conv1 → patch tokens + CLS + positions (vit/tokens) → ln_pre → resblocks, then ln_post(CLS) @ proj."""
    v = model.visual
    h = v.conv1(x).flatten(2).transpose(1, 2)  # [B, HW, W]
    cls = v.class_embedding.expand(h.shape[0], 1, -1)
    out = {"vit/tokens": torch.cat([cls, h], dim=1) + v.positional_embedding}
    h = v.ln_pre(out["vit/tokens"])
    for i, block in enumerate(v.transformer.resblocks):
        h = block(h)
        out[f"vit/block{i + 1:02d}"] = h
    out["preproj"] = v.ln_post(h[:, 0])
    out["pooled"] = out["preproj"] @ v.proj
    return out


MANUAL = {"rn": _manual_rn, "vit": _manual_vit}


@pytest.mark.parametrize("name", ["rn", "vit"])
def test_taps_equal_manual_forward(name, request):
    backbone = request.getfixturevalue(name)
    x = _images()
    got = backbone.encode_taps(x, backbone.taps())
    with torch.no_grad():
        want = MANUAL[name](backbone.model, x)
    assert list(got) == backbone.taps()
    for tap, tensor in got.items():
        assert tensor.shape == (3, *backbone.tap_shape(tap)), tap
        assert tensor.dtype == torch.float32 and tensor.device == backbone.device
        torch.testing.assert_close(tensor, want[tap], rtol=1e-5, atol=1e-5, msg=tap)


@pytest.mark.parametrize("name", ["rn", "vit"])
def test_pooled_is_unnormalised_encode_image(name, request):
    backbone = request.getfixturevalue(name)
    x = _images()
    pooled = backbone.encode_taps(x, ["pooled"])["pooled"]
    with torch.no_grad():
        torch.testing.assert_close(pooled, backbone.model.encode_image(x, normalize=False))
    assert not torch.allclose(pooled.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("name", ["rn", "vit"])
def test_tap_subsets_equal_the_full_forward(name, request):
    backbone = request.getfixturevalue(name)
    x = _images()
    full = backbone.encode_taps(x, backbone.taps())
    first = backbone.taps()[1]
    # [first, pooled] is the case open_clip 3.3's ResNet stop_early handling gets wrong.
    subsets = [[first], [first, "pooled"], [backbone.dense_tap], ["pooled", backbone.dense_tap]]
    subsets += [["vit/tokens"], ["vit/tokens", first]] if name == "vit" else []
    for subset in subsets:
        got = backbone.encode_taps(x, subset)
        assert list(got) == subset
        for tap in subset:
            torch.testing.assert_close(got[tap], full[tap], msg=f"{subset}: {tap}")


def test_tap_names_and_shapes(rn, vit):
    assert rn.taps() == ["pooled", "rn/layer1", "rn/layer2", "rn/layer3", "rn/layer4", "preproj"]
    assert rn.dense_tap == "rn/layer4" and rn.kind == "rn" and rn.num_blocks is None
    assert [rn.tap_shape(t) for t in rn.taps()] == [
        (64,),
        (32, 16, 16),
        (64, 8, 8),
        (128, 4, 4),
        (256, 2, 2),
        (256,),
    ]
    assert vit.taps()[0] == "pooled" and vit.taps()[6] == "vit/block06" and len(vit.taps()) == 15
    assert vit.taps()[-2:] == ["preproj", "vit/tokens"] and vit.tap_shape("preproj") == (128,)
    assert vit.tap_shape("vit/tokens") == (65, 128)
    assert vit.dense_tap == "vit/block11" and vit.kind == "vit" and vit.num_blocks == 12
    assert vit.tap_shape("vit/block06") == (65, 128) and vit.tap_shape("pooled") == (64,)


def test_real_architecture_tap_shapes():
    """METHODS §1.1 shapes for RN50 and ViT-B/16, read off the architecture (random init, no forward)."""
    rn50, vit_b16 = load_backbone("RN50", "none"), load_backbone("ViT-B-16", "none")
    assert [rn50.tap_shape(t) for t in rn50.taps()] == [
        (1024,),
        (256, 56, 56),
        (512, 28, 28),
        (1024, 14, 14),
        (2048, 7, 7),
        (2048,),
    ]
    assert vit_b16.tap_shape("vit/block06") == (197, 768) and vit_b16.tap_shape("pooled") == (512,)
    assert vit_b16.dense_tap == "vit/block11" and vit_b16.taps()[-3] == "vit/block12"
    assert vit_b16.tap_shape("vit/tokens") == (197, 768)  # [CLS; 14×14 patches] entering ln_pre


def test_unknown_tap_suggests(vit):
    with pytest.raises(UsageError, match="Did you mean vit/block06"):
        vit.encode_taps(_images(1), ["vit/block6"])
    with pytest.raises(UsageError):
        vit.tap_shape("rn/layer1")


def test_frozen(rn, vit):
    for backbone in (rn, vit):
        assert not backbone.model.training
        assert not any(p.requires_grad for p in backbone.model.parameters())


# --- text classifier ----------------------------------------------------------------------------


def test_text_classifier_equals_the_formula(vit):
    classes = ["cat", "golden retriever", "red car"]
    templates = ["a photo of a {}.", "art of the {}.", "itap of a {}."]
    rows = []
    with torch.no_grad():
        for c in classes:
            emb = vit.model.encode_text(vit.tokenizer([t.format(c) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
    want = torch.stack(rows)
    got = vit.text_classifier(classes, templates)
    assert got.shape == (3, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vit.text_classifier(classes, templates, batch_size=2), got)
    callables = [lambda c, t=t: t.format(c) for t in templates]
    torch.testing.assert_close(vit.text_classifier(classes, callables), got)


def test_text_classifier_rejects_template_without_placeholder(rn):
    with pytest.raises(UsageError, match="placeholder"):
        rn.text_classifier(["cat"], ["a photo"])


# --- random init and identity --------------------------------------------------------------------


def test_none_is_deterministic_and_announced(rn):
    rng_before = torch.get_rng_state()
    again = load_backbone("fsl-tiny-rn", "none")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    _assert_same_weights(again.model, rn.model.state_dict())
    assert again.fingerprint_parts() == rn.fingerprint_parts()
    assert again.random_init and "RANDOM" in again.notes[0]
    assert again.fingerprint_parts()["weights"]["source"] == "none"


def test_fingerprint_is_json_and_differs_with_weights(rn, vit, tmp_path):
    parts = rn.fingerprint_parts()
    assert json.loads(json.dumps(parts)) == parts
    assert set(parts) == {"arch", "weights", "preprocess", "quick_gelu", "embed_dim"}
    path = tmp_path / "w.safetensors"
    save_file(_perturbed_state(rn), path)
    other = load_backbone("fsl-tiny-rn", str(path))
    assert other.fingerprint_parts()["weights"] != parts["weights"]
    assert vit.fingerprint_parts() != parts


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_file_reloads_identically(rn, tmp_path, suffix):
    state = _perturbed_state(rn)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    backbone = load_backbone("fsl-tiny-rn", str(path))
    _assert_same_weights(backbone.model, state)
    assert not backbone.random_init and backbone.pretrained == str(path)
    assert backbone.fingerprint_parts()["weights"] == {"source": "file", "sha256": _sha256(path)}


def _write_local_dir(folder: Path, state: dict, model_cfg: dict) -> None:
    folder.mkdir()
    preprocess = {
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(state, folder / "open_clip_model.safetensors")


def test_local_dir_applies_and_records_preprocessing(vit, tmp_path):
    state = _perturbed_state(vit)
    folder = tmp_path / "export"
    _write_local_dir(folder, state, open_clip.get_model_config("fsl-tiny-vit"))
    backbone = load_backbone(f"local-dir:{folder}")
    _assert_same_weights(backbone.model, state)
    cfg = backbone.preprocess_cfg
    assert cfg["mean"] == [0.5, 0.4, 0.3] and cfg["std"] == [0.2, 0.25, 0.3]
    assert cfg["resize_mode"] == "squash" and cfg["size"] == 64
    assert list(backbone.model.visual.preprocess_cfg["mean"]) == cfg["mean"]
    parts = backbone.fingerprint_parts()
    assert parts["arch"] == "local-dir" and parts["preprocess"] == cfg and "model_cfg" in parts
    # Lenient spelling, and a moved folder keeps its identity.
    moved = shutil.copytree(folder, tmp_path / "moved")
    for lenient in (
        load_backbone("fsl-tiny-vit", pretrained=f"local-dir:{moved}"),
        load_backbone(pretrained=str(moved)),
    ):
        assert lenient.fingerprint_parts() == parts


def _hf_cache_snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in a Hugging Face cache laid out as huggingface_hub does."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    return snapshot


def test_tag_resolved_from_an_offline_cache(rn, offline, monkeypatch, tmp_path):
    """A tag goes through open_clip's resolver; its quick_gelu and preprocessing are applied."""
    tag_cfg = _pcfg(hf_hub="fsl/tiny-rn/", quick_gelu=True, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "fsl-tiny-rn", {"testtag": tag_cfg})
    weights = _hf_cache_snapshot(tmp_path, "fsl/tiny-rn") / "open_clip_pytorch_model.bin"
    state = _perturbed_state(rn)
    torch.save(state, weights)
    backbone = load_backbone("fsl-tiny-rn", "TestTag", cache_dir=str(tmp_path))
    _assert_same_weights(backbone.model, state)
    assert backbone.quick_gelu and any("QuickGELU" in n for n in backbone.notes)
    assert backbone.preprocess_cfg["mean"] == [0.1, 0.2, 0.3]
    assert backbone.fingerprint_parts()["weights"] == {
        "source": "tag",
        "tag": "testtag",
        "sha256": _sha256(weights),
    }


def test_hf_hub_resolved_from_an_offline_cache(vit, offline, tmp_path):
    snapshot = _hf_cache_snapshot(tmp_path / "cache", "fsl/tiny-vit")
    state = _perturbed_state(vit)
    _write_local_dir(tmp_path / "export", state, open_clip.get_model_config("fsl-tiny-vit"))
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(tmp_path / "export" / name, snapshot / name)
    backbone = load_backbone("hf-hub:fsl/tiny-vit", cache_dir=str(tmp_path / "cache"))
    _assert_same_weights(backbone.model, state)
    assert backbone.arch == "hf-hub:fsl/tiny-vit" and backbone.preprocess_cfg["mean"] == [0.5, 0.4, 0.3]
    digest = _sha256(snapshot / "open_clip_model.safetensors")
    assert backbone.fingerprint_parts()["weights"] == {
        "source": "hf-hub",
        "repo": "fsl/tiny-vit",
        "sha256": digest,
    }


# --- OpenAI TorchScript archives ------------------------------------------------------------------


def _write_openai_jit(path: Path, arch: str) -> torch.nn.Module:
    """An archive shaped like OpenAI's CLIP downloads: TorchScript, fp16-exact weights, QuickGELU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = open_clip.create_model(arch, force_quick_gelu=True).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())  # OpenAI ships fp16; the loader rounds through fp16
    # OpenAI's archives have no attn_mask buffer (open_clip's loader rejects one) but do carry
    # input_resolution (which it drops).
    model.attn_mask = model._buffers.pop("attn_mask")
    model.register_buffer("input_resolution", torch.tensor(64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            model, {"encode_image": (torch.zeros(1, 3, 64, 64),)}, check_trace=False
        )
        torch.jit.save(traced, str(path))
    return model


@pytest.fixture(scope="module")
def openai_jit(tmp_path_factory):
    path = tmp_path_factory.mktemp("jit") / "RN-tiny.pt"
    return path, _write_openai_jit(path, "fsl-tiny-rn")


def test_openai_torchscript_goes_through_load_openai_model(openai_jit, monkeypatch):
    path, source = openai_jit
    calls = []
    real = open_clip.openai.load_openai_model
    monkeypatch.setattr(
        open_clip.openai, "load_openai_model", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    backbone = load_backbone("fsl-tiny-rn", str(path))
    assert calls and backbone.quick_gelu and not backbone.random_init
    assert any("TorchScript" in n and "weights-only" in n for n in backbone.notes)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_taps(x, ["pooled"])["pooled"], source.encode_image(x))
        tokens = backbone.tokenizer(["a photo of a cat"])
        torch.testing.assert_close(backbone.model.encode_text(tokens), source.encode_text(tokens))
    assert backbone.preprocess_cfg["size"] == 64 and backbone.preprocess_cfg["interpolation"] == "bicubic"
    assert backbone.fingerprint_parts()["weights"] == {"source": "openai-jit", "sha256": _sha256(path)}


def test_openai_release_is_recognised_by_its_hash():
    rn50 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"  # METHODS §1.1
    assert openai_release_name(rn50) == "RN50" and openai_release_name("0" * 64) is None


def test_openai_torchscript_for_another_arch_names_it(openai_jit):
    with pytest.raises(BackboneError, match=r"different architecture than fsl-tiny-vit.*matches fsl-tiny-rn"):
        load_backbone("fsl-tiny-vit", str(openai_jit[0]))


# --- errors ---------------------------------------------------------------------------------------


def _bad_weights_file(case: str, folder: Path, rn, vit) -> tuple[Path, str]:
    """(a weights file that must not load into fsl-tiny-rn, a phrase its error must contain)."""
    if case == "foreign":
        save_file(_perturbed_state(vit), folder / "vit.safetensors")
        return folder / "vit.safetensors", "does not fit architecture fsl-tiny-rn: 122 missing keys"
    if case == "text":
        (folder / "notes.pt").write_text("not weights")
        return folder / "notes.pt", "not a PyTorch or safetensors file"
    if case == "pickle":
        torch.save({"epoch": 3, "path": Path("x")}, folder / "ckpt.pt")
        return folder / "ckpt.pt", "weights-only loading refuses"
    full = folder / f"full.{case}"
    torch.save(_perturbed_state(rn), full) if case == "pt" else save_file(_perturbed_state(rn), full)
    cut = folder / f"cut.{case}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return cut, "truncated download"


@pytest.mark.parametrize("case", ["pt", "safetensors", "foreign", "text", "pickle"])
def test_bad_weights_file_is_one_clear_line(rn, vit, tmp_path, case):
    path, phrase = _bad_weights_file(case, tmp_path, rn, vit)
    with pytest.raises(BackboneError) as info:
        load_backbone("fsl-tiny-rn", str(path))
    message = str(info.value)
    assert str(path) in message and phrase in message
    assert "\n" not in message and "Traceback" not in message


def test_offline_tag_says_what_to_download(offline, tmp_path):
    start = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        load_backbone("RN50", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "timm/resnet50_clip.openai" in message
    command = f"hf download timm/resnet50_clip.openai open_clip_pytorch_model.bin --cache-dir {tmp_path}"
    assert command in message
    assert "--pretrained" in message and "\n" not in message and "Traceback" not in message


def test_unresolvable_hub_fails_fast_instead_of_retrying(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, but no DNS either: huggingface_hub alone would retry for ~45 s."""
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.perf_counter()
    with pytest.raises(BackboneError, match=r"cannot be resolved.*hf download timm/resnet50_clip\.openai"):
        load_backbone("RN50", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 1.0
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


def test_offline_hf_hub_says_what_to_download(offline, tmp_path):
    with pytest.raises(BackboneError, match=re.escape(f"hf download someone/clip-x --cache-dir {tmp_path}")):
        load_backbone("hf-hub:someone/clip-x", cache_dir=str(tmp_path))


def test_unknown_names_suggest():
    with pytest.raises(UsageError, match=r"Did you mean RN50\?"):
        load_backbone("RN-50")
    with pytest.raises(UsageError, match=r"Did you mean openai\?.*cc12m, none, openai, yfcc15m"):
        load_backbone("RN50", "opneai")
    with pytest.raises(BackboneError, match="Weights file not found"):
        load_backbone("RN50", "/nowhere/weights.pt")
    with pytest.raises(BackboneError, match="timm or CoCa"):
        load_backbone("ViT-B-16-SigLIP", "none")


def test_precision(rn):
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        load_backbone("fsl-tiny-rn", "none", precision="fp16")
    with pytest.raises(UsageError, match="Did you mean fp16"):
        load_backbone("fsl-tiny-rn", "none", precision="fp61")
    bf16 = load_backbone("fsl-tiny-rn", "none", precision="bf16")
    assert bf16.dtype == torch.bfloat16
    x = _images()
    got = bf16.encode_taps(x, ["rn/layer2", "pooled"])
    want = rn.encode_taps(x, ["rn/layer2", "pooled"])
    for tap in got:
        assert got[tap].dtype == torch.bfloat16 and got[tap].shape == want[tap].shape
        torch.testing.assert_close(got[tap].float(), want[tap], rtol=0.1, atol=0.1)


def test_list_models():
    infos = {info.name: info for info in list_models()}
    assert "openai" in infos["RN50"].tags and infos["RN50"].kind == "rn"
    assert infos["ViT-B-16"].kind == "vit" and infos["ViT-B-16"].embed_dim == 512
    for name in TINY_MODELS:
        assert infos[name].tags[-1] == "none" and infos[name].tiny
    assert infos["fsl-tiny-rn"].tags == ("shapes", "none")  # the shipped weights
    assert "ViT-B-16-SigLIP" not in infos  # timm tower
    assert {info.kind for info in infos.values()} == {"rn", "vit"}
