#!/usr/bin/python3
"""Charts of the back-and-forth benchmark (docs/benchmarks.md) from its JSON results.

    npm run bench:plots        # = model check to JSON, then this script
    /usr/bin/python3 scripts/plot-benchmarks.py [results.json] [model-check.json] [out-dir]

Needs Debian's python3-matplotlib (apt-get install python3-matplotlib); no PyPI packages.
Writes wan-bytes.png, total-time.png and model-vs-measured.png into out-dir (default docs/benchmarks).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results_path = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks/backforth.json"
check_path = sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks/model-check.json"
out_dir = sys.argv[3] if len(sys.argv) > 3 else "docs/benchmarks"

results = json.load(open(results_path))
checked = json.load(open(check_path))
model = {(c["run"], c["leg"], c["path"]): c["predicted"] for c in checked}


def label(run, leg):
    ram = f'{run["memMiB"] // 1024} GiB' if run["memMiB"] >= 1024 else f'{run["memMiB"]} MiB'
    dirty = f', dirty {run["rewritePct"]}%/s' if run["rewritePct"] else ""
    if leg["leg"] == 1:
        what = "leg 1 (first)"
    else:
        what = f'leg {leg["leg"]}: {100 * leg["changedPages"] / (leg["qemuNormalPages"] + leg["qemuZeroPages"]):.0f}% changed'
    return f'{run["mbit"]} Mbit/s {run["delayMs"]} ms {ram}{dirty}\n{what}'


rows = []
for run in results["runs"]:
    by = {(l["leg"], l["path"]): l for l in run["legs"]}
    for (leg_no, path), leg in sorted(by.items()):
        if path != "bfmig":
            continue
        direct = by.get((leg_no, "direct"))
        if direct is None:
            continue
        rows.append((run, leg, direct))


def chart(metric, scale, unit, file, title, model_key):
    fig, ax = plt.subplots(figsize=(max(10, 0.42 * len(rows)), 6.5))
    xs = range(len(rows))
    w = 0.38
    d = [r[2][metric] / scale for r in rows]
    b = [r[1][metric] / scale for r in rows]
    ax.bar([x - w / 2 for x in xs], d, w, label="direct QEMU (measured)", color="#8c8c8c")
    ax.bar([x + w / 2 for x in xs], b, w, label="through bfmig (measured)", color="#1f77b4")
    md = [model[(r[0]["id"], r[2]["leg"], "direct")][model_key] * (1000 / scale if model_key == "totalSeconds" else 1 / scale) for r in rows]
    mbf = [model[(r[0]["id"], r[1]["leg"], "bfmig")][model_key] * (1000 / scale if model_key == "totalSeconds" else 1 / scale) for r in rows]
    ax.scatter([x - w / 2 for x in xs], md, marker="_", s=220, color="black", label="model", zorder=3)
    ax.scatter([x + w / 2 for x in xs], mbf, marker="_", s=220, color="black", zorder=3)
    ax.set_yscale("log")
    ax.set_ylabel(unit)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([label(r[0], r[1]) for r in rows], rotation=90, fontsize=7)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{file}", dpi=110)
    plt.close(fig)


host = results["host"]
sub = f'({host["qemu"].split("(")[0].strip()}, {host["accel"]}, {host["cores"]} shared cores; user-space WAN emulator)'
chart("wanBytes", 1e6, "WAN bytes, MB (log)", "wan-bytes.png", f"WAN bytes per leg, direct vs bfmig {sub}", "wanBytes")
chart("totalTimeMs", 1000, "QEMU total time, s (log)", "total-time.png", f"Total migration time per leg, direct vs bfmig {sub}", "totalSeconds")

fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
for ax, (key, mkey, scale, unit) in zip(axes, [("wanBytes", "wanBytes", 1e6, "WAN MB"), ("totalSeconds", "totalSeconds", 1, "total time s")]):
    for path, colour in (("direct", "#8c8c8c"), ("bfmig", "#1f77b4")):
        pts = [(c["measured"][key] / scale, c["predicted"][mkey] / scale) for c in checked if c["path"] == path]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=colour, label=path)
    lo = min(min(c["measured"][key], c["predicted"][mkey]) for c in checked) / scale * 0.7
    hi = max(max(c["measured"][key], c["predicted"][mkey]) for c in checked) / scale * 1.4
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.plot([lo, hi], [lo * 1.25, hi * 1.25], color="black", lw=0.5, ls="--")
    ax.plot([lo, hi], [lo * 0.75, hi * 0.75], color="black", lw=0.5, ls="--", label="±25%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"measured {unit}")
    ax.set_ylabel(f"model {unit}")
    ax.legend()
    ax.grid(which="both", alpha=0.3)
fig.suptitle("Model against every measured leg")
fig.tight_layout()
fig.savefig(f"{out_dir}/model-vs-measured.png", dpi=110)
print(f"wrote {out_dir}/wan-bytes.png, total-time.png, model-vs-measured.png")
