"""What a run was trained on, recorded in `run_dir/data.json`, and checked when the run is resumed.

    {"root": "/abs/path", "layout": "train_valid", "classes": [...vocab order], "counts": {split: {class: n}},
     "n_images": 1797, "hash": sha256 over the sorted (relative path, size) list}

The hash reads no file contents (a stat per file, cheap next to the decode check of every image), yet changes
when a file is added, removed, renamed, moved to another class or resized. DataLoaders not built by `image_dls`
have no folder report: the record then holds what is known (classes when they have a vocab, item counts).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable

from ..base.errors import DataChangedError
from ..base.files import atomic_write
from ..base.ranks import is_main_process


__all__ = ["files_hash", "folder_fingerprint", "dls_fingerprint", "data_diff", "record_data", "DATA_FILE"]

DATA_FILE = "data.json"
MAX_LISTED = 6  # per-class count changes spelled out in a message


def files_hash(entries: Iterable[tuple[str, int]]) -> str:
    "sha256 over the sorted (relative POSIX path, size in bytes) pairs; file contents are not read."
    h = hashlib.sha256()
    for rel, size in sorted((str(r), int(s)) for r, s in entries):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + str(size).encode() + b"\n")  # no name holds \0
    return h.hexdigest()


def folder_fingerprint(report) -> dict:
    "The record of a `fastlearn.data.FolderReport` (the images it kept, one stat each)."
    root = Path(report.root)
    entries = [(Path(p).relative_to(root).as_posix(), Path(p).stat().st_size) for p in report.files]
    return {"root": str(root.resolve()), "layout": report.layout, "classes": list(report.classes),
            "counts": {split: dict(c) for split, c in report.counts.items()}, "n_images": int(report.n_images),
            "hash": files_hash(entries)}


def dls_fingerprint(dls) -> dict:
    "The record of what `dls` trains on: its folder report when `image_dls` built it, else what can be known."
    report = getattr(dls, "__dict__", {}).get("folder_report")  # fastai's __getattr__ would search the loaders
    if report is not None:
        return folder_fingerprint(report)
    try:
        vocab = [str(c) for c in dls.vocab]
    except Exception:  # DataLoaders over plain datasets have no vocab
        vocab = None
    sizes = {}
    for split, dl in (("train", dls.train), ("valid", dls.valid)):
        try:
            sizes[split] = len(dl.dataset)
        except Exception:
            sizes[split] = None
    known = all(v is not None for v in sizes.values())
    return {"root": None, "layout": None, "classes": vocab, "counts": None, "n_items": sizes,
            "n_images": sum(sizes.values()) if known else None, "hash": None,
            "note": "DataLoaders not built by fastlearn's image_dls: only the classes (when they have a vocab) and "
                    "the item counts per split are recorded, so a resume checks only those"}


def data_diff(saved: dict, current: dict) -> list[str]:
    "What differs between two records, in words (the root is compared separately: a moved copy is the same data)."
    out = []
    if saved.get("layout") != current.get("layout") and saved.get("hash") and current.get("hash"):
        out.append(f"layout {saved.get('layout')} -> {current.get('layout')}")
    a, b = saved.get("classes"), current.get("classes")
    if a is not None and b is not None and a != b:
        added, removed = [c for c in b if c not in a], [c for c in a if c not in b]
        if added:
            out.append(f"classes added {added}")
        if removed:
            out.append(f"classes removed {removed}")
        if not added and not removed:
            out.append(f"class order changed {a} -> {b}")
    ca, cb = saved.get("counts"), current.get("counts")
    if ca and cb:
        changes = [f"{s}/{c} {ca.get(s, {}).get(c, 0)} -> {cb.get(s, {}).get(c, 0)}"
                   for s in dict.fromkeys([*ca, *cb]) for c in dict.fromkeys([*ca.get(s, {}), *cb.get(s, {})])
                   if ca.get(s, {}).get(c, 0) != cb.get(s, {}).get(c, 0)]
        if changes:
            more = f" and {len(changes) - MAX_LISTED} more" if len(changes) > MAX_LISTED else ""
            out.append(f"image counts changed ({', '.join(changes[:MAX_LISTED])}{more}; "
                       f"{saved.get('n_images')} -> {current.get('n_images')} images)")
    elif saved.get("n_items") and current.get("n_items"):
        if saved["n_items"] != current["n_items"]:
            out.append(f"items per split {saved['n_items']} -> {current['n_items']}")
    elif saved.get("n_images") != current.get("n_images"):
        out.append(f"{saved.get('n_images')} -> {current.get('n_images')} images")
    if not out and saved.get("hash") and current.get("hash") and saved["hash"] != current["hash"]:
        out.append("files changed: same classes and counts, but other names or sizes (file-list hash "
                   f"{saved['hash'][:12]} -> {current['hash'][:12]})")
    return out


def _write(run_dir: Path, record: dict) -> None:
    atomic_write(run_dir / DATA_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def _note(msg: str) -> None:
    print(f"fastlearn: {msg}", file=sys.stderr, flush=True)


def record_data(dls, run_dir: str | Path, resume: bool = False, accept_change: bool = False) -> dict:
    """Write `run_dir/data.json` for a new run; on a resume, compare with it first and raise `DataChangedError`
    saying what differs unless `accept_change` (then warn and record the new data, keeping the old record
    under "previous"). Only rank 0 writes or prints; every rank checks."""
    run_dir, main = Path(run_dir), is_main_process()
    current = dls_fingerprint(dls)
    path = run_dir / DATA_FILE
    if not resume or not path.exists():
        if resume and main:
            _note(f"{run_dir} has no {DATA_FILE} (it started before fastlearn recorded its data): the data cannot be "
                  f"checked against it; recording this data for later resumes")
        if main:
            _write(run_dir, current)
        return current
    saved = json.loads(path.read_text())
    diff = data_diff(saved, current)
    moved = saved.get("root") != current.get("root")
    older = {k: v for k, v in saved.items() if k != "previous"}
    with_previous = {**current, "previous": saved.get("previous", []) + [older]}  # what an accepted change writes
    if not diff:
        if bool(saved.get("hash")) != bool(current.get("hash")) and main:
            _note(f"{path} and this resume do not both come from an image folder: only the classes and counts "
                  f"could be compared (they match)")
        elif moved and main:
            _note(f"data folder moved: {saved.get('root')} -> {current.get('root')} (same classes, counts and files); "
                  f"recorded in {path}")
            _write(run_dir, with_previous)
        return current
    what = "; ".join(([f"folder {saved.get('root')} -> {current.get('root')}"] if moved else []) + diff)
    if not accept_change:
        raise DataChangedError(f"resume refused: {run_dir} was trained on other data ({what}). Resume with the data "
                               f"recorded in {path}, pass --accept-data-change (accept_data_change=True) to go on "
                               f"with this data anyway, or start a new run")
    if main:
        _note(f"warning: resuming {run_dir} on changed data ({what}), accepted; the new data is recorded in {path}")
        _write(run_dir, with_previous)
    return current
