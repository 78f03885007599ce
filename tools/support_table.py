"""Print the README's model support table from the test results (and a CPU speed measurement).

    .venv/bin/python -m pytest -q tests/loader/test_model_support.py   # writes the results
    .venv/bin/python tools/support_table.py --measure                  # CPU update speed per class
    .venv/bin/python tools/support_table.py                            # prints the table

The correctness columns come from ``.cache/model_support/results-<layout>.json``, which
``tests/loader/test_model_support.py`` writes on every run: a cell says "yes" only when that
run found start-up (or update) parameters bit-identical to upstream's ``auto`` on every rank
with the fast plan used on every rank. ``--measure`` loads a small release-shaped checkpoint
(``SPEED_SIZES``) of every fast class at TP=1 with both loaders (`auto` in upstream's own
SGLang, the overlay off; `fast` with it), one process each, updates it A -> B -> A ... and
records the median update seconds of a second round (``speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / ".cache" / "model_support"
LAYOUTS = (("tp1", "TP=1"), ("tp2", "TP=2"), ("tp2-ep2", "TP=2, EP=2"))


def _load(name: str) -> dict:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else {}


def _cell(row: dict, what: str) -> str:
    fast = row.get("fast") or {}
    if not row or "crash" in fast or "crash" in (row.get("auto") or {}):
        return "fails" if row else "-"
    ran_fast = fast.get("fallback_lines") == 0 and fast.get("fast_lines") == 2 * len(fast.get("errors") or [])
    return "yes" if row.get(f"{what}_identical") and ran_fast else "NO"


def measure(updates: int = 6) -> dict:
    """Median update seconds of ``auto`` and ``fast`` per fast class (TP=1, one process)."""
    sys.path.insert(0, str(ROOT))
    from sglang_fastload.model_support import SUPPORT_TABLE
    from tests.rig.inprocess import CaseSpec, load_cases_beside_upstream
    from tests.rig.model_zoo import SPEED_SIZES, write_zoo_checkpoint
    from tests.rig.checkpoints import checkpoint_bytes

    entries = [e for e in SUPPORT_TABLE if e.fast]
    out = {}
    with tempfile.TemporaryDirectory(prefix="support-speed-") as tmp:
        cases, keys, sizes = [], [], {}
        for e in entries:
            a = write_zoo_checkpoint(e.zoo, Path(tmp) / f"{e.zoo}-a", seed=1, sizes=SPEED_SIZES)
            b = write_zoo_checkpoint(e.zoo, Path(tmp) / f"{e.zoo}-b", seed=2, sizes=SPEED_SIZES)
            sizes[e.zoo] = checkpoint_bytes(a)
            chain = [b, a] * (updates // 2)
            for fmt in ("auto", "fast"):
                cases.append(CaseSpec(a, fmt, chain))
                keys.append((e.zoo, fmt))
        # Two rounds in each loader's process; only the second is kept (the first warms up code
        # paths, thread pools and the page cache, which otherwise favour whichever class runs last).
        results = dict(zip(keys, load_cases_beside_upstream(cases * 2, tp_size=1, timeout=1800, env={"OMP_NUM_THREADS": "1"})[len(cases):]))
    for e in entries:
        row = {"bytes": sizes[e.zoo]}
        for fmt in ("auto", "fast"):
            res = results[(e.zoo, fmt)]
            if isinstance(res, str) or res[0].error is not None:
                row[fmt] = None
                continue
            row[fmt] = statistics.median(res[0].timings["update_s"])
        out[e.zoo] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


def table() -> str:
    """The support table as Markdown."""
    sys.path.insert(0, str(ROOT))
    from sglang_fastload.model_support import SUPPORT_TABLE

    results = {layout: _load(f"results-{layout}.json") for layout, _ in LAYOUTS}
    speed = _load("speed.json")
    head = ["Architecture", "fast"]
    for _, title in LAYOUTS:
        head += [f"{title} start-up", f"{title} update"]
    head += ["CPU update speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for e in SUPPORT_TABLE:
        cells = [f"`{e.architecture}`", "yes" if e.fast else "falls back"]
        for layout, _ in LAYOUTS:
            row = results[layout].get(e.zoo, {}) if e.fast and e.zoo else {}
            if layout == "tp2-ep2" and not e.moe:
                cells += ["n/a", "n/a"]
            else:
                cells += [_cell(row, "startup"), _cell(row, "update")] if e.fast else ["upstream", "upstream"]
        s = speed.get(e.zoo) if e.fast else None
        if s and s.get("auto") and s.get("fast"):
            cells.append(f"{s['auto'] / s['fast']:.1f}x ({s['bytes'] / 1e6:.0f} MB)")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
        if not e.fast:
            notes.append(f"* `{e.architecture}`: {e.reason}.")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="measure CPU update speed first (a few minutes)")
    parser.add_argument("--updates", type=int, default=6, help="updates per loader for --measure")
    args = parser.parse_args(argv)
    if not any(RESULTS.glob("results-*.json")):
        print(f"no test results in {RESULTS}: run tests/loader/test_model_support.py first", file=sys.stderr)
        return 1
    if args.measure:
        measure(args.updates)
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    sys.exit(main())
