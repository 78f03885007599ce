"""Tests of tools/sync_upstream.py: rebasing the overlay's forks onto another sglang release.

Synthetic trees (a tiny manifest, pristine bases, forks with provenance lines and
OVERLAY-fenced edits, and a folder or wheel standing in for the new release) cover each
report status, the pending state, --continue/--abort, --dry-run and --check. One test
rebases a copy of the real overlay from its recorded base onto sglang 0.5.22 fetched from
PyPI and compares the report with ``git merge-file --diff3`` run here independently.
All merges are real ``git merge-file`` runs.
"""

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "sync_upstream.py"
WHEEL_CACHE = REPO / ".cache" / "wheels"  # git-ignored; survives between runs
REAL_TARGET = "0.5.22"

_spec = importlib.util.spec_from_file_location("sync_upstream", TOOL)
sync_upstream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_upstream)

OLD, NEW = "1.0.0", "1.1.0"
ALPHA = "sglang/srt/alpha.py"
BETA = "sglang/srt/layers/beta.py"
EXTRA = "sglang/srt/fastload_extra.py"

ALPHA_BASE = '''"""Alpha: loads things."""
import os


def load(path):
    return open(path).read()


def helper():
    return 1


def size(path):
    return os.path.getsize(path)


def tail():
    return "tail"
'''

# Our fork: the return line of load() replaced by an OVERLAY-fenced fast path.
ALPHA_FORK = ALPHA_BASE.replace(
    "    return open(path).read()\n",
    "    # OVERLAY: begin fast path\n"
    "    return fast_read(path)\n"
    "    # OVERLAY: end\n",
)
# Upstream change far from ours: merges cleanly.
ALPHA_NEW_CLEAN = ALPHA_BASE.replace('return "tail"', 'return "TAIL"')
# Upstream change of the very line we replaced: conflicts.
ALPHA_NEW_CONFLICT = ALPHA_BASE.replace(
    "return open(path).read()", 'return open(path, encoding="utf-8").read()'
)

BETA_BASE = '''"""Beta layer."""


class Beta:
    scale = 1.0

    def forward(self, x):
        return x * self.scale
'''
BETA_FORK = BETA_BASE.replace(
    "    scale = 1.0\n",
    "    scale = 1.0\n    # OVERLAY: begin fast flag\n    fast = True\n    # OVERLAY: end\n",
)

EXTRA_TEXT = '"""Overlay-only helper module."""\n\nVALUE = 1\n'


# --- building synthetic trees -----------------------------------------------------------------


def provenance(version, path):
    """Return the provenance line a fork of ``path`` at ``version`` starts with."""
    return (
        f"# OVERLAY: provenance: sglang {version} {path}, forked by sglang-fastload "
        "(Apache-2.0); every change is fenced by OVERLAY: tags.\n"
    )


def module_name(path):
    """Return the dotted module name of a package-relative .py path."""
    return path[: -len(".py")].replace("/", ".")


def write(path, text):
    """Write ``text`` (str or bytes) to ``path``, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)


def build_tree(root, forks, overlay_only=None, version=OLD):
    """Create an overlay checkout under ``root``.

    Args:
        forks: ``{path: (pristine base text, fork text without provenance)}``.
        overlay_only: ``{path: text}`` of modules without an upstream base.
    """
    modules = {}
    for path, (base, fork) in forks.items():
        write(root / "upstream_base" / path, base)
        write(root / "overlay" / path, provenance(version, path) + fork)
        modules[module_name(path)] = {
            "base_sha256": hashlib.sha256(base.encode("utf-8")).hexdigest(),
            "path": path,
        }
    for path, text in (overlay_only or {}).items():
        write(root / "overlay" / path, text)
        modules[module_name(path)] = {"overlay_only": True, "path": path}
    manifest = {"base_version": version, "modules": modules}
    write(root / "overlay" / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def build_source(directory, files, version=NEW):
    """Create a folder holding an ``sglang/`` package tree that stands in for a release."""
    write(directory / "sglang" / "__init__.py", "")
    write(directory / "sglang" / "_version.py", f"__version__ = version = '{version}'\n")
    for path, text in files.items():
        write(directory / path, text)
    return directory


def build_wheel(directory, files, version=NEW):
    """Create ``sglang-VERSION-py3-none-any.whl`` holding ``files`` (plus the package init)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"sglang-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sglang/", "")
        zf.writestr("sglang/__init__.py", "")
        zf.writestr("sglang/_version.py", f"__version__ = version = '{version}'\n")
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def settled(root):
    """Return ``snapshot(root)`` without an unfinished sync's ``.pending`` folder."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith(".pending")}


def snapshot(root):
    """Return ``{relative path: bytes}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def manifest_of(root):
    """Return the parsed manifest of a tree."""
    return json.loads((root / "overlay" / "manifest.json").read_text())


