#!/usr/bin/python3
"""Turns kvcache_bench's decode results (JSON) into a chart of achieved GB/s against T.

    build/default/benchmarks/kvcache_bench --benchmark_filter='Roofline|Decode/' \
        --benchmark_format=json --benchmark_out=decode.json
    benchmarks/plot_decode.py decode.json decode.png [--geometry llama3_8b]

One line per (policy, dtype, batch, threads) of the chosen geometry; the read-bandwidth
ceilings for 1 and 2 threads (measured in the same run, around each benchmark: their median)
are drawn as dashed lines.
Needs Debian's python3-matplotlib.
"""
import argparse
import json
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    with open(path) as f:
        data = json.load(f)
    for bench in data["benchmarks"]:
        # With repetitions keep the medians only; without, every run.
        if bench.get("run_type") == "aggregate" and bench.get("aggregate_name") != "median":
            continue
        yield bench


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("png")
    parser.add_argument("--geometry", default="llama3_8b")
    args = parser.parse_args()

    lines = defaultdict(list)
    ceilings = {}
    for bench in rows(args.json):
        name = bench["name"]
        if name.startswith("Decode/"):
            parts = name.split("/")  # Decode/geometry/policy/dtype/T:../batch:../threads:..
            if parts[1] != args.geometry:
                continue
            key = f"{parts[2]} {parts[3]} {parts[5]} {parts[6]}"
            lines[key].append((bench["tokens"], bench["bytes_per_second"] / 1e9))
            # Each benchmark carries the read ceiling measured around it: draw their median.
            ceilings.setdefault(int(bench["threads"]), []).append(bench["read_bytes_per_second"] / 1e9)

    fig, ax = plt.subplots(figsize=(11, 6.5))
    # Colour: policy and dtype; line: threads (solid 2, dotted 1); marker: batch (o 1, s 8).
    colours = {}
    palette = plt.get_cmap("tab10").colors
    for key in sorted(lines):
        policy, dtype, batch, threads = key.split()
        colour = colours.setdefault((policy, dtype), palette[len(colours) % len(palette)])
        points = sorted(lines[key])
        ax.plot([t for t, _ in points], [g for _, g in points], "-" if threads == "threads:2" else ":",
                color=colour, marker="o" if batch == "batch:1" else "s", markersize=4, label=key)
    ceilings = {threads: statistics.median(rates) for threads, rates in ceilings.items()}
    for threads, gbps in sorted(ceilings.items()):
        ax.axhline(gbps, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"read ceiling, {threads} thread{'s' if threads > 1 else ''}: {gbps:.1f} GB/s",
                    (0.99, gbps), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom" if threads > 1 else "top", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, max(ceilings.values(), default=1) * 1.12)
    ax.set_xlabel("context length T (tokens)")
    ax.set_ylabel("K/V bytes read per second (GB/s)")
    ax.set_title(f"CPU decode attention, {args.geometry}: achieved bandwidth vs. read ceiling (same run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=3, loc="lower center")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png} ({len(lines)} lines)")


if __name__ == "__main__":
    main()
