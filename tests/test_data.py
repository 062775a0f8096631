import io
import pickle
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastlearn.data import dls as data_mod
from fastlearn.data.dls import IMAGENET_MEAN, IMAGENET_STD, image_dls
from fastlearn.data.folders import FolderReport, check_image_folder
from fastlearn.base.errors import CorruptImageError, DataError, EmptyClassError, SingleClassError

CPU = dict(device="cpu", num_workers=0, bs=4)


def _img(path: Path, mode: str = "RGB", size=(12, 10), color=None, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None: color = {"L": 90, "1": 1, "P": 3, "LA": (90, 128), "RGBA": (10, 200, 30, 128), "CMYK": (0, 50, 100, 0)}.get(mode, (10, 120, 240))
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _folder(root: Path, classes=("cat", "dog"), n: int = 5, split: str | None = None, **kw) -> Path:
    for cls in classes:
        for i in range(n):
            _img(root / (split or "") / cls / f"{i}.png", **kw)
    return root


def _truncated(path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _all_batches(dl):
    return [(x.clone(), y.clone()) for x, y in dl]


# --- check_image_folder: errors before any training -------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_image_folder(tmp_path / "nope")


def test_file_not_folder(tmp_path):
    f = _img(tmp_path / "x.png")
    with pytest.raises(DataError, match="not a directory"):
        check_image_folder(f)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no class subfolders") as e:
        check_image_folder(tmp_path)
    assert str(tmp_path) in str(e.value) and "train" in str(e.value)


def test_loose_images_without_class_folders(tmp_path):
    for i in range(3): _img(tmp_path / f"{i}.jpg")
    with pytest.raises(DataError, match="found 3 image"):
        check_image_folder(tmp_path)


def test_no_images_at_all(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        check_image_folder(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    _folder(tmp_path, classes=("cat", "dog"))
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "readme.txt").write_text("todo")
    with pytest.raises(EmptyClassError) as e:
        check_image_folder(tmp_path)
    assert str(tmp_path / "bird") in str(e.value) and "dog" not in str(e.value)


def test_single_class(tmp_path):
    _folder(tmp_path, classes=("cat",))
    with pytest.raises(SingleClassError, match="cat"):
        check_image_folder(tmp_path)


def test_all_bad_files_are_listed(tmp_path):
    _folder(tmp_path)
    bad = {(tmp_path / "cat" / "zero.png"), _truncated(tmp_path / "cat" / "half.png", "PNG"),
           _truncated(tmp_path / "dog" / "half.jpg", "JPEG"), tmp_path / "dog" / "text.jpg"}
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    (tmp_path / "dog" / "text.jpg").write_text("not an image")
    with pytest.raises(CorruptImageError) as e:
        check_image_folder(tmp_path)
    assert set(e.value.paths) == bad
    assert all(str(p) in str(e.value) for p in bad) and "bad_images='skip'" in str(e.value)


def test_truncation_setting_is_not_changed_globally(tmp_path):
    from PIL import ImageFile
    _folder(tmp_path)
    _truncated(tmp_path / "cat" / "half.jpg", "JPEG")
    with pytest.raises(CorruptImageError):
        check_image_folder(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_skip_mode_counts_bad_files_and_still_builds_dls(tmp_path):
    _folder(tmp_path, n=5)
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    _truncated(tmp_path / "dog" / "half.png", "PNG")
    (tmp_path / "dog" / "labels.txt").write_text("ignored: not an image suffix")
    report = check_image_folder(tmp_path, bad_images="skip")
    assert len(report.skipped) == 2 and report.n_images == 10 and report.n_ignored == 1
    assert report.counts == {"all": {"cat": 5, "dog": 5}}
    with pytest.warns(UserWarning, match="skipping 2"):
        dls = image_dls(tmp_path, size=8, bad_images="skip", **CPU)
    assert len(dls.train_ds) + len(dls.valid_ds) == 10
    assert not set(dls.train_ds.items + dls.valid_ds.items) & set(report.skipped)


def test_class_whose_images_are_all_bad_is_empty_after_skipping(tmp_path):
    _folder(tmp_path, classes=("cat", "dog"))
    (tmp_path / "fox").mkdir()
    (tmp_path / "fox" / "0.png").write_bytes(b"")
    with pytest.raises(EmptyClassError, match="after skipping"):
        check_image_folder(tmp_path, bad_images="skip")


def test_bad_images_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="'error', 'skip'"):
        check_image_folder(tmp_path, bad_images="ignore")


def test_valid_class_unknown_to_train(tmp_path):
    _folder(tmp_path, split="train")
    _folder(tmp_path, classes=("cat", "dog", "cow"), split="valid")
    with pytest.raises(DataError, match="cow"):
        check_image_folder(tmp_path)


def test_train_without_valid_folder(tmp_path):
    _folder(tmp_path, split="train")
    with pytest.raises(DataError, match="no valid/, val/ or validation/"):
        check_image_folder(tmp_path)


def test_train_val_layout_is_accepted(tmp_path):
    _folder(tmp_path, n=4, split="train")
    _folder(tmp_path, n=2, split="val")
    r = check_image_folder(tmp_path)
    assert (r.layout, r.valid_name, r.classes) == ("train_valid", "val", ("cat", "dog"))
    assert r.counts == {"train": {"cat": 4, "dog": 4}, "valid": {"cat": 2, "dog": 2}} and r.n_images == 12


def test_hidden_nested_and_fastai_models_folders(tmp_path):
    _folder(tmp_path, n=3)
    _img(tmp_path / "cat" / "more" / "deep.png")  # nested: still a cat
    _img(tmp_path / ".ipynb_checkpoints" / "x.png")  # hidden: not a class
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "stage1.pth").write_bytes(b"weights")  # fastai's save folder: not a class
    r = check_image_folder(tmp_path)
    assert r.classes == ("cat", "dog") and r.counts["all"] == {"cat": 4, "dog": 3}
    dls = image_dls(tmp_path, size=8, valid_pct=0.3, **CPU)
    labels = {Path(p).name: dls.vocab[int(y)] for ds in (dls.train_ds, dls.valid_ds) for p, (_, y) in zip(ds.items, ds)}
    assert labels["deep.png"] == "cat"


def test_report_is_frozen_and_summarises(tmp_path):
    r = check_image_folder(_folder(tmp_path))
    assert isinstance(r, FolderReport)
    with pytest.raises(AttributeError):
        r.layout = "x"
    assert r.summary().endswith("2 classes, 10 images (all 10)")


def test_2000_small_images_check_quickly(tmp_path):
    for cls in range(10):
        (tmp_path / str(cls)).mkdir()
        for i in range(200): Image.new("L", (8, 8), i).save(tmp_path / str(cls) / f"{i}.png")
    t = time.perf_counter()
    r = check_image_folder(tmp_path)
    elapsed = time.perf_counter() - t
    assert r.n_images == 2000
    # a guard against a pathological check (e.g. several decodes per file: minutes), not a speed target: ~0.5 s idle,
    # 2.3 s seen on a loaded 2-core CI machine
    assert elapsed < 15.0, f"checking 2,000 8x8 PNGs took {elapsed:.2f}s"


# --- image_dls ----------------------------------------------------------------------------------------------------

def test_any_image_mode_loads_as_3_channels(tmp_path):
    for i, (mode, fmt) in enumerate([("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("1", "PNG"),
                                     ("LA", "PNG"), ("CMYK", "TIFF")]):
        for cls in ("a", "b"):
            _img(tmp_path / cls / f"{i}.{fmt.lower()}", mode=mode, size=(20 + i, 15), fmt=fmt)
    dls = image_dls(tmp_path, size=16, valid_pct=0.3, **CPU)
    for dl in (dls.train, dls.valid):
        for x, y in dl:
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32


def test_train_valid_layout_uses_the_folders(tmp_path):
    _folder(tmp_path, n=6, split="train")
    _folder(tmp_path, n=2, split="valid")
    dls = image_dls(tmp_path, size=8, **CPU)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (12, 4)
    assert all(Path(p).parts[-3] == "valid" for p in dls.valid_ds.items)
    assert dls.vocab == ["cat", "dog"] and dls.folder_report.layout == "train_valid"


def test_flat_layout_random_split_sizes(tmp_path):
    _folder(tmp_path, n=10)
    dls = image_dls(tmp_path, size=8, valid_pct=0.25, **CPU)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (15, 5)
    assert not set(dls.train_ds.items) & set(dls.valid_ds.items)


def test_flat_split_too_small_for_validation(tmp_path):
    _folder(tmp_path, n=1)
    with pytest.raises(DataError, match="no validation image"):
        image_dls(tmp_path, size=8, valid_pct=0.2, **CPU)


def test_batch_larger_than_train_set(tmp_path):
    _folder(tmp_path, n=5)
    with pytest.raises(DataError, match="bs=64"):
        image_dls(tmp_path, size=8, valid_pct=0.2, **{**CPU, "bs": 64})


def test_same_seed_same_split_and_first_batch(tmp_path):
    _folder(tmp_path, classes=("a", "b", "c"), n=8)
    for i, p in enumerate(sorted(tmp_path.rglob("*.png"))):  # distinct images so batches can be compared
        _img(p, mode="L", color=i * 10)
    make = lambda seed: image_dls(tmp_path, size=8, seed=seed, augment=False, **CPU)
    a, b, c = make(1), make(1), make(2)
    assert a.valid_ds.items == b.valid_ds.items and a.valid_ds.items != c.valid_ds.items
    (xa, ya), (xb, yb) = a.one_batch(), b.one_batch()
    assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not torch.equal(next(iter(a.train))[0], next(iter(a.train))[0])  # still reshuffled every epoch


def test_split_does_not_reseed_torch_globally(tmp_path):
    _folder(tmp_path)
    draws = []
    for before in (123, 456):
        torch.manual_seed(before)
        image_dls(tmp_path, size=8, seed=42, **CPU)
        draws.append(torch.rand(3))
    assert not torch.equal(*draws)  # fastai's RandomSplitter(seed=42) would reset torch's global rng: equal draws


def test_augment_false_gives_deterministic_batches(tmp_path):
    _folder(tmp_path, n=6, size=(14, 10), mode="L")
    for i, p in enumerate(sorted(tmp_path.rglob("*.png"))):
        im = Image.effect_noise((14, 10), 40 + i)  # non-square: fastai's Resize would crop at random on train
        im.save(p)
    dls = image_dls(tmp_path, size=8, augment=False, **CPU)
    dls.train.shuffle = False
    first, second = _all_batches(dls.train), _all_batches(dls.train)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second))
    dls_aug = image_dls(tmp_path, size=8, augment=True, **CPU)
    dls_aug.train.shuffle = False
    a1, a2 = _all_batches(dls_aug.train), _all_batches(dls_aug.train)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a1, a2))  # augmentation does vary


