"""The docs check (tools/check_docs.py) on tiny sites rendered by tools/render_docs.py: offline MathJax, loaded
images and no request leaving the machine pass; a raw-TeX page with a remote image fails; the API check finds a
missing entry. The full build (every notebook executed) is CI's `tools/build_docs.sh && python tools/check_docs.py`."""
import importlib.util
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", ROOT / "tools" / f"{name}.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


check_docs = _tool("check_docs")
render_docs = _tool("render_docs")
needs_chromium = pytest.mark.skipif(check_docs.chromium_path() is None,
                                    reason="chromium not installed (apt-get install -y chromium); the browser check needs it")

# a 2x2 PNG, as an executed cell's image output stores it
_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="


def _notebook(markdown: str, png: bool = True) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("plot()")
    if png:
        cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": _PNG, "text/plain": "<Figure>"})]
    nb.cells = [nbformat.v4.new_markdown_cell(markdown), cell]
    return nb


def _site(tmp_path: Path, notebooks: dict[str, nbformat.NotebookNode]) -> Path:
    src, out = tmp_path / "nbs", tmp_path / "site"
    src.mkdir()
    for name, nb in notebooks.items():
        nbformat.write(nb, src / name)
    render_docs.render(src, out)
    return out


@needs_chromium
def test_offline_math_images_and_requests(tmp_path):
    good = _notebook("# LR finder\n\n$$\\mathrm{lr}(p) = \\frac{\\mathrm{lr}_{max}}{\\mathrm{div}}$$\n\nand $p \\in [0, 1]$.")
    bad = _notebook("# Bad\n\n<img src=\"https://example.invalid/remote.png\">\n\n<img src=\"missing.png\">")
    site = _site(tmp_path, {"01_lr_finder_one_cycle.ipynb": good, "02_bad.ipynb": bad})
    assert (site / "mathjax" / "MathJax.js").is_file()
    assert "cdnjs" not in (site / "lr_finder_one_cycle.html").read_text() and "require.js" not in (site / "bad.html").read_text()
    shot = tmp_path / "shot.png"
    results = {r.page: r for r in check_docs.check_pages(site, sorted(site.glob("*.html")), shot, check_docs.chromium_path())}
    lr = results["lr_finder_one_cycle.html"]
    assert lr.problems == [] and lr.math == lr.math_source == 2 and lr.images_ok == lr.images == 1
    assert shot.read_bytes().startswith(b"\x89PNG")
    problems = " | ".join(results["bad.html"].problems)
    assert "request leaves the machine: https://example.invalid/remote.png" in problems
    assert "image not loaded" in problems and "missing.png" in problems
    assert "raw TeX" not in problems


@needs_chromium
def test_raw_tex_is_reported(tmp_path):
    "A page whose TeX MathJax never typesets (here: MathJax removed from the site) fails with the raw TeX named."
    site = _site(tmp_path, {"01_lr_finder_one_cycle.ipynb": _notebook("# LR\n\n$$x^2 \\le 1$$", png=False)})
    shutil.rmtree(site / "mathjax")
    (result,) = check_docs.check_pages(site, [site / "lr_finder_one_cycle.html"], None, check_docs.chromium_path())
    problems = " | ".join(result.problems)
    assert "MathJax not loaded" in problems and "raw TeX in the text" in problems and "request failed" in problems


def _api_page(path: Path, drop: str | None = None) -> Path:
    "An API page as nbs/09_api.ipynb renders it (h2 per module, h3 per name), without the entry `drop`."
    parts = []
    for mod, names in check_docs.public_modules().items():
        parts.append(f'<h2 id="{mod}">{mod}<a class="anchor-link" href="#{mod}">\u00b6</a></h2>')
        parts += [f'<h3 id="{n}">{n}<a class="anchor-link" href="#{n}">\u00b6</a></h3>' for n in names if n != drop]
    path.write_text("<html><body>" + "\n".join(parts) + "</body></html>", encoding="utf-8")
    return path


def test_api_check(tmp_path):
    assert check_docs.api_problems(_api_page(tmp_path / "api.html")) == []
    problems = check_docs.api_problems(_api_page(tmp_path / "api.html", drop="load_run"))
    assert "fastlearn.run.predict: no entry for load_run" in problems
    assert any(p.startswith("fastlearn.__all__: not on the page: ") and "load_run" in p for p in problems)
    assert check_docs.api_problems(tmp_path / "nope.html") == [f"no API page {tmp_path / 'nope.html'}"]
