"""Bad input, through the command line: each gets one clear line (exit 1 or 2), never a traceback, and
nothing half-written is left behind. Spec parsers are fuzzed with hypothesis; checkpoints are loaded
weights-only, and a pickle that would run code never does.
"""

from __future__ import annotations

import ast
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from dataset_helpers import extract_argv
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from fsl_cache import api
from fsl_cache import cli as cli_module
from fsl_cache.backbones import load_backbone
from fsl_cache.backbones.loading import resolve_spec
from fsl_cache.cli import _int_list, main
from fsl_cache.datasets import load_dataset
from fsl_cache.datasets.base import DatasetSpec
from fsl_cache.errors import FslError, StoreError
from fsl_cache.extraction.pipeline import ExtractOptions, prepare_extraction
from fsl_cache.splits.sampling import few_shot_pools
from fsl_cache.store import FeatureStore, find_store, verify_store

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "fsl-tiny-rn",
    "--pretrained",
    "none",
    "--for",
    "zero_shot",
    "--shots",
    "1",
    "--seeds",
    "1",
    "--workers",
    "0",
    "--batch-size",
    "4",
]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons (tests/conftest.py)


def cli(*args) -> tuple[int, str]:
    """Run the CLI; assert it ended the way a user error must: a message, no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def assert_one_error(code: int, output: str, *, expect: str, exit_code: int = 1) -> None:
    assert code == exit_code, output
    assert output.count("error:") == 1 and expect in output, output


def assert_nothing_published(cache: Path) -> None:
    assert not list(cache.rglob("manifest.json")), "no manifest may claim a partial store"


# ---------------------------------------------------------------------------- images


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header claims side² pixels (over twice PIL's limit) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def small_dataset(root: Path, classes=("cat", "dog")) -> Path:
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (20, 16), (60 * i, 40 * c, 120)).save(root / split / cls / f"{i}.png")
    return root


RGB = Image.new("RGB", (24, 20), (200, 30, 90))
BAD_IMAGES = {
    "zero-byte.png": lambda path: path.write_bytes(b""),
    "truncated.png": lambda path: path.write_bytes(png_bytes(RGB.resize((64, 64)))[:120]),
    "truncated.jpg": lambda path: path.write_bytes(
        jpeg_bytes(Image.effect_noise((64, 64), 80).convert("RGB"))[:400]
    ),
    "not-an-image.jpg": lambda path: path.write_text("hello, I am text"),
    "html.png": lambda path: path.write_text("<html><body>404</body></html>"),
    "bomb.png": lambda path: path.write_bytes(bomb_png()),
    "dangling.png": lambda path: path.symlink_to(path.parent / "gone.png"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_an_unreadable_image_stops_extraction_with_its_path(tmp_path, name):
    root = small_dataset(tmp_path / "data")
    BAD_IMAGES[name](root / "test" / "dog" / name)
    code, out = cli("extract", "--dataset", f"imagefolder:{root}", *TINY, "--cache-dir", tmp_path / "c")
    assert_one_error(code, out, expect=f"Cannot read image {root / 'test' / 'dog' / name}")
    assert "--skip-bad" in out
    assert_nothing_published(tmp_path / "c")


def test_skip_bad_records_every_unreadable_image(tmp_path):
    root = small_dataset(tmp_path / "data")
    for name, make in BAD_IMAGES.items():
        make(root / "test" / "dog" / name)
    code, out = cli(
        "extract", "--dataset", f"imagefolder:{root}", *TINY, "--skip-bad", "--cache-dir", tmp_path / "c"
    )
    assert code == 0, out
    store_dir = next((tmp_path / "c").glob("*/*"))
    manifest = json.loads((store_dir / "manifest.json").read_text())
    paths = FeatureStore.open(store_dir).read("images/test/paths")
    assert sorted(paths[i] for i in manifest["skipped"]["test"]) == sorted(
        f"test/dog/{n}" for n in BAD_IMAGES
    )
    assert verify_store(store_dir) == []


def odd_but_valid_images() -> dict[str, Image.Image]:
    """Modes and shapes a dataset may hold that must all decode to RGB."""
    palette = RGB.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    return {
        "cmyk.jpg": RGB.convert("CMYK"),
        "deep16.png": Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(20, 24) * 100),
        "palette.png": palette,
        "palette alpha.png": transparent,
        "rgba.png": Image.new("RGBA", (24, 20), (10, 200, 30, 100)),
        "la.png": Image.new("LA", (24, 20), (90, 128)),
        "bilevel.png": Image.new("1", (24, 20), 1),
        "int32.tif": Image.fromarray(np.arange(480, dtype=np.int32).reshape(20, 24)),
        "float.tif": Image.fromarray(np.linspace(0, 1, 480, dtype=np.float32).reshape(20, 24)),
        "grey.bmp": Image.new("L", (24, 20), 77),
        "one pixel.png": Image.new("RGB", (1, 1), (1, 2, 3)),
        "sliver.png": Image.new("RGB", (3, 500), (9, 9, 9)),
        "ünïcødé 猫.webp": RGB,
        "anim.gif": RGB.convert("P"),
    }


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_odd_modes_unicode_and_spaces_extract_and_round_trip(tmp_path, fmt):
    root = small_dataset(tmp_path / "dä ta set", classes=("clé ü", "日本 猫"))
    for name, img in odd_but_valid_images().items():
        img.save(root / "test" / "clé ü" / name)
    cache = tmp_path / "ca che ü"
    code, out = cli(
        "extract", "--dataset", f"imagefolder:{root}", *TINY, "--format", fmt, "--cache-dir", cache
    )
    assert code == 0, out
    store_dir = next(cache.glob("*/*"))
    paths = list(FeatureStore.open(store_dir).read("images/test/paths"))
    assert sorted(paths) == sorted(
        load_dataset(f"imagefolder:{root}").splits["test"][i][0] for i in range(len(paths))
    )
    assert "test/clé ü/ünïcødé 猫.webp" in paths
    code, out = cli("cache", "verify", store_dir.name.rsplit("-", 1)[1], "--cache-dir", cache)
    assert code == 0, out


# ---------------------------------------------------------------------------- split files and CSVs


def eurosat_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "root"
    folder = root / "eurosat" / "2750"
    split = {}
    for i in range(10):
        (folder / f"C{i}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"C{i}" / "a.jpg")
    for s in ("train", "val", "test"):
        split[s] = [[f"C{i}/a.jpg", i, f"C{i}"] for i in range(10)]
    return root, split


def _set(split, s, i, j, value):
    split[s][i][j] = value


SPLIT_CASES = {
    "missing file": (lambda d: _set(d, "test", 3, 0, "C3/nope.jpg"), "missing: "),
    "label is a string": (lambda d: _set(d, "train", 0, 1, "0"), "label must be an int, got '0'"),
    "label is a float": (lambda d: _set(d, "train", 1, 1, 1.0), "label must be an int, got 1.0"),
    "label is a bool": (lambda d: _set(d, "train", 1, 1, True), "label must be an int, got True"),
    "label out of range": (lambda d: _set(d, "val", 2, 1, 10), "label 10 out of range 0..9"),
    "negative label": (lambda d: _set(d, "val", 2, 1, -1), "label -1 out of range"),
    "short entry": (lambda d: d["test"].__setitem__(0, ["C0/a.jpg", 0]), "must be [path, label, classname]"),
    "empty path": (lambda d: _set(d, "test", 0, 0, ""), "path must be a non-empty string"),
    "renamed class": (lambda d: _set(d, "test", 4, 2, "Other"), "is named 'Other' here"),
    "no val": (lambda d: d.pop("val"), "missing key 'val'"),
    "split not a list": (lambda d: d.__setitem__("train", {"a": 1}), "'train' must be a list"),
    "a label unused": (lambda d: [d[s].pop() for s in d], "no item has label 9"),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_a_bad_split_file_is_one_line_and_writes_nothing(tmp_path, case):
    root, split = eurosat_root(tmp_path)
    edit, message = SPLIT_CASES[case]
    edit(split)
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    code, out = cli("extract", "--dataset", "eurosat", "--root", root, *TINY, "--cache-dir", tmp_path / "c")
    assert_one_error(code, out, expect=message)
    assert not (tmp_path / "c").exists(), "a dataset error comes before anything is written"


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[1, 2, 3]", "expected an object"),
        (b'{"train": [', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
)
def test_a_split_file_that_is_not_a_split_file(tmp_path, raw, message):
    root, _ = eurosat_root(tmp_path)
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_bytes(raw)
    code, out = cli("extract", "--dataset", "eurosat", "--root", root, *TINY, "--cache-dir", tmp_path / "c")
    assert_one_error(code, out, expect=message)


CSV_CASES = {
    "wrong column count": ("path,label\na.png,cat\nb.png\n", "data.csv:3: expected 2 columns"),
    "no header": ("a.png,cat\n", "data.csv:1: header must name the columns"),
    "empty file": ("", "header must name the columns path,label[,split]; found: nothing"),
    "only a header": ("path,label\n", "no rows after the header"),
    "duplicate column": ("path,path,label\na.png,a.png,cat\n", "header must name the columns"),
    "empty label": ("path,label\na.png, \n", "data.csv:2: empty label"),
    "unknown split": (
        "path,label,split\na.png,cat,training\n",
        "split must be one of train, val, test; got 'training'",
    ),
    "missing image": ("path,label\na.png,cat\nb.png,dog\n", "missing: "),
    "index out of range": ("path,label\na.png,0\na.png,7\n", "data.csv:3: label 7 out of range 0..1"),
    "index without classnames": ("path,label\na.png,0\n", "must list the class names"),
    "not UTF-8": ("path,label\na.png,caf\udce9\n", "is not UTF-8 text"),
    "huge field": ("path,label\na.png," + "x" * 200_000 + "\n", "data.csv:2: not a readable CSV row"),
    "NUL in a path": ("path,label\nsub\0dir/a.png,cat\n", "missing: "),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_a_bad_csv_row_names_its_line(tmp_path, case):
    text, message = CSV_CASES[case]
    folder = tmp_path / "csv"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    if case == "index out of range":
        (folder / "classnames.txt").write_text("cat\ndog\n")
    (folder / "data.csv").write_bytes(text.encode("utf-8", "surrogateescape"))
    code, out = cli(
        "extract", "--dataset", f"csv:{folder / 'data.csv'}", *TINY, "--cache-dir", tmp_path / "c"
    )
    assert_one_error(code, out, expect=message)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------- names, numbers, stores


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("demo") / "demo")


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--pretrained", "laion2b"], 2, "Unknown pretrained tag for fsl-tiny-rn 'laion2b'"),
        (["--model", "RN5O"], 2, "Did you mean RN50?"),
        (["--model", "coca_ViT-B-32"], 1, "timm or CoCa image tower"),
        (["--model", "hf-hub:nobody/nothing"], 1, "hf-hub:nobody/nothing is not available"),
        (["--model", "local-dir:/no/such/dir"], 1, "local-dir: folder not found"),
        (["--pretrained", "~no_such_user_here/w.pt"], 1, "Could not determine home directory"),
        (["--format", "parquet"], 2, "'parquet' is not one of 'zarr', 'hdf5'"),
        (["--precision", "fp8"], 2, "'fp8' is not one of"),
        (["--for", "zero_shot,tip_adaptr"], 2, "Did you mean tip_adapter?"),
        (["--shots", "0"], 2, "shots must be a positive integer, got 0"),
        (["--shots", "-4"], 2, "shots must be a positive integer, got -4"),
        (["--shots", "1,x"], 2, "expected comma-separated integers"),
        (["--seeds", ","], 2, "seeds needs at least one value"),
        (["--views", "0"], 2, "--views must be >= 1"),
        (["--batch-size", "0"], 2, "--batch-size must be >= 1"),
        (["--device", "tpu:3"], 2, "Unknown device 'tpu:3'"),
        (
            ["--model", "fsl-tiny-vit", "--for", "ldc", "--vit-blocks", "99"],
            2,
            "--vit-blocks must lie in 1..12",
        ),
    ],
)
def test_unknown_names_and_bad_numbers_are_one_line(demo, tmp_path, monkeypatch, args, code, message):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = [
        "--model",
        "fsl-tiny-rn",
        "--pretrained",
        "none",
        "--workers",
        "0",
        "--shots",
        "1",
        "--seeds",
        "1",
    ]
    exit_code, out = cli("extract", "--dataset", f"imagefolder:{demo}", *base, *args, "--cache-dir", tmp_path)
    assert exit_code == code and message in out, out
    assert_nothing_published(tmp_path)


def test_more_shots_than_a_class_has_takes_all_of_it(demo, tmp_path):
    """[CODE] Dassl generate_fewshot_dataset: a class with fewer than k images contributes all it has."""
    code, out = cli(*extract_argv(demo, tmp_path, for_methods="zero_shot", shots=50, seeds=1, workers=0))
    assert code == 0, out
    store = FeatureStore.open(next(tmp_path.glob("*/*")))
    assert len(store.read("splits/k50_s1/train")) == len(load_dataset(f"imagefolder:{demo}").splits["train"])


def test_a_store_of_another_backbone_is_refused(demo, tmp_path):
    rn = api.extract(
        f"imagefolder:{demo}",
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=tmp_path,
        for_methods=["zero_shot"],
        shots=(1,),
        seeds=(1,),
        workers=0,
        progress=False,
    )
    opts = ExtractOptions(for_methods=("zero_shot",), shots=(1,), seeds=(1,), workers=0)
    vit_dir = prepare_extraction(
        f"imagefolder:{demo}",
        root=None,
        model="fsl-tiny-vit",
        pretrained="none",
        cache_dir=tmp_path,
        options=opts,
    ).store_dir
    shutil.copytree(rn.store, vit_dir)  # the RN store where the ViT one would go
    args = [
        "--model",
        "fsl-tiny-vit",
        "--pretrained",
        "none",
        "--for",
        "zero_shot",
        "--shots",
        "1",
        "--seeds",
        "1",
        "--workers",
        "0",
    ]
    code, out = cli("extract", "--dataset", f"imagefolder:{demo}", *args, "--cache-dir", tmp_path)
    assert_one_error(code, out, expect="folder name does not carry the store key")
    code, out = cli("cache", "verify", vit_dir)
    assert_one_error(code, out, expect="folder name does not carry the store key")
    assert verify_store(rn.store) == []  # the original is untouched


# ---------------------------------------------------------------------------- checkpoints


class Boom:
    """Unpickling this would create ``path``: proof that a checkpoint ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def state_dicts():
    rn = load_backbone("fsl-tiny-rn", "none").model.state_dict()
    vit = load_backbone("fsl-tiny-vit", "none").model.state_dict()
    return rn, vit


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def checkpoint_cases(tmp_path: Path, rn: dict, vit: dict) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import save_file

    made = {}

    def put(name: str, message: str, write) -> None:
        path = tmp_path / name
        write(path)
        made[name] = (path, message)

    put(
        "random.pt",
        "not a PyTorch or safetensors file",
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    )
    put("empty.pt", "not a PyTorch or safetensors file", lambda p: p.write_bytes(b""))
    put(
        "truncated.pt",
        "truncated download or corrupted file",
        lambda p: (torch.save(rn, p), p.write_bytes(_truncated(p.read_bytes()))),
    )
    put("foreign.pt", "does not fit architecture fsl-tiny-rn", lambda p: torch.save(vit, p))
    put(
        "foreign.safetensors",
        "does not fit architecture fsl-tiny-rn",
        lambda p: save_file({k: v.contiguous() for k, v in vit.items()}, str(p)),
    )
    put(
        "truncated.safetensors",
        "Cannot read weights file",
        lambda p: (
            save_file({k: v.contiguous() for k, v in rn.items()}, str(p)),
            p.write_bytes(_truncated(p.read_bytes())),
        ),
    )
    put(
        "text.safetensors",
        "not a PyTorch or safetensors file",
        lambda p: p.write_text("version https://git-lfs.github.com/spec/v1"),
    )
    put(
        "evil.pt",
        "holds Python objects besides tensors",
        lambda p: torch.save({"state_dict": rn, "x": Boom(tmp_path / "PWNED")}, p),
    )
    put(
        "evil-legacy.pt",
        "holds Python objects besides tensors",
        lambda p: torch.save(Boom(tmp_path / "PWNED"), p, _use_new_zipfile_serialization=False),
    )
    put(
        "scripted.pt",
        "TorchScript archive but not a loadable OpenAI CLIP model",
        lambda p: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p)),
    )
    return made


