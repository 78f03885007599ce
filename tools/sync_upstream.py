#!/usr/bin/env python3
"""Rebase the overlay's forks onto another sglang release, and check the overlay tree.

Every forked module has three versions: the pristine upstream file of the release the fork
was made from (``upstream_base/<path>``, recorded in ``overlay/manifest.json``), our fork
(``overlay/<path>``) and the same file in the target release. ``--to VERSION`` three-way
merges each fork (``git merge-file --diff3``) and reports, per file, what happened. The
manifest and ``upstream_base/`` advance only once every file merged cleanly, either in the
same run or on ``--continue`` after the conflicts were resolved by hand.

Usage::

    python tools/sync_upstream.py --to 0.5.24              # fetch with pip, merge, report
    python tools/sync_upstream.py --to 0.5.24 --dry-run    # report only, write nothing
    python tools/sync_upstream.py --to 0.5.24 --wheel sglang-0.5.24-....whl   # offline
    python tools/sync_upstream.py --to 0.5.24 --source ~/src/sglang/python    # offline
    python tools/sync_upstream.py --to 0.5.24 --moved sglang.srt.a=sglang/srt/b/a.py
                                                           # confirm where a module moved
    python tools/sync_upstream.py --continue               # after resolving conflicts
    python tools/sync_upstream.py --abort                  # undo an unfinished sync
    python tools/sync_upstream.py --check                  # CI: manifest, bases, provenance

When a forked file is gone from the target release, the tool looks for where it went by
content (difflib similarity with the pristine base, over every .py file of the release).
One clear match is followed: the fork is merged onto the file at its new path and, once the
sync finishes, the fork, its pristine base and its manifest entry (which is also the start-up
hook's module map) move there. Anything less clear stops the sync with the candidates and
the exact ``--moved`` command that confirms one.

Exit status: 0 when everything is clean; 1 when the sync stopped (conflicts, a deleted
upstream file, a module clash), ``--continue`` refused, or ``--check`` found problems;
2 on usage errors or when the release or the tree cannot be used.

Standard library only; needs ``git`` on PATH for ``git merge-file``.
"""

import argparse
import ast
import dataclasses
import difflib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

EXIT_OK = 0
EXIT_STOPPED = 1
EXIT_ERROR = 2

TOOL = "python tools/sync_upstream.py"
MANIFEST = "overlay/manifest.json"
OVERLAY_DIR = "overlay"
BASE_DIR = "upstream_base"
# Unfinished-sync state. Kept out of overlay/ because setup.py ships that whole tree.
PENDING_DIR = "upstream_base/.pending"
STATE_FILE = "state.json"
PENDING_NEW = "new"  # the target release's files, one per forked module
PENDING_ORIG = "orig"  # forks and manifest as they were before the sync (for --abort)
PENDING_MODULES = "release_modules.txt"  # every module name the target release defines

OURS_LABEL = "sglang-fastload overlay"
PROVENANCE_RE = re.compile(
    r"^# OVERLAY: provenance: sglang (?P<version>\S+) (?P<path>[^\s,]+),"
)
MARKER_RE = re.compile(rb"^(<{7}|\|{7}|>{7})(?: |\r?$)", re.MULTILINE)
OPEN_MARKER_RE = re.compile(rb"^<{7}(?: |\r?$)", re.MULTILINE)
VERSION_FILE_RE = re.compile(
    r"^__version__\s*=\s*(?:version\s*=\s*)?['\"](?P<version>[^'\"]+)['\"]", re.MULTILINE
)
# Places that pin the sglang release the project is built against.
PIN_FILES = ("setup.py", "pyproject.toml", "ci/*")
PIN_RE = r"(?:sglang==|SGLANG_VERSION:-|SGLANG_VERSION=){version}(?![\w.])"

# Report statuses. CLEAN ones let the manifest advance.
UNCHANGED = "unchanged"
MERGED = "merged"
IDENTICAL = "identical"
OVERLAY_ONLY = "overlay-only"
CONFLICT = "conflict"
DELETED = "deleted"
CLASH = "clash"
MOVED = "moved"
CLEAN_STATUSES = (UNCHANGED, MERGED, IDENTICAL, OVERLAY_ONLY, MOVED)
STATUS_LABELS = {
    UNCHANGED: "unchanged upstream",
    MERGED: "merged cleanly",
    IDENTICAL: "fork == upstream",
    OVERLAY_ONLY: "overlay-only",
    CONFLICT: "CONFLICTS",
    DELETED: "DELETED upstream",
    CLASH: "CLASH",
    MOVED: "moved, merged cleanly",
}

# Following a moved file: the release file most similar to the pristine base (difflib
# ratio over stripped lines) is taken when it reaches MOVE_SURE_RATIO and beats the
# runner-up by MOVE_MARGIN; files above MOVE_HINT_RATIO are offered as candidates.
MOVE_SURE_RATIO = 0.6
MOVE_MARGIN = 0.15
MOVE_HINT_RATIO = 0.2
MOVE_PREFILTER = 8  # candidates ranked by shared lines before the (slower) difflib ratio


class SyncError(Exception):
    """A problem that stops the tool before it changes anything (exit status 2)."""


@dataclasses.dataclass
class FileResult:
    """What a sync does to one manifest module.

    Attributes:
        module: dotted module name (manifest key).
        path: package-relative path, e.g. ``sglang/srt/models/qwen3.py``.
        status: one of the status constants above.
        conflicts: number of conflict hunks (status ``conflict`` only).
        note: one extra line for the report (may be empty).
        merged: the new fork bytes, provenance line included (None when nothing to write).
        new: the target release's file bytes (None when the release lacks it).
        moved_from: ``(old module, old path)`` when upstream moved the file to ``path``.
        candidates: ``[(path, similarity, contained)]`` where a deleted file may have gone.
    """

    module: str
    path: str
    status: str
    conflicts: int = 0
    note: str = ""
    merged: bytes = None
    new: bytes = None
    moved_from: tuple = None
    candidates: list = dataclasses.field(default_factory=list)

    @property
    def old_path(self):
        """The path the fork has before this sync (differs from ``path`` after a move)."""
        return self.moved_from[1] if self.moved_from else self.path

    def as_dict(self):
        """Return the JSON-able part of the result."""
        data = {
            "module": self.module,
            "path": self.path,
            "status": self.status,
            "conflicts": self.conflicts,
            "note": self.note,
        }
        if self.moved_from:
            data["moved_from"] = {"module": self.moved_from[0], "path": self.moved_from[1]}
        if self.candidates:
            data["candidates"] = [
                {"path": p, "similarity": round(r, 3), "contained": round(c, 3)}
                for p, r, c in self.candidates
            ]
        return data


