"""Whether the installed ``sglang_fastload`` is this checkout's.

Every rank process and server the tests start imports the package from site-packages (the
start-up hook imports it there before any test code runs), not from the checkout. A checkout
edited since the last ``ci/setup_env.sh`` would otherwise be tested as it was at that install.
"""

from __future__ import annotations

import filecmp
import os
from typing import List

from sglang_fastload import constants

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIPPED_DIRS = {"__pycache__"}


def _files(root: str) -> List[str]:
    """Relative paths of the files below ``root`` (byte-code caches left out)."""
    out = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        out += [os.path.relpath(os.path.join(here, n), root) for n in names if not n.endswith(".pyc")]
    return sorted(out)


def tree_differences(source: str, installed: str, *, skip: frozenset = frozenset()) -> List[str]:
    """Files that differ between two trees: changed, missing from ``installed``, or only there.

    Args:
        source: the tree as in the checkout.
        installed: the same tree as installed.
        skip: top-level entries of ``installed`` that ``source`` does not hold.

    Returns:
        One line per difference, naming the relative path (empty: the trees are equal).
    """
    ours, theirs = set(_files(source)), {p for p in _files(installed) if p.split(os.sep)[0] not in skip}
    out = [f"changed since installed: {p}" for p in sorted(ours & theirs)
           if not filecmp.cmp(os.path.join(source, p), os.path.join(installed, p), shallow=False)]
    out += [f"not installed: {p}" for p in sorted(ours - theirs)]
    out += [f"installed, not in the checkout: {p}" for p in sorted(theirs - ours)]
    return out


def installed_differences() -> List[str]:
    """How the imported ``sglang_fastload`` (and its overlay) differs from this checkout."""
    import sglang_fastload

    installed = os.path.dirname(os.path.abspath(sglang_fastload.__file__))
    source = os.path.join(REPO, "sglang_fastload")
    if os.path.samefile(installed, source):
        return []  # imported from the checkout itself
    overlay = constants.OVERLAY_DIR_INSTALLED
    return tree_differences(source, installed, skip=frozenset({overlay})) + tree_differences(
        os.path.join(REPO, constants.OVERLAY_DIR_SOURCE), os.path.join(installed, overlay)
    )