def test_foreign_truncated_and_malicious_checkpoints_are_refused_safely(demo, tmp_path, state_dicts):
    (tmp_path / "weights").mkdir()
    for name, (path, message) in checkpoint_cases(tmp_path / "weights", *state_dicts).items():
        code, out = cli(
            "extract",
            "--dataset",
            f"imagefolder:{demo}",
            "--model",
            "fsl-tiny-rn",
            "--pretrained",
            path,
            "--for",
            "zero_shot",
            "--shots",
            "1",
            "--seeds",
            "1",
            "--cache-dir",
            tmp_path / "c",
        )
        assert_one_error(code, out, expect=message)
        assert str(path) in out, out
        assert not (tmp_path / "weights" / "PWNED").exists(), f"{name}: loading a checkpoint ran its code"
    assert not (tmp_path / "c").exists()


def test_good_checkpoints_load_without_torchscript(tmp_path, state_dicts, monkeypatch):
    """Control for the above: a state dict (torch.save or safetensors) loads weights-only, never via jit."""
    from safetensors.torch import save_file

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load used for a file that is not a TorchScript archive")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    rn = state_dicts[0]
    torch.save(rn, tmp_path / "rn.pt")
    save_file({k: v.contiguous() for k, v in rn.items()}, str(tmp_path / "rn.safetensors"))
    for path in (tmp_path / "rn.pt", tmp_path / "rn.safetensors"):
        bb = load_backbone("fsl-tiny-rn", str(path))
        assert not bb.random_init and bb.weights.kind == "file"
        torch.testing.assert_close(bb.model.state_dict()["visual.conv1.weight"], rn["visual.conv1.weight"])


UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "marshal.loads",
    "shelve.open",
    "dill.load",
    "joblib.load",
    "yaml.load",
}


def _call_name(node: ast.Call) -> str:
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_code_path_unpickles():
    """Static audit of the package: torch.load only weights-only, no pickle, np.load never allows it."""
    found = []
    for path in sorted((REPO / "fsl_cache").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name, kwargs = _call_name(node), {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name in UNSAFE_CALLS:
                found.append(f"{where} {name}")
            if name.endswith("torch.load") and not (
                isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
            ):
                found.append(f"{where} torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and not (
                isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is False
            ):
                found.append(f"{where} np.load without allow_pickle=False")
            if name.endswith("jit.load") or name.endswith("load_openai_model"):
                found.append(f"{where} {name}")
    # The one TorchScript entry: OpenAI's own .pt files, only when named as --pretrained FILE (announced).
    assert found == [next(f for f in found if "backbones/loading.py" in f and "load_openai_model" in f)], (
        found
    )


# ---------------------------------------------------------------------------- property-based: parsers


names = st.sampled_from(
    ["imagefolder", "csv", "eurosat", "dtd", "imagenet", "imagenet_a", "fgvc_aircraft", "nope"]
)
paths = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="~/.:\\ \0abc", max_size=12),
    st.sampled_from(["~", "~root", "~nobody_here/x", "..", "", "/", "/dev/null", "x\0y"]),
)


