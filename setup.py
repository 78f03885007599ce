"""Build script: the package, the overlay tree as package data, and the start-up files.

The overlay tree (``overlay/``) is copied into ``sglang_fastload/_overlay`` and the .pth and
.start files into the wheel's root, so they land in site-packages, are listed in RECORD
and are removed by ``pip uninstall``.
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_pth_files():
    namespace = {}
    with open(os.path.join(HERE, "sglang_fastload", "constants.py")) as f:
        exec(f.read(), namespace)
    consts = dict(namespace)
    namespace = {}
    with open(os.path.join(HERE, "sglang_fastload", "pth_files.py")) as f:
        source = f.read().replace(
            "from sglang_fastload.constants import ENV_ENABLE", f"ENV_ENABLE = {consts['ENV_ENABLE']!r}"
        )
    exec(source, namespace)
    return consts, namespace["PTH_LINE"], namespace["START_LINE"]


class BuildWithOverlay(build_py):
    """build_py that also ships the overlay tree and the site-packages start-up files."""

    def run(self):
        super().run()
        consts, pth_line, start_line = _load_pth_files()
        target = os.path.join(self.build_lib, "sglang_fastload", consts["OVERLAY_DIR_INSTALLED"])
        if os.path.isdir(target):
            shutil.rmtree(target)
        shutil.copytree(
            os.path.join(HERE, consts["OVERLAY_DIR_SOURCE"]),
            target,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.orig", "*.rej"),
        )
        self._extra_outputs = [
            os.path.join(root, name) for root, _, names in os.walk(target) for name in names
        ]
        for name, text in ((consts["PTH_NAME"], pth_line), (consts["START_NAME"], start_line)):
            path = os.path.join(self.build_lib, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            self._extra_outputs.append(path)

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + list(getattr(self, "_extra_outputs", []))


setup(
    name="sglang-fastload",
    version="0.1.0",
    description="Fast, validated safetensors weight loading and updates for SGLang",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["sglang_fastload", "sglang_fastload.*"]),
    # Unpinned on purpose: the start-up guard checks the exact sglang release at run time.
    install_requires=["sglang"],
    entry_points={"console_scripts": ["sglang-fastload=sglang_fastload.cli:main"]},
    cmdclass={"build_py": BuildWithOverlay},
    zip_safe=False,
)