def run_tool(capsys, *args):
    """Run the tool's ``main`` and return ``(exit status, stdout, stderr)``."""
    status = sync_upstream.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys, *args):
    """Run the tool with ``--json`` and return ``(exit status, parsed report)``."""
    status, out, err = run_tool(capsys, *args, "--json")
    return status, json.loads(out)


def statuses(report):
    """Return ``{path: (status, conflicts)}`` from a JSON report."""
    return {f["path"]: (f["status"], f["conflicts"]) for f in report["files"]}


@pytest.fixture
def tree(tmp_path):
    """An overlay tree with two forks (alpha, beta) and one overlay-only module."""
    return build_tree(
        tmp_path / "repo",
        {ALPHA: (ALPHA_BASE, ALPHA_FORK), BETA: (BETA_BASE, BETA_FORK)},
        {EXTRA: EXTRA_TEXT},
    )


def sync_args(root, source):
    """Return the arguments of a sync of ``root`` to ``NEW`` from a source folder."""
    return ["--to", NEW, "--root", root, "--source", source]


# --- synthetic: clean merge -------------------------------------------------------------------


def test_clean_merge_advances_manifest_base_and_provenance(tree, tmp_path, capsys):
    source = build_source(tmp_path / "new", {ALPHA: ALPHA_NEW_CLEAN, BETA: BETA_BASE})
    status, out, _ = run_tool(capsys, *sync_args(tree, source))
    assert status == 0, out
    assert "merged cleanly" in out and ALPHA in out
    assert "unchanged upstream" in out and BETA in out
    assert "overlay-only" in out and EXTRA in out
    assert "Reinstall" in out and "Run the tests" in out

    fork = (tree / "overlay" / ALPHA).read_text()
    assert fork.splitlines()[0] == provenance(NEW, ALPHA).rstrip("\n")
    assert fork.split("\n", 1)[1] == ALPHA_FORK.replace('return "tail"', 'return "TAIL"')
    beta = (tree / "overlay" / BETA).read_text()
    assert beta == provenance(NEW, BETA) + BETA_FORK

    manifest = manifest_of(tree)
    assert manifest["base_version"] == NEW
    assert (tree / "upstream_base" / ALPHA).read_text() == ALPHA_NEW_CLEAN
    entry = manifest["modules"][module_name(ALPHA)]
    assert entry["base_sha256"] == hashlib.sha256(ALPHA_NEW_CLEAN.encode()).hexdigest()
    assert manifest["modules"][module_name(EXTRA)] == {"overlay_only": True, "path": EXTRA}
    text = (tree / "overlay" / "manifest.json").read_text()
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert not (tree / "upstream_base" / ".pending").exists()
    assert run_tool(capsys, "--check", "--root", tree)[0] == 0


def test_upstream_change_on_first_line_does_not_touch_provenance(tmp_path, capsys):
    root = build_tree(tmp_path / "repo", {ALPHA: (ALPHA_BASE, ALPHA_FORK)})
    new = ALPHA_BASE.replace('"""Alpha: loads things."""', '"""Alpha: loads things fast."""')
    source = build_source(tmp_path / "new", {ALPHA: new})
    status, out, _ = run_tool(capsys, *sync_args(root, source))
    assert status == 0, out
    lines = (root / "overlay" / ALPHA).read_text().splitlines()
    assert lines[0] == provenance(NEW, ALPHA).rstrip("\n")
    assert lines[1] == '"""Alpha: loads things fast."""'
    assert "<<<<<<<" not in (root / "overlay" / ALPHA).read_text()


def test_wheel_and_cached_wheel_inputs(tmp_path, capsys):
    files = {ALPHA: ALPHA_NEW_CLEAN}
    cache = tmp_path / "cache"
    build_wheel(cache, files)
    root = build_tree(tmp_path / "a", {ALPHA: (ALPHA_BASE, ALPHA_FORK)})
    status, report = run_json(capsys, "--to", NEW, "--root", root, "--cache-dir", cache)
    assert status == 0
    assert statuses(report) == {ALPHA: ("merged", 0)}
    assert "wheel" in report["summary"]

    root = build_tree(tmp_path / "b", {ALPHA: (ALPHA_BASE, ALPHA_FORK)})
    wheel = build_wheel(tmp_path / "w", files)
    assert run_tool(capsys, "--to", NEW, "--root", root, "--wheel", wheel)[0] == 0
    assert manifest_of(root)["base_version"] == NEW


