"""sglang-fastload: fast, validated weight loading for SGLang through forked-module overlays.

This package imports nothing at module level: the start-up hook (``_hook``) runs in every
Python process of the environment and must stay free.
"""

__version__ = "0.1.0"
