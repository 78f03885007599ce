"""Test-only read tracer, put on PYTHONPATH of a server under test.

When SGLANG_FASTLOAD_TEST_TRACE names a file, the process appends to it:
- "open\t<thread name>\t<file>" for every ``safetensors.safe_open`` call;
- "pool\t<max_workers>" for every thread pool that SGLang's weight iterators create
  (``sglang/srt/model_loader/weight_utils.py``),
so a test can see how many reader threads a weight load really asked for and used.
"""

import os

_trace = os.environ.get("SGLANG_FASTLOAD_TEST_TRACE")
if _trace:
    import concurrent.futures
    import sys
    import threading

    import safetensors

    def _record(line):
        with open(_trace, "a") as f:
            f.write(line + "\n")

    _real_safe_open = safetensors.safe_open

    def _traced_safe_open(filename, *args, **kwargs):
        _record(f"open\t{threading.current_thread().name}\t{filename}")
        return _real_safe_open(filename, *args, **kwargs)

    safetensors.safe_open = _traced_safe_open

    _real_pool_init = concurrent.futures.ThreadPoolExecutor.__init__

    def _traced_pool_init(self, max_workers=None, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.replace("\\", "/").endswith("sglang/srt/model_loader/weight_utils.py"):
            _record(f"pool\t{max_workers}")
        _real_pool_init(self, max_workers, *args, **kwargs)

    concurrent.futures.ThreadPoolExecutor.__init__ = _traced_pool_init
