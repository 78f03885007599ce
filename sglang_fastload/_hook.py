"""Start-up hook: puts the forked SGLang modules in front of upstream's, in every process.

Run from ``sglang_fastload.pth`` (and ``sglang_fastload.start`` on Python 3.15+) at interpreter
start-up. Modelled on setuptools' ``_distutils_hack``: standard library only, nothing read
or imported until a forked module is really imported, never raises, silent unless
something is wrong.

The finder answers only for the module names listed in the overlay manifest. On the first
such import it checks, once per process, that the installed sglang is the manifest's base
version and that each upstream file still has its recorded sha256; if not, the process
runs pure upstream and one warning says why and what to run.
"""

import os
import sys

from sglang_fastload import constants

# The public entry point of the .pth/.start files is ``install``: renaming it would break
# every interpreter that still has an old .pth, so it stays.
__all__ = ["install", "OverlayFinder", "overlay_root"]

_PREFIX = "sglang."


def overlay_root():
    """Return the folder holding the overlay manifest and forks, or None.

    Returns:
        The installed ``sglang_fastload/_overlay`` folder, else (source checkout or editable
        install) the repository's ``overlay`` folder, else None.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (
        os.path.join(here, constants.OVERLAY_DIR_INSTALLED),
        os.path.join(os.path.dirname(here), constants.OVERLAY_DIR_SOURCE),
    ):
        if os.path.isfile(os.path.join(candidate, constants.MANIFEST_NAME)):
            return candidate
    return None


def _warn(message):
    try:
        sys.stderr.write("sglang-fastload: " + message + "\n")
    except Exception:
        pass


class OverlayFinder:
    """A ``sys.meta_path`` finder serving overlay files for forked sglang modules only."""

    def __init__(self, root):
        self.root = root
        self._modules = None  # {dotted name: overlay file}, loaded on first sglang import
        self._verdict = None  # None = not checked yet, else (active: bool, reason: str)

    # --- lazily loaded state -------------------------------------------------------------
    def _load_manifest(self):
        import json

        with open(os.path.join(self.root, constants.MANIFEST_NAME), encoding="utf-8") as f:
            manifest = json.load(f)
        self.manifest = manifest
        self._modules = {
            name: os.path.join(self.root, *entry["path"].split("/"))
            for name, entry in manifest["modules"].items()
        }

    def modules(self):
        """Return ``{dotted module name: overlay file}`` for every forked module."""
        if self._modules is None:
            self._load_manifest()
        return self._modules

    def verdict(self):
        """Return ``(active, reason)``, checking the installed sglang once per process."""
        if self._verdict is None:
            self._verdict = self._check_upstream()
            if not self._verdict[0]:
                _warn(self._verdict[1])
        return self._verdict

    def _check_upstream(self):
        from sglang_fastload import _guard

        return _guard.check_installed_sglang(self.manifest)

    # --- the finder protocol -------------------------------------------------------------
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_PREFIX):
            return None
        try:
            if fullname in constants.LOAD_FORMAT_CHOICES_MODULES:
                return self._upstream_spec_offering_fast(fullname, path, target)
            overlay_file = self.modules().get(fullname)
            if overlay_file is None or not self.verdict()[0]:
                return None
            import importlib.util

            if os.path.basename(overlay_file) == "__init__.py":
                # A forked package keeps upstream's directory on its search path, so its
                # unforked submodules still import.
                upstream_dirs = [os.path.join(p, fullname.rpartition(".")[2]) for p in path or ()]
                return importlib.util.spec_from_file_location(
                    fullname,
                    overlay_file,
                    submodule_search_locations=[os.path.dirname(overlay_file), *upstream_dirs],
                )
            return importlib.util.spec_from_file_location(fullname, overlay_file)
        except Exception as exc:  # never break an import of upstream
            self._verdict = (False, f"overlay disabled: {exc!r}")
            _warn(self._verdict[1])
            return None

    def invalidate_caches(self):
        pass

    def _upstream_spec_offering_fast(self, fullname, path, target):
        """Upstream's own spec, whose module offers ``fast`` on the command line once run."""
        self.modules()  # the verdict needs the manifest
        if not self.verdict()[0]:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _OfferFastAfterExec(spec.loader)
                return spec
        return None


class _OfferFastAfterExec:
    """Upstream's loader of a module that defines LOAD_FORMAT_CHOICES, plus one step:
    append ``fast`` to that list right after the module ran (before any parser uses it)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        choices = getattr(module, "LOAD_FORMAT_CHOICES", None)
        if isinstance(choices, list) and constants.LOAD_FORMAT not in choices:
            choices.append(constants.LOAD_FORMAT)
        elif not isinstance(choices, list) and module.__name__ == constants.LOAD_FORMAT_CHOICES_MODULES[-1]:
            _warn(
                f"{module.__name__} has no LOAD_FORMAT_CHOICES list any more; "
                f"--load-format {constants.LOAD_FORMAT} may be refused on the command line"
            )

    def __getattr__(self, name):  # get_source, get_resource_reader, ... stay upstream's
        return getattr(self._loader, name)


def installed_finder():
    """Return the ``OverlayFinder`` installed in this process, or None."""
    for finder in sys.meta_path:
        if isinstance(finder, OverlayFinder) or type(finder).__name__ == "OverlayFinder":
            return finder
    return None


def install():
    """Install the overlay finder at the front of ``sys.meta_path`` (idempotent, never raises)."""
    try:
        if os.environ.get(constants.ENV_ENABLE, "1").strip() == "0":
            return
        if installed_finder() is not None:
            return
        root = overlay_root()
        if root is None:
            return
        already = [name for name in sys.modules if name.startswith("sglang.srt.")]
        sys.meta_path.insert(0, OverlayFinder(root))
        if already:
            _warn(
                "sglang modules were imported before the overlay was installed "
                f"({len(already)} of them); those stay upstream in this process"
            )
    except Exception as exc:
        _warn(f"start-up hook failed, running pure upstream: {exc!r}")
