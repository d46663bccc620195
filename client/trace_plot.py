"""Draw a causal trace like Figure 1 of the ROME paper (Meng et al. 2022).

One heatmap per kind of restored state, side by side: prompt tokens down, layers across, the
subject's tokens marked with ``*``, colour = probability of the answer with that state
restored (from the corrupted probability, white, up to the highest value, dark).

Takes plain data: the client's ``TraceResult``, the science's ``TraceResult`` (or its
``to_dict()``), or a dict with ``tokens``, a subject span (``subject_range`` /
``subject_span`` / ``subject_start`` + ``subject_end``), ``grids`` (kind -> [tokens][layers],
nested lists or numpy arrays), ``answer``, ``clean_prob``, ``corrupted_prob`` and optionally
``kinds``, ``window``, ``samples``. Needs matplotlib (``pip install 'editserve[plot]'``),
imported only when a picture is drawn: importing this module costs nothing, and neither it
nor the client imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_STYLE = {
    # kind: (colour map, panel title, x label)
    "hidden": ("Purples", "Impact of restoring state\nafter corrupted input", "single restored layer"),
    "mlp": ("Greens", "Impact of restoring MLP\nafter corrupted input", "center of {w} restored MLP layers"),
    "attn": ("Reds", "Impact of restoring Attn\nafter corrupted input", "center of {w} restored Attn layers"),
}
_ORDER = ("hidden", "mlp", "attn")


def _get(result: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(result, Mapping):
            if name in result:
                return result[name]
        elif hasattr(result, name):
            return getattr(result, name)
    return default


def _subject_span(result: Any) -> tuple[int, int]:
    span = _get(result, "subject_range", "subject_span")
    if span is None:
        start, end = _get(result, "subject_start"), _get(result, "subject_end")
        if start is None or end is None:
            raise ValueError("the trace has no subject span (subject_range or subject_start/subject_end)")
        span = (start, end)
    return int(span[0]), int(span[1])


def plot_trace(
    result: Any,
    path: str | Path,
    *,
    kinds: Sequence[str] | None = None,
    title: str | None = None,
    colorbar_label: str | None = None,
    dpi: int = 150,
) -> Path:
    """Draw ``result`` into an image file (format from the suffix: .png, .svg, .pdf) and
    return its path. The colour scale runs from the corrupted probability up; ``title`` and
    ``colorbar_label`` replace the defaults (e.g. to draw averaged indirect effects)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("plot_trace needs matplotlib: pip install 'editserve[plot]'") from err
    import numpy as np

    tokens = [str(t) for t in _get(result, "tokens", default=[])]
    grids = _get(result, "grids", default={}) or {}
    start, end = _subject_span(result)
    if kinds is None:
        kinds = _get(result, "kinds") or [k for k in _ORDER if k in grids] + [
            k for k in grids if k not in _ORDER
        ]
    kinds = [k for k in kinds if k in grids]
    if not tokens or not kinds:
        raise ValueError("nothing to draw: the trace has no tokens or no grids")
    answer = str(_get(result, "answer", default="?"))
    clean = float(_get(result, "clean_prob", default=float("nan")))
    corrupted = float(_get(result, "corrupted_prob", default=float("nan")))
    window = _get(result, "window", default=None)
    samples = _get(result, "samples", default=None)

    # tokens as read (a leading space dropped; a blank token shown quoted); subject tokens starred
    labels = [
        (token.strip() or repr(token)) + ("*" if start <= i < end else "") for i, token in enumerate(tokens)
    ]

    n_tokens = len(tokens)
    fig = Figure(figsize=(4.2 * len(kinds) + 0.6, 0.9 + 0.32 * n_tokens), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        grid = np.asarray(grids[kind], dtype=float)
        if grid.shape[0] != n_tokens:
            raise ValueError(f"grid {kind!r} has {grid.shape[0]} rows for {n_tokens} tokens")
        cmap, panel_title, xlabel = _STYLE.get(kind, ("Blues", f"Impact of restoring {kind}", "layer"))
        low = corrupted if np.isfinite(corrupted) else float(np.nanmin(grid))
        high = max(float(np.nanmax(grid)), low + 1e-6)
        image = ax.pcolormesh(grid, cmap=cmap, vmin=low, vmax=high)
        ax.invert_yaxis()  # first token on top
        ax.set_yticks(np.arange(n_tokens) + 0.5, labels, fontsize=9)
        layers = grid.shape[1]
        step = max(1, int(np.ceil(layers / 8)))
        ticks = list(range(0, layers, step))
        ax.set_xticks(np.array(ticks) + 0.5, [str(t) for t in ticks], fontsize=9)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(xlabel.format(w=window if window else "?"), fontsize=9)
        bar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.02)
        bar.set_label(colorbar_label or f"p({answer.strip() or answer!r})", fontsize=9)
        bar.ax.tick_params(labelsize=8)
    heading = title or (
        f"answer {answer!r}: clean p = {clean:.3f}, corrupted p = {corrupted:.3f}"
        + (f" ({samples} noise samples)" if samples else "")
    )
    fig.suptitle(heading, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
