"""Run test files on the GPU host, with the overlay active and the bench's import stand-ins.

    PYTHONPATH=.devbundle/pytest/site python3 bench/device_tests.py tests/loader/test_idle_restores.py ...

The device image lacks pytest (carry it: ``pip download pytest pluggy iniconfig packaging
pygments`` for Python 3.12 and unzip the wheels into ``.devbundle/pytest/site``) and the GPU
kernel packages SGLang imports at module level (``import_standins_for_bench.py``). A site on
``PYTHONPATH`` alone is not enough: its ``.pth`` (the overlay hook) runs only through
``site.addsitedir``, and without it the tests import upstream's modules instead of the forks.
Arguments after the script go to pytest (``-q -p no:cacheprovider -o timeout=0`` are added).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    site_dir = os.environ.get("SGLANG_FASTLOAD_DEVICE_SITE", "/tmp/site")
    sys.path.insert(0, ROOT)
    from bench import gpu_bench, import_standins_for_bench

    print(f"overlay: {gpu_bench.activate_site(site_dir)}", flush=True)
    import_standins_for_bench.activate()
    import pytest

    return pytest.main(["-q", "-p", "no:cacheprovider", "-o", "timeout=0", *argv])


if __name__ == "__main__":
    sys.exit(main())
