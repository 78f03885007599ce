"""Command line: ``python -m sglang_fastload {status,install-pth,uninstall-pth}``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import site
import sys
import sysconfig
from typing import List, Optional

from sglang_fastload import _guard, _hook, constants, pth_files


def _site_dirs() -> List[str]:
    dirs = []
    try:
        dirs.extend(site.getsitepackages())
    except AttributeError:
        pass
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        dirs.append(user)
    dirs.append(sysconfig.get_paths()["purelib"])
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def installed_pth_files() -> List[str]:
    """Return every ``sglang_fastload.pth`` this interpreter's site directories hold."""
    return [
        os.path.join(d, constants.PTH_NAME)
        for d in _site_dirs()
        if os.path.isfile(os.path.join(d, constants.PTH_NAME))
    ]


def _upstream_file(pkg_dir: Optional[str], rel_path: str) -> Optional[str]:
    if pkg_dir is None:
        return None
    return os.path.join(os.path.dirname(pkg_dir), *rel_path.split("/"))


def status(out=sys.stdout) -> int:
    """Print whether the overlay is active here and why; return 0 when active.

    Does not import sglang: it reads the installed files and asks the overlay's finder.
    """
    import json

    root = _hook.overlay_root()
    enabled = os.environ.get(constants.ENV_ENABLE, "1").strip() != "0"
    finder = _hook.installed_finder()
    pth = installed_pth_files()
    spec = importlib.util.find_spec("sglang")
    pkg_dir = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
    manifest = json.load(open(os.path.join(root, constants.MANIFEST_NAME))) if root else None
    installed = _guard.installed_sglang_version()

    if not enabled:
        active, why = False, f"{constants.ENV_ENABLE}=0 turns the overlay off"
    elif root is None:
        active, why = False, "the overlay tree is missing from this installation"
    elif finder is None:
        active, why = False, (
            "the start-up hook is not installed in this interpreter "
            "(no .pth: run `python -m sglang_fastload install-pth`, or started with -S)"
        )
    elif pkg_dir is None:
        active, why = False, "sglang is not installed"
    else:
        if "sglang" not in sys.modules:
            # The guard locates upstream through the sglang package; find it without importing.
            _guard_pkg = pkg_dir
            active, why = _guard.check_installed_sglang_at(manifest, _guard_pkg)
        else:
            active, why = finder.verdict()

    print(f"sglang-fastload overlay: {'ACTIVE' if active else 'INACTIVE'} ({why})", file=out)
    print(f"  sglang installed: {installed}   overlay base: {manifest['base_version'] if manifest else '?'}", file=out)
    print(f"  overlay tree: {root}", file=out)
    print(f"  .pth installed: {', '.join(pth) if pth else 'no'}", file=out)
    auto_fast = os.environ.get(constants.ENV_AUTO_MEANS_FAST, "").strip() == "1"
    print(
        f"  --load-format auto: {'served by fast for the models fast supports' if auto_fast else 'upstream'}"
        f" ({constants.ENV_AUTO_MEANS_FAST}={'1' if auto_fast else 'unset'})",
        file=out,
    )
    from sglang_fastload.loader import plan_store_location

    print(f"  load plan store: {plan_store_location.describe()}", file=out)
    snapshot = os.environ.get(constants.ENV_UPDATE_SNAPSHOT, "").strip() == "1"
    print(
        f"  host snapshot before updates: {'on' if snapshot else 'off'}"
        f" ({constants.ENV_UPDATE_SNAPSHOT}={'1' if snapshot else 'unset'})",
        file=out,
    )
    if manifest:
        print("  modules:", file=out)
        for name, entry in sorted(manifest["modules"].items()):
            target = os.path.join(root, *entry["path"].split("/")) if active else _upstream_file(pkg_dir, entry["path"])
            print(f"    {name} -> {target}", file=out)
    return 0 if active else 1


def install_pth(out=sys.stdout) -> int:
    """Write the .pth and .start files into this interpreter's site-packages (editable installs)."""
    target = sysconfig.get_paths()["purelib"]
    for name, text in ((constants.PTH_NAME, pth_files.PTH_LINE), (constants.START_NAME, pth_files.START_LINE)):
        path = os.path.join(target, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}", file=out)
    return 0


def uninstall_pth(out=sys.stdout) -> int:
    """Remove the .pth and .start files from this interpreter's site directories."""
    removed = 0
    for d in _site_dirs():
        for name in (constants.PTH_NAME, constants.START_NAME):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                os.remove(path)
                print(f"removed {path}", file=out)
                removed += 1
    if not removed:
        print("no sglang-fastload start-up files found", file=out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m sglang_fastload`` and ``sglang-fastload``."""
    parser = argparse.ArgumentParser(prog="python -m sglang_fastload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="is the overlay active in this environment, and why")
    sub.add_parser("install-pth", help="install the start-up hook (.pth/.start) for editable installs")
    sub.add_parser("uninstall-pth", help="remove the start-up hook files")
    args = parser.parse_args(argv)
    return {"status": status, "install-pth": install_pth, "uninstall-pth": uninstall_pth}[args.command]()
