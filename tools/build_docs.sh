#!/usr/bin/env bash
# Build the offline documentation site into _docs/ (no Quarto, no network):
#   1. copy nbs/*.ipynb to _docs/notebooks/ and execute them there with nbdev's runner (the one CI uses:
#      it honours `#| eval: false`), saving the outputs into the copies (nbs/ is not touched);
#   2. render each executed notebook to _docs/<page>.html (tools/render_docs.py, nbconvert's lab template),
#      including the API reference page (nbs/09_api.ipynb: show_doc over every module's __all__).
#
#   tools/build_docs.sh             # execute + render (a few minutes on 2 CPU cores)
#   tools/build_docs.sh --no-exec   # render the outputs stored in nbs/ as they are (seconds)
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

out=_docs
rm -rf "$out"
mkdir -p "$out/notebooks"
cp nbs/*.ipynb "$out/notebooks/"
if [[ $execute == 1 ]]; then
  # one torch thread per notebook process: nbdev runs DOCS_WORKERS notebooks at once, and more threads than
  # cores makes torch's OpenMP workers spin against each other
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nbdev-test "$out/notebooks" --save --n-workers "${DOCS_WORKERS:-2}" --timing
fi
python tools/render_docs.py "$out/notebooks" "$out"
echo "open $out/index.html"