def _outside(target: str, cwd: Path) -> bool:
    """True for a target naming something that exists outside ``cwd`` (never scan the disk)."""
    try:
        resolved = Path(target).expanduser().resolve()
        return resolved.exists() and cwd not in (resolved, *resolved.parents)
    except (RuntimeError, OSError, ValueError):
        return False


@FUZZ
@given(kind=names, sep=st.sampled_from([":", "", "::"]), target=paths, root=st.one_of(st.none(), paths))
def test_dataset_specs_never_crash(tmp_path, monkeypatch, kind, sep, target, root):
    monkeypatch.chdir(tmp_path)
    assume(not _outside(target, tmp_path) and (root is None or not _outside(root, tmp_path)))
    try:
        load_dataset(f"{kind}{sep}{target}", root=root)
    except FslError:
        pass


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(kind=names, target=st.one_of(paths, st.text(alphabet="[]/ab:~", max_size=12)))
def test_dataset_specs_on_the_command_line_are_one_line(tmp_path, monkeypatch, kind, target):
    """The whole error path too: rich must print a message with ``[/x]`` in it, not parse it as markup."""
    monkeypatch.chdir(tmp_path)
    assume(not _outside(target, tmp_path) and "\0" not in target)
    code, out = cli(
        "extract", "--dataset", f"{kind}:{target}", "--root", tmp_path, "--cache-dir", tmp_path / "c"
    )
    assert code in (1, 2) and out.count("error:") == 1, out