# --- small helpers ----------------------------------------------------------------------------


def default_root():
    """Return the repository root: the parent of this file's ``tools/`` folder."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_cache_dir():
    """Return the wheel cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sglang-fastload", "wheels")


def sha256_bytes(data):
    """Return the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path):
    """Return a file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_bytes(path, data):
    """Write ``data`` to ``path``, creating parent folders."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def rel_file(root, *parts):
    """Return ``root`` joined with slash-separated ``parts``."""
    pieces = []
    for part in parts:
        pieces.extend(part.split("/"))
    return os.path.join(root, *pieces)


def load_manifest(root):
    """Read ``overlay/manifest.json`` under ``root``.

    Raises:
        SyncError: when it is missing or malformed.
    """
    path = rel_file(root, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise SyncError(f"{path} not found; is --root the sglang-fastload checkout?")
    except json.JSONDecodeError as exc:
        raise SyncError(f"{path} is not valid JSON: {exc}")
    if not isinstance(manifest.get("base_version"), str) or not isinstance(
        manifest.get("modules"), dict
    ):
        raise SyncError(f"{path} needs a string 'base_version' and a 'modules' object")
    return manifest


def dump_manifest(manifest):
    """Return the manifest's canonical text: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def write_manifest(root, manifest):
    """Write the manifest in its canonical form."""
    write_bytes(rel_file(root, MANIFEST), dump_manifest(manifest).encode("utf-8"))


def module_paths(module):
    """Return the two files that can define a dotted module: ``a/b.py`` and ``a/b/__init__.py``."""
    stem = module.replace(".", "/")
    return stem + ".py", stem + "/__init__.py"


def path_module(path):
    """Return the dotted module name a ``.py`` path defines (None for other files)."""
    if not path.endswith(".py"):
        return None
    stem = path[: -len(".py")]
    if stem.endswith("/__init__"):
        stem = stem[: -len("/__init__")]
    return stem.replace("/", ".")


def split_provenance(data):
    """Split a fork into its provenance line and the rest.

    Returns:
        ``(line, body)`` where ``line`` is the decoded first line without its newline when
        it is a provenance line, else ``(None, data)``.
    """
    end = data.find(b"\n")
    first = data if end < 0 else data[: end + 1]
    try:
        text = first.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return None, data
    if PROVENANCE_RE.match(text):
        return text, data[len(first):]
    return None, data


def provenance_version(line):
    """Return ``(version, path)`` named by a provenance line."""
    match = PROVENANCE_RE.match(line)
    return match.group("version"), match.group("path")


def with_version(line, version, path=None):
    """Return the provenance line naming ``version`` (and ``path``, if given) instead."""
    match = PROVENANCE_RE.match(line)
    path = match.group("path") if path is None else path
    return line[: match.start("version")] + version + " " + path + line[match.end("path"):]


def provenance_bytes(line, newline=b"\n"):
    """Return a provenance line as the bytes that start a fork."""
    return line.encode("utf-8") + newline


def count_conflicts(data):
    """Return how many conflict hunks (``<<<<<<<`` lines) ``data`` holds."""
    return len(OPEN_MARKER_RE.findall(data))


def has_markers(data):
    """Return True when ``data`` contains any merge conflict marker line."""
    return MARKER_RE.search(data) is not None


def tool_command(root, *args):
    """Return the command line a user should run next (with ``--root`` when not default)."""
    parts = [TOOL]
    if os.path.abspath(root) != default_root():
        parts += ["--root", root]
    return " ".join(parts + list(args))


# --- the merge --------------------------------------------------------------------------------


def merge_file(current, base, other, labels):
    """Three-way merge with ``git merge-file -p --diff3``.

    Args:
        current: our side (the fork without its provenance line).
        base: the common ancestor (pristine upstream file of the recorded release).
        other: their side (the target release's file).
        labels: three conflict-marker labels: ours, base, theirs.

    Returns:
        ``(merged bytes, number of conflicts)``.

    Raises:
        SyncError: when git is missing or ``git merge-file`` fails.
    """
    git = shutil.which("git")
    if git is None:
        raise SyncError("git is not on PATH; it is needed for `git merge-file`")
    with tempfile.TemporaryDirectory(prefix="sglang-fastload-merge-") as tmp:
        names = []
        for name, data in (("current", current), ("base", base), ("other", other)):
            path = os.path.join(tmp, name)
            write_bytes(path, data)
            names.append(path)
        cmd = [git, "merge-file", "-p", "--diff3"]
        for label in labels:
            cmd += ["-L", label]
        proc = subprocess.run(cmd + names, cwd=tmp, capture_output=True)
    # The exit status is the number of conflicts (capped at 127), negative on error.
    if proc.returncode < 0 or proc.returncode > 127:
        raise SyncError(
            f"git merge-file failed ({proc.returncode}): "
            f"{proc.stderr.decode('utf-8', 'replace').strip()}"
        )
    conflicts = proc.returncode
    if conflicts == 127:
        conflicts = max(127, count_conflicts(proc.stdout))
    return proc.stdout, conflicts


# --- releases ---------------------------------------------------------------------------------


class DirRelease:
    """A release given as a folder that contains the ``sglang/`` package tree."""

    def __init__(self, directory, version):
        self.directory = os.path.abspath(directory)
        self.version = version
        self.origin = f"source {self.directory}"
        if not os.path.isfile(os.path.join(self.directory, "sglang", "__init__.py")):
            raise SyncError(
                f"--source {directory} has no sglang/__init__.py; pass the folder that "
                "contains the sglang/ package (e.g. <sglang checkout>/python)"
            )

    def read(self, path):
        """Return the bytes of package-relative ``path`` or None."""
        return read_bytes(rel_file(self.directory, path))

    def paths(self):
        """Return every file path under ``sglang/``, slash-separated."""
        found = []
        top = os.path.join(self.directory, "sglang")
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, self.directory).replace(os.sep, "/")
            found.extend(f"{rel}/{name}" for name in filenames)
        return sorted(found)

    def python_files(self):
        """Yield ``(path, bytes)`` of every ``.py`` file under ``sglang/``."""
        for path in self.paths():
            if path.endswith(".py"):
                yield path, self.read(path)