def test_release_of_another_version_is_refused(tree, tmp_path, capsys):
    before = snapshot(tree)
    wheel = build_wheel(tmp_path / "w", {ALPHA: ALPHA_BASE}, version="1.2.0")
    status, _, err = run_tool(capsys, "--to", NEW, "--root", tree, "--wheel", wheel)
    assert status == 2 and "1.2.0" in err
    source = build_source(tmp_path / "src", {ALPHA: ALPHA_BASE}, version="1.2.0")
    status, _, err = run_tool(capsys, *sync_args(tree, source))
    assert status == 2 and "declares sglang 1.2.0" in err
    assert snapshot(tree) == before


BODY_LINES = [f"VALUE_{i} = {i}\n" for i in range(12)]


@settings(max_examples=25, deadline=None)
@given(
    ours=st.integers(min_value=0, max_value=len(BODY_LINES) - 1),
    theirs=st.integers(min_value=0, max_value=len(BODY_LINES) - 1),
)
def test_separate_edits_always_merge_cleanly(tmp_path_factory, ours, theirs):
    """A fenced insertion and an upstream edit two or more lines apart never conflict."""
    assume(theirs < ours - 1 or theirs > ours + 2)
    tmp = tmp_path_factory.mktemp("prop")
    base = "".join(BODY_LINES)
    fenced = ["# OVERLAY: begin\n", "FAST = True\n", "# OVERLAY: end\n"]
    fork = "".join(BODY_LINES[: ours + 1] + fenced + BODY_LINES[ours + 1 :])
    new_lines = list(BODY_LINES)
    new_lines[theirs] = f"VALUE_{theirs} = {theirs} * 10\n"
    root = build_tree(tmp / "repo", {ALPHA: (base, fork)})
    source = build_source(tmp / "new", {ALPHA: "".join(new_lines)})
    assert sync_upstream.main(sync_args(str(root), str(source)) + ["--json"]) == 0
    merged_lines = list(new_lines)
    merged_lines[ours + 1 : ours + 1] = fenced
    expected = provenance(NEW, ALPHA) + "".join(merged_lines)
    assert (root / "overlay" / ALPHA).read_text() == expected


# --- synthetic: conflicts, --continue, --abort ------------------------------------------------


def test_conflict_keeps_markers_and_does_not_advance(tree, tmp_path, capsys):
    base_before = snapshot(tree / "upstream_base")
    manifest_before = (tree / "overlay" / "manifest.json").read_bytes()
    source = build_source(tmp_path / "new", {ALPHA: ALPHA_NEW_CONFLICT, BETA: BETA_BASE})
    status, out, _ = run_tool(capsys, *sync_args(tree, source))
    assert status == 1
    assert "CONFLICTS (1)" in out and ALPHA in out
    assert f"overlay/{ALPHA} (1)" in out
    assert "python tools/sync_upstream.py --root" in out and "--continue" in out

    fork = (tree / "overlay" / ALPHA).read_text()
    assert fork.startswith(provenance(NEW, ALPHA))
    assert "<<<<<<< sglang-fastload overlay\n" in fork
    assert f"||||||| sglang {OLD}\n" in fork
    assert f">>>>>>> sglang {NEW}\n" in fork
    assert "=======\n" in fork
    # The clean file of the same sync is merged too, but nothing advanced.
    assert (tree / "overlay" / BETA).read_text() == provenance(NEW, BETA) + BETA_FORK
    assert (tree / "overlay" / "manifest.json").read_bytes() == manifest_before
    assert settled(tree / "upstream_base") == base_before

    status, out, _ = run_tool(capsys, "--check", "--root", tree)
    assert status == 1 and "unfinished" in out and "conflict markers" in out
    # A second --to is refused while the first is pending.
    status, _, err = run_tool(capsys, *sync_args(tree, source))
    assert status == 2 and "--continue" in err


