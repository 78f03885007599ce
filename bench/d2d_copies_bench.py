"""Many device-to-device copies out of one scratch: one ``cudaMemcpyAsync`` each, or torch's
fused ``_foreach_copy_`` over views (bytes, or wider words where every copy allows).

    python3 bench/d2d_copies_bench.py [--copies 4096 --mib 5 --repeats 3]

A start-up stream's scratch is copied into the parameters by thousands of such copies (a
16-layer Qwen3-30B-A3B: ~4,200 of ~5 MB). This times, for the same copies (sources in
order, destinations shuffled, like experts scattered into stacked parameters), the CPU time
to make views and queue them, and the time until the device has finished. Ways alternate
within each repeat. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=4096)
    p.add_argument("--mib", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    from sglang_fastload.loader import cuda_runtime

    runtime = cuda_runtime.runtime()
    n = int(args.mib * (1 << 20)) // 8 * 8
    total = n * args.copies
    src = torch.empty(total, dtype=torch.uint8, device="cuda")
    dst = torch.empty(total, dtype=torch.uint8, device="cuda")
    src.random_(0, 256)
    slots = list(range(args.copies))
    random.Random(1).shuffle(slots)
    pairs = [(slot * n, i * n) for i, slot in enumerate(slots)]  # (dst offset, src offset)
    stream = torch.cuda.current_stream()
    handle = stream.cuda_stream

    def by_runtime():
        base_d, base_s = dst.data_ptr(), src.data_ptr()
        t0 = time.perf_counter()
        for d, s in pairs:
            runtime.copy_within_device(base_d + d, base_s + s, n, handle)
        return 0.0, time.perf_counter() - t0

    def foreach(dtype):
        def run():
            t0 = time.perf_counter()
            d_words, s_words = dst.view(dtype), src.view(dtype)
            w = n // d_words.element_size()
            ds = [d_words.narrow(0, d // d_words.element_size(), w) for d, _ in pairs]
            ss = [s_words.narrow(0, s // s_words.element_size(), w) for _, s in pairs]
            t1 = time.perf_counter()
            torch._foreach_copy_(ds, ss)
            return t1 - t0, time.perf_counter() - t1
        return run

    ways = {"runtime-memcpy": by_runtime, "foreach-u8": foreach(torch.uint8), "foreach-i16": foreach(torch.int16),
            "foreach-i64": foreach(torch.int64)}
    want = src.view(torch.int64)[pairs[7][1] // 8:pairs[7][1] // 8 + 16].clone()
    rows = {name: [] for name in ways}
    for r in range(args.repeats + 1):  # the first round warms up (not kept)
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            dst.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            views_s, issue_s = ways[name]()
            torch.cuda.synchronize()
            end = time.perf_counter() - t0
            got = dst.view(torch.int64)[pairs[7][0] // 8:pairs[7][0] // 8 + 16]
            assert torch.equal(got, want), name
            if r:
                rows[name].append({"views_s": round(views_s, 4), "issue_s": round(issue_s, 4), "total_s": round(end, 4),
                                   "gbps": round(total / end / 1e9, 1)})
    print(f"{args.copies} copies of {n / 2**20:.2f} MiB ({total / 1e9:.1f} GB), {torch.cuda.get_device_name()}")
    summary = {}
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("views_s", "issue_s", "total_s", "gbps")}
        summary[name] = {"median": med, "runs": rs}
        print(f"{name:16s} views {med['views_s']:.4f} s  queue {med['issue_s']:.4f} s  until done {med['total_s']:.4f} s"
              f"  ({med['gbps']:.0f} GB/s)")
    out = args.out or os.path.join(os.environ.get("OUT", "."), "d2d_copies.json")
    with open(out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "copies": args.copies, "bytes_each": n, "ways": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
