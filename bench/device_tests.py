"""Run test files on the GPU host, with the overlay active and the bench's import stand-ins.

    PYTHONPATH=.devbundle/pytest/site python3 bench/device_tests.py tests/loader/test_idle_restores.py ...

The device image lacks pytest (carry it: ``pip download pytest pluggy iniconfig packaging
pygments`` for Python 3.12 and unzip the wheels into ``.devbundle/pytest/site``) and the GPU
kernel packages SGLang imports at module level (``import_standins_for_bench.py``). A site on
``PYTHONPATH`` alone is not enough: its ``.pth`` (the overlay hook) runs only through
``site.addsitedir``, and without it the tests import upstream's modules instead of the forks.
Arguments after the script go to pytest (``-q -p no:cacheprovider -o timeout=0`` are added).

Tests that load through the rig's rank processes (``tests/rig/inprocess.py``) start new
interpreters, which need the same two things: a ``sitecustomize.py`` written to a temporary
directory put first on ``PYTHONPATH`` gives them the overlay site and the stand-ins (it
shadows any ``sitecustomize`` of the device image for the tests' processes only).
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    site_dir = os.environ.get("SGLANG_FASTLOAD_DEVICE_SITE", "/tmp/site")
    sys.path.insert(0, ROOT)
    from bench import gpu_bench, import_standins_for_bench

    print(f"overlay: {gpu_bench.activate_site(site_dir)}", flush=True)
    import_standins_for_bench.activate()
    _boot_child_interpreters(site_dir)
    import pytest

    return pytest.main(["-q", "-p", "no:cacheprovider", "-o", "timeout=0", *argv])


# What every child interpreter of the tests runs first (``_boot_child_interpreters``).
_CHILD_BOOT = """\
import importlib.util, site, sys
site.addsitedir({site_dir!r})
_spec = importlib.util.spec_from_file_location("import_standins_for_bench", {standins!r})
_module = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.activate()
"""


def _boot_child_interpreters(site_dir: str) -> str:
    """Make the tests' child interpreters start as this one did (overlay site, stand-ins).

    Args:
        site_dir: the device site holding the installed package and its ``.pth``.

    Returns:
        The directory put first on ``PYTHONPATH``.
    """
    boot = tempfile.mkdtemp(prefix="sglang-fastload-device-tests-")
    standins = os.path.join(HERE, "import_standins_for_bench.py")
    with open(os.path.join(boot, "sitecustomize.py"), "w") as f:
        f.write(_CHILD_BOOT.format(site_dir=site_dir, standins=standins))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (boot, os.environ.get("PYTHONPATH", "")) if p)
    return boot


if __name__ == "__main__":
    sys.exit(main())
