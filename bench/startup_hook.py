"""Start-up cost of the overlay hook: `python -c pass` with the hook vs with SGLANG_FASTLOAD=0.

Both contenders run interleaved in one run (same machine state); prints medians and the
difference. Usage: python bench/startup_hook.py [--runs N]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time


def time_once(env) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    on = dict(os.environ)
    on.pop("SGLANG_FASTLOAD", None)
    off = dict(on, SGLANG_FASTLOAD="0")
    # The off switch is checked in the .pth line itself, before anything is imported.
    with_hook, without = [], []
    for _ in range(5):
        time_once(on), time_once(off)
    for _ in range(args.runs):
        with_hook.append(time_once(on))
        without.append(time_once(off))
    m_on, m_off = statistics.median(with_hook), statistics.median(without)
    print(f"python -c pass, {args.runs} runs each, interleaved ({sys.executable})")
    print(f"  hook installed (default):   median {m_on * 1e3:.2f} ms")
    print(f"  SGLANG_FASTLOAD=0:          median {m_off * 1e3:.2f} ms")
    print(f"  hook cost:                  {(m_on - m_off) * 1e3:+.2f} ms ({m_on / m_off:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
