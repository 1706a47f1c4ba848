#!/usr/bin/env python3
"""Charts the JSON that `simulate --json FILE` writes.

    plot_simulation.py sharegpt.json shared-prefix.json multi-turn.json [-o simulation.png]

One row of panels per file (per trace): KV memory waste and peak concurrent sequences for every
configuration, and the prefill tokens that prefix caching saved as a share of what an ideal
cache (unlimited memory, token granularity) would save. Needs matplotlib only.
"""
import argparse
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt

COLORS = {"contiguous": "tab:gray", "paged": "tab:blue", "paged+prefix": "tab:green"}


def label(row):
    if row["policy"] == "contiguous":
        return f"contiguous\n{row['block_tokens']}"
    return f"{row['policy'].replace('+', chr(10) + '+')}\nB={row['block_tokens']}"


def bars(axis, rows, values, title, text_format):
    positions = range(len(rows))
    axis.bar(positions, values, color=[COLORS.get(row["policy"], "tab:orange") for row in rows])
    axis.set_xticks(list(positions), [label(row) for row in rows], fontsize=7)
    axis.set_title(title, fontsize=9)
    for position, value in zip(positions, values):
        axis.annotate(text_format.format(value), (position, value), ha="center", va="bottom", fontsize=7)
    axis.margins(y=0.15)


def plot_trace(axes, rows):
    first = rows[0]
    trace = f"{first['trace']} ({first['requests']} requests, {first['budget_gib']:g} GiB)"
    bars(axes[0], rows, [100 * row["waste_fraction"] for row in rows], f"{trace}\nKV memory waste %", "{:.1f}")
    bars(axes[1], rows, [row["peak_sequences"] for row in rows], "peak concurrent sequences", "{:d}")
    prefix = [row for row in rows if row["policy"] == "paged+prefix"]
    fractions = [row["saved_fraction_of_ideal"] for row in prefix]
    if prefix and all(fraction is not None and not math.isnan(fraction) for fraction in fractions):
        bars(axes[2], prefix, [100 * fraction for fraction in fractions],
             "prefill saved, % of ideal cache", "{:.1f}")
        axes[2].set_ylim(0, 110)
    else:
        axes[2].set_axis_off()
        axes[2].text(0.5, 0.5, "no shared prefixes in this trace", ha="center", va="center", fontsize=9)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="files written by simulate --json")
    parser.add_argument("-o", "--output", default="simulation.png", help="PNG to write")
    arguments = parser.parse_args()

    traces = []
    for path in arguments.json:
        with open(path) as file:
            rows = json.load(file)
        if not rows:
            sys.exit(f"error: {path} holds no configuration")
        traces.append(rows)

    figure, axes = plt.subplots(len(traces), 3, figsize=(15, 4 * len(traces)), squeeze=False)
    for row_axes, rows in zip(axes, traces):
        plot_trace(row_axes, rows)
    figure.tight_layout()
    figure.savefig(arguments.output, dpi=120)
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
