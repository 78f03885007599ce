#!/usr/bin/env bash
# Creates (or refreshes) the CPU environment used by the tests, the demo and the benchmarks:
# CPU torch, real sglang 0.5.23 without its GPU pins, its CPU-usable dependencies,
# the test rig's GPU-import stand-ins, and this project's wheel.
# Usage: ci/setup_env.sh [VENV_DIR]   (default: .venv in the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
py=${PYTHON:-python3}

step() { printf '\n==> %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.deps-$(cat "$root/ci/requirements-cpu.txt" "$root/ci/constraints-cpu.txt" | sha256sum | cut -c1-12)-$SGLANG_VERSION"
if [ ! -e "$stamp" ]; then
  step "installing CPU torch, sglang==$SGLANG_VERSION (no deps) and its CPU dependencies"
  "${pip[@]}" install --upgrade pip
  "${pip[@]}" install -c "$root/ci/constraints-cpu.txt" torch==2.13.0
  "${pip[@]}" install --no-deps "sglang==$SGLANG_VERSION" "xgrammar==0.2.7"
  "${pip[@]}" install -c "$root/ci/constraints-cpu.txt" -r "$root/ci/requirements-cpu.txt"
  touch "$stamp"
fi

step "installing the test rig's GPU-import stand-ins"
"$venv/bin/python" "$root/tests/rig/install_standins.py"

step "building and installing the sglang-fastload wheel"
rm -rf "$root/build" "$root/dist"
"$venv/bin/python" -m build --wheel --no-isolation --outdir "$root/dist" "$root" >/dev/null
"${pip[@]}" install --force-reinstall --no-deps "$root"/dist/sglang_fastload-*.whl
step "environment ready: $venv"
