"""Which loader SGLang's ``get_model_loader`` hands out, decided at the top of that function.

Two jobs:
- ``--load-format fast`` (and ``auto`` when ``SGLANG_FASTLOAD_AUTO_MEANS_FAST=1``) gets the
  fast loader;
- during a weight update, upstream builds its ``LoadConfig`` without the server's
  ``--model-loader-extra-config``: the keys the chosen loader accepts are filled in, so
  updates read the way start-up did, and a key meant for another loader never reaches one
  that would reject it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

from sglang.srt.configs.load_config import LoadConfig, LoadFormat

from sglang_fastload import constants

logger = logging.getLogger(__name__)

# Keys upstream's default loader accepts, per format (upstream's _validate_default_loader_extra_config).
_DEFAULT_LOADER_KEYS = frozenset({"enable_multithread_load", "num_threads"})
_DEFAULT_LOADER_FORMATS = {
    LoadFormat.AUTO: _DEFAULT_LOADER_KEYS,
    LoadFormat.SAFETENSORS: _DEFAULT_LOADER_KEYS,
    LoadFormat.PT: _DEFAULT_LOADER_KEYS,
    LoadFormat.FASTSAFETENSORS: _DEFAULT_LOADER_KEYS | {"enable_gds"},
}


def auto_means_fast() -> bool:
    """True when ``SGLANG_FASTLOAD_AUTO_MEANS_FAST=1`` maps ``auto`` to ``fast``."""
    return os.environ.get(constants.ENV_AUTO_MEANS_FAST, "").strip() == "1"


def serves_fast(load_format) -> bool:
    """Whether ``load_format`` is loaded by the fast loader in this process."""
    return load_format == LoadFormat.FAST or (load_format == LoadFormat.AUTO and auto_means_fast())


def accepted_extra_keys(load_format) -> Optional[frozenset]:
    """Extra-config keys the loader of ``load_format`` accepts; None when unknown (forward none)."""
    if serves_fast(load_format):
        from sglang_fastload.loader.fast_model_loader import EXTRA_CONFIG_KEYS

        return frozenset(EXTRA_CONFIG_KEYS)
    return _DEFAULT_LOADER_FORMATS.get(load_format)


def fill_update_extra_config(load_config: LoadConfig, server_extra: Optional[dict], server_format=None) -> None:
    """Give an update's load config the server's extra-config keys its loader accepts.

    Args:
        load_config: the config upstream built for the update (changed in place).
        server_extra: the server's ``--model-loader-extra-config``.
        server_format: the server's start-up load format: its loader accepted every key, so
            an update in the same format gets them all (some loaders, e.g. instanttensor,
            take options of their own).
    """
    if load_config.model_loader_extra_config or not server_extra:
        return
    fmt = load_config.load_format
    if isinstance(server_format, str):
        server_format = LoadFormat(server_format.lower())
    if fmt == server_format or (serves_fast(fmt) and serves_fast(server_format)):
        load_config.model_loader_extra_config = dict(server_extra)
        return
    keys = accepted_extra_keys(fmt)
    if keys:
        load_config.model_loader_extra_config = {k: v for k, v in server_extra.items() if k in keys}


def fast_loader_for(load_config: LoadConfig):
    """The loader ``get_model_loader`` must return for ``load_config``, or None for upstream's choice.

    During a weight update (see ``update_guard``) this also fills in the server's extra config.

    Args:
        load_config: the config SGLang asks a loader for.

    Returns:
        A ``FastModelLoader``, or None when upstream's dispatch decides.
    """
    from sglang_fastload import update_guard

    update = update_guard.current_update()
    if update is not None:
        update.loader_requested = True
        fill_update_extra_config(load_config, update.server_extra_config, update.server_load_format)
    if not serves_fast(load_config.load_format):
        return None
    from sglang_fastload.loader.fast_model_loader import FastModelLoader

    return FastModelLoader(load_config)


def dispatch_first(upstream_get_model_loader, module_logger):
    """Wrap SGLang's ``get_model_loader`` so ``fast_loader_for`` decides first.

    Args:
        upstream_get_model_loader: upstream's function.
        module_logger: the forked module's logger (the overlay's "active" notice goes there,
            proving the overlay is live in the process that loads weights).

    Returns:
        The function to bind in its place, with the same signature.
    """

    @functools.wraps(upstream_get_model_loader)
    def get_model_loader(load_config, model_config=None):
        from sglang_fastload.overlay_notice import log_overlay_active_once

        log_overlay_active_once(module_logger)
        loader = fast_loader_for(load_config)
        if loader is not None:
            return loader
        return upstream_get_model_loader(load_config, model_config)

    return get_model_loader