def test_continue_refuses_with_markers_then_advances(tree, tmp_path, capsys):
    source = build_source(tmp_path / "new", {ALPHA: ALPHA_NEW_CONFLICT, BETA: BETA_BASE})
    assert run_tool(capsys, *sync_args(tree, source))[0] == 1
    # Refuses while markers remain.
    manifest_before = (tree / "overlay" / "manifest.json").read_bytes()
    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 1
    assert "still has conflict markers" in out and ALPHA in out
    assert (tree / "overlay" / "manifest.json").read_bytes() == manifest_before

    # Dropping the provenance line while resolving is caught as well.
    resolved = ALPHA_NEW_CONFLICT.replace(
        '    return open(path, encoding="utf-8").read()\n',
        "    # OVERLAY: begin fast path\n    return fast_read(path)\n    # OVERLAY: end\n",
    )
    write(tree / "overlay" / ALPHA, resolved)
    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 1 and "provenance" in out

    write(tree / "overlay" / ALPHA, provenance(NEW, ALPHA) + resolved)
    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 0, out
    manifest = manifest_of(tree)
    assert manifest["base_version"] == NEW
    assert (tree / "upstream_base" / ALPHA).read_text() == ALPHA_NEW_CONFLICT
    assert not (tree / "upstream_base" / ".pending").exists()
    assert "Rebuild" in out or "Reinstall" in out
    assert run_tool(capsys, "--check", "--root", tree)[0] == 0


def test_abort_restores_the_forks(tree, tmp_path, capsys):
    before = snapshot(tree)
    source = build_source(tmp_path / "new", {ALPHA: ALPHA_NEW_CONFLICT, BETA: BETA_BASE})
    assert run_tool(capsys, *sync_args(tree, source))[0] == 1
    assert snapshot(tree) != before
    status, out, _ = run_tool(capsys, "--abort", "--root", tree)
    assert status == 0 and "Aborted" in out
    assert snapshot(tree) == before


# --- synthetic: deleted, identical, clash -----------------------------------------------------


