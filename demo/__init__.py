"""The sglang-fastload demo: fast vs upstream ``/update_weights_from_disk`` on a real CPU server.

Run it with ``ci/demo`` (sets up ``.venv`` first) or ``.venv/bin/python -m demo``; see
``ci/demo --help`` and ``demo/run_demo.py``.
"""
