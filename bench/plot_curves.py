"""Draw sequential-editing curves from `editserve eval --sequential --out FILE` results.

Each FILE is one run (one method); its curve holds the measurements taken after 10, 100, ...
accumulated edits. The figure has one panel per metric (ES, PS, NS, drift top-1 agreement),
the number of accumulated edits on a log axis, one line per run, and the unedited model's
value on the same cases as a dotted line where the run recorded it (NS).

    .venv/bin/python bench/plot_curves.py --out docs/img/sequential_smollm2.png \\
        "T-Patcher=~/runs/tp_seq1000.json" "ROME=~/runs/rome_seq1000.json"

A label may be given before "=" (default: the file's name). Also prints each curve as a table.

A run's output file holds every case's records (megabytes) and lives outside the repository;
``--keep DIR`` writes each run's curve alone (a few kB: the points and the unedited NS at each)
as ``DIR/<label>.curve.json``, and such a file is accepted wherever a run file is, so a later
figure can draw a new run beside one whose output file is gone.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PANELS = (("es", "ES (%)"), ("ps", "PS (%)"), ("ns", "NS (%)"), ("top1_agreement", "drift top-1 agreement (%)"))


def load_run(spec: str) -> tuple[str, dict]:
    label, _, path = spec.rpartition("=")
    file = Path(path).expanduser()
    return label or file.stem, json.loads(file.read_text())


def unedited(run: dict, metric: str, edits: int) -> float | None:
    """The metric on the first ``edits`` cases before any edit (the run's pre-edit records, or
    a kept curve's ``unedited`` map)."""
    kept = (run.get("unedited") or {}).get(metric, {}).get(str(edits))
    if kept is not None:
        return kept
    state = run.get("sequential") or {}
    pre, cases = state.get("pre") or {}, (state.get("cases") or [])[:edits]
    values = [pre[c][metric] for c in cases if c in pre and pre[c].get(metric) is not None]
    return 100 * statistics.fmean(values) if values else None


def table(label: str, run: dict) -> str:
    lines = [f"{label}", "| edits | ES | PS | NS (unedited) | drift KL | drift top-1 |", "|---:|---:|---:|---:|---:|---:|"]
    for point in run["curve"]:
        n = point["edits"]
        base = unedited(run, "ns", n)
        lines.append(f"| {n} | {100 * point['es']:.1f} | {100 * point['ps']:.1f} | {100 * point['ns']:.1f} "
                     f"({'-' if base is None else f'{base:.1f}'}) | {point.get('kl', float('nan')):.4f} | "
                     f"{100 * point.get('top1_agreement', float('nan')):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="[LABEL=]FILE of a sequential run")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--keep", type=Path, default=None, help="also write each run's curve to DIR/<label>.curve.json")
    args = parser.parse_args()

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [load_run(spec) for spec in args.runs]
    figure = Figure(figsize=(12, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    for ax, (metric, name) in zip(axes, PANELS, strict=True):
        for label, run in runs:
            points = [p for p in run["curve"] if p.get(metric) is not None]
            xs = [p["edits"] for p in points]
            line, = ax.plot(xs, [100 * p[metric] for p in points], marker="o", label=label)
            if metric == "ns":
                base = [unedited(run, "ns", x) for x in xs]
                if all(b is not None for b in base):
                    ax.plot(xs, base, linestyle=":", color=line.get_color())
        ax.set_xscale("log")
        ax.set_ylim(0, 102)  # the same scale for every run and panel: no zoomed-in drama
        ax.set_xlabel("accumulated edits")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    if args.title:
        figure.suptitle(args.title, fontsize=11)
    # the legend under the panels: long run labels inside a panel hid its points
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06 * ((len(labels) + 2) // 3) + 0.04, 1, 1))
    figure.savefig(args.out)
    for label, run in runs:
        print(table(label, run))
        print()
        if args.keep is not None:
            kept = {"curve": run["curve"],
                    "unedited": {"ns": {str(p["edits"]): unedited(run, "ns", p["edits"]) for p in run["curve"]}}}
            path = args.keep / f"{label.lower().replace(' ', '_')}.curve.json"
            path.write_text(json.dumps(kept, indent=1))
            print(f"kept {path}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
