"""Markdown reports of evaluation runs: the unedited and edited rows of a run, a sequential
run's curve and costs, and what a revert sample did."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .measure import SUMMARY_KEYS, summary_of
from .metrics import harmonic_mean, summarize


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if not ordered:
        return float("nan"), float("nan")
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return statistics.median(ordered), p90


def summary_table(records: Sequence[dict], *, title: str, drift: dict | None = None) -> str:
    """Markdown: the unedited model's row beside the edited one, then costs.

    ``drift`` (kl, top1_agreement) replaces the per-case means: a sequential run measures drift
    once for the model holding all its edits (the curve's last point), not per case."""
    pre = summarize([r["pre"] for r in records], SUMMARY_KEYS)
    pre["score"] = harmonic_mean([pre["es"], pre["ps"], pre["ns"]])
    post = summary_of(records)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v: float | None, fmt: str = "{:.3f}") -> str:
        return "-" if v is None else fmt.format(v)

    generated = post.get("gen_es") is not None  # by-generation columns only where measured
    gen_head = " gES | gPS | gNS | gLoc |" if generated else ""
    lines = [
        f"**{title}** ({len(records)} cases)",
        "",
        "| model | Score | ES | PS | NS | EM | PM | NM | Rel | Gen | Loc | Port | GE | KL | top-1 |" + gen_head,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * gen_head.count("|"),
    ]
    kl = drift if drift is not None else summarize(records, ("kl", "top1_agreement"))
    for name, row, drift in (("unedited", pre, {"kl": None, "top1_agreement": None}), ("edited", post, kl)):
        gen = ""
        if generated:
            gen = (f" {pct(row['gen_es'])} | {pct(row['gen_ps'])} | {pct(row['gen_ns'])} | "
                   f"{pct(row['gen_loc']) if name == 'edited' else '-'} |")
        lines.append(
            f"| {name} | {pct(row['score'])} | {pct(row['es'])} | {pct(row['ps'])} | {pct(row['ns'])} | "
            f"{pct(row['em'])} | {pct(row['pm'])} | {pct(row['nm'])} | {pct(row['reliability'])} | "
            f"{pct(row['generalization'])} | {pct(row['locality']) if name == 'edited' else '-'} | "
            f"{pct(row['portability'])} | {num(row['fluency'], '{:.2f}')} | {num(drift['kl'], '{:.4f}')} | "
            f"{pct(drift['top1_agreement'])} |" + gen
        )
    timings = [r for r in records if "compute_seconds" in r]
    if timings:
        lines += ["", *cost_table([r["compute_seconds"] for r in timings], [r["apply_seconds"] for r in timings],
                                  [r["revert_seconds"] for r in timings])]
        restored = sum(bool(r.get("revert_restored")) for r in timings)
        lines += ["", f"Reverts checked (P(new) back to its pre-edit value): {restored}/{len(timings)}"]
    undefined = sum(r["post"].get("es") is None for r in records)
    if undefined:
        lines += ["", f"{undefined} cases have no true answer distinct from the new target: "
                      "ES/PS/NS/EM/PM/NM average over the other cases"]
    return "\n".join(lines)


def cost_table(compute: Sequence[float], apply: Sequence[float], revert: Sequence[float]) -> list[str]:
    """Markdown rows: median and p90 of edit compute (s), apply and revert (ms)."""
    c50, c90 = _quantiles(compute)
    a50, a90 = _quantiles(apply)
    r50, r90 = _quantiles(revert)
    return ["| cost | median | p90 |", "|---|---|---|",
            f"| edit compute (s) | {c50:.2f} | {c90:.2f} |",
            f"| apply (ms) | {1000 * a50:.2f} | {1000 * a90:.2f} |",
            f"| revert (ms) | {1000 * r50:.2f} | {1000 * r90:.2f} |"]


def curve_table(result: dict) -> str:
    """Markdown for a sequential run: the degradation curve, then the edits' costs."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    generated = any(p.get("gen_es") is not None for p in result["curve"])
    lines = ["| edits | ES | PS | NS | Score | Rel | Gen | Loc | KL | top-1 |" + (" gES | gPS | gNS | gLoc |" if generated else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" * 4 if generated else "")]
    for p in result["curve"]:
        kl = "-" if p["kl"] is None else f"{p['kl']:.4f}"
        gen = (f" {pct(p['gen_es'])} | {pct(p['gen_ps'])} | {pct(p['gen_ns'])} | {pct(p['gen_loc'])} |"
               if generated else "")
        lines.append(f"| {p['edits']} | {pct(p['es'])} | {pct(p['ps'])} | {pct(p['ns'])} | {pct(p['score'])} | "
                     f"{pct(p['reliability'])} | {pct(p['generalization'])} | {pct(p['locality'])} | {kl} | "
                     f"{pct(p['top1_agreement'])} |" + gen)
    timings = result["timings"]
    if timings:
        lines += ["", *cost_table([t["compute_seconds"] for t in timings], [t["apply_seconds"] for t in timings],
                                  result.get("revert_seconds") or [])]
    if result.get("revert_sample"):
        lines += ["", revert_sample_table(result["revert_sample"])]
    return "\n".join(lines)


def revert_sample_table(sample: dict) -> str:
    """Markdown: the kept and the reverted edits' cases before and after the sample's reverts
    (and the reverted ones' unedited values), then the drift probes before and after."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    keys = ("es", "ps", "ns", "reliability", "generalization", "gen_es", "gen_ps", "gen_ns")
    lines = [f"{len(sample['reverted_edits'])} edits reverted among the others (seed {sample['seed']}):", "",
             "| cases | measured | ES | PS | NS | Rel | Gen | gES | gPS | gNS |", "|---|---|" + "---:|" * len(keys)]
    rows = [("kept", sample["kept_cases"], "before the reverts", sample["kept"]["before"]),
            ("kept", sample["kept_cases"], "after", sample["kept"]["after"]),
            ("reverted", sample["reverted_cases"], "before the reverts", sample["reverted"]["before"]),
            ("reverted", sample["reverted_cases"], "after", sample["reverted"]["after"]),
            ("reverted", sample["reverted_cases"], "unedited model", sample["reverted"]["unedited"])]
    for name, count, when, values in rows:
        lines.append(f"| {name} ({count}) | {when} | " + " | ".join(pct(values.get(k)) for k in keys) + " |")
    drift = sample["drift"]
    lines += ["", "| drift probes | KL | top-1 |", "|---|---:|---:|"]
    for when in ("before", "after"):
        kl = drift[when]["kl"]
        lines.append(f"| {when} the reverts | {'-' if kl is None else f'{kl:.4f}'} | "
                     f"{pct(drift[when]['top1_agreement'])} |")
    return "\n".join(lines)
