"""What `fastlearn recipes` prints: the named recipes as short blocks, or one recipe with every key resolved.

Plain text wrapped to a width (the console's: the terminal's, or COLUMNS, or 80 when piped), so recipe names,
which a user types, are never cut. The prose (what a recipe is for, its `expected` result) comes straight from
the recipe files: there is no second copy of those figures in the code.
"""
from __future__ import annotations

import inspect
import json
import re
import textwrap
from dataclasses import fields
from pathlib import Path

from ..core.recipes import list_recipes, load_recipe, Recipe, toml_value


__all__ = ["recipe_list", "recipe_text", "epochs_text", "sizes_text"]

_INDENT = "    "


def epochs_text(r: Recipe) -> str:
    "How long a recipe trains, in words (the number of unfreezing stages depends on the model's layer groups)."
    if r.strategy == "scratch":
        return f"{r.epochs} epochs from scratch"
    if r.strategy == "linear_probe":
        return f"{r.head_epochs + r.epochs} epochs, head only"
    return f"{r.head_epochs} head + {r.unfreeze_epochs}/stage + {r.epochs} epochs, strategy {r.strategy}"


def sizes_text(r: Recipe) -> str:
    "Training size in px, with the progressive-resizing ramp and the validation size when they differ."
    s = f"{r.resize_start}->{r.size} px" if r.resize_start else f"{r.size} px"
    return s + (f" (valid {r.valid_size})" if r.valid_size and r.valid_size != r.size else "")


def _wrap(text: str, width: int, first: str = _INDENT, rest: str = _INDENT) -> list[str]:
    # never split a word: names, paths and figures stay whole even when a line runs long
    return textwrap.wrap(text, width=max(width, 20), initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]


def recipe_list(width: int = 80) -> str:
    "Every named recipe: its name alone on a line, then arch, sizes and epochs, what it is for, and `expected`."
    names = sorted(list_recipes())
    out = _wrap(f"{len(names)} recipes. Every key of one: fastlearn recipes digits", width, "", _INDENT)
    out += _wrap("Train one: fastlearn train digits --data digits (--data: a folder of class subfolders, "
                 "or a bundled sample)", width, "", _INDENT) + [""]
    for name in names:
        r = load_recipe(name)
        out.append(name)
        out += _wrap(f"{r.arch}, {sizes_text(r)}, {epochs_text(r)}", width)
        if r.description:
            out += _wrap(r.description, width)
        if r.expected:
            out += _wrap(f"expected: {r.expected}", width)
        out.append("")
    return "\n".join(out)


def _field_comments() -> dict[str, str]:
    """The comment beside each key in `Recipe`'s source (its unit or meaning), whole: comment-only lines indented
    deeper than the keys continue the key above; {} when the source is not shipped."""
    try:
        src = inspect.getsource(Recipe)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    key, indent = None, 0
    for line in src.splitlines():
        m = re.match(r"(\s+)(\w+): [^#]+?#\s*(.+)$", line)
        more = re.match(r"(\s+)#\s*(.+)$", line)
        if m:
            key, indent = m.group(2), len(m.group(1))
            found[key] = m.group(3).strip()
        elif more and key is not None and len(more.group(1)) > indent:
            found[key] += " " + more.group(2).strip()
        else:  # a key without a comment, a section heading, a blank line or a method: nothing continues
            key = None
    return found


def _long_string(key: str, text: str, width: int) -> list[str]:
    """`key = text` as a TOML multi-line string wrapped at spaces: a line-ending backslash removes the newline
    and the next line's indent, so the value is unchanged. One long line when wrapping would change it."""
    lines = textwrap.wrap(text, width=max(width - 6, 20), break_long_words=False, break_on_hyphens=False)
    if " ".join(lines) != text:  # runs of spaces or newlines in the text: keep it exactly, on one line
        return [f"{key} = {toml_value(text)}"]
    body = [_INDENT + json.dumps(line)[1:-1] for line in lines]  # json's escapes are TOML's basic-string escapes
    return [f'{key} = """\\'] + [b + " \\" for b in body[:-1]] + [body[-1] + '"""']


def recipe_text(name_or_path: str | Path | Recipe, width: int = 80) -> str:
    """One recipe in full: every key resolved (defaults, `extends` and overrides applied) with its meaning beside
    it, long text wrapped. The text is TOML that `load_recipe` reads back as the same recipe."""
    r = name_or_path if isinstance(name_or_path, Recipe) else load_recipe(name_or_path)
    where = list_recipes().get(str(name_or_path)) if not isinstance(name_or_path, Recipe) else None
    origin = where or (name_or_path if not isinstance(name_or_path, Recipe) else None)
    out = [f"# recipe {r.name!r}, resolved: every key"] + ([f"# from {origin}"] if origin else []) + [""]
    comments = _field_comments()
    for f in fields(r):
        v = getattr(r, f.name)
        note = comments.get(f.name)
        if isinstance(v, str) and len(f"{f.name} = {toml_value(v)}") > width:
            out += (_wrap(note, width, "# ", "# ") if note else []) + _long_string(f.name, v, width)  # meaning above
            continue
        line = f"{f.name} = {toml_value(v)}" if v is not None else f"# {f.name} = (unset)"
        if not note:
            out.append(line)
            continue
        col = max(len(line) + 2, 26)
        room = width - col - 2
        if room >= 20:
            parts = textwrap.wrap(note, room, break_long_words=False, break_on_hyphens=False)
            out.append(f"{line.ljust(col)}# {parts[0]}")
            out += [f"{'':<{col}}# {p}" for p in parts[1:]]
        else:
            out.append(line)
            out += _wrap(note, width, "# ", "# ")
    return "\n".join(out) + "\n"