archs = st.sampled_from(["fsl-tiny-rn", "fsl-tiny-vit", "RN50", "ViT-B/16", "coca_ViT-B-32", "convnext_base"])
models = st.one_of(
    archs,
    st.text(max_size=20),
    st.builds(lambda p, t: p + t, st.sampled_from(["hf-hub:", "local-dir:"]), paths),
)
weights = st.one_of(
    st.sampled_from(["none", "None", " none ", "openai", "laion2b_s34b_b79k", ""]),
    paths,
    st.builds(lambda t, s: t + s, paths, st.sampled_from([".pt", ".safetensors", ".bin", ""])),
)


@FUZZ
@given(model=models, pretrained=weights)
def test_backbone_specs_never_crash(tmp_path, monkeypatch, model, pretrained):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    arch = model.replace("/", "-")
    assume(
        not (arch in open_clip.list_models() and open_clip.get_pretrained_cfg(arch, pretrained))
    )  # no downloads
    assume(not _outside(pretrained, tmp_path) and not _outside(model.split(":", 1)[-1], tmp_path))
    try:
        resolve_spec(model, pretrained, cache_dir=str(tmp_path))
    except FslError:
        pass


def _spec() -> DatasetSpec:
    train = tuple((f"t{i}.png", i % 3) for i in range(12))
    val = tuple((f"v{i}.png", i % 3) for i in range(4))
    return DatasetSpec(
        "x", Path("."), ("a", "b", "c"), {"tip": ("{}",)}, {"train": train, "val": val, "test": val}, "0"
    )


