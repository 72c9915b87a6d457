"""One summary table from the long-format CSVs of a results folder.

    python bench/summary.py [DIR]   (default bench/results)

For each (op, variant, shape, dtype, mode) of the latest run on each device: provider, ms,
speed-up vs torch.compile (else eager), peak MiB, card.
"""
from __future__ import annotations

import csv
import glob
import os
import sys
from collections import OrderedDict


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results")
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            # only the benchmarks' long-format files (the suite's steps.csv and gpu_check.csv
            # live in the same folder with other columns)
            if not {"op", "provider", "mode", "shape", "ms"} <= set(reader.fieldnames or ()):
                continue
            rows += list(reader)
    if not rows:
        print(f"no benchmark rows in {folder}")
        return 1
    latest = {}
    for r in rows:  # keep the newest measurement of each key
        key = (r["op"], r.get("variant", ""), r["shape"], r["dtype"], r["mode"], r["provider"],
               r["device"])
        if key not in latest or r["time"] >= latest[key]["time"]:
            latest[key] = r
    groups = OrderedDict()
    for key, r in latest.items():
        groups.setdefault(key[:5] + (key[6],), {})[r["provider"]] = r
    print("| op | variant | shape | dtype | mode | provider | ms | vs torch.compile | vs eager "
          "| peak MiB | card |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (op, variant, shape, dtype, mode, dev), provs in groups.items():
        comp = provs.get("compile")
        eager = provs.get("eager")
        for p, r in sorted(provs.items()):
            ms = float(r["ms"])
            vc = f"{float(comp['ms']) / ms:.2f}x" if comp else "-"
            ve = f"{float(eager['ms']) / ms:.2f}x" if eager else "-"
            print(f"| {op} | {variant} | {shape} | {dtype} | {mode} | {p} | {ms:.3f} | {vc} | {ve} "
                  f"| {r['peak_mib']} | {dev} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
