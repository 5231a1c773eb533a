"""Prints the rows of `ioattn bench features` JSON files side by side: one column of TFLOPs/s per file (named by
its position, the files listed first), a row per (impl, mode, head dim, feature, seqlen).
Usage: feature_table.py A.json [B.json ...]."""
import json
import sys


def main() -> None:
    files = sys.argv[1:]
    tables = []
    for path in files:
        with open(path) as f:
            rows = json.load(f)["rows"]
        tables.append({(r["impl"], r["mode"], r["headdim"], r["feature"], r["seqlen"]): r["tflops"] for r in rows})
    for i, path in enumerate(files):
        print(f"[{i}] {path}")
    print(f"{'impl':8} {'mode':12} {'d':>3} {'feature':14} {'seqlen':>6} | " + " | ".join(f"{f'[{i}]':>7}"
                                                                                   for i in range(len(files))))
    for key in sorted({k for t in tables for k in t}):
        cells = [f"{t[key]:7.1f}" if key in t else f"{'-':>7}" for t in tables]
        print(f"{key[0]:8} {key[1]:12} {key[2]:3} {key[3]:14} {key[4]:6} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