int_lists = st.one_of(
    st.text(alphabet="0123456789,- x.e+", max_size=20),
    st.text(max_size=12),
    st.lists(st.integers(-5, 10**20), max_size=4).map(lambda v: ",".join(map(str, v))),
)


@FUZZ
@given(shots=int_lists, seeds=int_lists, seed_args=st.lists(int_lists, max_size=3))
def test_shots_and_seeds_lists_parse_or_fail_cleanly(shots, seeds, seed_args):
    import click

    try:
        parsed = (_int_list(None, None, shots), _int_list(None, None, seeds))
        if hasattr(cli_module, "_seed_list"):  # fit's --seed (stage two)
            cli_module._seed_list(None, None, tuple(seed_args))
    except click.BadParameter:
        return
    try:
        pools = few_shot_pools(_spec(), shots=parsed[0], seeds=parsed[1])
    except FslError:
        return
    assert set(pools.train_union) <= set(range(12))


def _registered_methods():
    from fsl_cache.methods import get_method, list_methods

    return [get_method(m) if isinstance(m, str) else m for m in list_methods()]


@FUZZ
@given(data=st.data())
def test_method_options_parse_or_fail_cleanly(data):
    import click

    methods = _registered_methods()
    assert methods, "every registered method's options are fuzzed"
    info = data.draw(st.sampled_from(methods))
    known = [o.name for o in info.options()] or ["x"]
    keys = st.one_of(
        st.sampled_from(known), st.sampled_from(known).map(lambda k: k.replace("_", "-")), st.text(max_size=8)
    )
    values = st.one_of(
        st.text(max_size=12),
        st.sampled_from(
            [
                "nan",
                "inf",
                "-inf",
                "1e400",
                "-1",
                "0",
                "none",
                "true",
                "1,2",
                "",
                "1e3",
                "0.5",
                "2**64",
                "99999999999999999999",
            ]
        ),
    )
    items = data.draw(
        st.lists(
            st.builds(lambda k, s, v: f"{k}{s}{v}", keys, st.sampled_from(["=", "", "=="]), values),
            max_size=3,
        )
    )
    try:
        options = cli_module._key_values(None, None, tuple(items))
    except click.BadParameter:
        return
    try:
        info.config.from_options(options, method=info.name)
    except FslError:
        pass


# ---------------------------------------------------------------------------- property-based: damaged manifests


@pytest.fixture(scope="module")
def tiny_store(demo, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("tiny")
    return api.extract(
        f"imagefolder:{demo}",
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=cache,
        for_methods=["zero_shot"],
        shots=(1,),
        seeds=(1,),
        workers=0,
        progress=False,
    ).store


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.floats(allow_nan=True), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)


def _paths_of(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths_of(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths_of(value, prefix + (i,))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_any_edit_of_a_manifest_is_refused_or_reported_never_a_crash(tiny_store, data):
    original = (tiny_store / "manifest.json").read_text()
    manifest = json.loads(original)
    spots = [
        p
        for p in _paths_of(manifest)
        if p and p[0] in ("arrays", "format", "fingerprint", "schema", "dataset")
    ]
    spot = data.draw(st.sampled_from(spots))
    target = manifest
    for key in spot[:-1]:
        target = target[key]
    if data.draw(st.booleans()):
        target[spot[-1]] = data.draw(json_values)
    elif isinstance(target, dict):
        del target[spot[-1]]
    else:
        target.pop(spot[-1])
    try:
        (tiny_store / "manifest.json").write_text(json.dumps(manifest))
        try:
            store = FeatureStore.open(tiny_store)
            for name in list(store.arrays):
                store.read(name)
            find_store(tiny_store.parents[1], str(tiny_store))
            verify_store(tiny_store)
        except StoreError:
            pass
    finally:
        (tiny_store / "manifest.json").write_text(original)
