"""The card's small plot: kept share and latency over the last minutes (matplotlib, Agg)."""
from __future__ import annotations

import io


def render_plot(points: list, minutes: float) -> bytes:
    """PNG of kept share (left axis, 0-1) and latency (right axis, ms) against seconds ago.

    points: [(seconds ago <= 0, kept share or None, latency ms)]. Uses the object API (no
    pyplot state), so pages can be drawn from several threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 1.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.11, 0.22, 0.76, 0.7))
    ago = [p[0] for p in points]
    shares = [float("nan") if p[1] is None else p[1] for p in points]
    ax.plot(ago, shares, color="#1a9850", marker=".", markersize=3, linewidth=1.2)
    ax.set_ylim(0, 1.05)
    # The span the data covers (at least a minute, at most `minutes`): readable from the start.
    ax.set_xlim(max(-60 * minutes, min([-60.0, *ago]) * 1.05), 0)
    ax.set_ylabel("kept share", color="#1a9850", fontsize=7)
    ax.set_xlabel("seconds ago", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)
    latency = ax.twinx()
    latency.plot(ago, [p[2] for p in points], color="#d73027", marker=".", markersize=3,
                 linewidth=1.0)
    latency.set_ylim(bottom=0)
    latency.set_ylabel("latency ms", color="#d73027", fontsize=7)
    latency.tick_params(labelsize=6)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