def test_explicit_stats_normalise_constant_images_to_zero(tmp_path):
    _folder(tmp_path, n=4, color=(51, 102, 204))  # 0.2, 0.4, 0.8 of 255
    dls = image_dls(tmp_path, size=8, mean=(0.2, 0.4, 0.8), std=(0.1, 0.2, 0.3), augment=False, **CPU)
    for dl in (dls.train, dls.valid):
        x, _ = dl.one_batch()
        assert x.abs().max() < 1e-5


def test_default_stats_are_imagenet(tmp_path):
    dls = image_dls(_folder(tmp_path), size=8, **CPU)
    norm = dls.after_batch.fs[-1]
    assert torch.allclose(norm.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(norm.std.flatten(), torch.tensor(IMAGENET_STD))


@pytest.fixture
def fake_models(monkeypatch):
    "Stand-ins for fastlearn.core.models' lookups, where image_dls calls them, so the arch path is tested without timm."
    calls = []
    monkeypatch.setattr(data_mod, "model_stats",
                        lambda arch, pretrained=True: calls.append(arch) or ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    monkeypatch.setattr(data_mod, "model_input_size", lambda arch: calls.append(arch) or 12)
    return calls


def test_arch_gives_stats_and_size(tmp_path, fake_models):
    dls = image_dls(_folder(tmp_path), size=None, arch="fake_net", augment=False, **CPU)
    x, _ = dls.one_batch()
    norm = [t for t in dls.after_batch.fs if type(t).__name__ == "Normalize"][0]
    assert x.shape[-2:] == (12, 12) and fake_models == ["fake_net", "fake_net"]
    assert torch.allclose(norm.mean.flatten(), torch.tensor(0.5)) and torch.allclose(norm.std.flatten(), torch.tensor(0.25))


def test_explicit_stats_win_over_arch(tmp_path, fake_models):
    dls = image_dls(_folder(tmp_path), size=8, arch="fake_net", mean=(0.1, 0.1, 0.1), std=(1, 1, 1), **CPU)
    norm = dls.after_batch.fs[-1]
    assert torch.allclose(norm.mean.flatten(), torch.tensor(0.1)) and fake_models == []


def test_argument_errors(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(ValueError, match="arch="):
        image_dls(root, size=None, **CPU)
    with pytest.raises(ValueError, match="both or neither"):
        image_dls(root, size=8, mean=(0.5, 0.5, 0.5), **CPU)
    with pytest.raises(ValueError, match="valid_pct=1.5"):
        image_dls(root, size=8, valid_pct=1.5, **CPU)


def test_random_erasing_changes_train_batches_only(tmp_path):
    _folder(tmp_path, n=4, color=(51, 102, 204))
    dls = image_dls(tmp_path, size=16, mean=(0.2, 0.4, 0.8), std=(0.1, 0.2, 0.3), augment=False,
                    random_erasing=1.0, **CPU)
    xt, yt = dls.train.one_batch()
    xv, _ = dls.valid.one_batch()
    assert xt.abs().amax(dim=(1, 2, 3)).min() > 0.1  # every training image got an erased (noise) patch
    assert xv.abs().max() < 1e-5 and yt.dtype == torch.long


def test_dataloaders_pickle_for_export(tmp_path):
    dls = image_dls(_folder(tmp_path), size=8, random_erasing=0.5, **CPU)
    empty = pickle.loads(pickle.dumps(dls.new_empty()))
    assert empty.vocab == ["cat", "dog"]


def test_default_num_workers(monkeypatch):
    monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(data_mod.sys, "platform", "linux")
    assert data_mod.default_num_workers() == 8
    monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert data_mod.default_num_workers() == 0
    monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert data_mod.default_num_workers() == 3
    monkeypatch.setattr(data_mod.sys, "platform", "darwin")
    assert data_mod.default_num_workers() == 0


# --- RandAugment (timm) on training items --------------------------------------------------------------------------


def _pass(dl):
    "One ordered pass over a DataLoader's items (no shuffle, no dropped batch)."
    return torch.cat([x for x, _ in dl.new(shuffle=False, drop_last=False)])


def test_rand_augment_changes_train_items_only(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "valid"):
        for cls in ("cat", "dog"):
            for i in range(4):  # noise images: every RandAugment op (contrast, shear, ...) changes them visibly
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.effect_noise((16, 16), 80).convert("RGB").save(root / split / cls / f"{i}.png")
    kw = dict(size=16, augment=False, mean=(0.5,) * 3, std=(0.25,) * 3, **CPU)
    plain = image_dls(root, **kw)
    dls = image_dls(root, rand_augment="rand-m9-n3-mstd0.5-p1.0", **kw)
    a, b = _pass(dls.train), _pass(dls.train)
    assert a.shape == (8, 3, 16, 16)
    changed = (a - b).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert changed.sum() >= 6  # two draws of the same image differ (3 random ops each time, each with p=1)
    assert not torch.allclose(_pass(plain.train), a)  # and differ from the un-augmented image
    assert torch.equal(_pass(dls.valid), _pass(plain.valid))  # validation items are untouched
    assert pickle.loads(pickle.dumps(dls.new_empty())).vocab == ["cat", "dog"]  # still exportable


@pytest.mark.parametrize("bad", ["rand-mabc", "rand-x9", "augmix-m5", "", "rand-m9-tnotanop"])
def test_rand_augment_invalid_config_is_named(tmp_path, bad):
    with pytest.raises(ValueError, match=r"rand_augment=.*rand-m9-mstd0\.5") as e:
        image_dls(_folder(tmp_path), size=8, rand_augment=bad, **CPU)
    assert repr(bad) in str(e.value)


# --- CSV layout (fastlearn/labels.py): file names and labels in a CSV, fastai's from_csv conventions ---------------

from conftest import write_csv_dataset  # noqa: E402
from fastlearn.core.targets import label_info  # noqa: E402
from fastlearn.data.labels import CsvReport, check_csv  # noqa: E402


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_csv_with_is_valid_column(tmp_path):
    csv = write_csv_dataset(tmp_path, n=24, is_valid=True)
    dls = image_dls(csv, size=8, **CPU)
    r = dls.folder_report
    assert isinstance(r, CsvReport) and r.layout == "csv" and r.csv == csv and r.root == tmp_path
    assert (len(dls.train_ds), len(dls.valid_ds)) == (18, 6)  # rows 0, 4, 8, ... are marked valid
    assert sorted(Path(p).name for p in dls.valid_ds.items) == sorted(f"{i}.png" for i in range(0, 24, 4))
    assert list(dls.vocab) == list(r.classes) == ["blue", "green", "red"]
    for ds in (dls.train_ds, dls.valid_ds):  # every image carries the CSV's label (image i is colour i % 3)
        for p, (_, y) in zip(ds.items, ds):
            assert dls.vocab[int(y)] == ("red", "green", "blue")[int(Path(p).stem) % 3]
    assert r.counts == {"train": {"blue": 6, "green": 6, "red": 6}, "valid": {"blue": 2, "green": 2, "red": 2}}
    assert label_info(dls) == {"multi_label": False, "threshold": None, "classes": ["blue", "green", "red"]}
    assert dls.multi_label is False and r.summary().endswith("3 classes, 24 images (train 18, valid 6)")
    assert pickle.loads(pickle.dumps(dls.new_empty())).vocab == ["blue", "green", "red"]  # still exportable


def test_csv_folder_with_labels_csv_and_random_split(tmp_path):
    write_csv_dataset(tmp_path, n=30)  # no is_valid column: the seeded random split of a flat folder
    a = image_dls(tmp_path, size=8, valid_pct=0.2, seed=1, **CPU)  # a folder holding labels.csv
    b = image_dls(tmp_path / "labels.csv", size=8, valid_pct=0.2, seed=1, **CPU)
    c = image_dls(tmp_path, size=8, valid_pct=0.2, seed=2, **CPU)
    assert (len(a.train_ds), len(a.valid_ds)) == (24, 6) and a.folder_report.layout == "csv"
    assert a.valid_ds.items == b.valid_ds.items != c.valid_ds.items
    assert set(a.valid_ds.items) == set(a.folder_report.valid_files)


def test_csv_custom_columns_and_image_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    for i in range(12):
        Image.new("RGB", (8, 8), (200 * (i % 2), 0, 0)).save(tmp_path / "pics" / f"im{i}.png")
    rows = "\n".join(f"{i % 2},im{i}.png,{'bright' if i % 2 else 'dark'},{int(i >= 8)}" for i in range(12))
    csv = _csv(tmp_path / "meta" / "train.csv", "fold,image,tag,holdout\n" + rows + "\n")
    dls = image_dls(csv, size=8, fn_col="image", label_col="tag", valid_col="holdout", folder="../pics",
                    **{**CPU, "bs": 2})
    assert (len(dls.train_ds), len(dls.valid_ds)) == (8, 4) and list(dls.vocab) == ["bright", "dark"]
    assert dls.folder_report.columns == ("image", "tag", "holdout")


def test_csv_multi_label_targets(tmp_path):
    csv = write_csv_dataset(tmp_path, n=24, multi_label=True, is_valid=True)
    with open(csv, "a") as f:
        f.write("images/0.png,,false\n".replace("0.png", "none.png"))  # a row with no label: all-negative target
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "none.png")
    dls = image_dls(csv, size=8, multi_label=True, threshold=0.3, **CPU)
    assert dls.multi_label and label_info(dls) == {"multi_label": True, "threshold": 0.3,
                                                   "classes": ["blue", "green", "red"]}
    labels = dls.folder_report.labels
    for ds in (dls.train_ds, dls.valid_ds):
        for p, (_, y) in zip(ds.items, ds):
            assert y.shape == (3,) and {dls.vocab[k] for k in y.nonzero().flatten().tolist()} == set(labels[p])
    none = dls.train_ds.items.index(tmp_path / "images" / "none.png")
    assert dls.train_ds[none][1].sum() == 0
    assert dls.c == 3 and pickle.loads(pickle.dumps(dls.new_empty())).vocab == ["blue", "green", "red"]


def test_single_label_csv_with_spaces_warns_and_names_the_key(tmp_path):
    csv = write_csv_dataset(tmp_path, n=24, multi_label=True, is_valid=True)
    with pytest.warns(UserWarning, match="multi_label = true"):
        check_csv(csv)


_GOOD = "filename,label,is_valid\n" + "".join(f"{i}.png,{'ab'[i % 2]},{str(i >= 6).lower()}\n" for i in range(8))


@pytest.mark.parametrize("name, csv_text, kwargs, error, words", [
    ("missing csv", None, {}, DataError, ["does not exist", "filename,label"]),
    ("empty file", "", {}, DataError, ["is empty"]),
    ("one column", "filename\n0.png\n", {}, DataError, ["1 column(s) ['filename']", "label column"]),
    ("no rows", "filename,label\n", {}, DataError, ["no rows"]),
    ("missing fn column", _GOOD, {"fn_col": "fname"}, DataError,
     ["no column 'fname' (fn_col)", "['filename', 'label', 'is_valid']"]),
    ("missing label column", _GOOD, {"label_col": "Label"}, DataError, ["no column 'Label'", "did you mean 'label'"]),
    ("file missing on disk", _GOOD.replace("3.png", "gone3.png").replace("5.png", "gone5.png"), {}, DataError,
     ["2 of 8 file(s)", "'gone3.png', 'gone5.png'", "line 5, line 7"]),
    ("listed twice", _GOOD.replace("3.png", "1.png"), {}, DataError, ["more than once", "'1.png'"]),
    ("empty label", _GOOD.replace("2.png,a", "2.png,"), {}, DataError, ["is empty at line 4", "multi_label"]),
    ("bad is_valid", _GOOD.replace("0.png,a,false", "0.png,a,maybe"), {}, DataError, ["'maybe'", "true/false"]),
    ("label only in valid", _GOOD.replace("7.png,b", "7.png,c"), {}, DataError,
     ["['c']", "only in validation", "column 'is_valid'"]),
    ("no validation rows", _GOOD.replace(",true", ",false"), {}, DataError, ["no validation image"]),
    ("one class", _GOOD.replace(",b,", ",a,"), {}, SingleClassError, ["one label ['a']"]),
    ("corrupt image", _GOOD, {"corrupt": "4.png"}, CorruptImageError, ["4.png", "bad_images='skip'"]),
    ("class gone after skipping", _GOOD.replace("2.png,a", "2.png,c").replace("4.png,a", "4.png,c"),
     {"corrupt": ["2.png", "4.png"], "bad_images": "skip"}, EmptyClassError, ["['c']", "after skipping"]),
])
def test_bad_csv_is_named_before_training(tmp_path, name, csv_text, kwargs, error, words):
    for i in range(8):
        _img(tmp_path / f"{i}.png")
    kwargs = dict(kwargs)
    for f in [kwargs.pop("corrupt")] if isinstance(kwargs.get("corrupt"), str) else kwargs.pop("corrupt", []):
        _truncated(tmp_path / f, "PNG")
    csv = tmp_path / "labels.csv"
    if csv_text is not None:
        _csv(csv, csv_text)
    with pytest.raises(error) as e:
        image_dls(csv, size=8, **{**CPU, "bs": 2}, **kwargs)
    for w in words:
        assert w in str(e.value), (name, str(e.value))


def test_random_split_label_only_in_valid_names_the_split(tmp_path):
    for i in range(10):
        _img(tmp_path / f"{i}.png")
    rows = [f"{i}.png,{'ab'[i % 2]}" for i in range(10)]
    valid = check_csv(_csv(tmp_path / "labels.csv", "filename,label\n" + "\n".join(rows) + "\n"), seed=3).valid_files
    lone = sorted(valid)[0].name  # a validation image: give it a label no other image has
    rows = [r.replace(f"{lone},a", f"{lone},z").replace(f"{lone},b", f"{lone},z") for r in rows]
    with pytest.raises(DataError, match=r"\['z'\].*random split \(valid_pct=0.2, seed=3\).*seed/valid_pct"):
        check_csv(_csv(tmp_path / "labels.csv", "filename,label\n" + "\n".join(rows) + "\n"), seed=3)


def test_csv_only_arguments_on_a_class_folder_are_refused(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(DataError, match="multi_label=True is for a CSV"):
        image_dls(root, size=8, multi_label=True, **CPU)
    with pytest.raises(DataError, match="fn_col='name' is for a CSV"):
        image_dls(root, size=8, fn_col="name", **CPU)
    dls = image_dls(root, size=8, **CPU)  # the class-folder layout is unchanged
    assert dls.folder_report.layout == "flat" and not dls.multi_label
    assert label_info(dls) == {"multi_label": False, "threshold": None, "classes": ["cat", "dog"]}


@pytest.mark.parametrize("split_idx", [0, 1])
def test_item_resize_gives_fastais_pixels(split_idx):
    "The item Resize skips fastai's zero-pixel pad and nothing else: every crop and size gives fastai's exact pixels."
    import random

    import numpy as np
    from fastai.vision.augment import Resize
    from fastai.vision.core import PILImage

    rng = np.random.default_rng(split_idx)
    for trial in range(60):
        w, h = (int(v) for v in rng.integers(5, 90, 2))
        im = PILImage.create(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        size = int(rng.integers(8, 70))
        ours, theirs = data_mod._Resize(size), Resize(size)
        random.seed(trial)  # the same random crop place on train
        a = ours(im, split_idx=split_idx)
        random.seed(trial)
        b = theirs(im, split_idx=split_idx)
        assert type(a) is type(b) and a.size == b.size == (size, size)
        assert np.array_equal(np.asarray(a), np.asarray(b)), (w, h, size)
