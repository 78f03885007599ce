"""The version guard: is the installed sglang the exact release our forks were made from?

Imported lazily by the start-up hook on the first import of a forked module; standard
library only.
"""

import hashlib
import os
import sys

SYNC_HINT = "run `python tools/sync_upstream.py --to {installed}` in a sglang-fastload checkout"


def installed_sglang_version():
    """Return the installed sglang distribution's version, or None if unknown."""
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        return None


def upstream_package_dir():
    """Return the directory of the installed (upstream) ``sglang`` package, or None."""
    pkg = sys.modules.get("sglang")
    paths = list(getattr(pkg, "__path__", []) or [])
    if not paths:
        import importlib.util

        spec = importlib.util.find_spec("sglang")
        paths = list(spec.submodule_search_locations or []) if spec else []
    return paths[0] if paths else None


def file_sha256(path):
    """Return the hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_installed_sglang(manifest):
    """Compare the installed sglang with the overlay manifest.

    Args:
        manifest: the parsed overlay ``manifest.json``.

    Returns:
        See ``check_installed_sglang_at``.
    """
    return check_installed_sglang_at(manifest, upstream_package_dir())


def check_installed_sglang_at(manifest, pkg_dir):
    """Compare the sglang package at ``pkg_dir`` with the overlay manifest.

    Args:
        manifest: the parsed overlay ``manifest.json``.
        pkg_dir: directory of the installed ``sglang`` package (None if not installed).

    Returns:
        ``(True, "active ...")`` when version and every forked module's upstream file match,
        else ``(False, reason)`` with the reason and the command that fixes it.
    """
    base = manifest["base_version"]
    installed = installed_sglang_version()
    hint = SYNC_HINT.format(installed=installed or "INSTALLED_VERSION")
    if installed != base:
        return (
            False,
            f"installed sglang {installed} is not the overlay's base {base}; "
            f"running pure upstream. To rebase the overlay, {hint}.",
        )
    if pkg_dir is None:
        return False, "sglang is not importable; running pure upstream."
    site_dir = os.path.dirname(pkg_dir)
    for name, entry in sorted(manifest["modules"].items()):
        if entry.get("overlay_only"):
            continue
        upstream_file = os.path.join(site_dir, *entry["path"].split("/"))
        if not os.path.isfile(upstream_file):
            return False, (
                f"upstream file {upstream_file} of {name} is missing; running pure "
                f"upstream. To rebase the overlay, {hint}."
            )
        if file_sha256(upstream_file) != entry["base_sha256"]:
            return False, (
                f"upstream file {upstream_file} differs from sglang {base} "
                f"(sha256 mismatch); running pure upstream. To rebase the overlay, {hint}."
            )
    return True, f"active: sglang {installed} matches the overlay base {base}"