class WheelRelease:
    """A release given as an sglang wheel (a zip with ``sglang/`` at its root)."""

    def __init__(self, wheel, version):
        self.wheel = os.path.abspath(wheel)
        self.version = version
        self.origin = f"wheel {self.wheel}"
        try:
            with zipfile.ZipFile(self.wheel) as zf:
                self._names = {n for n in zf.namelist() if not n.endswith("/")}
        except (OSError, zipfile.BadZipFile) as exc:
            raise SyncError(f"cannot read wheel {wheel}: {exc}")
        if "sglang/__init__.py" not in self._names:
            raise SyncError(f"{wheel} has no sglang/__init__.py; is it an sglang wheel?")

    def read(self, path):
        """Return the bytes of package-relative ``path`` or None."""
        if path not in self._names:
            return None
        with zipfile.ZipFile(self.wheel) as zf:
            return zf.read(path)

    def paths(self):
        """Return every file path under ``sglang/``."""
        return sorted(n for n in self._names if n.startswith("sglang/"))

    def python_files(self):
        """Yield ``(path, bytes)`` of every ``.py`` file under ``sglang/`` (one zip open)."""
        with zipfile.ZipFile(self.wheel) as zf:
            for path in self.paths():
                if path.endswith(".py"):
                    yield path, zf.read(path)


def release_modules(paths):
    """Return every dotted module name defined by ``paths``, parent packages included."""
    modules = set()
    for path in paths:
        module = path_module(path)
        while module:
            modules.add(module)
            module = module.rpartition(".")[0]
    return modules


def release_version(release):
    """Return the version the release's ``sglang/_version.py`` declares, or None."""
    data = release.read("sglang/_version.py")
    if data is None:
        return None
    match = VERSION_FILE_RE.search(data.decode("utf-8", "replace"))
    return match.group("version") if match else None


def wheel_version(wheel):
    """Return the version in an sglang wheel's file name, or None."""
    match = re.match(r"sglang-([^-]+)-", os.path.basename(wheel))
    return match.group(1) if match else None


def find_cached_wheel(version, cache_dir):
    """Return a cached ``sglang-VERSION-*.whl`` from ``cache_dir``, or None."""
    hits = sorted(glob.glob(os.path.join(glob.escape(cache_dir), f"sglang-{version}-*.whl")))
    return hits[0] if hits else None


def fetch_wheel(version, cache_dir):
    """Return the path of the sglang ``version`` wheel, downloading it with pip if needed.

    Raises:
        SyncError: when pip cannot get a wheel.
    """
    cached = find_cached_wheel(version, cache_dir)
    if cached:
        return cached
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", cache_dir, f"sglang=={version}",
    ]
    print(f"fetching sglang {version}: {' '.join(cmd[2:])}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    cached = find_cached_wheel(version, cache_dir)
    if proc.returncode != 0 or not cached:
        raise SyncError(
            f"pip could not download sglang=={version} into {cache_dir}:\n"
            f"{(proc.stderr or proc.stdout).strip()}\n"
            "Offline? Pass --wheel PATH or --source DIR (a folder containing sglang/)."
        )
    return cached


def open_release(args):
    """Return the release to sync to, from ``--source``, ``--wheel`` or a download.

    Raises:
        SyncError: on conflicting options or a release whose version is not ``--to``.
    """
    version = args.to
    if args.wheel:
        named = wheel_version(args.wheel)
        if named and named != version:
            raise SyncError(f"--wheel {args.wheel} is sglang {named}, not --to {version}")
        release = WheelRelease(args.wheel, version)
    elif args.source:
        release = DirRelease(args.source, version)
    else:
        release = WheelRelease(fetch_wheel(version, args.cache_dir or default_cache_dir()), version)
    declared = release_version(release)
    if declared is not None and declared != version:
        raise SyncError(f"{release.origin} declares sglang {declared}, not --to {version}")
    return release


# --- checking the tree ------------------------------------------------------------------------


def forked(entry):
    """Return True when a manifest entry is a fork of an upstream file."""
    return not entry.get("overlay_only")


def check_module(root, base_version, module, entry, fork_versions=None):
    """Return the problems of one manifest module (empty list when it is fine).

    ``fork_versions`` lists the versions a provenance line may name (default: only
    ``base_version``; an unfinished sync also allows its target).
    """
    fork_versions = fork_versions or (base_version,)
    problems = []
    path = entry.get("path")
    if not isinstance(path, str) or not path.endswith(".py"):
        return [f"{module}: manifest entry needs a 'path' to a .py file"]
    if path not in module_paths(module):
        problems.append(f"{module}: path {path} does not define module {module}")
    fork = read_bytes(rel_file(root, OVERLAY_DIR, path))
    if fork is None:
        problems.append(f"{module}: overlay/{path} is missing")
    if not forked(entry):
        return problems
    base = read_bytes(rel_file(root, BASE_DIR, path))
    if base is None:
        problems.append(f"{module}: pristine base upstream_base/{path} is missing")
    elif entry.get("base_sha256") != sha256_bytes(base):
        problems.append(
            f"{module}: upstream_base/{path} has sha256 {sha256_bytes(base)}, the manifest "
            f"records {entry.get('base_sha256')} (the base copy must be the pristine sglang "
            f"{base_version} file)"
        )
    if fork is not None:
        line, _ = split_provenance(fork)
        if line is None:
            problems.append(
                f"{module}: overlay/{path} does not start with its provenance line "
                f"'# OVERLAY: provenance: sglang {base_version} {path}, ...'"
            )
        else:
            named_version, named_path = provenance_version(line)
            if named_version not in fork_versions:
                problems.append(
                    f"{module}: overlay/{path} provenance names sglang {named_version}, "
                    f"the manifest's base is {base_version}"
                )
            if named_path != path:
                problems.append(f"{module}: overlay/{path} provenance names {named_path}")
        if has_markers(fork):
            problems.append(f"{module}: overlay/{path} contains merge conflict markers")
    return problems


def stray_base_files(root, manifest):
    """Return ``upstream_base/`` .py files that no manifest fork owns."""
    owned = {e.get("path") for e in manifest["modules"].values() if forked(e)}
    top = rel_file(root, BASE_DIR)
    stray = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), top).replace(os.sep, "/")
            if name.endswith(".py") and rel not in owned:
                stray.append(rel)
    return sorted(stray)


