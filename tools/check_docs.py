"""Check the built documentation site (tools/build_docs.sh) as a reader's browser sees it, offline.

    python tools/check_docs.py [SITE_DIR]          # default _docs: the API check, then every page in Chromium
    python tools/check_docs.py --api-only SITE_DIR  # only the API check (no browser; the build runs this)

API check: every public module of the installed fastlearn (pkgutil, names without a leading `_`) has its section
on the API page, that section has an entry for each name in the module's `__all__`, every name in
`fastlearn.__all__` is on the page, and the page documents no module that is gone.

Browser check, per page, in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download):
math typeset by MathJax (no MathJax error, no raw `$$` or `$...\\cmd...$` TeX left in the text), no request
leaving the machine (every request is recorded; file:, data:, about:, blob: and localhost are local, anything
else is blocked and reported), no failed request, every <img> loaded (naturalWidth > 0), no JavaScript error.
It writes a full-page screenshot of the LR-finder page into SITE_DIR, prints a table and exits 1 on any problem.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

API_PAGE = "api.html"  # nbs/09_api.ipynb, named as nbdev names it
SCREENSHOT_PAGE = "lr_finder_one_cycle.html"
SCREENSHOT = "lr_finder_screenshot.png"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # Playwright adds --headless
_LOCAL_SCHEMES = {"file", "data", "about", "blob"}
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_MATH_TIMEOUT_MS = 60_000  # MathJax typesets a page in well under a second; this is for a loaded CI machine


# ---- API page -------------------------------------------------------------------------------------------------

class _Headings(HTMLParser):
    "The page's h2/h3 headings in order, as (level, id, text)."

    def __init__(self):
        super().__init__()
        self.found: list[tuple[int, str, str]] = []
        self._open: list | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "h3"):
            self._open = [int(tag[1]), dict(attrs).get("id") or "", ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._open is not None:
            level, id_, text = self._open
            self.found.append((level, id_, text.replace("\u00b6", "").strip()))  # drop nbconvert's anchor pilcrow
            self._open = None


def public_modules(package: str = "fastlearn") -> dict[str, list[str]]:
    "Each public module of the installed `package` (pkgutil, no leading `_`) and its `__all__` (empty if none)."
    # raised inside a dependency (fastai) at import, as the notebooks also silence it
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated")
    pkg = importlib.import_module(package)
    mods = sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, f"{package}.")
                  if not m.ispkg and not any(part.startswith("_") for part in m.name.split(".")))
    return {m: list(getattr(importlib.import_module(m), "__all__", [])) for m in mods}


def api_problems(page: Path, package: str = "fastlearn") -> list[str]:
    "What the rendered API page lacks (or has stale) against the installed package; empty when it is complete."
    if not page.is_file():
        return [f"no API page {page}"]
    parser = _Headings()
    parser.feed(page.read_text(encoding="utf-8"))
    sections: dict[str, set[str]] = {}
    current = None
    for level, id_, text in parser.found:
        if level == 2 and text.startswith(f"{package}."):
            current = sections.setdefault(text, set())
        elif level == 3 and current is not None:
            current.add(text)
    problems = []
    modules = public_modules(package)
    for mod, names in modules.items():
        if mod not in sections:
            problems.append(f"{mod}: no section")
        elif missing := [n for n in names if n not in sections[mod]]:
            problems.append(f"{mod}: no entry for {', '.join(missing)}")
    on_page = set().union(*sections.values()) if sections else set()
    if missing := [n for n in importlib.import_module(package).__all__ if n not in on_page]:
        problems.append(f"{package}.__all__: not on the page: {', '.join(missing)}")
    if gone := sorted(set(sections) - set(modules)):
        problems.append(f"documents modules that are not installed: {', '.join(gone)}")
    return problems


# ---- browser --------------------------------------------------------------------------------------------------

@dataclass
class PageCheck:
    page: str
    math: int = 0  # formulas typeset by MathJax
    math_source: int = 0  # TeX formulas MathJax found on the page
    images: int = 0
    images_ok: int = 0
    requests: int = 0
    problems: list[str] = field(default_factory=list)


def is_local(url: str) -> bool:
    "Whether a request for `url` stays on this machine."
    u = urlparse(url)
    return u.scheme in _LOCAL_SCHEMES or (u.scheme in ("http", "https", "ws", "wss") and u.hostname in _LOCAL_HOSTS)


def chromium_path() -> str | None:
    "The Chromium to drive: $CHROMIUM, else `chromium` on PATH (Debian's package), else None."
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


# truthy once MathJax's queue has run everything queued before (the page's Typeset); 'absent' without MathJax
_WAIT_MATH = """() => {
  if (!window.MathJax || !MathJax.Hub) return 'absent';
  if (window.__checkDocsTypeset === undefined) {
    window.__checkDocsTypeset = false;
    MathJax.Hub.Queue(() => { window.__checkDocsTypeset = true; });
  }
  return window.__checkDocsTypeset;
}"""

_INSPECT = r"""() => {
  const skip = el => el.closest('pre, code, script, style, .MathJax, .MathJax_Display, .MathJax_Preview, nav');
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let text = '';
  for (let n = walker.nextNode(); n; n = walker.nextNode()) if (!skip(n.parentElement)) text += n.textContent + '\n';
  return {
    math: document.querySelectorAll('.MathJax, .MathJax_SVG').length,
    mathSource: document.querySelectorAll('script[type^="math/tex"]').length,
    mathErrors: document.querySelectorAll('.MathJax_Error, .merror').length,
    text: text,
    images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  };
}"""

_RAW_TEX = [re.compile(r"\$\$"), re.compile(r"\$[^$\n]*\\[A-Za-z]+[^$\n]*\$"), re.compile(r"\\begin\{")]


def check_pages(site: Path, pages: list[Path], screenshot: Path | None, chromium: str) -> list[PageCheck]:
    "Load each page in headless Chromium and check math, requests and images; screenshot SCREENSHOT_PAGE."
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit('check_docs: playwright is not installed; install the docs extra: pip install -e ".[docs]"')
    results = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="check-docs-chromium-") as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        current: list[PageCheck] = []
        ctx.on("request", lambda r: _on_request(current, r.url))
        ctx.on("requestfailed", lambda r: _on_failed(current, r.url, r.failure))
        # nothing outside the machine is ever reached, even where the flags above would let a request through
        ctx.route(re.compile(r"^(https?|wss?)://"), lambda route: route.continue_() if is_local(route.request.url)
                  else route.abort("blockedbyclient"))
        for path in pages:
            check = PageCheck(path.name)
            current[:] = [check]
            page = ctx.new_page()
            page.on("pageerror", lambda e, c=check: c.problems.append(f"JavaScript error: {e}"))
            page.goto(path.resolve().as_uri(), wait_until="load")
            if page.wait_for_function(_WAIT_MATH, timeout=_MATH_TIMEOUT_MS).json_value() == "absent":
                check.problems.append("MathJax not loaded")
            else:  # a second pass: typesetting can queue more work (fonts, extensions)
                page.evaluate("() => { window.__checkDocsTypeset = undefined; }")
                page.wait_for_function(_WAIT_MATH, timeout=_MATH_TIMEOUT_MS)
            found = page.evaluate(_INSPECT)
            check.math, check.math_source = found["math"], found["mathSource"]
            if found["mathErrors"]:
                check.problems.append(f"{found['mathErrors']} MathJax errors")
            if check.math < check.math_source:
                check.problems.append(f"{check.math_source - check.math} of {check.math_source} formulas not typeset")
            for pattern in _RAW_TEX:
                if m := pattern.search(found["text"]):
                    check.problems.append(f"raw TeX in the text: {found['text'][max(m.start() - 20, 0):m.end() + 20]!r}")
            check.images = len(found["images"])
            check.images_ok = sum(i["ok"] for i in found["images"])
            check.problems += [f"image not loaded: {i['src'][:80]}" for i in found["images"] if not i["ok"]]
            if screenshot is not None and path.name == SCREENSHOT_PAGE:
                page.screenshot(path=str(screenshot), full_page=True)
            page.close()
            current.clear()
            results.append(check)
        ctx.close()
    return results


def _on_request(current: list[PageCheck], url: str) -> None:
    for check in current:
        check.requests += 1
        if not is_local(url):
            check.problems.append(f"request leaves the machine: {url[:120]}")


def _on_failed(current: list[PageCheck], url: str, why: str | None) -> None:
    for check in current:
        if is_local(url) and url != "about:blank":  # MathJax opens an about:blank frame; its 'failure' is no loss
            check.problems.append(f"request failed ({why}): {url[:120]}")


def table(results: list[PageCheck]) -> str:
    "One line per page: math typeset/found, images loaded/total, requests, problems."
    rows = [("page", "math", "images", "requests", "problems")]
    rows += [(r.page, f"{r.math}/{r.math_source}", f"{r.images_ok}/{r.images}", str(r.requests),
              "; ".join(r.problems) or "ok") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("site", nargs="?", default="_docs", type=Path, help="the built site (default _docs)")
    ap.add_argument("--api-only", action="store_true", help="only check the API page against the installed package")
    ap.add_argument("--no-api", action="store_true", help="skip the API check (a site without the API page)")
    ap.add_argument("--skip-browser-if-missing", action="store_true",
                    help="without chromium, say so in one line and check only the API page (README command 2 on a "
                         "machine without it; CI installs chromium, so the browser check runs there)")
    args = ap.parse_args(argv)
    pages = sorted(args.site.glob("*.html"))
    if not pages:
        print(f"check_docs: no pages in {args.site}; build them first: tools/build_docs.sh", file=sys.stderr)
        return 1
    failed = False
    if not args.no_api:
        problems = api_problems(args.site / API_PAGE)
        for p in problems:
            print(f"API page: {p}", file=sys.stderr)
        print(f"API page: {'stale or incomplete' if problems else 'every public name of the installed fastlearn'}")
        failed = bool(problems)
    if args.api_only:
        return int(failed)
    chromium = chromium_path()
    if chromium is None and args.skip_browser_if_missing:
        print("check_docs: chromium not found, pages not checked in a browser (apt-get install -y chromium to check them)")
        return int(failed)
    if chromium is None:
        print("check_docs: chromium not found; install it (apt-get install -y chromium) or set CHROMIUM", file=sys.stderr)
        return 1
    shot = args.site / SCREENSHOT
    results = check_pages(args.site, pages, shot, chromium)
    print(table(results))
    if shot.is_file():
        print(f"screenshot: {shot}")
    bad = [r.page for r in results if r.problems]
    if bad:
        print(f"check_docs: {len(bad)} of {len(results)} pages with problems: {', '.join(bad)}", file=sys.stderr)
    return int(failed or bool(bad))


if __name__ == "__main__":
    sys.exit(main())
