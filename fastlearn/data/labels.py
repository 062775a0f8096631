"""Label layouts beyond class subfolders: a CSV of file names and labels, and multi-label data.

CSV (fastai's `from_csv`/`from_df` conventions): `--data path/to/labels.csv`, or a folder holding `labels.csv`.
File names (default: the first column) are relative to the CSV's folder, or to `folder`; the label column (default:
the second) holds one label, or with `multi_label` space-separated labels (fastai's `label_delim=' '`; an empty
cell is an image with none). An `is_valid` column (`valid_col` for another) marks validation rows, else the same
seeded random split as a flat folder. `check_csv` finds every problem before any compute.

Multi-label is asked for explicitly, as fastai asks for `label_delim`: detecting it from a space would silently
split single-label classes such as "golden retriever"; such labels get a warning instead. Multi-label trains a
sigmoid per class (fastai `BCEWithLogitsLossFlat`) and reports `accuracy_multi` and macro F1, so a rare class
weighs as much as a common one.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
from fastai.data.block import CategoryBlock, MultiCategoryBlock

from ..base.errors import CorruptImageError, DataError, EmptyClassError, SingleClassError
from .folders import (bad_listing, BAD_IMAGES, check_image_folder, decode_problems, FolderReport, MAX_LISTED,
                      random_splitter)


__all__ = ["CSV_NAME", "CsvReport", "is_csv_data", "check_csv", "label_report", "label_args", "csv_parts"]

CSV_NAME = "labels.csv"  # a --data folder holding this file is read as a CSV layout
_SHOWN = 5  # rows or files spelled out in an error message
_CSV_HINT = ("expected a CSV with a header row: a file-name column and a label column (e.g. 'filename,label'), "
             "optionally 'is_valid'; file names relative to the CSV's folder (or to `folder`)")
_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f", ""}
_CSV_ARGS = ("fn_col", "label_col", "valid_col", "folder")


@dataclass(frozen=True)
class CsvReport(FolderReport):
    "What `check_csv` found: a `FolderReport` (layout 'csv', root = the images' folder), the CSV's labels and split."
    csv: Path | None = None
    labels: dict = field(default_factory=dict, repr=False)  # image path -> label (str), or labels (tuple) multi-label
    valid_files: frozenset = field(default=frozenset(), repr=False)  # the validation images
    multi_label: bool = False
    columns: tuple = ()  # (file-name column, label column, validation column or None) as used

    def n_train(self, valid_pct: float = 0.2) -> int:
        "Training images (the split is already made: `valid_files` are the rest)."
        return self.n_images - len(self.valid_files)

    def summary(self) -> str:
        "One line for logs: CSV, classes, images per split, skipped files."
        kind = "multi-label, " if self.multi_label else ""
        extra = f"; skipped {len(self.skipped)} bad file(s)" if self.skipped else ""
        return (f"{self.csv}: {kind}{len(self.classes)} classes, {self.n_images} images (train "
                f"{self.n_train()}, valid {len(self.valid_files)}){extra}")


class _CsvLabel:
    "Label(s) of an image path, from the CSV (picklable, for `Learner.export`)."

    def __init__(self, labels: dict):
        self.labels = labels
        self.__name__ = "csv_label"  # else fasttransform wraps it in a local, unpicklable function

    def __call__(self, p):  # no return annotation: fasttransform would cast the label to it
        y = self.labels[Path(p)]
        return list(y) if isinstance(y, tuple) else y


class _ListSplitter:
    "Split items by membership of a precomputed validation set (picklable)."

    def __init__(self, valid_files: frozenset):
        self.valid_files = valid_files

    def __call__(self, items: Sequence[Path]):
        v = [Path(p) in self.valid_files for p in items]
        return [i for i, x in enumerate(v) if not x], [i for i, x in enumerate(v) if x]


def is_csv_data(path: str | Path) -> bool:
    "True for a path ending in .csv, or a folder holding labels.csv (fastai's default CSV name)."
    p = Path(path).expanduser()
    return p.suffix.lower() == ".csv" or (p.is_dir() and (p / CSV_NAME).is_file())


def _lines(rows) -> str:
    "'line 3, line 7, ... (+2 more)' for dataframe row positions (line 1 is the header)."
    rows = list(rows)
    more = f" (+{len(rows) - _SHOWN} more)" if len(rows) > _SHOWN else ""
    return ", ".join(f"line {i + 2}" for i in rows[:_SHOWN]) + more


def _read_csv(csv: Path):
    if not csv.exists():
        raise DataError(f"CSV file {csv} does not exist; {_CSV_HINT}")
    if not csv.is_file():
        raise DataError(f"CSV path {csv} is not a file; {_CSV_HINT}")
    try:  # every cell as text: labels such as "NA", "None" or "01" stay what they are
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"CSV file {csv} is empty; {_CSV_HINT}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"CSV file {csv} cannot be parsed ({type(e).__name__}: {e}); {_CSV_HINT}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _column(df, csv: Path, given: str | None, key: str, default_pos: int | None) -> str | None:
    cols = list(df.columns)
    if given is None:
        return cols[default_pos] if default_pos is not None else None
    if given not in cols:
        close = [c for c in cols if c.lower() == str(given).lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"CSV {csv} has no column {given!r} ({key}){hint}; its columns are {cols}; "
                        f"set {key} to one of them")
    return given


def check_csv(path: str | Path, fn_col: str | None = None, label_col: str | None = None, valid_col: str | None = None,
              folder: str | Path | None = None, multi_label: bool = False, valid_pct: float = 0.2, seed: int = 42,
              bad_images: str = "error") -> CsvReport:
    "Validate a CSV of image file names and labels before training: columns, files, images, labels and the split."
    if bad_images not in BAD_IMAGES:
        raise ValueError(f"bad_images={bad_images!r}; use one of {', '.join(map(repr, BAD_IMAGES))}")
    p = Path(path).expanduser()
    csv = p / CSV_NAME if p.is_dir() else p
    df = _read_csv(csv)
    cols = list(df.columns)
    if len(cols) < 2:
        raise DataError(f"CSV {csv} has {len(cols)} column(s) {cols}; it needs a file-name column and a label "
                        f"column; {_CSV_HINT}")
    fn = _column(df, csv, fn_col, "fn_col", 0)
    lab = _column(df, csv, label_col, "label_col", 1 if cols[1] != fn else 0)
    val = _column(df, csv, valid_col, "valid_col", None) or ("is_valid" if "is_valid" in cols else None)
    if len({fn, lab, val} - {None}) < (3 if val else 2):
        raise DataError(f"CSV {csv}: fn_col={fn!r}, label_col={lab!r}, valid_col={val!r} must be different columns "
                        f"(columns found: {cols})")
    if len(df) == 0:
        raise DataError(f"CSV {csv} has a header ({cols}) but no rows; add one row per image")

    base = csv.parent if folder is None else (csv.parent / Path(folder).expanduser())
    if not base.is_dir():
        raise DataError(f"image folder {base} (folder={str(folder)!r}, relative to the CSV's folder) does not exist; "
                        f"set folder to where the files named in {fn!r} are")
    names = [s.strip() for s in df[fn]]
    empty = [i for i, s in enumerate(names) if not s]
    if empty:
        raise DataError(f"CSV {csv}: column {fn!r} is empty at {_lines(empty)}; every row needs a file name")
    paths = [base / s for s in names]
    dup = [p for p, n in Counter(paths).items() if n > 1]
    if dup:
        at = [i for i, p in enumerate(paths) if p in set(dup)]
        raise DataError(f"CSV {csv} lists {len(dup)} file(s) more than once, e.g. {names[at[0]]!r} ({_lines(at)}); "
                        f"keep one row per image" + (" with all its labels" if multi_label else ""))

    cells = [s.strip() for s in df[lab]]
    if multi_label:
        labels = [tuple(dict.fromkeys(s.split())) for s in cells]  # space-separated, repeats dropped, order kept
    else:
        blank = [i for i, s in enumerate(cells) if not s]
        if blank:
            raise DataError(f"CSV {csv}: label column {lab!r} is empty at {_lines(blank)}; give every image a label "
                            f"(or set multi_label = true if an image may have none)")
        labels = cells
        spaced = [s for s in cells if len(s.split()) > 1]
        if spaced:
            warnings.warn(f"{len(spaced)} label(s) in {csv} column {lab!r} hold spaces, e.g. {spaced[0]!r}: each is "
                          f"read as ONE class; if they are several labels per image, set multi_label = true",
                          stacklevel=4)  # the caller of image_dls
    if val is not None:
        flags = [s.strip().lower() for s in df[val]]
        odd = [i for i, s in enumerate(flags) if s not in _TRUE | _FALSE]
        if odd:
            raise DataError(f"CSV {csv}: column {val!r} holds {df[val].iloc[odd[0]]!r} at {_lines(odd)}; use "
                            f"true/false (or 1/0) to mark validation rows")
        is_valid = {pth: f in _TRUE for pth, f in zip(paths, flags)}

    missing = [i for i, pth in enumerate(paths) if not pth.is_file()]
    if missing:
        shown = ", ".join(repr(names[i]) for i in missing[:_SHOWN]) + (" ..." if len(missing) > _SHOWN else "")
        raise DataError(f"{len(missing)} of {len(paths)} file(s) listed in {csv} are missing under {base}: {shown} "
                        f"({_lines(missing)}); fix column {fn!r}, or set folder to the images' folder")

    bad = sorted((pth, why) for pth, why in zip(paths, decode_problems(paths)) if why is not None)
    if bad and bad_images == "error":
        raise CorruptImageError(f"{len(bad)} file(s) listed in {csv} cannot be decoded as images:\n{bad_listing(bad)}\n"
                                f"delete or replace them (and their rows), or pass bad_images='skip' to train without "
                                f"them", paths=[pth for pth, _ in bad])
    skipped = {pth for pth, _ in bad}
    by_path = {pth: y for pth, y in zip(paths, labels) if pth not in skipped}
    files = tuple(sorted(by_path))
    if not files:
        raise DataError(f"no usable image is listed in {csv}")

    if val is not None:
        valid = frozenset(pth for pth in files if is_valid[pth])
        how = f"column {val!r}"
    else:  # the very split image_dls makes over the same sorted items
        valid = frozenset(files[i] for i in random_splitter(valid_pct, seed)(files)[1])
        how = f"the random split (valid_pct={valid_pct}, seed={seed})"
    n_valid = len(valid)
    if n_valid == 0 or n_valid == len(files):
        which = "validation" if n_valid == 0 else "training"
        fix = ("mark some rows true and some false" if val is not None else "add images or change valid_pct")
        raise DataError(f"{how} leaves no {which} image among the {len(files)} in {csv}; {fix}")

    def names_of(y) -> tuple:
        return y if isinstance(y, tuple) else (y,)
    counts = {"train": Counter(), "valid": Counter()}
    for pth, y in by_path.items():
        counts["valid" if pth in valid else "train"].update(names_of(y))
    listed = {c for y in labels for c in names_of(y)}
    gone = sorted(listed - set(counts["train"]) - set(counts["valid"]))
    if gone:
        raise EmptyClassError(f"label(s) {gone} in {csv} have no usable image after skipping bad files; add images "
                              f"for them or remove their rows")
    unseen = sorted(set(counts["valid"]) - set(counts["train"]))
    if unseen:
        fix = ("add training rows for them, or remove these rows" if val is not None else
               "add images for them, or change seed/valid_pct, or add an is_valid column")
        hint = ("; labels with spaces are one class each unless multi_label = true"
                if not multi_label and any(" " in c for c in unseen) else "")
        raise DataError(f"label(s) {unseen[:MAX_LISTED]}{' ...' if len(unseen) > MAX_LISTED else ''} appear only in "
                        f"validation images ({how}) in {csv}; the model can only learn labels it trains on: "
                        f"{fix}{hint}")
    classes = tuple(sorted(counts["train"]))  # the order of fastai's vocab
    if len(classes) < 2:
        raise SingleClassError(f"CSV {csv} has one label {list(classes)} in its training images; classification needs "
                               f"at least two")
    return CsvReport(root=base, layout="csv", classes=classes,
                     counts={s: {c: counts[s][c] for c in classes} for s in ("train", "valid")},
                     n_images=len(files), skipped=tuple(sorted(skipped)), files=files, csv=csv,
                     labels=by_path, valid_files=valid, multi_label=multi_label, columns=(fn, lab, val))


def label_report(path: str | Path, bad_images: str = "error", valid_pct: float = 0.2, seed: int = 42,
                 multi_label: bool = False, threshold: float = 0.5, **csv_args) -> FolderReport:
    """`check_csv` for a CSV (or a folder with labels.csv), else `check_image_folder`; refuses CSV-only
    arguments (and multi_label) for a folder of class subfolders."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold={threshold}; use a probability in (0, 1), e.g. 0.5")
    unknown = set(csv_args) - set(_CSV_ARGS)
    if unknown:
        raise TypeError(f"unexpected argument(s) {sorted(unknown)}; CSV arguments are {', '.join(_CSV_ARGS)}")
    if is_csv_data(path):
        return check_csv(path, multi_label=multi_label, valid_pct=valid_pct, seed=seed, bad_images=bad_images,
                         **csv_args)
    given = {k: v for k, v in csv_args.items() if v is not None}
    if multi_label or given:
        what = ", ".join(f"{k}={v!r}" for k, v in {**given, **({"multi_label": True} if multi_label else {})}.items())
        raise DataError(f"{what} is for a CSV of file names and labels, but {path} is not a .csv file nor a folder "
                        f"holding {CSV_NAME}; pass the CSV as the data path (class subfolders give one label per "
                        f"image)")
    return check_image_folder(path, bad_images=bad_images)


def label_args(recipe) -> dict:
    "The recipe's label keys as `image_dls` arguments."
    return {k: getattr(recipe, k) for k in (*_CSV_ARGS, "multi_label", "threshold")}


def csv_parts(report: CsvReport):
    "(label getter, splitter, fastai y block) for a `CsvReport`."
    block = MultiCategoryBlock if report.multi_label else CategoryBlock
    return _CsvLabel(report.labels), _ListSplitter(report.valid_files), block
