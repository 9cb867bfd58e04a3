"""Built-in loaders against the real CoOp split files and hand-made layouts, and their errors."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from dataset_helpers import (
    COOP_CASES,
    build_coop_layout,
    scratch_dir,
    split_file,
    touch_all,
    write_split_json,
)

from fsl_cache.datasets import list_datasets, load_dataset, templates_for
from fsl_cache.datasets.base import builtin_loaders, sha256_file
from fsl_cache.datasets.templates import CLIP80, IMAGENET_SELECT7
from fsl_cache.errors import DatasetError, UsageError


@pytest.fixture(scope="module")
def coop_root():
    # ~86k empty files: removed at teardown rather than left in pytest's retained tmp folders,
    # whose later clean-up would bill every subsequent pytest run on the machine
    with tempfile.TemporaryDirectory(prefix="fsl-coop-", dir=scratch_dir()) as tmp:
        root = Path(tmp)
        for case in COOP_CASES:
            build_coop_layout(root, case)
        yield root


# ---------------------------------------------------------------------------- real split files


@pytest.mark.parametrize("case", COOP_CASES, ids=lambda c: c.name)
def test_coop_loader_reads_real_split(coop_root, case):
    spec = load_dataset(case.name, root=coop_root)
    assert spec.name == case.name
    assert spec.num_classes == case.num_classes
    assert tuple(len(spec.splits[s]) for s in ("train", "val", "test")) == case.sizes
    assert set(case.some_classnames) <= set(spec.classnames)
    assert not any("_" in name for name in spec.classnames)
    assert spec.templates["tip"] == (case.template,)
    assert spec.templates["coop"] == (case.template,)
    assert spec.source_hash == sha256_file(split_file(case.stem))
    assert spec.image_root == (coop_root / case.folder / case.images).resolve()


@pytest.mark.parametrize("case", COOP_CASES, ids=lambda c: c.name)
def test_coop_loader_keeps_file_order_and_labels(coop_root, case):
    raw = json.loads(split_file(case.stem).read_text())
    spec = load_dataset(case.name, root=coop_root)
    for split in ("train", "val", "test"):
        assert list(spec.splits[split]) == [(p, label) for p, label, _ in raw[split]]
    names = {label: name.replace("_", " ") for items in raw.values() for _, label, name in items}
    assert spec.classnames == tuple(names[label] for label in range(case.num_classes))
    assert spec.path("test", 0).is_file()


def test_eurosat_classnames_in_label_order(coop_root):
    spec = load_dataset("eurosat", root=coop_root)
    eurosat = next(case for case in COOP_CASES if case.name == "eurosat")
    assert spec.classnames == eurosat.some_classnames


def test_caltech_ignores_background_and_renames(coop_root):
    names = load_dataset("caltech101", root=coop_root).classnames
    assert names[0] == "face"
    assert "BACKGROUND Google" not in names and "Faces easy" not in names


def test_root_from_environment(coop_root, monkeypatch):
    monkeypatch.setenv("FSL_DATA", str(coop_root))
    assert load_dataset("dtd").num_classes == 47


# ---------------------------------------------------------------------------- hand-made layouts


@pytest.mark.parametrize(
    "name, folder, images, stem, count, raw, expected",
    [
        ("food101", "food-101", "images", "Food101", 101, "apple_pie", "apple pie"),
        ("sun397", "sun397", "SUN397", "SUN397", 397, "indoor_bakery", "indoor bakery"),
    ],
)
def test_split_file_datasets_without_fixture(tmp_path, name, folder, images, stem, count, raw, expected):
    names = [raw] + [f"class_{i}" for i in range(1, count)]
    path = write_split_json(tmp_path / folder, stem, names)
    split = json.loads(path.read_text())
    touch_all(tmp_path / folder / images, [e[0] for items in split.values() for e in items])
    spec = load_dataset(name, root=tmp_path)
    assert spec.num_classes == count
    assert spec.classnames[0] == expected
    assert {s: len(v) for s, v in spec.splits.items()} == {
        "train": count,
        "val": count,
        "test": count,
    }
    assert spec.templates["tip"] == templates_for(name)["tip"]


def make_fgvc(root):
    folder = root / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    lines = {
        "train": ["1 707-320", "2 F/A-18", "3 A300B4"],
        "val": ["4 A300B4"],
        "test": ["5 F/A-18", "6 707-320"],
    }
    for split, rows in lines.items():
        (folder / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    touch_all(folder / "images", [f"{i}.jpg" for i in range(1, 7)])
    return folder


def test_fgvc_aircraft_official_variant_files(tmp_path):
    make_fgvc(tmp_path)
    spec = load_dataset("fgvc_aircraft", root=tmp_path)
    assert spec.classnames == ("707-320", "A300B4", "F/A-18")
    assert spec.splits["train"] == (("1.jpg", 0), ("2.jpg", 2), ("3.jpg", 1))
    assert spec.splits["val"] == (("4.jpg", 1),)
    assert spec.splits["test"] == (("5.jpg", 2), ("6.jpg", 0))
    assert spec.templates["tip"] == ("a photo of a {}, a type of aircraft.",)


def test_fgvc_unknown_variant_names_file_and_line(tmp_path):
    folder = make_fgvc(tmp_path)
    (folder / "images_variant_val.txt").write_text("4 A300B4\n7 Concorde\n")
    with pytest.raises(DatasetError, match=r"images_variant_val.txt:2: variant 'Concorde'"):
        load_dataset("fgvc_aircraft", root=tmp_path)


WNIDS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great_white_shark",
    "n01491361": "tiger shark",
}


def write_classnames(folder, wnids=WNIDS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))


def make_imagenet(root, per_class=25):
    folder = root / "imagenet"
    write_classnames(folder)
    wnids = list(WNIDS)[:3]
    touch_all(
        folder / "images" / "train",
        [f"{w}/{w}_{i:04d}.JPEG" for w in wnids for i in range(per_class)],
    )
    touch_all(
        folder / "images" / "val",
        [f"{w}/ILSVRC2012_val_{j}{w}.JPEG" for w in wnids for j in range(4)],
    )
    return folder


def test_imagenet_holds_out_val_from_train(tmp_path):
    make_imagenet(tmp_path)
    spec = load_dataset("imagenet", root=tmp_path)
    assert spec.classnames == ("tench", "goldfish", "great white shark")
    train, val = set(spec.splits["train"]), set(spec.splits["val"])
    assert not train & val
    assert len(train | val) == 75
    assert [label for _, label in spec.splits["val"]].count(0) == 12  # min(20, 25 // 2)
    assert all(p.startswith("train/") for p, _ in spec.splits["val"])
    assert len(spec.splits["test"]) == 12 and all(p.startswith("val/") for p, _ in spec.splits["test"])
    assert spec.splits["test"][4] == ("val/n01443537/ILSVRC2012_val_0n01443537.JPEG", 1)
    assert any("[PROPOSED]" in note and "random.Random(0)" in note for note in spec.notes)
    assert load_dataset("imagenet", root=tmp_path) == spec  # deterministic


def test_imagenet_val_is_capped_at_twenty_per_class(tmp_path):
    make_imagenet(tmp_path, per_class=50)
    spec = load_dataset("imagenet", root=tmp_path)
    assert len(spec.splits["val"]) == 60 and len(spec.splits["train"]) == 90


def test_imagenet_templates(tmp_path):
    make_imagenet(tmp_path)
    templates = load_dataset("imagenet", root=tmp_path).templates
    assert templates["tip"] == IMAGENET_SELECT7 and len(templates["tip"]) == 7
    assert templates["coop"] == templates["single"] == ("a photo of a {}.",)
    assert templates["clip80"] == CLIP80


def test_imagenet_folder_missing_from_classnames(tmp_path):
    folder = make_imagenet(tmp_path)
    touch_all(folder / "images" / "train", ["n99999999/x.JPEG"])
    with pytest.raises(DatasetError, match=r"n99999999.*classnames\.txt"):
        load_dataset("imagenet", root=tmp_path)


@pytest.mark.parametrize(
    "name, folder, images",
    [
        ("imagenet_sketch", "imagenet-sketch", "images"),
        ("imagenet_a", "imagenet-adversarial", "imagenet-a"),
        ("imagenet_r", "imagenet-rendition", "imagenet-r"),
    ],
)
def test_wnid_shift_sets_are_test_only_subsets(tmp_path, name, folder, images):
    write_classnames(tmp_path / folder)
    touch_all(tmp_path / folder / images, ["n01484850/a.jpg", "n01484850/b.jpg", "n01440764/c.jpg"])
    (tmp_path / folder / images / "README.txt").write_text("ignored, as in CoOp")
    spec = load_dataset(name, root=tmp_path)
    # labels enumerate the sorted folders present: a 2-class problem out of 4 names
    assert spec.classnames == ("tench", "great white shark")
    assert spec.splits["test"] == (
        ("n01440764/c.jpg", 0),
        ("n01484850/a.jpg", 1),
        ("n01484850/b.jpg", 1),
    )
    assert spec.splits["train"] == () and spec.splits["val"] == ()
    assert spec.templates["tip"] == IMAGENET_SELECT7 and "clip80" in spec.templates


def test_imagenet_v2_folders_are_label_numbers(tmp_path):
    folder = tmp_path / "imagenetv2"
    write_classnames(folder)
    image_dir = folder / "imagenetv2-matched-frequency-format-val"
    touch_all(image_dir, ["0/a.jpeg", "1/b.jpeg", "2/c.jpeg", "3/d.jpeg", "3/e.jpeg"])
    spec = load_dataset("imagenet_v2", root=tmp_path)
    assert spec.classnames == ("tench", "goldfish", "great white shark", "tiger shark")
    assert spec.splits["test"][-2:] == (("3/d.jpeg", 3), ("3/e.jpeg", 3))
    shutil.rmtree(image_dir / "2")
    with pytest.raises(DatasetError, match=r"imagenetv2-matched-frequency-format-val/2$"):
        load_dataset("imagenet_v2", root=tmp_path)


# ---------------------------------------------------------------------------- errors


@pytest.fixture
def eurosat_small(tmp_path):
    names = [
        "AnnualCrop",
        "Forest",
        "HerbaceousVegetation",
        "Highway",
        "Industrial",
        "Pasture",
        "PermanentCrop",
        "Residential",
        "River",
        "SeaLake",
    ]
    path = write_split_json(tmp_path / "eurosat", "EuroSAT", names)
    split = json.loads(path.read_text())
    touch_all(tmp_path / "eurosat" / "2750", [e[0] for items in split.values() for e in items])
    return tmp_path


EUROSAT_EXPECTS = "EuroSAT expects ROOT/eurosat/2750/<Class>/*.jpg and ROOT/eurosat/split_zhou_EuroSAT.json"


def test_small_eurosat_loads(eurosat_small):
    assert load_dataset("eurosat", root=eurosat_small).classnames[0] == "AnnualCrop"


def test_missing_root(tmp_path):
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{EUROSAT_EXPECTS}; missing: {tmp_path / 'nope'} (the data root)"),
    ):
        load_dataset("eurosat", root=tmp_path / "nope")


def test_missing_dataset_folder_names_layout(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(f"missing: {tmp_path / 'eurosat'}")) as err:
        load_dataset("eurosat", root=tmp_path)
    assert str(err.value).startswith(EUROSAT_EXPECTS)


def test_root_pointing_at_dataset_folder_gets_a_hint(eurosat_small):
    with pytest.raises(DatasetError, match=re.escape(f"try --root {eurosat_small})")):
        load_dataset("eurosat", root=eurosat_small / "eurosat")


def test_missing_split_file(eurosat_small):
    (eurosat_small / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    message = f"{EUROSAT_EXPECTS}; missing: {eurosat_small / 'eurosat' / 'split_zhou_EuroSAT.json'}"
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_dataset("eurosat", root=eurosat_small)


def test_wrong_layout_names_expected_one(eurosat_small):
    (eurosat_small / "eurosat" / "2750").rename(eurosat_small / "eurosat" / "jpg")
    with pytest.raises(DatasetError, match=re.escape(EUROSAT_EXPECTS) + "; missing: .*eurosat/2750$"):
        load_dataset("eurosat", root=eurosat_small)


def test_one_missing_image_is_named(eurosat_small):
    missing = eurosat_small / "eurosat" / "2750" / "Forest" / "val_0.jpg"
    missing.unlink()
    with pytest.raises(DatasetError, match=re.escape(f"; missing: {missing}") + "$"):
        load_dataset("eurosat", root=eurosat_small)


def test_many_missing_images_show_first_few_and_count(eurosat_small):
    shutil.rmtree(eurosat_small / "eurosat" / "2750" / "River")
    shutil.rmtree(eurosat_small / "eurosat" / "2750" / "SeaLake")
    with pytest.raises(
        DatasetError, match=r"6 of 30 listed images are missing, first: .*River/train_0.jpg"
    ) as err:
        load_dataset("eurosat", root=eurosat_small)
    assert str(err.value).count(str(eurosat_small)) == 3 and "\n" not in str(err.value)


def rewrite_split(root, edit):
    path = root / "eurosat" / "split_zhou_EuroSAT.json"
    split = json.loads(path.read_text())
    edit(split)
    path.write_text(json.dumps(split))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["train"][3].__setitem__(1, "3"), r"train\[3\]: label must be an int, got '3'"),
        (lambda s: s["val"][0].__setitem__(1, 10), r"val\[0\]: label 10 out of range 0..9"),
        (lambda s: s["test"][1].__setitem__(1, -1), r"test\[1\]: label -1 out of range"),
        (lambda s: s.pop("val"), "missing key 'val'"),
        (
            lambda s: s["train"].__setitem__(0, ["a.jpg", 0]),
            r"train\[0\] must be \[path, label, classname\]",
        ),
        (
            lambda s: s["train"][1].__setitem__(2, "Woods"),
            r"val\[1\]: label 1 is named 'Forest' here but 'Woods' before",
        ),
    ],
)
def test_bad_split_json(eurosat_small, edit, message):
    rewrite_split(eurosat_small, edit)
    with pytest.raises(DatasetError, match=message):
        load_dataset("eurosat", root=eurosat_small)


def test_split_json_not_json(eurosat_small):
    (eurosat_small / "eurosat" / "split_zhou_EuroSAT.json").write_text("{nope")
    with pytest.raises(DatasetError, match=r"split_zhou_EuroSAT\.json: not valid JSON"):
        load_dataset("eurosat", root=eurosat_small)


def test_unknown_name_suggests_closest(tmp_path):
    with pytest.raises(
        UsageError, match=r"Unknown dataset 'eurosta'. Did you mean eurosat\? Available: .*dtd"
    ):
        load_dataset("eurosta", root=tmp_path)


def test_builtin_without_root_asks_for_one(monkeypatch):
    monkeypatch.delenv("FSL_DATA", raising=False)
    with pytest.raises(UsageError, match="pass --root DIR or set FSL_DATA"):
        load_dataset("eurosat")


# ---------------------------------------------------------------------------- catalog contract


def test_list_datasets_covers_every_loader():
    infos = {info.name: info for info in list_datasets()}
    assert set(builtin_loaders()) | {"imagefolder:DIR", "csv:FILE"} == set(infos)
    assert infos["eurosat"].num_classes == 10 and infos["imagenet_a"].num_classes == 200
    assert (
        infos["eurosat"].layout == "ROOT/eurosat/2750/<Class>/*.jpg and ROOT/eurosat/split_zhou_EuroSAT.json"
    )
    assert infos["csv:FILE"].num_classes is None


@pytest.mark.parametrize("name", sorted(builtin_loaders()))
def test_every_builtin_has_well_formed_templates(name):
    templates = templates_for(name)
    assert next(iter(templates)) == "tip" and "coop" in templates and len(templates["coop"]) == 1
    for template in (t for group in templates.values() for t in group):
        assert template.count("{}") == 1 and template.format("x") != template


def test_clip80_has_80_distinct_templates():
    assert len(CLIP80) == len(set(CLIP80)) == 80
    assert set(IMAGENET_SELECT7) <= set(CLIP80)
