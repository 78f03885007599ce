"""Every fork differs from its pristine upstream base only inside `OVERLAY:` fences.

The smaller and better marked the diff, the cheaper each rebase (tools/sync_upstream.py).
"""

import difflib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = json.loads((ROOT / "overlay" / "manifest.json").read_text())
FORKS = sorted(e["path"] for e in MANIFEST["modules"].values() if not e.get("overlay_only"))


def fenced_lines(lines):
    """Indices of lines inside `# OVERLAY: begin` ... `# OVERLAY: end` (inclusive) or tagged."""
    inside, depth = set(), 0
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("# OVERLAY: begin"):
            depth += 1
        if depth or "OVERLAY:" in line:
            inside.add(i)
        if text.startswith("# OVERLAY: end"):
            assert depth, f"line {i + 1}: OVERLAY end without begin"
            depth -= 1
    assert depth == 0, "an OVERLAY: begin is never closed"
    return inside


@pytest.mark.parametrize("rel", FORKS)
def test_fork_changes_are_fenced(rel):
    fork = (ROOT / "overlay" / rel).read_text().splitlines()
    base = (ROOT / "upstream_base" / rel).read_text().splitlines()
    assert fork[0].startswith(f"# OVERLAY: provenance: sglang {MANIFEST['base_version']} {rel}")
    body = fork[1:]
    inside = fenced_lines(body)
    assert inside, f"{rel}: a fork without any OVERLAY change should not be a fork"
    matcher = difflib.SequenceMatcher(a=base, b=body, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        changed = range(j1, j2) if j2 > j1 else [j1 - 1, j1]  # a pure deletion sits between two lines
        # A blank line next to a fence may be aligned on either side of it by the diff.
        outside = [
            j for j in changed
            if j not in inside and not (0 <= j < len(body) and not body[j].strip() and {j - 1, j + 1} & inside)
        ]
        assert not outside, (
            f"{rel}: upstream lines {i1 + 1}-{i2} changed outside an OVERLAY fence "
            f"(fork lines {[j + 2 for j in outside]})"
        )