def check_tree(root, manifest=None, fork_versions=None):
    """Return every problem of the overlay tree (empty list when consistent).

    Checks that each fork's pristine base copy exists and matches the manifest's sha256,
    that each fork starts with a provenance line naming the manifest's base version and
    holds no conflict markers, and that no base copy is left without a manifest entry.
    """
    manifest = manifest or load_manifest(root)
    problems = []
    for module, entry in sorted(manifest["modules"].items()):
        problems.extend(
            check_module(root, manifest["base_version"], module, entry, fork_versions)
        )
    for path in stray_base_files(root, manifest):
        problems.append(f"upstream_base/{path} belongs to no manifest module; delete it")
    return problems


# The package's record of upstream functions answered by faster twins (sglang_fastload/
# module_walks.py, idle_restores.py): qualified name -> sha256 of the source each was written from.
CONSTANTS = "sglang_fastload/constants.py"
TWIN_SOURCES = "UPSTREAM_WALK_SOURCES"


def recorded_twin_sources(root):
    """Return ``{function name: sha256}`` from the package's constants (empty without them)."""
    data = read_bytes(rel_file(root, CONSTANTS))
    if data is None:
        return {}
    for node in ast.parse(data).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == TWIN_SOURCES for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def function_digests(data):
    """Return ``{qualified name: sha256 of its source text}`` for each top-level function and
    each method of a top-level class ("Class.method") of a module's bytes, the text being the
    lines ``inspect.getsource`` reads (decorators to body end)."""
    lines = data.decode("utf-8").splitlines(keepends=True)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    found = []
    for node in ast.parse(data).body:
        if isinstance(node, functions):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            found.extend((f"{node.name}.{item.name}", item) for item in node.body if isinstance(item, functions))
    out = {}
    for name, node in found:
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        out[name] = sha256_bytes("".join(lines[start - 1:node.end_lineno]).encode("utf-8"))
    return out


def changed_twins(root, manifest):
    """Return one line per upstream function whose twin no longer matches the fork's source."""
    recorded = recorded_twin_sources(root)
    if not recorded:
        return []
    found = {}
    unreadable = False  # a fork with conflict markers: its functions cannot be told apart
    for entry in manifest["modules"].values():
        data = read_bytes(rel_file(root, OVERLAY_DIR, entry.get("path", "")))
        if forked(entry) and data is not None:
            try:
                digests = function_digests(data)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                unreadable = True
                continue
            for name, digest in digests.items():
                if name in recorded:
                    found[name] = (entry["path"], digest)
    lines = []
    for name, digest in sorted(recorded.items()):
        if name not in found:
            if unreadable:
                continue
            lines.append(f"{name} is in no fork any more: remove its twin from "
                         f"sglang_fastload/ (module_walks.py, idle_restores.py) and its entry from {CONSTANTS}")
        elif found[name][1] != digest:
            lines.append(
                f"upstream's {name} (overlay/{found[name][0]}) changed: bring its twin in "
                f"sglang_fastload/ (module_walks.py, idle_restores.py) up to date, then record sha256 {found[name][1]} "
                f"in {CONSTANTS} ({TWIN_SOURCES}); until then servers keep upstream's function"
            )
    return lines


# --- planning a sync --------------------------------------------------------------------------


