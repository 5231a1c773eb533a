"""Prints the backward (and forward) rows of `ioattn bench features` JSON files side by side: one column of
TFLOPs/s per file, a row per (mode, head dim, feature, seqlen). Usage: feature_table.py A.json [B.json ...]."""
import json
import sys


def main() -> None:
    files = sys.argv[1:]
    tables = []
    for path in files:
        rows = json.load(open(path))["rows"]
        tables.append({(r["mode"], r["headdim"], r["feature"], r["seqlen"]): r["tflops"] for r in rows})
    keys = sorted({k for t in tables for k in t})
    print("mode headdim feature seqlen | " + " | ".join(files))
    for key in keys:
        cells = [f"{t[key]:7.1f}" if key in t else "      -" for t in tables]
        print(f"{key[0]} {key[1]} {key[2]} {key[3]} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
