#!/usr/bin/env bash
# Build the offline documentation site into _docs/ (no Quarto, no network):
#   1. copy nbs/*.ipynb to _docs/notebooks/ and execute them there with nbdev's runner (it honours
#      `#| eval: false`), saving the outputs into the copies (nbs/ is not touched); a cell that raises fails the
#      build, so this is also the notebook test (CI runs it instead of tools/run_notebooks.py);
#   2. render each executed notebook to _docs/<page>.html (tools/render_docs.py, nbconvert's lab template), with
#      MathJax copied into _docs/mathjax/: the pages load nothing from the network;
#   3. check the API page (nbs/09_api.ipynb) against the installed package: a public module or name missing from
#      it fails the build (tools/check_docs.py --api-only).
#
#   tools/build_docs.sh             # execute + render + API check (several minutes on 2 CPU cores)
#   tools/build_docs.sh --no-exec   # render the outputs stored in nbs/ (seconds); the API page is still
#                                   # executed, since it documents the installed code
#   tools/build_docs.sh && python tools/check_docs.py _docs    # CI: also every page in headless Chromium
#
# With Quarto installed, `nbdev-docs` builds the full nbdev site from nbs/ instead (into _docs/ as well).
set -euo pipefail
cd "$(dirname "$0")/.."

execute=1
case "${1:-}" in
  "") ;;
  --no-exec) execute=0 ;;
  *) echo "usage: tools/build_docs.sh [--no-exec]" >&2; exit 2 ;;
esac

# the docs extra first, so that a base install is told in one line what to add (not a traceback halfway)
need="nbformat nbconvert nbdev jupyter_server_mathjax"
[[ $execute == 1 ]] && need="$need onnx onnxruntime onnxscript"  # nbs/10_use_the_model.ipynb exports to ONNX
python - $need <<'PY'
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"build_docs: {', '.join(missing)} not installed; install the docs extra: pip install -e \".[docs]\"")
PY

out=_docs
rm -rf "$out"
mkdir -p "$out/notebooks"
cp nbs/*.ipynb "$out/notebooks/"
# one torch thread per notebook process: nbdev runs DOCS_WORKERS notebooks at once, and more threads than
# cores makes torch's OpenMP workers spin against each other
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ $execute == 1 ]]; then
  nbdev-test "$out/notebooks" --save --n-workers "${DOCS_WORKERS:-2}" --timing
else
  nbdev-test "$out/notebooks/09_api.ipynb" --save
fi
python tools/render_docs.py "$out/notebooks" "$out"
python tools/check_docs.py --api-only "$out"
echo "open $out/index.html"
