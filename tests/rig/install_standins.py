"""Install (or remove) the TEST-ONLY GPU-import stand-ins into the running interpreter.

    python tests/rig/install_standins.py             # install / refresh (idempotent)
    python tests/rig/install_standins.py --uninstall # remove
    python tests/rig/install_standins.py --check     # exit 0 if installed and current

Copies ``tests/rig/gpu_import_standins_for_tests/`` into this interpreter's purelib
(site-packages) and writes ``gpu_import_standins_for_tests.pth`` next to it, whose one
guarded line activates the stand-in finder in every interpreter of the venv — including
the scheduler processes SGLang spawns. Meant for test virtual environments only: the
finder serves placeholder modules for GPU-only packages (triton, torchvision, torchao,
torchaudio) that are not installed.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import sysconfig

PACKAGE = "gpu_import_standins_for_tests"
PTH_NAME = PACKAGE + ".pth"
# Guarded: if the package is removed but the .pth stays, the interpreter starts silently.
PTH_LINE = (
    "import os; os.environ.get('GPU_IMPORT_STANDINS_FOR_TESTS', '1').strip() == '0' or "
    "exec('try:\\n import gpu_import_standins_for_tests as m\\nexcept ImportError:\\n pass\\n"
    "else:\\n m.activate()')\n"
)

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, PACKAGE)


def site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _source_files():
    out = []
    for root, dirs, files in os.walk(SOURCE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(root, name), SOURCE))
    return sorted(out)


def is_current(target_dir: str | None = None) -> bool:
    """True when the installed copy and .pth match this checkout."""
    target_dir = target_dir or site_packages()
    dest = os.path.join(target_dir, PACKAGE)
    pth = os.path.join(target_dir, PTH_NAME)
    try:
        with open(pth, encoding="utf-8") as f:
            if f.read() != PTH_LINE:
                return False
    except OSError:
        return False
    for rel in _source_files():
        other = os.path.join(dest, rel)
        if not os.path.isfile(other) or not filecmp.cmp(os.path.join(SOURCE, rel), other, shallow=False):
            return False
    return True


def install(target_dir: str | None = None) -> str:
    target_dir = target_dir or site_packages()
    dest = os.path.join(target_dir, PACKAGE)
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pth = os.path.join(target_dir, PTH_NAME)
    tmp = pth + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(PTH_LINE)
    os.replace(tmp, pth)
    return dest


def uninstall(target_dir: str | None = None) -> bool:
    target_dir = target_dir or site_packages()
    removed = False
    pth = os.path.join(target_dir, PTH_NAME)
    if os.path.exists(pth):
        os.remove(pth)
        removed = True
    dest = os.path.join(target_dir, PACKAGE)
    if os.path.isdir(dest):
        shutil.rmtree(dest)
        removed = True
    return removed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--uninstall", action="store_true", help="remove the stand-ins")
    group.add_argument("--check", action="store_true", help="exit 1 unless installed and current")
    parser.add_argument("--target", help="site-packages folder (default: this interpreter's purelib)")
    args = parser.parse_args(argv)
    if args.check:
        ok = is_current(args.target)
        print(f"{PACKAGE}: {'installed and current' if ok else 'missing or stale'}")
        return 0 if ok else 1
    if args.uninstall:
        removed = uninstall(args.target)
        print(f"{PACKAGE}: {'removed' if removed else 'was not installed'}")
        return 0
    if is_current(args.target):
        print(f"{PACKAGE}: already installed in {args.target or site_packages()}")
        return 0
    dest = install(args.target)
    print(f"{PACKAGE}: installed into {dest} (test-only GPU-import stand-ins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
