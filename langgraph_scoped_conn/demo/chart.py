"""The demo's picture: server backends over time, one line per mode.

:func:`terminal_chart` draws it with block characters (no dependency);
:func:`write_png` saves it with matplotlib (the ``plot`` extra), imported only there.
Both take :class:`Series`: the backends one mode held, sampled from the server, with
time counted from the start of that mode's runs, so the modes share one time axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from langgraph_scoped_conn.demo.sampler import Sample

__all__ = ["PLOT_MISSING", "Series", "series_of", "terminal_chart", "write_png"]

PLOT_MISSING = (
    "pip install 'langgraph-scoped-conn[plot]' (matplotlib; from a clone of the "
    "repository: pip install '.[plot]')"
)

_EIGHTHS = " ▁▂▃▄▅▆▇█"
_COLOURS = {"naive": "#d62728", "scoped": "#2ca02c"}


@dataclasses.dataclass(frozen=True)
class Series:
    """One mode's backends over time.

    Attributes:
        mode: ``naive`` or ``scoped`` (picks the colour).
        label: what the line is, for legends.
        points: (seconds since the mode's runs started, backends), in time order.
        seconds: how long the mode's runs took.
    """

    mode: str
    label: str
    points: tuple[tuple[float, int], ...]
    seconds: float

    @property
    def peak(self) -> int:
        """The most backends seen at once."""
        return max((n for _, n in self.points), default=0)


def series_of(
    samples: Sequence[Sample], application: str, start: float, *, mode: str, label: str
) -> Series:
    """The backends of ``application`` in ``samples``, timed from ``start`` (monotonic)."""
    points = tuple((t - start, counts.get(application, 0)) for t, counts in samples)
    seconds = points[-1][0] if points else 0.0
    return Series(mode, label, points, max(seconds, 0.0))


def terminal_chart(
    series: Sequence[Series],
    *,
    limit: int | None = None,
    budget: int | None = None,
    width: int = 60,
    height: int = 10,
) -> list[str]:
    """The series as text: one panel per series, on the same scales.

    Each column is the most backends seen in its slice of time, so a spike is never
    hidden.  ``limit`` (how many connections the server could still accept when the
    runs started: it is full there) and ``budget`` (the scoped pool's size) are drawn
    as dotted lines where no bar covers them.

    Returns:
        The lines to print, without colour.
    """
    width = max(width, 10)
    top = max([s.peak for s in series] + [limit or 0, budget or 0, 1])
    height = max(min(height, top), 2)
    step = math.ceil(top / height)  # backends per row
    span = max((s.seconds for s in series), default=0.0) or 1.0
    marks = {v: name for v, name in ((budget, "budget"), (limit, "server full at")) if v}
    rows_of_marks = {math.ceil(v / step) - 1: (v, name) for v, name in marks.items()}
    label_width = len(str(step * height))
    lines: list[str] = []
    for s in series:
        lines.append(f"{s.label}  (peak {s.peak})")
        columns = _columns(s, span, width)
        for row in reversed(range(height)):
            mark = rows_of_marks.get(row)
            cells = []
            for value in columns:
                fill = 0.0 if value is None else min(max((value - row * step) / step, 0.0), 1.0)
                eighths = round(fill * 8)
                cells.append(_EIGHTHS[eighths] if eighths else ("┈" if mark else " "))
            axis = str(mark[0]) if mark else ""
            note = f" {mark[1]} {mark[0]}" if mark else ""
            lines.append(f"{axis:>{label_width}} ┤{''.join(cells)}{note}".rstrip())
        lines.append(f"{'0':>{label_width}} └{'─' * width}")
    end = f"{span:.1f} s"
    lines.append(f"{'':>{label_width}}  0 s{end:>{width - 3}}")
    return lines


def _columns(series: Series, span: float, width: int) -> list[int | None]:
    """The most backends in each of ``width`` slices of ``span`` seconds (None: after the end)."""
    out: list[int | None] = [None] * width
    last = 0
    points = iter(series.points)
    point = next(points, None)
    for column in range(width):
        until = (column + 1) * span / width
        if column * span / width > series.seconds:
            break
        most = last
        while point is not None and point[0] <= until:
            last = point[1]
            most = max(most, last)
            point = next(points, None)
        out[column] = most
    return out


def write_png(
    path: Path,
    series: Sequence[Series],
    *,
    limit: int | None = None,
    budget: int | None = None,
    title: str = "PostgreSQL backends during the demo",
) -> Path:
    """Save the series as a step chart at ``path`` (parent directories are made).

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for s in series:
        xs = [t for t, _ in s.points]
        ys = [n for _, n in s.points]
        axes.step(
            xs,
            ys,
            where="post",
            color=_COLOURS.get(s.mode),
            linewidth=1.8,
            label=f"{s.label} (peak {s.peak})",
        )
    if limit:
        axes.axhline(limit, color="#555555", linestyle="--", linewidth=1)
        axes.annotate(
            f"server full at {limit}", (0, limit), xytext=(4, 3), textcoords="offset points"
        )
    if budget:
        axes.axhline(budget, color=_COLOURS["scoped"], linestyle=":", linewidth=1)
        axes.annotate(f"budget {budget}", (0, budget), xytext=(4, 3), textcoords="offset points")
    top = max([s.peak for s in series] + [limit or 0, budget or 0, 1])
    axes.set_ylim(0, top * 1.15 + 1)
    axes.set_xlim(left=0)
    axes.set_xlabel("seconds since the mode's runs started")
    axes.set_ylabel("client backends (pg_stat_activity)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
