"""User datasets (imagefolder:DIR, csv:FILE) and the offline demo dataset."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from dataset_helpers import touch_all

from fsl_cache.datasets import load_dataset, make_demo_dataset, open_image
from fsl_cache.datasets.custom import stratified_split
from fsl_cache.errors import DatasetError, UsageError


def class_counts(spec, split):
    return Counter(label for _, label in spec.splits[split])


# ---------------------------------------------------------------------------- stratified split


def test_stratified_split_sizes():
    groups = [
        ("big", [f"big/{i}.jpg" for i in range(10)]),
        ("three", ["t/a", "t/b", "t/c"]),
        ("two", ["w/a", "w/b"]),
    ]
    out = stratified_split(groups, held_out={"val": 20, "test": 30})
    counts = {s: Counter(label for _, label in items) for s, items in out.items()}
    assert (counts["train"][0], counts["val"][0], counts["test"][0]) == (5, 2, 3)
    assert (counts["train"][1], counts["val"][1], counts["test"][1]) == (1, 1, 1)
    assert (counts["train"][2], counts["val"][2], counts["test"][2]) == (2, 0, 0)
    assert sorted(p for items in out.values() for p, label in items if label == 0) == sorted(groups[0][1])


def test_stratified_split_is_per_class_stable():
    paths = [f"cat/{i:02d}.jpg" for i in range(20)]
    alone = stratified_split([("cat", paths)], held_out={"val": 20, "test": 30})
    with_other = stratified_split(
        [("ant", ["ant/a.jpg"] * 5), ("cat", paths)], held_out={"val": 20, "test": 30}
    )
    assert [p for p, _ in alone["test"]] == [p for p, label in with_other["test"] if label == 1]
    assert alone["test"] == sorted(alone["test"])  # sorted within the split, not in shuffled order


# ---------------------------------------------------------------------------- imagefolder


def make_folder(root, counts):
    touch_all(root, [f"{cls}/{i:03d}.jpg" for cls, n in counts.items() for i in range(n)])
    return root


def test_imagefolder_without_split_folders(tmp_path):
    folder = make_folder(tmp_path / "pets", {"tabby_cat": 10, "dog": 20, "axolotl": 2})
    (folder / "dog" / "notes.txt").write_text("not an image")
    (folder / "dog" / "nested").mkdir()
    (folder / "dog" / "nested" / "deep.PNG").touch()
    spec = load_dataset(f"imagefolder:{folder}")
    assert spec.name == f"imagefolder:{folder.resolve()}"
    assert spec.classnames == ("axolotl", "dog", "tabby cat")
    assert spec.templates == {"tip": ("a photo of a {}.",), "coop": ("a photo of a {}.",)}
    assert (
        class_counts(spec, "train")[1],
        class_counts(spec, "val")[1],
        class_counts(spec, "test")[1],
    ) == (11, 4, 6)
    assert class_counts(spec, "train")[0] == 2 and class_counts(spec, "val")[0] == 0
    assert ("dog/nested/deep.PNG", 1) in {i for s in spec.splits.values() for i in s}
    assert any("stratified split" in n and "random.Random('0:<class>')" in n for n in spec.notes)
    assert load_dataset(f"imagefolder:{folder}") == spec
    assert all(spec.path(s, i).is_file() for s in spec.splits for i in range(len(spec.splits[s])))


def test_imagefolder_with_split_folders(tmp_path):
    for split, n in {"train": 4, "val": 2, "test": 3}.items():
        make_folder(tmp_path / split, {"b": n, "a": n})
    (tmp_path / "classnames.txt").write_text("Alpha\nBravo\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n\nan image of a {}.\n")
    spec = load_dataset(f"imagefolder:{tmp_path}")
    assert spec.classnames == ("Alpha", "Bravo")
    assert spec.templates["tip"] == ("a photo of {}.", "an image of a {}.")
    assert spec.templates["coop"] == ("a photo of {}.",)
    assert {s: len(v) for s, v in spec.splits.items()} == {"train": 8, "val": 4, "test": 6}
    assert spec.splits["val"][0] == ("val/a/000.jpg", 0)
    assert spec.notes == ("splits: train/, val/, test/ folders",)


def test_imagefolder_without_val_folder_holds_val_out_of_train(tmp_path):
    make_folder(tmp_path / "train", {"a": 10, "b": 10})
    make_folder(tmp_path / "test", {"a": 2})
    spec = load_dataset(f"imagefolder:{tmp_path}")
    assert class_counts(spec, "val") == {0: 2, 1: 2} and class_counts(spec, "train") == {0: 8, 1: 8}
    assert all(p.startswith("train/") for p, _ in spec.splits["val"])
    assert class_counts(spec, "test") == {0: 2}
    assert any("val held out of train/" in n for n in spec.notes)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: make_folder(d / "train", {"a": 1}), "missing: {d}/test"),
        (
            lambda d: (make_folder(d / "train", {"a": 1}), make_folder(d / "test", {"zebra": 1})),
            "{d}/test/zebra is not a class folder of {d}/train",
        ),
        (lambda d: (make_folder(d, {"a": 1}), (d / "b").mkdir()), "{d}/b holds no images"),
        (lambda d: None, "no class folders in {d}"),
        (
            lambda d: (
                make_folder(d / "train", {"a": 2, "b": 2}),
                make_folder(d / "test", {"a": 1, "b": 1}),
                make_folder(d / "bogus", {"a": 1}),
            ),
            "every sub-folder must be train/, val/ or test/; found bogus/",
        ),
        (
            lambda d: make_folder(d, {"a": 6}),
            "has only one class \\('a'\\); few-shot classification needs at least 2",
        ),
        (
            lambda d: (
                make_folder(d, {"a": 3, "b": 3}),
                (d / "classnames.txt").write_text("only one\n"),
            ),
            "classnames.txt has 1 names but there are 2 classes",
        ),
        (
            lambda d: (
                make_folder(d, {"a": 3}),
                (d / "templates.txt").write_text("ok {}\nno braces\n"),
            ),
            "templates.txt:2: a template needs exactly one {{}}",
        ),
    ],
)
def test_imagefolder_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DatasetError, match=message.format(d=tmp_path).replace("{}", r"\{\}")):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_missing_dir(tmp_path):
    with pytest.raises(DatasetError, match=f"imagefolder expects DIR/<class>.*; missing: {tmp_path}/nope"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_spec_without_path(tmp_path):
    with pytest.raises(UsageError, match="needs a path after the colon"):
        load_dataset("imagefolder:")


# ---------------------------------------------------------------------------- csv


def write_csv(folder, text, images=()):
    touch_all(folder, images)
    path = folder / "data.csv"
    path.write_text(text)
    return path


def test_csv_with_split_column_and_names(tmp_path):
    images = ["img/a.jpg", "img/b.jpg", "img/c.jpg", "img/d.jpg"]
    text = (
        "path,label,split\nimg/a.jpg,zebra,train\nimg/b.jpg,ant_lion,test\n"
        "img/c.jpg,zebra,val\nimg/d.jpg,ant_lion,train\n"
    )
    spec = load_dataset(f"csv:{write_csv(tmp_path, text, images)}")
    assert spec.classnames == ("ant lion", "zebra")
    assert spec.splits == {
        "train": (("img/a.jpg", 1), ("img/d.jpg", 0)),
        "val": (("img/c.jpg", 1),),
        "test": (("img/b.jpg", 0),),
    }
    assert spec.image_root == tmp_path.resolve()


def test_csv_integer_labels_use_classnames_file(tmp_path):
    absolute = tmp_path / "elsewhere" / "x.png"
    touch_all(tmp_path, ["elsewhere/x.png", "y.png"])
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    path = write_csv(tmp_path, f"Label,Path,Split\n1,{absolute},train\n0,y.png,test\n")
    spec = load_dataset(f"csv:{path}")
    assert spec.classnames == ("cat", "dog")
    assert spec.path("train", 0) == absolute


def test_csv_without_split_column_is_stratified(tmp_path):
    images = [f"{c}{i}.jpg" for c in "ab" for i in range(10)]
    text = "path,label\n" + "".join(f"{p},{p[0]}\n" for p in images)
    path = write_csv(tmp_path, text, images)
    spec = load_dataset(f"csv:{path}")
    assert {s: len(v) for s, v in spec.splits.items()} == {"train": 10, "val": 4, "test": 6}
    assert any("stratified split" in n for n in spec.notes)
    assert load_dataset(f"csv:{path}") == spec


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "file,label\na.jpg,x\n",
            r"data.csv:1: header must name the columns path,label\[,split\]; found: file,label",
        ),
        ("path,label,splt\na.jpg,x,train\n", "data.csv:1: header must name"),
        ("path,label\na.jpg,x\nb.jpg\n", "data.csv:3: expected 2 columns"),
        ("path,label\na.jpg,x\n,y\n", "data.csv:3: empty path"),
        (
            "path,label,split\na.jpg,x,train\na.jpg,y,holdout\n",
            "data.csv:3: split must be one of train, val, test; got 'holdout'",
        ),
        ("path,label\na.jpg,0\na.jpg,5\n", "labels are integers, so .*classnames.txt must list"),
        ("path,label\n", "no rows after the header"),
        ("path,label\nmissing.jpg,x\n", "missing: .*missing.jpg"),
        ("path,label\na.jpg,x\nb.jpg,x\n", "has only one class"),
    ],
)
def test_csv_bad_rows_name_the_line(tmp_path, text, message):
    path = write_csv(tmp_path, text, ["a.jpg", "b.jpg"])
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"csv:{path}")


def test_csv_integer_label_out_of_range(tmp_path):
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    path = write_csv(tmp_path, "path,label\na.jpg,0\na.jpg,2\n", ["a.jpg"])
    with pytest.raises(DatasetError, match=r"data.csv:3: label 2 out of range 0..1"):
        load_dataset(f"csv:{path}")


def test_csv_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=f"missing: {tmp_path}/none.csv"):
        load_dataset(f"csv:{tmp_path / 'none.csv'}")


# ---------------------------------------------------------------------------- demo


def test_demo_dataset_is_quick_loadable_and_distinct(tmp_path):
    start = time.perf_counter()
    folder = make_demo_dataset(tmp_path / "demo")
    assert time.perf_counter() - start < 3.0
    spec = load_dataset(f"imagefolder:{folder}")
    assert spec.num_classes == 5 and "red circle" in spec.classnames
    assert {s: len(v) for s, v in spec.splits.items()} == {"train": 150, "val": 50, "test": 100}
    assert len(spec.templates["tip"]) == 2
    img = open_image(spec.path("test", 0))
    assert img.size == (64, 64)


def test_demo_dataset_is_deterministic(tmp_path):
    first, second = make_demo_dataset(tmp_path / "a"), make_demo_dataset(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 303  # 300 images, two text files, the marker
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    other = make_demo_dataset(tmp_path / "c", seed=1)
    assert (first / "train/checkerboard/000.png").read_bytes() != (
        other / "train/checkerboard/000.png"
    ).read_bytes()


def test_demo_dataset_is_idempotent(tmp_path):
    folder = make_demo_dataset(tmp_path)
    probe = folder / "train" / "red_circle" / "000.png"
    stamp = probe.stat().st_mtime_ns
    time.sleep(0.01)
    assert make_demo_dataset(tmp_path) == folder
    assert probe.stat().st_mtime_ns == stamp
    with pytest.raises(UsageError, match="already holds another demo dataset"):
        make_demo_dataset(tmp_path, seed=7)


def test_demo_dataset_redoes_an_interrupted_run(tmp_path):
    folder = make_demo_dataset(tmp_path)
    (folder / ".demo-complete").unlink()
    (folder / "test" / "checkerboard" / "019.png").unlink()
    make_demo_dataset(tmp_path)
    assert (folder / "test" / "checkerboard" / "019.png").is_file()


def test_demo_dataset_refuses_foreign_folder(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="not empty"):
        make_demo_dataset(tmp_path)


def test_the_demo_dataset_names_each_folder_by_its_own_class(tmp_path):
    from fsl_cache.datasets import load_dataset, make_demo_dataset
    from fsl_cache.datasets.demo import CLASSES

    spec = load_dataset(f"imagefolder:{make_demo_dataset(tmp_path / 'demo')}")
    assert list(spec.classnames) == [CLASSES[key] for key in sorted(CLASSES)]