def test_upstream_deleted_file(tree, tmp_path, capsys):
    unrelated = "sglang/srt/moved/alpha.py"  # same name, nothing like alpha inside
    source = build_source(tmp_path / "new", {unrelated: "X = 1\n", BETA: BETA_BASE})
    status, report = run_json(capsys, *sync_args(tree, source))
    assert status == 1
    assert statuses(report)[ALPHA] == ("deleted", 0)
    (alpha,) = [f for f in report["files"] if f["path"] == ALPHA]
    assert "no similar file left" in alpha["note"]
    assert any("git rm overlay/" + ALPHA in step for step in report["next_steps"])
    assert not any("--moved" in step for step in report["next_steps"])
    assert manifest_of(tree)["base_version"] == OLD

    # --continue refuses until the module is dropped from the manifest.
    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 1 and f"has no {ALPHA}" in out
    manifest = manifest_of(tree)
    del manifest["modules"][module_name(ALPHA)]
    write(tree / "overlay" / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (tree / "overlay" / ALPHA).unlink()
    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 0, out
    assert manifest_of(tree)["base_version"] == NEW
    assert not (tree / "upstream_base" / ALPHA).exists()
    assert run_tool(capsys, "--check", "--root", tree)[0] == 0


# --- synthetic: forked files that moved upstream ----------------------------------------------

MOVED = "sglang/srt/loading/alpha_io.py"  # a new folder and a new file name


def assert_moved(root, new_text, old=ALPHA, new=MOVED):
    """The fork, its base copy and its manifest entry all live at ``new`` now."""
    manifest = manifest_of(root)
    assert manifest["base_version"] == NEW
    assert module_name(old) not in manifest["modules"]
    entry = manifest["modules"][module_name(new)]
    assert entry == {"path": new, "base_sha256": hashlib.sha256(new_text.encode()).hexdigest()}
    assert not (root / "overlay" / old).exists() and not (root / "upstream_base" / old).exists()
    assert (root / "upstream_base" / new).read_text() == new_text
    fork = (root / "overlay" / new).read_text()
    assert fork.startswith(provenance(NEW, new))
    assert "return fast_read(path)" in fork and "<<<<<<<" not in fork
    assert run_tool_plain("--check", "--root", root) == 0


def run_tool_plain(*args):
    """Run the tool's ``main`` and return its exit status."""
    return sync_upstream.main([str(a) for a in args])


def test_moved_file_is_found_by_content_and_followed(tree, tmp_path, capsys):
    user = tree / "sglang_fastload" / "user.py"
    write(user, f"import {module_name(ALPHA)}\n")
    source = build_source(tmp_path / "new", {MOVED: ALPHA_NEW_CLEAN, BETA: BETA_BASE,
                                             "sglang/srt/alpha_notes.py": "NOTES = 1\n"})
    status, report = run_json(capsys, *sync_args(tree, source), "--dry-run")
    assert status == 0 and report["clean"]
    (alpha,) = [f for f in report["files"] if f["module"] == module_name(MOVED)]
    assert alpha["status"] == "moved" and alpha["path"] == MOVED
    assert alpha["moved_from"] == {"module": module_name(ALPHA), "path": ALPHA}
    assert (tree / "overlay" / ALPHA).exists()  # a dry run writes nothing

    status, out, _ = run_tool(capsys, *sync_args(tree, source))
    assert status == 0, out
    (line,) = [line for line in out.splitlines() if f" {MOVED}  (" in line]
    assert "moved, merged cleanly" in line and f"(moved from {ALPHA}, " in line
    assert_moved(tree, ALPHA_NEW_CLEAN)
    fork = (tree / "overlay" / MOVED).read_text()
    assert fork.split("\n", 1)[1] == ALPHA_FORK.replace('return "tail"', 'return "TAIL"')
    assert f"sglang_fastload/user.py:1: {module_name(ALPHA)} -> {module_name(MOVED)}" in out


def test_unclear_move_stops_with_the_command_that_confirms_it(tree, tmp_path, capsys):
    twin = "sglang/srt/other/alpha.py"
    files = {MOVED: ALPHA_NEW_CLEAN, twin: ALPHA_NEW_CLEAN, BETA: BETA_BASE}
    source = build_source(tmp_path / "new", files)
    before = snapshot(tree)
    status, report = run_json(capsys, *sync_args(tree, source), "--dry-run")
    assert status == 1 and statuses(report)[ALPHA] == ("deleted", 0)
    (alpha,) = [f for f in report["files"] if f["path"] == ALPHA]
    assert {c["path"] for c in alpha["candidates"]} == {MOVED, twin}
    confirm = [s for s in report["next_steps"] if "--moved" in s]
    assert len(confirm) == 1, report["next_steps"]
    command = confirm[0].rsplit(": ", 1)[1]
    assert command.startswith("python tools/sync_upstream.py --root ")
    assert f"--moved {module_name(ALPHA)}=" in command and "--dry-run" not in command
    assert snapshot(tree) == before

    # The user confirms one of them.
    status, out, _ = run_tool(capsys, *sync_args(tree, source), "--moved", f"{module_name(ALPHA)}={MOVED}")
    assert status == 0, out
    assert "confirmed with --moved" in out
    assert_moved(tree, ALPHA_NEW_CLEAN)


def test_moved_file_with_conflict_then_abort_or_continue(tree, tmp_path, capsys):
    source = build_source(tmp_path / "new", {MOVED: ALPHA_NEW_CONFLICT, BETA: BETA_BASE})
    before = snapshot(tree)
    status, report = run_json(capsys, *sync_args(tree, source))
    assert status == 1
    (alpha,) = [f for f in report["files"] if f["path"] == MOVED]
    assert alpha["status"] == "conflict" and alpha["moved_from"]["path"] == ALPHA
    assert "<<<<<<<" in (tree / "overlay" / MOVED).read_text()
    assert not (tree / "overlay" / ALPHA).exists()
    assert run_tool(capsys, "--abort", "--root", tree)[0] == 0
    assert snapshot(tree) == before

    assert run_tool(capsys, *sync_args(tree, source))[0] == 1
    resolved = ALPHA_NEW_CONFLICT.replace(
        '    return open(path, encoding="utf-8").read()\n',
        "    # OVERLAY: begin fast path\n    return fast_read(path)\n    # OVERLAY: end\n",
    )
    write(tree / "overlay" / MOVED, provenance(NEW, MOVED) + resolved)
    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 0, out
    assert_moved(tree, ALPHA_NEW_CONFLICT)


def test_fork_identical_to_upstream_says_it_can_go(tmp_path, capsys):
    # Upstream adopted our change verbatim (alpha); beta's fenced change is still ours.
    upstreamed = ALPHA_BASE.replace("return open(path).read()", "return fast_read(path)")
    root = build_tree(
        tmp_path / "repo", {ALPHA: (ALPHA_BASE, upstreamed), BETA: (BETA_BASE, BETA_FORK)}
    )
    beta_new = BETA_BASE.replace("fast = True", "").replace(
        "    def forward", "    fast = True\n\n    def forward"
    )
    source = build_source(tmp_path / "new", {ALPHA: upstreamed, BETA: beta_new})
    status, out, _ = run_tool(capsys, *sync_args(root, source))
    assert status == 0, out
    alpha_line = [line for line in out.splitlines() if ALPHA in line][0]
    assert "fork == upstream" in alpha_line and "can go" in alpha_line
    assert f"delete its entry from overlay/manifest.json and run `git rm overlay/{ALPHA}" in out
    beta_line = [line for line in out.splitlines() if line.strip().endswith(BETA)][0]
    assert "merged cleanly" in beta_line
    assert manifest_of(root)["base_version"] == NEW


@pytest.mark.parametrize("upstream_path", [EXTRA, "sglang/srt/fastload_extra/__init__.py"])
def test_overlay_only_module_clash(tree, tmp_path, capsys, upstream_path):
    source = build_source(
        tmp_path / "new", {ALPHA: ALPHA_NEW_CLEAN, BETA: BETA_BASE, upstream_path: "X = 2\n"}
    )
    status, report = run_json(capsys, *sync_args(tree, source))
    assert status == 1
    assert statuses(report)[EXTRA] == ("clash", 0)
    assert statuses(report)[ALPHA] == ("merged", 0)
    assert manifest_of(tree)["base_version"] == OLD

    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 1 and "overlay-only" in out
    # Rename ours, then the sync can finish.
    renamed = "sglang/srt/fastload_helpers.py"
    (tree / "overlay" / EXTRA).rename(tree / "overlay" / renamed)
    manifest = manifest_of(tree)
    del manifest["modules"][module_name(EXTRA)]
    manifest["modules"][module_name(renamed)] = {"overlay_only": True, "path": renamed}
    write(tree / "overlay" / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    status, out, _ = run_tool(capsys, "--continue", "--root", tree)
    assert status == 0, out
    assert manifest_of(tree)["base_version"] == NEW
    assert run_tool(capsys, "--check", "--root", tree)[0] == 0


# --- synthetic: --dry-run ---------------------------------------------------------------------


@pytest.mark.parametrize("new_alpha, expected", [(ALPHA_NEW_CLEAN, 0), (ALPHA_NEW_CONFLICT, 1)])
def test_dry_run_writes_nothing(tree, tmp_path, capsys, new_alpha, expected):
    source = build_source(tmp_path / "new", {ALPHA: new_alpha, BETA: BETA_BASE})
    before = snapshot(tmp_path)
    status, out, _ = run_tool(capsys, *sync_args(tree, source), "--dry-run")
    assert status == expected
    assert "Dry run: nothing was written" in out and ALPHA in out
    assert snapshot(tmp_path) == before


def test_dry_run_continue_writes_nothing(tree, tmp_path, capsys):
    source = build_source(tmp_path / "new", {ALPHA: ALPHA_NEW_CONFLICT, BETA: BETA_BASE})
    assert run_tool(capsys, *sync_args(tree, source))[0] == 1
    text = (tree / "overlay" / ALPHA).read_text()
    for marker in ("<<<<<<<", "|||||||", ">>>>>>>"):
        text = text.replace(marker, "")
    write(tree / "overlay" / ALPHA, text)
    before = snapshot(tree)
    status, _, _ = run_tool(capsys, "--continue", "--dry-run", "--root", tree)
    assert status == 0
    assert snapshot(tree) == before


# --- synthetic: --check -----------------------------------------------------------------------


def test_check_passes_on_consistent_tree(tree, capsys):
    status, out, _ = run_tool(capsys, "--check", "--root", tree)
    assert status == 0 and "OK (3 module(s), base sglang 1.0.0)" in out
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--check", "--root", str(tree)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_fails_on_tampered_base(tree, tmp_path, capsys):
    write(tree / "upstream_base" / BETA, BETA_BASE + "# local edit\n")
    status, out, _ = run_tool(capsys, "--check", "--root", tree)
    assert status == 1
    assert f"upstream_base/{BETA} has sha256" in out
    # A sync refuses to start on such a tree and writes nothing.
    before = snapshot(tree)
    source = build_source(tmp_path / "new", {ALPHA: ALPHA_NEW_CLEAN, BETA: BETA_BASE})
    status, _, err = run_tool(capsys, *sync_args(tree, source))
    assert status == 2 and "inconsistent" in err
    assert snapshot(tree) == before


def test_check_fails_on_missing_or_stale_provenance(tree, capsys):
    write(tree / "overlay" / ALPHA, ALPHA_FORK)
    write(tree / "overlay" / BETA, provenance("0.9.0", BETA) + BETA_FORK)
    status, out, _ = run_tool(capsys, "--check", "--root", tree)
    assert status == 1
    assert "2 problem(s)" in out
    assert f"overlay/{ALPHA} does not start with its provenance line" in out
    assert f"overlay/{BETA} provenance names sglang 0.9.0" in out


def test_check_fails_on_stray_base_and_missing_fork(tree, capsys):
    write(tree / "upstream_base" / "sglang/srt/old.py", "x = 1\n")
    (tree / "overlay" / BETA).unlink()
    status, out, _ = run_tool(capsys, "--check", "--root", tree)
    assert status == 1
    assert "upstream_base/sglang/srt/old.py belongs to no manifest module" in out
    assert f"overlay/{BETA} is missing" in out


def test_check_passes_on_the_real_repository(capsys):
    status, out, _ = run_tool(capsys, "--check", "--root", REPO)
    assert status == 0, out


# --- synthetic: twins of upstream functions ---------------------------------------------------


def record_twins(root, sources):
    """Record ``{function: sha256}`` as the package's constants do (UPSTREAM_WALK_SOURCES)."""
    write(root / "sglang_fastload" / "constants.py", f"UPSTREAM_WALK_SOURCES = {sources!r}\n")


def digest_of(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_check_names_a_twin_whose_upstream_source_changed_and_the_digest_to_record(tree, capsys):
    size = "def size(path):\n    return os.path.getsize(path)\n"
    record_twins(tree, {"size": digest_of(size), "helper": digest_of("def helper():\n    return 2\n"), "gone": "0" * 64})
    status, out, _ = run_tool(capsys, "--check", "--root", tree)
    assert status == 1 and "2 problem(s)" in out, out
    assert f"upstream's helper (overlay/{ALPHA}) changed" in out
    assert digest_of("def helper():\n    return 1\n") in out  # what to record once reviewed
    assert "gone is in no fork any more" in out
    assert "upstream's size" not in out
    record_twins(tree, {"size": digest_of(size)})
    assert run_tool(capsys, "--check", "--root", tree)[0] == 0


def test_a_method_is_recorded_by_its_qualified_name(tree, capsys):
    forward = "    def forward(self, x):\n        return x * self.scale\n"  # as inspect.getsource reads it
    record_twins(tree, {"Beta.forward": digest_of(forward)})
    assert run_tool(capsys, "--check", "--root", tree)[0] == 0
    record_twins(tree, {"Beta.forward": digest_of(forward.replace("x *", "x /"))})
    status, out, _ = run_tool(capsys, "--check", "--root", tree)
    assert status == 1 and f"upstream's Beta.forward (overlay/{BETA}) changed" in out, out


def test_a_sync_that_changes_a_twins_upstream_function_says_so(tree, tmp_path, capsys):
    record_twins(tree, {"tail": digest_of('def tail():\n    return "tail"\n')})
    source = build_source(tmp_path / "new", {ALPHA: ALPHA_NEW_CLEAN, BETA: BETA_BASE})
    status, out, _ = run_tool(capsys, *sync_args(tree, source))
    assert status == 0, out
    assert f"upstream's tail (overlay/{ALPHA}) changed" in out
    assert digest_of('def tail():\n    return "TAIL"\n') in out


# --- real releases ----------------------------------------------------------------------------


def independent_merge(fork_body, base, new, tmp):
    """Run ``git merge-file -p --diff3`` here, apart from the tool: (merged, conflicts)."""
    paths = []
    for name, data in (("ours", fork_body), ("base", base), ("theirs", new)):
        path = tmp / name
        path.write_bytes(data)
        paths.append(str(path))
    proc = subprocess.run(["git", "merge-file", "-p", "--diff3", *paths], capture_output=True)
    assert 0 <= proc.returncode < 127, proc.stderr
    return proc.stdout, proc.returncode


def expected_report(root, wheel, tmp):
    """Compute each module's expected status straight from the files and the wheel."""
    manifest = manifest_of(root)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        expected, merged = {}, {}
        for module, entry in manifest["modules"].items():
            path = entry["path"]
            if entry.get("overlay_only"):
                stem = module.replace(".", "/")
                clash = any(
                    n == stem + ".py" or (n.startswith(stem + "/") and n.endswith(".py"))
                    for n in names
                )
                expected[path] = ("clash" if clash else "overlay-only", 0)
                continue
            if path not in names:
                expected[path] = ("deleted", 0)
                continue
            new = zf.read(path)
            fork = (root / "overlay" / path).read_bytes()
            body = fork.split(b"\n", 1)[1]
            base = (root / "upstream_base" / path).read_bytes()
            out, conflicts = independent_merge(body, base, new, tmp)
            if conflicts:
                expected[path] = ("conflict", conflicts)
            elif out == new:
                expected[path] = ("identical", 0)
            else:
                expected[path] = ("unchanged" if base == new else "merged", 0)
            merged[path] = out
    return expected, merged


def test_real_rebase_onto_0_5_22(tmp_path, capsys):
    root = tmp_path / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".pending")
    shutil.copytree(REPO / "overlay", root / "overlay", ignore=skip)
    shutil.copytree(REPO / "upstream_base", root / "upstream_base", ignore=skip)
    before = manifest_of(root)
    if before["base_version"] == REAL_TARGET:
        pytest.skip(f"the overlay is already based on sglang {REAL_TARGET}")
    base_before = snapshot(root / "upstream_base")

    wheel = sync_upstream.fetch_wheel(REAL_TARGET, str(WHEEL_CACHE))
    work = tmp_path / "merge"
    work.mkdir()
    expected, merged = expected_report(root, wheel, work)

    status, report = run_json(
        capsys, "--to", REAL_TARGET, "--root", root, "--cache-dir", WHEEL_CACHE
    )
    print(json.dumps(report["files"], indent=2))
    assert statuses(report) == expected
    clean_states = ("unchanged", "merged", "identical", "overlay-only")
    clean = all(state in clean_states for state, _ in expected.values())
    assert status == (0 if clean else 1)

    for path, (state, _) in expected.items():
        if state not in ("unchanged", "merged", "identical"):
            continue
        source = (root / "overlay" / path).read_bytes()
        first, body = source.split(b"\n", 1)
        assert first.decode().startswith(f"# OVERLAY: provenance: sglang {REAL_TARGET} {path},")
        assert body == merged[path]
        compile(source, str(path), "exec")

    after = manifest_of(root)
    if clean:
        assert after["base_version"] == REAL_TARGET
        with zipfile.ZipFile(wheel) as zf:
            for entry in after["modules"].values():
                if not entry.get("overlay_only"):
                    data = zf.read(entry["path"])
                    assert (root / "upstream_base" / entry["path"]).read_bytes() == data
                    assert entry["base_sha256"] == hashlib.sha256(data).hexdigest()
        assert sync_upstream.main(["--check", "--root", str(root)]) == 0
    else:
        assert after == before
        assert settled(root / "upstream_base") == base_before


def test_real_rebase_follows_a_moved_fork(tmp_path, capsys):
    """sglang 0.5.22 with the weight updater moved one package up: found by content, followed."""
    root = tmp_path / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".pending")
    shutil.copytree(REPO / "overlay", root / "overlay", ignore=skip)
    shutil.copytree(REPO / "upstream_base", root / "upstream_base", ignore=skip)
    old = "sglang/srt/model_executor/model_runner_components/weight_updater.py"
    new = "sglang/srt/model_executor/weight_updater.py"
    if module_name(old) not in manifest_of(root)["modules"] or manifest_of(root)["base_version"] == REAL_TARGET:
        pytest.skip("the overlay no longer forks the weight updater from another release")
    write(root / "tests" / "user.py", f"from {module_name(old)} import WeightUpdater\n")
    wheel = sync_upstream.fetch_wheel(REAL_TARGET, str(WHEEL_CACHE))
    source = tmp_path / "release"
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("sglang/") and (name.endswith(".py") or name.endswith("/__init__.py")):
                target = source / (new if name == old else name)
                write(target, zf.read(name))
    expected, _ = independent_merge(
        (root / "overlay" / old).read_bytes().split(b"\n", 1)[1],
        (root / "upstream_base" / old).read_bytes(),
        (source / new).read_bytes(),
        tmp_path,
    )

    status, report = run_json(capsys, "--to", REAL_TARGET, "--root", root, "--source", source)
    assert status == 0, report
    (moved,) = [f for f in report["files"] if f["path"] == new]
    assert moved["status"] == "moved" and moved["moved_from"] == {"module": module_name(old), "path": old}
    assert any(f"tests/user.py:1: {module_name(old)} -> {module_name(new)}" in s for s in report["next_steps"])
    first, body = (root / "overlay" / new).read_bytes().split(b"\n", 1)
    assert first.decode().startswith(f"# OVERLAY: provenance: sglang {REAL_TARGET} {new},")
    assert body == expected
    assert not (root / "overlay" / old).exists() and not (root / "upstream_base" / old).exists()
    assert (root / "upstream_base" / new).read_bytes() == (source / new).read_bytes()
    assert manifest_of(root)["modules"][module_name(new)]["path"] == new
    assert sync_upstream.main(["--check", "--root", str(root)]) == 0