def _lines(data):
    """Return the stripped, non-blank lines of a file (what similarity is measured on)."""
    text = data.decode("utf-8", "replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def rank_moves(base, release, exclude=()):
    """Rank the release's ``.py`` files by how much they look like ``base``.

    Args:
        base: the pristine upstream file of the recorded release (the file that is gone).
        release: the target release.
        exclude: paths that cannot be the new home (already forked elsewhere).

    Returns:
        ``[(path, similarity, contained)]``, best first: similarity is difflib's ratio in
        [0, 1], contained the share of the base's lines found in the file (high when the
        module was merged into a bigger one); only files above ``MOVE_HINT_RATIO`` in one
        of the two.
    """
    base_lines = _lines(base)
    base_set = set(base_lines)
    if not base_set:
        return []
    shared = []
    for path, data in release.python_files():
        if path in exclude or data is None:
            continue
        lines = _lines(data)
        common = len(base_set.intersection(lines))
        if common:
            score = common / max(len(base_set), len(set(lines)))
            shared.append((score, common / len(base_set), path, lines))
    ranked = []
    for _, contained, path, lines in sorted(shared, key=lambda item: (-item[0], item[2]))[:MOVE_PREFILTER]:
        ratio = difflib.SequenceMatcher(None, base_lines, lines).ratio()
        if ratio >= MOVE_HINT_RATIO:
            ranked.append((path, ratio, contained))
    listed = {path for path, _, _ in ranked}
    for _, contained, path, _ in sorted(shared, key=lambda item: (-item[1], item[2]))[:3]:
        if path not in listed and contained >= MOVE_SURE_RATIO:
            ranked.append((path, 0.0, contained))
    return sorted(ranked, key=lambda item: (-item[1], -item[2], item[0]))


def sure_move(ranked):
    """Return the one path ``ranked`` clearly points at, or None when it is not clear."""
    ranked = [(path, ratio) for path, ratio, _ in ranked]
    if not ranked or ranked[0][1] < MOVE_SURE_RATIO:
        return None
    if len(ranked) > 1 and ranked[0][1] - ranked[1][1] < MOVE_MARGIN:
        return None
    return ranked[0][0]


def plan_fork(root, module, entry, release, from_version, taken=(), moved_to=None):
    """Merge one fork in memory and return its :class:`FileResult`.

    Args:
        taken: paths of the other forks (a moved file cannot land on one of them).
        moved_to: the new path confirmed with ``--moved`` (None: find it if needed).
    """
    path = entry["path"]
    fork = read_bytes(rel_file(root, OVERLAY_DIR, path))
    base = read_bytes(rel_file(root, BASE_DIR, path))
    new = None if moved_to else release.read(path)
    moved_from, ranked, new_path = None, [], path
    if new is None:
        if moved_to is None:
            ranked = rank_moves(base, release, exclude=set(taken))
            moved_to = sure_move(ranked)
        if moved_to is None:
            hints = ", ".join(
                f"{p} ({r:.0%} similar)" if r else f"{p} (holds {c:.0%} of its lines)"
                for p, r, c in ranked[:3]
            )
            note = "maybe moved to: " + hints if hints else "no similar file left"
            return FileResult(module, path, DELETED, note=note, candidates=ranked[:3])
        new = release.read(moved_to)
        moved_from, new_path = (module, path), moved_to
        module = path_module(moved_to)
    line, body = split_provenance(fork)
    newline = b"\r\n" if fork.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    labels = (OURS_LABEL, f"sglang {from_version}", f"sglang {release.version}")
    merged_body, conflicts = merge_file(body, base, new, labels)
    merged = provenance_bytes(with_version(line, release.version, new_path), newline) + merged_body
    move_note = ""
    if moved_from:
        similarity = {p: r for p, r, _ in ranked}.get(new_path)
        how = f", {similarity:.0%} similar" if similarity is not None else ", confirmed with --moved"
        move_note = f"moved from {path}{how}"
    result = dict(merged=merged, new=new, moved_from=moved_from, candidates=ranked[:3])
    if conflicts:
        return FileResult(module, new_path, CONFLICT, conflicts, move_note, **result)
    if merged_body == new:
        note = "the fork has no changes" if body == base else "upstream now has our changes"
        note += "; the fork can go"
        return FileResult(module, new_path, IDENTICAL, 0, "; ".join(filter(None, (move_note, note))), **result)
    if moved_from:
        return FileResult(module, new_path, MOVED, 0, move_note, **result)
    status = UNCHANGED if base == new else MERGED
    return FileResult(module, new_path, status, 0, "", **result)


def plan_overlay_only(module, entry, modules_upstream):
    """Return the :class:`FileResult` of an overlay-only module (clash or fine)."""
    path = entry["path"]
    if module in modules_upstream:
        return FileResult(module, path, CLASH, note=f"upstream now defines {module}")
    return FileResult(module, path, OVERLAY_ONLY, note="no upstream file")


def plan_sync(root, manifest, release, moves=None):
    """Merge every manifest module in memory; write nothing.

    Args:
        moves: ``{module: new path}`` confirmed with ``--moved``.

    Returns:
        ``(results, release module names)``.

    Raises:
        SyncError: when a ``--moved`` entry names an unknown module or a missing file.
    """
    moves = dict(moves or {})
    for module, new_path in moves.items():
        if module not in manifest["modules"] or not forked(manifest["modules"][module]):
            raise SyncError(f"--moved {module}=...: {module} is not a fork in {MANIFEST}")
        if release.read(new_path) is None or path_module(new_path) is None:
            raise SyncError(f"--moved {module}={new_path}: sglang {release.version} has no such .py file")
    modules_upstream = release_modules(release.paths())
    taken = [e["path"] for e in manifest["modules"].values()]
    results = []
    for module, entry in sorted(manifest["modules"].items()):
        if forked(entry):
            results.append(
                plan_fork(root, module, entry, release, manifest["base_version"], taken,
                          moves.get(module))
            )
        else:
            results.append(plan_overlay_only(module, entry, modules_upstream))
    return results, modules_upstream


def is_clean(results):
    """Return True when every result lets the manifest advance."""
    return all(r.status in CLEAN_STATUSES for r in results)


# --- reporting --------------------------------------------------------------------------------


def report_lines(results):
    """Return one report line per module."""
    lines = []
    for r in results:
        label = STATUS_LABELS[r.status]
        if r.status == CONFLICT:
            label += f" ({r.conflicts})"
        line = f"  {label:<22} {r.path}"
        if r.note:
            line += f"  ({r.note})"
        lines.append(line)
    return lines


def stale_pins(root, version):
    """Return ``file: text`` for each place that still pins sglang ``version``."""
    pattern = re.compile(PIN_RE.format(version=re.escape(version)))
    hits = []
    for spec in PIN_FILES:
        for path in sorted(glob.glob(os.path.join(glob.escape(root), spec))):
            if not os.path.isfile(path):
                continue
            for rel, number, match in _matching_lines(path, pattern, root):
                hits.append(f"{rel}:{number}: {match.group(0)}")
    return hits


def _matching_lines(path, pattern, root):
    """Yield ``(path relative to root, line number, match)`` for each line ``pattern`` matches."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            match = pattern.search(text)
            if match:
                yield rel, number, match


def removal_steps(results):
    """Return next-step lines for forks that became identical to upstream."""
    steps = []
    for r in results:
        if r.status == IDENTICAL:
            steps.append(
                f"The fork of {r.module} now equals upstream, so it can go: delete its "
                f"entry from {MANIFEST} and run `git rm overlay/{r.path} "
                f"upstream_base/{r.path}`."
            )
    return steps


def move_steps(root, results):
    """Return next-step lines for forks that followed a moved upstream file."""
    steps = []
    for r in results:
        if r.moved_from and r.status != DELETED:
            steps.append(
                f"{r.moved_from[0]} moved upstream to {r.module}: the fork, its base copy and "
                f"its {MANIFEST} entry (the start-up hook's module map) follow it to {r.path}."
            )
    for hit in stale_references(root, results):
        steps.append(f"Update the old module name: {hit}")
    return steps


def finished_steps(root, old_version, new_version, results):
    """Return the next steps after the manifest advanced to ``new_version``."""
    steps = move_steps(root, results) + removal_steps(results) + changed_twins(root, load_manifest(root))
    if old_version == new_version:
        return steps or [f"Nothing to do: the overlay is already based on sglang {new_version}."]
    steps.append("Review the result: git diff -- overlay upstream_base")
    for pin in stale_pins(root, old_version):
        steps.append(f"Pin sglang {new_version} instead of {old_version}: {pin}")
    if os.path.isfile(rel_file(root, "ci/setup_env.sh")):
        steps.append(
            f"Rebuild and reinstall the wheel against the new release: "
            f"SGLANG_VERSION={new_version} ci/setup_env.sh"
        )
    else:
        steps.append(
            f"Reinstall: pip install sglang=={new_version} && pip install --force-reinstall ."
        )
    steps.append("Run the tests: python -m pytest")
    steps.append(
        f'Commit: git add overlay upstream_base && git commit -m "Rebase overlay onto sglang '
        f'{new_version}"'
    )
    return steps


def stopped_steps(root, new_version, results, args=None):
    """Return the next steps after a sync that stopped with problems."""
    steps = move_steps(root, results)
    conflicted = [r for r in results if r.status == CONFLICT]
    if conflicted:
        files = ", ".join(f"overlay/{r.path} ({r.conflicts})" for r in conflicted)
        steps.append(
            f"Resolve the conflict markers (<<<<<<< ||||||| ======= >>>>>>>) in: {files}. "
            "Keep our OVERLAY-fenced changes on top of the new upstream code; leave the "
            "provenance line as it is."
        )
    steps.extend(deleted_steps(root, new_version, results, args))
    for r in results:
        if r.status == CLASH:
            steps.append(
                f"sglang {new_version} now defines {r.module}, our overlay-only module at "
                f"overlay/{r.path}. Rename ours (move the file, fix its {MANIFEST} entry "
                "and its imports) or turn it into a fork of the new upstream file."
            )
    steps.extend(removal_steps(results))
    steps.append(f"Then run: {tool_command(root, '--continue')}")
    steps.append(f"To undo this sync instead: {tool_command(root, '--abort')}")
    return steps


def deleted_steps(root, new_version, results, args=None):
    """Return next-step lines for forks whose upstream file is gone with no clear new home."""
    steps = []
    for r in results:
        if r.status == DELETED:
            if r.candidates and args is not None:
                confirm = tool_command(
                    root, *release_args(args), "--moved", f"{r.module}={r.candidates[0][0]}"
                )
                steps.append(
                    f"sglang {new_version} has no {r.path}; no file is clearly its new home "
                    f"({r.note}). If it moved to {r.candidates[0][0]}, confirm it (first run "
                    f"`{tool_command(root, '--abort')}` if this sync is pending): {confirm}"
                )
            steps.append(
                f"sglang {new_version} has no {r.path} ({r.note}). Drop the fork: delete "
                f"{r.module} from {MANIFEST} and `git rm overlay/{r.path}`; re-fork the "
                "module from its new location afterwards if it still needs our changes."
            )
    return steps


def emit(args, header, results, footer, steps, extra=None):
    """Print the report as text, or as one JSON object with ``--json``."""
    if args.json:
        payload = {
            "summary": header,
            "files": [r.as_dict() for r in results],
            "result": footer,
            "next_steps": steps,
        }
        payload.update(extra or {})
        print(json.dumps(payload, indent=2, sort_keys=True))
        return
    print(header)
    for line in report_lines(results):
        print(line)
    print(footer)
    if steps:
        print("Next steps:")
        for number, step in enumerate(steps, 1):
            print(f"  {number}. {step}")


# --- pending state ----------------------------------------------------------------------------


def pending_dir(root):
    """Return the folder that holds an unfinished sync's state."""
    return rel_file(root, PENDING_DIR)


def load_state(root):
    """Return the unfinished sync's state, or None when no sync is in progress."""
    path = os.path.join(pending_dir(root), STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_pending(root, manifest, results, release, modules_upstream):
    """Store what ``--continue`` and ``--abort`` need: targets, new files, originals."""
    top = pending_dir(root)
    if os.path.isdir(top):
        shutil.rmtree(top)
    for r in results:
        if r.new is not None:
            write_bytes(rel_file(top, PENDING_NEW, r.path), r.new)
        original = read_bytes(rel_file(root, OVERLAY_DIR, r.old_path))
        if original is not None:
            write_bytes(rel_file(top, PENDING_ORIG, OVERLAY_DIR, r.old_path), original)
    write_bytes(
        rel_file(top, PENDING_ORIG, MANIFEST), read_bytes(rel_file(root, MANIFEST))
    )
    write_bytes(
        os.path.join(top, PENDING_MODULES),
        "".join(m + "\n" for m in sorted(modules_upstream)).encode("utf-8"),
    )
    state = {
        "from_version": manifest["base_version"],
        "to_version": release.version,
        "origin": release.origin,
        "files": [r.as_dict() for r in results],
    }
    write_bytes(
        os.path.join(top, STATE_FILE),
        (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    )


def write_forks(root, results):
    """Write every merged fork (clean or with conflict markers) into ``overlay/``.

    A fork whose upstream file moved is written at the new path and removed from the old.
    """
    for r in results:
        if r.merged is not None:
            write_bytes(rel_file(root, OVERLAY_DIR, r.path), r.merged)
            if r.moved_from:
                old = rel_file(root, OVERLAY_DIR, r.old_path)
                if os.path.isfile(old):
                    os.remove(old)


def follow_moves(manifest, results):
    """Rename the manifest entries of moved forks (module name and path).

    The manifest is also the start-up hook's module map, so the overlay then serves the
    fork under its new module name. Returns the old paths, whose base copies must go.
    """
    old_paths = []
    for r in results:
        if r.moved_from and r.merged is not None:
            old_module, old_path = r.moved_from
            entry = manifest["modules"].pop(old_module)
            entry["path"] = r.path
            manifest["modules"][r.module] = entry
            old_paths.append(old_path)
    return old_paths


def stale_references(root, results):
    """Return ``file:line: name`` for project files that still name a moved module.

    Looks at the project's own .py/.md/.toml/.cfg files, not at the forks or base copies.
    """
    names = {}
    for r in results:
        if r.moved_from:
            old_module, old_path = r.moved_from
            names[old_module] = r.module
            names[old_path] = r.path
    if not names:
        return []
    pattern = re.compile("|".join(re.escape(n) + r"(?![\w/])" for n in sorted(names, key=len, reverse=True)))
    skip = {OVERLAY_DIR, BASE_DIR, "build", "dist", "node_modules"}
    hits = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d != "__pycache__" and not d.endswith(".egg-info")
            and not (rel_dir == "." and d in skip)
        )
        for name in sorted(filenames):
            if not name.endswith((".py", ".md", ".toml", ".cfg", ".txt", ".sh")):
                continue
            path = os.path.join(dirpath, name)
            for rel, number, match in _matching_lines(path, pattern, root):
                hits.append(f"{rel}:{number}: {match.group(0)} -> {names[match.group(0)]}")
    return hits


def advance(root, manifest, version, new_files, dropped=()):
    """Move the manifest and ``upstream_base/`` to ``version``.

    Args:
        manifest: the manifest to update (its forked entries get new sha256s).
        version: the new base version.
        new_files: ``{path: bytes}`` of the new release for every forked module.
        dropped: paths of forks removed from the manifest during the sync, whose base
            copies are deleted.
    """
    for entry in manifest["modules"].values():
        if forked(entry):
            data = new_files[entry["path"]]
            write_bytes(rel_file(root, BASE_DIR, entry["path"]), data)
            entry["base_sha256"] = sha256_bytes(data)
    for path in dropped:
        base = rel_file(root, BASE_DIR, path)
        if os.path.isfile(base):
            os.remove(base)
    manifest["base_version"] = version
    write_manifest(root, manifest)


# --- commands ---------------------------------------------------------------------------------


def cmd_check(args):
    """``--check``: verify manifest, base copies, provenance lines and the twins' sources."""
    root = args.root
    manifest = load_manifest(root)
    state = load_state(root)
    versions = None
    if state is not None:
        # Forks merged by the unfinished sync already name its target.
        versions = (manifest["base_version"], state["to_version"])
    problems = check_tree(root, manifest, versions) + changed_twins(root, manifest)
    if state is not None:
        problems.insert(
            0,
            f"a sync to sglang {state['to_version']} is unfinished; resolve it and run "
            f"`{tool_command(root, '--continue')}` (or `{tool_command(root, '--abort')}`)",
        )
    if problems:
        print(f"sglang-fastload overlay check: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return EXIT_STOPPED
    count = len(manifest["modules"])
    print(
        f"sglang-fastload overlay check: OK ({count} module(s), base sglang "
        f"{manifest['base_version']})"
    )
    return EXIT_OK


def release_args(args):
    """Return the options that name the release, to repeat them in a suggested command."""
    extra = ["--to", args.to]
    for option, value in (("--wheel", args.wheel), ("--source", args.source),
                          ("--cache-dir", args.cache_dir)):
        if value:
            extra += [option, value]
    for move in args.moved or ():
        extra += ["--moved", move]
    return extra


def parse_moves(values):
    """Return ``{module: new path}`` from ``--moved MODULE=PATH`` options.

    Raises:
        SyncError: on a value without ``=``.
    """
    moves = {}
    for value in values or ():
        module, sep, path = value.partition("=")
        if not sep or not module or not path.endswith(".py"):
            raise SyncError(f"--moved {value}: expected MODULE=PATH, e.g. "
                            "sglang.srt.old.name=sglang/srt/new/name.py")
        moves[module.strip()] = path.strip()
    return moves


def cmd_sync(args):
    """``--to``: merge every fork onto the target release; advance if all is clean."""
    root = args.root
    state = load_state(root)
    if state is not None:
        raise SyncError(
            f"a sync to sglang {state['to_version']} is unfinished; resolve it and run "
            f"`{tool_command(root, '--continue')}`, or undo it with "
            f"`{tool_command(root, '--abort')}`"
        )
    manifest = load_manifest(root)
    problems = check_tree(root, manifest)
    if problems:
        raise SyncError(
            "the overlay tree is inconsistent; fix this first (see "
            f"`{tool_command(root, '--check')}`):\n  - " + "\n  - ".join(problems)
        )
    release = open_release(args)
    old = manifest["base_version"]
    results, modules_upstream = plan_sync(root, manifest, release, parse_moves(args.moved))
    header = (
        f"sglang-fastload: rebasing the overlay from sglang {old} onto sglang "
        f"{release.version} ({release.origin})"
    )
    clean = is_clean(results)
    if args.dry_run:
        footer = "Dry run: nothing was written. " + (
            "The sync would be clean."
            if clean
            else "The sync would stop; see the files in capitals above."
        )
        command = tool_command(root, *release_args(args))
        steps = [f"To do it: {command}"] + move_steps(root, results)
        steps += deleted_steps(root, release.version, results, args) + removal_steps(results)
        emit(args, header, results, footer, steps, {"clean": clean})
        return EXIT_OK if clean else EXIT_STOPPED
    if clean:
        write_forks(root, results)
        dropped = follow_moves(manifest, results)
        new_files = {r.path: r.new for r in results if r.new is not None}
        advance(root, manifest, release.version, new_files, dropped)
        footer = f"Clean: {MANIFEST} and upstream_base/ now record sglang {release.version}."
        emit(args, header, results, footer, finished_steps(root, old, release.version, results),
             {"clean": True})
        return EXIT_OK
    save_pending(root, manifest, results, release, modules_upstream)  # keeps the originals
    write_forks(root, results)
    if follow_moves(manifest, results):  # --continue finds moved forks at their new paths
        write_manifest(root, manifest)
    footer = (
        f"Stopped: {MANIFEST} and upstream_base/ still record sglang {old}; "
        f"the sync to {release.version} is pending in {PENDING_DIR}/."
    )
    emit(args, header, results, footer, stopped_steps(root, release.version, results, args),
         {"clean": False})
    return EXIT_STOPPED


def continue_problems(root, manifest, version, modules_upstream):
    """Return what still blocks ``--continue`` (empty when the sync can finish)."""
    problems = []
    for module, entry in sorted(manifest["modules"].items()):
        path = entry.get("path", "")
        fork = read_bytes(rel_file(root, OVERLAY_DIR, path))
        if fork is None:
            problems.append(f"{module}: overlay/{path} is missing")
            continue
        if not forked(entry):
            if module in modules_upstream:
                problems.append(
                    f"{module}: overlay-only, but sglang {version} defines it too; rename "
                    "ours or turn it into a fork"
                )
            continue
        if read_bytes(rel_file(pending_dir(root), PENDING_NEW, path)) is None:
            problems.append(
                f"{module}: sglang {version} has no {path}; delete the module from "
                f"{MANIFEST} and `git rm overlay/{path}`"
            )
            continue
        left = count_conflicts(fork)
        if has_markers(fork):
            problems.append(
                f"{module}: overlay/{path} still has conflict markers "
                f"({left} conflict(s) left)"
            )
        line, _ = split_provenance(fork)
        if line is None or provenance_version(line)[0] != version:
            problems.append(
                f"{module}: overlay/{path} must start with the provenance line "
                f"'# OVERLAY: provenance: sglang {version} {path}, ...'"
            )
    return problems


def cmd_continue(args):
    """``--continue``: finish a sync once the conflicts are resolved."""
    root = args.root
    state = load_state(root)
    if state is None:
        start = tool_command(root, "--to VERSION")
        raise SyncError(f"no sync in progress; start one with `{start}`")
    version, old = state["to_version"], state["from_version"]
    manifest = load_manifest(root)
    with open(os.path.join(pending_dir(root), PENDING_MODULES), encoding="utf-8") as f:
        modules_upstream = {line.strip() for line in f if line.strip()}
    header = f"sglang-fastload: finishing the rebase from sglang {old} onto sglang {version}"
    problems = continue_problems(root, manifest, version, modules_upstream)
    if problems:
        advice = (
            f"Fix them, then run `{tool_command(root, '--continue')}` again "
            f"(or `{tool_command(root, '--abort')}` to undo the sync)."
        )
        if args.json:
            print(json.dumps({"summary": header, "problems": problems, "next_steps": [advice],
                              "clean": False}, indent=2, sort_keys=True))
            return EXIT_STOPPED
        print(header)
        print(f"Cannot continue yet, {len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        print(advice)
        return EXIT_STOPPED
    results, new_files = [], {}
    for module, entry in sorted(manifest["modules"].items()):
        path = entry["path"]
        if not forked(entry):
            results.append(FileResult(module, path, OVERLAY_ONLY, note="no upstream file"))
            continue
        new = read_bytes(rel_file(pending_dir(root), PENDING_NEW, path))
        new_files[path] = new
        _, body = split_provenance(read_bytes(rel_file(root, OVERLAY_DIR, path)))
        if body == new:
            results.append(FileResult(module, path, IDENTICAL, note="the fork can go"))
        else:
            results.append(FileResult(module, path, MERGED, note="resolved"))
    listed = {e["path"] for e in manifest["modules"].values()}
    known = {f["path"] for f in state["files"]}
    known |= {f["moved_from"]["path"] for f in state["files"] if f.get("moved_from")}
    dropped = sorted(known - listed)
    if args.dry_run:
        emit(args, header, results, "Dry run: nothing was written; --continue would finish "
             "the sync.", [f"To do it: {tool_command(root, '--continue')}"], {"clean": True})
        return EXIT_OK
    advance(root, manifest, version, new_files, dropped)
    shutil.rmtree(pending_dir(root))
    steps = finished_steps(root, old, version, results)
    for path in dropped:
        if os.path.exists(rel_file(root, OVERLAY_DIR, path)):
            steps.insert(0, f"overlay/{path} is no longer in the manifest: git rm overlay/{path}")
    footer = f"Done: {MANIFEST} and upstream_base/ now record sglang {version}."
    emit(args, header, results, footer, steps, {"clean": True})
    return EXIT_OK


def cmd_abort(args):
    """``--abort``: put the forks and the manifest back as they were before the sync."""
    root = args.root
    state = load_state(root)
    if state is None:
        raise SyncError("no sync in progress; nothing to abort")
    orig = rel_file(pending_dir(root), PENDING_ORIG)
    if args.dry_run:
        print(f"Dry run: --abort would restore {OVERLAY_DIR}/ and {MANIFEST} from {orig}.")
        return EXIT_OK
    for f in state["files"]:
        if f.get("moved_from"):
            written = rel_file(root, OVERLAY_DIR, f["path"])
            if os.path.isfile(written):
                os.remove(written)
    for dirpath, _, filenames in os.walk(orig):
        for name in filenames:
            source = os.path.join(dirpath, name)
            rel = os.path.relpath(source, orig)
            write_bytes(os.path.join(root, rel), read_bytes(source))
    shutil.rmtree(pending_dir(root))
    print(
        f"Aborted the sync to sglang {state['to_version']}: the forks and {MANIFEST} are "
        f"back at sglang {state['from_version']}."
    )
    return EXIT_OK


def build_parser():
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="tools/sync_upstream.py",
        description="Rebase the overlay's forks onto another sglang release (three-way "
        "merge with git merge-file), or check the overlay tree.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--to", metavar="VERSION", help="sglang release to rebase onto")
    action.add_argument("--continue", dest="cont", action="store_true",
                        help="finish a sync after resolving its conflicts")
    action.add_argument("--abort", action="store_true", help="undo an unfinished sync")
    action.add_argument("--check", action="store_true",
                        help="verify manifest hashes, base copies and provenance lines")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", metavar="PATH", help="use this sglang wheel (offline)")
    source.add_argument("--source", metavar="DIR",
                        help="use this folder containing the sglang/ package tree (offline)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=f"where downloaded wheels are kept (default {default_cache_dir()})")
    parser.add_argument("--moved", metavar="MODULE=PATH", action="append",
                        help="with --to: the forked MODULE now lives at PATH in the release "
                        "(confirms a move the tool was unsure of; repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the report, write nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--root", metavar="DIR", default=default_root(),
                        help="sglang-fastload checkout to work on (default: this repository)")
    return parser


def main(argv=None):
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.root = os.path.abspath(args.root)
    if (args.wheel or args.source or args.moved) and not args.to:
        parser.error("--wheel, --source and --moved go with --to")
    try:
        if args.check:
            return cmd_check(args)
        if args.cont:
            return cmd_continue(args)
        if args.abort:
            return cmd_abort(args)
        return cmd_sync(args)
    except SyncError as exc:
        print(f"sync_upstream: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
