"""Render executed notebooks to a static HTML site without Quarto (nbconvert's lab template).

    python tools/render_docs.py NOTEBOOK_DIR OUT_DIR

Honours the nbdev/Quarto cell directives our notebooks use, so the pages read as `nbdev-docs` renders them:
`#| hide` and `#| include: false` drop the cell, `#| echo: false` drops its code, `#| output: false` its
outputs, and `#| eval: false` cells are shown with a note that they were not run. Page names follow nbdev
(`01_lr_finder_one_cycle.ipynb` -> `lr_finder_one_cycle.html`), so links between pages work in both sites.
A notebook holding an error output fails the build. Quarto is the full site (`nbdev-docs`); this is the
offline fallback, which is why it is ours and not nbdev's.
"""
from __future__ import annotations

import html
import re
import sys
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import TagRemovePreprocessor
from nbdev.config import nbpath2html

_DIRECTIVE = re.compile(r"^#\|\s*([\w-]+)\s*(?::\s*(.*))?$")
_NOT_RUN = ("*Not executed when these docs are built (it needs data, a GPU or several processes); "
            "the expected result is described around it.*")


def directives(source: str) -> tuple[dict[str, str], str]:
    "Leading `#| key: value` lines of a cell as a dict, and the source without them."
    lines, found = source.splitlines(), {}
    i = 0
    while i < len(lines) and (m := _DIRECTIVE.match(lines[i].strip())):
        found[m.group(1)] = (m.group(2) or "true").strip().lower()
        i += 1
    return found, "\n".join(lines[i:]).lstrip("\n")


def prepare(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    "Apply the directives: drop, hide code or outputs, mark unexecuted cells; strip the directive lines."
    cells = []
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # nbdev's runner stores timings as numbers, which nbformat rejects
        if cell.cell_type != "code":
            cells.append(cell)
            continue
        d, cell.source = directives(cell.source)
        if d.get("hide") == "true" or d.get("include") == "false":
            continue
        tags = set(cell.metadata.get("tags", []))
        if d.get("echo") == "false":
            tags.add("remove_input")
        if d.get("output") == "false":
            cell.outputs = []
        cell.metadata["tags"] = sorted(tags)
        if d.get("eval") == "false":
            cell.outputs = []
            cells.append(nbformat.v4.new_markdown_cell(_NOT_RUN))
        cells.append(cell)
    nb.cells = cells
    return nb


def title_of(nb: nbformat.NotebookNode, fallback: str) -> str:
    "The notebook's `# Title` (nbdev's front matter convention), else `fallback`."
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if m:
                return m.group(1).strip()
    return fallback


def errors_in(nb: nbformat.NotebookNode) -> list[str]:
    "`ename: evalue` of every error output (a page with one is a broken page)."
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _nav(pages: list[tuple[str, str]], current: str) -> str:
    links = " | ".join(f"<b>{html.escape(t)}</b>" if href == current else f'<a href="{href}">{html.escape(t)}</a>'
                       for href, t in pages)
    return (f'<nav style="font: 14px sans-serif; padding: 8px 16px; border-bottom: 1px solid #ddd; '
            f'background: #f7f7f7">{links}</nav>')


def render(nb_dir: Path, out: Path) -> list[Path]:
    "Render every notebook in `nb_dir` (index first) into `out`; returns the pages written."
    files = sorted(nb_dir.glob("*.ipynb"), key=lambda p: (p.stem != "index", p.name))
    if not files:
        raise SystemExit(f"no notebooks in {nb_dir}")
    nbs = {p: nbformat.read(p, as_version=4) for p in files}
    broken = {p.name: e for p, nb in nbs.items() if (e := errors_in(nb))}
    if broken:
        raise SystemExit(f"notebooks with errors, not rendered: {broken}")
    pages = [(nbpath2html(p).name, title_of(nb, p.stem)) for p, nb in nbs.items()]
    exporter = HTMLExporter(template_name="lab", exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"}), enabled=True)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (p, nb), (href, title) in zip(nbs.items(), pages):
        body, _ = exporter.from_notebook_node(prepare(nb), resources={"metadata": {"name": f"fastlearn: {title}"}})
        body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _nav(pages, href), body, count=1)
        (out / href).write_text(body, encoding="utf-8")
        written.append(out / href)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    for page in render(Path(sys.argv[1]), Path(sys.argv[2])):
        print(page)
