"""`seshu server report`: every frozen set's score against release version, one panel per set."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from sqlalchemy import select

from seshu.evaluate.plot import panel, save_figure
from seshu.federation.layout import Federation
from seshu.federation.models import Release

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:cyan")


def plot_releases(fed: Federation, out: Path) -> Path:
    """Write the plot to `out` (PNG, SVG or PDF by its suffix) and return where it went."""
    with fed.db.read() as session:
        releases = list(session.scalars(select(Release).order_by(Release.version)))
    names = sorted({name for r in releases for name in r.metrics})
    columns = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / columns) if names else 1
    figure = Figure(figsize=(4.5 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for i, name in enumerate(names):
        points = [
            (r.version, float(r.metrics[name]["value"]))
            for r in releases
            if name in r.metrics and r.metrics[name]["value"] is not None
        ]
        first = next(r.metrics[name] for r in releases if name in r.metrics)
        better = "higher" if first["higher_is_better"] else "lower"
        title = f"{name} ({better} is better)"
        log_y = (not first["higher_is_better"] and "ppl" in first["metric"]) or first["metric"] == "perplexity"
        panel(axes[i], points, title, first["metric"], COLORS[i % len(COLORS)], log_y=log_y, xlabel="release")
        axes[i].set_xticks([v for v, _ in points])
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    figure.suptitle(f"Seshu federation: {len(releases)} release(s)")
    return save_figure(figure, Path(out))
