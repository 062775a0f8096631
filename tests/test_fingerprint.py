"""data.json: what a run was trained on; a resume on other data is refused saying what differs, unless accepted."""
import json
import shutil

import pytest

from fastlearn.data.folders import check_image_folder
from fastlearn.base.errors import DataChangedError
from fastlearn.run.fingerprint import data_diff, dls_fingerprint, files_hash, folder_fingerprint, record_data
from conftest import synthetic_dls, write_image_folder


def _fp(root):
    return folder_fingerprint(check_image_folder(root))


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "data", n_per_class=4, valid=2, size=16)


def test_files_hash_is_order_free_and_sees_names_and_sizes():
    a = [("train/a/1.png", 10), ("train/b/2.png", 20)]
    assert files_hash(a) == files_hash(a[::-1])
    assert files_hash(a) != files_hash([("train/a/1.png", 11), ("train/b/2.png", 20)])
    assert files_hash(a) != files_hash([("train/b/1.png", 10), ("train/b/2.png", 20)])  # moved to another class
    assert len(files_hash([])) == 64


def test_folder_fingerprint_records_root_layout_classes_counts(folder):
    fp = _fp(folder)
    assert fp["root"] == str(folder.resolve()) and fp["layout"] == "train_valid"
    assert fp["classes"] == ["a", "b", "c"] and fp["n_images"] == 18
    assert fp["counts"] == {"train": {"a": 4, "b": 4, "c": 4}, "valid": {"a": 2, "b": 2, "c": 2}}
    assert fp == _fp(folder) and data_diff(fp, _fp(folder)) == []


def test_data_diff_names_what_changed(folder, tmp_path):
    before = _fp(folder)
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert data_diff(before, _fp(moved)) == [] and _fp(moved)["root"] != before["root"]  # a copy is the same data
    (folder / "train" / "a" / "0.png").rename(folder / "train" / "a" / "renamed.png")
    assert data_diff(before, _fp(folder)) == [f"files changed: same classes and counts, but other names or sizes "
                                              f"(file-list hash {before['hash'][:12]} -> {_fp(folder)['hash'][:12]})"]
    (folder / "train" / "b" / "1.png").unlink()
    assert data_diff(before, _fp(folder)) == ["image counts changed (train/b 4 -> 3; 18 -> 17 images)"]
    shutil.rmtree(folder / "train" / "c"); shutil.rmtree(folder / "valid" / "c")
    write_image_folder(folder, n_per_class=1, valid=1, size=16, classes=("d",))
    diff = data_diff(before, _fp(folder))
    assert diff[:2] == ["classes added ['d']", "classes removed ['c']"] and diff[2].startswith("image counts changed")


def test_dataloaders_without_a_folder_report_record_what_is_known():
    fp = dls_fingerprint(synthetic_dls())
    assert fp["hash"] is None and fp["n_items"] == {"train": 72, "valid": 24} and "not built by" in fp["note"]
    assert data_diff(fp, dls_fingerprint(synthetic_dls(n=100))) == [
        "items per split {'train': 72, 'valid': 24} -> {'train': 75, 'valid': 25}"]


def test_record_data_writes_checks_refuses_and_accepts(folder, tmp_path, capsys):
    from fastlearn.data.dls import image_dls
    run = tmp_path / "run"
    run.mkdir()
    dls = image_dls(folder, size=16, bs=4)
    record_data(dls, run)
    assert json.loads((run / "data.json").read_text()) == _fp(folder)
    record_data(dls, run, resume=True)  # same data: fine, silent
    assert capsys.readouterr().err == ""
    (folder / "train" / "b" / "1.png").unlink()
    other = image_dls(folder, size=16, bs=4)
    with pytest.raises(DataChangedError) as e:
        record_data(other, run, resume=True)
    assert str(e.value) == (f"resume refused: {run} was trained on other data (image counts changed (train/b 4 -> 3; "
                            f"18 -> 17 images)). Resume with the data recorded in {run / 'data.json'}, pass "
                            f"--accept-data-change (accept_data_change=True) to go on with this data anyway, or start "
                            f"a new run")
    record_data(other, run, resume=True, accept_change=True)
    assert "warning: resuming" in capsys.readouterr().err
    saved = json.loads((run / "data.json").read_text())
    assert saved["n_images"] == 17 and saved["previous"][0]["n_images"] == 18
    record_data(other, run, resume=True)  # the accepted data is now the run's


@pytest.mark.slow
def test_cli_resume_on_other_data_is_refused_then_accepted(tmp_path, capsys):
    from fastlearn.cli import main
    data = write_image_folder(tmp_path / "data", n_per_class=8, valid=2)
    args = ["arch=test_resnet", "pretrained=false", "size=32", "bs=8", "lr_find=false", "lr=1e-3", "strategy=scratch",
            "epochs=1", "num_workers=0"]
    run = str(tmp_path / "run")
    assert main(["train", "transfer", "--data", str(data), "--run-dir", run, *args]) == 0
    other = write_image_folder(tmp_path / "other", n_per_class=8, valid=2, classes=("a", "b", "c", "d"))
    capsys.readouterr()
    assert main(["train", "transfer", "--data", str(other), "--run-dir", run, "--resume", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fastlearn: error: resume refused: {run} was trained on "
                                                         f"other data (folder {data} -> {other}; classes added ['d']")
    (data / "train" / "a" / "0.png").unlink()
    assert main(["train", "transfer", "--data", str(data), "--run-dir", run, "--resume", *args]) == 2
    assert main(["train", "transfer", "--data", str(data), "--run-dir", run, "--resume", "--accept-data-change",
                 *args]) == 0
    assert "warning: resuming" in capsys.readouterr().err
