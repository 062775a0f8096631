"""Render executed notebooks to a static HTML site without Quarto (nbconvert's lab template).

    python tools/render_docs.py NOTEBOOK_DIR OUT_DIR

Honours the nbdev/Quarto cell directives our notebooks use, so the pages read as `nbdev-docs` renders them:
`#| hide` and `#| include: false` drop the cell, `#| echo: false` drops its code, `#| output: false` its
outputs, and `#| eval: false` cells are shown with a note that they were not run. Page names follow nbdev
(`01_lr_finder_one_cycle.ipynb` -> `lr_finder_one_cycle.html`), so links between pages work in both sites.
A notebook holding an error output fails the build. Quarto is the full site (`nbdev-docs`); this is the
offline fallback, which is why it is ours and not nbdev's.

Nothing on a page is fetched from outside the machine: MathJax 2.7 is copied from the `jupyter-server-mathjax`
package into OUT_DIR/mathjax/ and loaded by a relative URL, and the lab template's CDN scripts (require.js,
mermaid, the widget manager) are dropped: none of our outputs needs them (tools/check_docs.py verifies both).
"""
from __future__ import annotations

import html
import re
import shutil
import sys
from pathlib import Path

import jupyter_server_mathjax
import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from nbconvert.preprocessors import TagRemovePreprocessor
from nbdev.config import nbpath2html

_DIRECTIVE = re.compile(r"^#\|\s*([\w-]+)\s*(?::\s*(.*))?$")
MATHJAX_DIR = "mathjax"  # under OUT_DIR
# MathJax 2.7 as jupyter-server-mathjax ships it: config TeX-AMS-MML_HTMLorMML-full, HTML-CSS output (there is
# no CommonHTML) and only the STIX-Web fonts, so HTML-CSS is told to use those (its default, TeX, is missing:
# it would fail to load fonts/TeX/fontdata.js and fall back to whatever fonts the reader's machine has)
_MATHJAX_URL = f"{MATHJAX_DIR}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
_MATHJAX_FONTS = ('<script>window.MathJax = {"HTML-CSS": {availableFonts: ["STIX-Web"], preferredFont: "STIX-Web", '
                  'webFont: "STIX-Web", imageFont: null}};</script>')
# nbconvert's lab page without its CDN scripts: require.js and the widget manager (only for widget or
# application/javascript outputs) and mermaid (only for mermaid diagrams) would be fetched from the network
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_mathjax -%}""" + _MATHJAX_FONTS + """{{ super() }}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
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


def copy_mathjax(out: Path) -> Path:
    "Copy the MathJax files of `jupyter-server-mathjax` to `out`/mathjax (what the pages' relative URL loads)."
    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (src / "MathJax.js").is_file():
        raise SystemExit(f"no MathJax.js in {src}; reinstall the docs extra: pip install -e \".[docs]\"")
    dst = out / MATHJAX_DIR
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def exporter() -> HTMLExporter:
    "nbconvert's lab template with MathJax from the site itself and no CDN script."
    ex = HTMLExporter(template_name="lab", template_file="fastlearn_offline.html.j2",
                      extra_loaders=[DictLoader({"fastlearn_offline.html.j2": _OFFLINE_TEMPLATE})],
                      mathjax_url=_MATHJAX_URL, exclude_input_prompt=True, exclude_output_prompt=True)
    ex.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"}), enabled=True)
    return ex


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
    ex = exporter()
    out.mkdir(parents=True, exist_ok=True)
    copy_mathjax(out)
    written = []
    for (p, nb), (href, title) in zip(nbs.items(), pages):
        body, _ = ex.from_notebook_node(prepare(nb), resources={"metadata": {"name": f"fastlearn: {title}"}})
        body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _nav(pages, href), body, count=1)
        (out / href).write_text(body, encoding="utf-8")
        written.append(out / href)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    for page in render(Path(sys.argv[1]), Path(sys.argv[2])):
        print(page)
