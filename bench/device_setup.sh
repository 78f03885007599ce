#!/usr/bin/env bash
# Runs ON THE GPU MACHINE: makes sglang 0.5.23 + this project importable there, checks that
# the overlay is active, then runs the given command with PYTHONPATH pointing at it.
#
#   bash bench/device_setup.sh python3 bench/gpu_bench.py --site-dir /tmp/site ...
#
# Needs .devbundle/ (made here by bench/make_device_bundle.sh, carried with the call):
#   site.tar.xz  -> unpacked into $SITE (default /tmp/site), a `pip --target` tree for Python 3.12
#   sglang_fastload-*.whl -> installed into $SITE with --no-deps (brings sglang_fastload.pth)
#
# PYTHONPATH alone does not run $SITE's .pth files (only site directories' are run), so the
# overlay's start-up hook is made active explicitly: gpu_bench.py's --site-dir calls
# site.addsitedir($SITE) before anything imports sglang (and installs the hook itself if no
# .pth did). The status check below does the same and must print ACTIVE.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
SITE=${SITE:-/tmp/site}
py=${PYTHON:-python3}
SECONDS=0

[ -f "$root/.devbundle/site.tar.xz" ] || { echo "device_setup: $root/.devbundle/site.tar.xz is missing (run bench/make_device_bundle.sh here and carry .devbundle)" >&2; exit 2; }
stamp="$SITE/.bundle-$(stat -c %s-%Y "$root/.devbundle/site.tar.xz")"
if [ ! -e "$stamp" ]; then
  rm -rf "$SITE"
  mkdir -p "$SITE"
  "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$root/.devbundle/site.tar.xz" "$SITE"
  touch "$stamp"
fi
"$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
  --target "$SITE" "$root"/.devbundle/sglang_fastload-*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
# The bundle carries no bytecode: without this, every process that imports a module first
# compiles it (~2 s of a benchmark process's first load went to compiling SGLang modules it
# imports lazily), which biases whichever contender runs first.
"$py" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

(cd / && "$py" - "$SITE") <<'EOF'
import site, sys
site.addsitedir(sys.argv[1])  # runs sglang_fastload.pth: the overlay's start-up hook
from sglang_fastload import _hook
from sglang_fastload.cli import main
if _hook.installed_finder() is None:
    print("device_setup: no .pth installed the hook; installing it explicitly", file=sys.stderr)
    _hook.install()
code = main(["status"])
try:
    import torch
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
except ImportError as exc:
    print(f"python {sys.version.split()[0]}, torch not importable: {exc}")
sys.exit(code)
EOF
echo "device_setup: ready in ${SECONDS} s (PYTHONPATH=$PYTHONPATH)" >&2

[ $# -gt 0 ] || exit 0
exec "$@"
