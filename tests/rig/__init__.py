"""CPU test rig: real SGLang 0.5.23 on a CPU-only machine (see /work/shared/notes/cpu-rig.md).

* ``tests.rig.checkpoints`` - tiny random Qwen3 / Qwen3-MoE / Llama / Qwen2 checkpoints + an oracle
* ``tests.rig.inprocess``   - load/update SGLang's real model classes, one process per rank
* ``tests.rig.server``      - a real ``sglang.launch_server`` on CPU as a context manager
* ``tests.rig.install_standins`` / ``gpu_import_standins_for_tests`` - TEST-ONLY GPU-import stand-ins
"""
