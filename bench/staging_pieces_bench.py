"""The post-load staging shortcut's pieces on the GPU, per layer (host-side costs only).

    python3 bench/staging_pieces_bench.py          # on the GPU host, PYTHONPATH=/tmp/site

146 leaf modules with one small CUDA parameter each (Qwen3-8B's count of hooked layers); times,
per layer, what ``post_load_staging.py`` does around each post-load hook: the device
resolution (an index-less ``cuda`` target, as SGLang's updater passes), the device tests, the
registry walk, ``resident_on``, ``settle_on`` and the whole shortcut context (with and
without an index), next to ``torch.cuda.current_device()`` (and the private call under it)
and making a ``torch.device``.
Medians of 51 rounds, twice.
"""

from __future__ import annotations

import statistics
import time

import torch

from sglang_fastload import post_load_staging as staging

LAYERS = 146


def main() -> int:
    device = torch.device("cuda", 0)
    layers = []
    for _ in range(LAYERS):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.zeros(4, device=device), requires_grad=False)
        layers.append(layer)
    tensors = [layer.weight for layer in layers]
    context = staging.skip_staging_when_resident(None)  # every layer is resident: never called

    def timed(label, function, rounds=51):
        seconds = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - t0)
        print(f"{label:40s} {statistics.median(seconds) * 1e6 / LAYERS:.3f} us each")

    def contexts(target):
        for layer in layers:
            with context(layer, target):
                pass

    for _ in range(2):
        timed("torch.cuda.current_device()", lambda: [torch.cuda.current_device() for _ in layers])
        timed("torch._C._cuda_getDevice()", lambda: [torch._C._cuda_getDevice() for _ in layers])
        timed("torch.device('cuda', i)", lambda: [torch.device("cuda", 0) for _ in layers])
        timed("resolved_cuda(cuda)", lambda: [staging.resolved_cuda(torch.device("cuda")) for _ in layers])
        timed("is_cuda", lambda: [t.is_cuda for t in tensors])
        timed("get_device", lambda: [t.get_device() for t in tensors])
        timed("x.device == dev", lambda: [t.device == device for t in tensors])
        timed("registered_tensors", lambda: [staging.registered_tensors(m) for m in layers])
        timed("resident_on(dev)", lambda: [staging.resident_on(m, device) for m in layers])
        timed("settle_on(dev)", lambda: [staging.settle_on(m, device) for m in layers])
        timed("shortcut context (cuda, no index)", lambda: contexts(torch.device("cuda")))
        timed("shortcut context (cuda:0)", lambda: contexts(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
