#!/usr/bin/env bash
# Prepares, on this machine, what the GPU benchmark machine needs and cannot download:
#   .devbundle/site.tar.xz       sglang 0.5.23, transformers 5.19.0 and the pure-Python (or
#                                cp312 manylinux) packages SGLang needs to build its model
#                                classes and loaders, as a `pip install --target` tree for
#                                Python 3.12, compressed (the device image has Python 3.12,
#                                torch, triton, safetensors, numpy, ... but not these)
#   .devbundle/sglang_fastload-*.whl   this project's wheel (installed there by device_setup.sh)
# Wheels are cached in .whl/. Both folders are listed in .git/info/exclude and travel with
# the device call through its `carry` argument. Usage: bash bench/make_device_bundle.sh
# [--wheel-only]   (--wheel-only: rebuild this project's wheel, keep an existing site.tar.xz)
set -euo pipefail
wheel_only=0
[ "${1:-}" = "--wheel-only" ] && wheel_only=1
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-$root/.venv/bin/python}

if [ -d .git ]; then  # a linked worktree has a .git file; .gitignore covers both anyway
  for pattern in /.devbundle/ /.whl/; do
    grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >>.git/info/exclude
  done
fi

# What the device image lacks (its package list: see bench/README.md). Versions are the
# ones the CPU environment runs (ci/requirements-cpu.txt) so both machines run the same code.
PACKAGES=(
  sglang==0.5.23
  transformers==5.19.0
  typing_extensions==4.16.0       # pydantic_core needs >= 4.16; the image's is older
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pybase64==1.5.1 orjson==3.13.0 msgspec==0.23.0 pyzmq==27.3.0
  apache-tvm-ffi==0.1.11
  partial-json-parser==0.2.1.1.post7 dill==0.4.1 gguf==0.19.0
  fastapi==0.165.0 starlette==1.10.0 python-multipart==0.0.34 uvicorn==0.54.0
  openai==2.8.0 distro==1.9.0 jiter==0.19.0 sniffio==1.3.1
  compressed-tensors==0.18.0 loguru==0.7.3
  opentelemetry-api==1.45.2
  ipython==9.18.1 traitlets==5.16.1 ipython_pygments_lexers==1.1.1
  jedi==0.20.1 parso==0.8.7 matplotlib-inline==0.2.2 pexpect==4.9.0 ptyprocess==0.7.0
  prompt_toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 asttokens==3.0.2 executing==2.3.0 pure_eval==0.2.4
  # Peers benchmarked beside `fast` (gpu_bench.py contenders; cp312 manylinux wheels).
  instanttensor==0.2.2 fastsafetensors==0.5.0
)
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_34_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

if [ "$wheel_only" = 1 ] && [ -f .devbundle/site.tar.xz ]; then
  echo "==> keeping .devbundle/site.tar.xz" >&2
else
echo "==> downloading cp312 wheels into .whl/" >&2
mkdir -p .whl .devbundle
"$py" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl "${PACKAGES[@]}"

# Exactly the wheels named above (an older download of another version must not come along).
stage=$(mktemp -d /tmp/devbundle-stage.XXXXXX)
trap 'rm -rf "$stage"' EXIT
wheels=()
for spec in "${PACKAGES[@]}"; do
  name=${spec%%==*}; version=${spec#*==}
  norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
  match=
  for f in .whl/*.whl; do
    b=${f#.whl/}
    fn=$(echo "${b%%-*}" | tr 'A-Z-.' 'a-z__'); fv=$(echo "$b" | cut -d- -f2)
    if [ "$fn" = "$norm" ] && [ "$fv" = "$version" ]; then match=$f; break; fi
  done
  [ -n "$match" ] || { echo "no wheel for $spec in .whl/" >&2; exit 1; }
  wheels+=("$match")
done

echo "==> installing ${#wheels[@]} wheels for Python 3.12 into a staging tree" >&2
"$py" -m pip install -q --no-deps --no-compile --no-index --only-binary=:all: "${PLATFORM[@]}" \
  --target "$stage/site" "${wheels[@]}"
# Caches and console scripts are not needed (test packages stay: sglang.srt imports sglang.test).
find "$stage/site" -depth -type d -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$stage/site/bin"

echo "==> compressing (xz)" >&2
tar -C "$stage/site" -cf - . | xz -T0 -9 >.devbundle/site.tar.xz.tmp
mv .devbundle/site.tar.xz.tmp .devbundle/site.tar.xz
fi

echo "==> building the sglang-fastload wheel" >&2
rm -f .devbundle/sglang_fastload-*.whl
rm -rf "$root/build"  # setuptools keeps files there: a module deleted since would ship again
wdir=$(mktemp -d /tmp/devbundle-wheel.XXXXXX)
"$py" -m build --wheel --no-isolation --outdir "$wdir" "$root" >/dev/null 2>"$wdir/build.log" || { cat "$wdir/build.log" >&2; exit 1; }
cp "$wdir"/sglang_fastload-*.whl .devbundle/
rm -rf "$wdir"

du -h .devbundle/* >&2
total=$(du -cb .devbundle/* | tail -n1 | cut -f1)
echo "bundle: $((total / 1024 / 1024)) MiB (the device call carries at most 64 MiB with the working tree)" >&2
