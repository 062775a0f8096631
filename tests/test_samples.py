import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from fastlearn.data import samples as sample_mod
from fastlearn.data.samples import SAMPLES, is_sample_name, sample


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def _tiny(dest: Path) -> int:
    "A 4-image sample so caching tests do not pay for writing 1,797 PNGs."
    for split in ("train", "valid"):
        for cls in ("a", "b"):
            (dest / split / cls).mkdir(parents=True)
            Image.new("L", (4, 4), 7).save(dest / split / cls / "0.png")
    return 4


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return sample("digits", root=tmp_path_factory.mktemp("samples"))


def test_digits_has_ten_classes_and_all_images(digits):
    assert sorted(p.name for p in (digits / "train").iterdir()) == [str(i) for i in range(10)]
    assert sorted(p.name for p in (digits / "valid").iterdir()) == [str(i) for i in range(10)]
    assert len(_pngs(digits)) == 1797
    names = [p.name for p in _pngs(digits)]
    assert len(set(names)) == 1797  # each source index written once, in one split only


def test_digits_split_is_stratified_20_percent(digits):
    n_train, n_valid = len(_pngs(digits / "train")), len(_pngs(digits / "valid"))
    assert (n_train, n_valid) == (1437, 360)
    for cls in range(10):
        t, v = len(_pngs(digits / "train" / str(cls))), len(_pngs(digits / "valid" / str(cls)))
        assert abs(v - 0.2 * (t + v)) <= 1, (cls, t, v)


def test_digits_images_are_32px_grayscale_scaled_to_255(digits):
    im = Image.open(_pngs(digits / "train" / "8")[0])
    assert (im.mode, im.size) == ("L", (32, 32))
    lo, hi = im.getextrema()
    assert lo == 0 and hi > 200


def test_second_call_is_cached_without_rewrite(digits):
    f = _pngs(digits)[0]
    before = (f.stat().st_mtime_ns, (digits / ".fastlearn-complete").stat().st_mtime_ns)
    t = time.perf_counter()
    again = sample("digits", root=digits.parent)
    assert time.perf_counter() - t < 0.1
    assert again == digits
    assert (f.stat().st_mtime_ns, (digits / ".fastlearn-complete").stat().st_mtime_ns) == before


def test_fastlearn_home_is_respected(tmp_path, monkeypatch):
    monkeypatch.setitem(SAMPLES, "tiny", _tiny)
    monkeypatch.setenv("FASTLEARN_HOME", str(tmp_path / "home"))
    path = sample("tiny")
    assert path == tmp_path / "home" / "samples" / "tiny"
    assert len(_pngs(path)) == 4


def test_default_root_without_fastlearn_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLEARN_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sample_mod.samples_root() == tmp_path / ".cache" / "fastlearn" / "samples"


def test_half_written_temp_and_unmarked_folders_are_not_done(tmp_path, monkeypatch):
    monkeypatch.setitem(SAMPLES, "tiny", _tiny)
    half = tmp_path / ".tiny.tmp-killed"
    (half / "train" / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(half / "train" / "a" / "0.png")
    old = time.time() - 2 * 3600
    os.utime(half, (old, old))
    unmarked = tmp_path / "tiny" / "train" / "a"
    unmarked.mkdir(parents=True)  # e.g. left by hand: no marker, so it must be rebuilt
    path = sample("tiny", root=tmp_path)
    assert json.loads((path / ".fastlearn-complete").read_text())["n_images"] == 4
    assert len(_pngs(path)) == 4
    assert not half.exists()  # stale temp folder from a killed write was cleaned up


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def dies_halfway(dest: Path) -> int:
        _tiny(dest)
        raise KeyboardInterrupt  # as if the process were killed mid-write

    monkeypatch.setitem(SAMPLES, "tiny", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        sample("tiny", root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(SAMPLES, "tiny", _tiny)
    assert len(_pngs(sample("tiny", root=tmp_path))) == 4


def test_unknown_sample_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="digits") as e:
        sample("mnist-full", root=tmp_path)
    assert "mnist-full" in str(e.value)


def test_is_sample_name():
    assert is_sample_name("digits")
    assert not is_sample_name("./digits/") and not is_sample_name("nope") and not is_sample_name(None)
