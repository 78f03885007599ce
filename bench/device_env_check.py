"""Run a script here as if only the GPU machine's packages plus the device bundle existed.

    .venv/bin/python bench/device_env_check.py bench/gpu_bench.py --device cpu --tiny

Runs the script under ``python -S`` with a site directory of symlinks to only those
distributions of this environment that are on the device image (``DEVICE_IMAGE`` below,
read off that image) or in ``bench/make_device_bundle.sh``'s ``PACKAGES`` (metadata
included, so "is X installed?" checks answer as they would there). A dry run on this
machine then shows which package the bundle still lacks before device time is spent
finding out. CUDA-only import paths are not exercised here.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# Python distributions on the GPU machine's image (2026-11; versions in bench/README.md).
DEVICE_IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()


# Needed here only because this environment's versions differ from the image's
# (huggingface_hub 2.x here imports httpx2; the image's 1.33 uses httpx).
HERE_ONLY = ["httpx2", "httpcore2", "truststore"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def bundle_packages() -> list:
    text = open(os.path.join(HERE, "make_device_bundle.sh")).read()
    body = text[text.index("PACKAGES=(") + len("PACKAGES=(") :]
    body = body[: body.index("\n)")]
    names = []
    for line in body.splitlines():
        line = line.split("#", 1)[0]
        names += [tok.split("==")[0] for tok in line.split()]
    return names


def build_site(target: str) -> list:
    """Symlink the allowed distributions of this interpreter's site-packages into ``target``.

    Returns the names of the distributions left out.
    """
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    allowed = {_norm(n) for n in DEVICE_IMAGE + HERE_ONLY + bundle_packages() + ["sglang-fastload"]}
    left_out = []
    tops = set()
    for dist in md.distributions(path=[purelib]):
        name = dist.metadata["Name"]
        if _norm(name) not in allowed:
            left_out.append(name)
            continue
        for f in dist.files or ():
            top = str(f).split("/")[0]
            if top and top != ".." and not top.startswith("__pycache__"):
                tops.add(top)
    # Not distributions: the CPU test rig's stand-ins for GPU-only packages the image has
    # for real (triton, torchvision, ...), and their start-up file.
    tops |= {"gpu_import_standins_for_tests", "gpu_import_standins_for_tests.pth"}
    for top in sorted(tops):
        src = os.path.join(purelib, top)
        if os.path.exists(src):
            os.symlink(src, os.path.join(target, top))
    return sorted(left_out)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    if os.environ.get("_DEVICE_ENV_CHECK_SITE"):
        import site

        site.addsitedir(os.environ["_DEVICE_ENV_CHECK_SITE"])
        script = sys.argv[1]
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
        return 0
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="device-env-check-") as tmp:
        left_out = build_site(tmp)
        print(f"device_env_check: left out (not on the image, not in the bundle): {', '.join(left_out) or 'none'}",
              file=sys.stderr, flush=True)
        env = dict(os.environ, _DEVICE_ENV_CHECK_SITE=tmp)
        # -S: no site-packages but the filtered copy (whose .pth files addsitedir runs).
        return subprocess.call([sys.executable, "-S", os.path.abspath(__file__)] + sys.argv[1:], env=env)


if __name__ == "__main__":
    sys.exit(main())
