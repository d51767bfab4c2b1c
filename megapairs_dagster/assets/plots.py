"""Plots as Dagster metadata: a PNG embedded in markdown, which the UI renders inline.

matplotlib loads with the first plot, not with the code location (tests/test_import_cost.py).
"""


import base64
import functools
import io
from collections.abc import Sequence

from dagster import MetadataValue


@functools.cache
def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_markdown(png: bytes, alt: str = "plot") -> MetadataValue:
    """A PNG as markdown metadata (a data URI), shown inline by the UI."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _figure_markdown(fig) -> MetadataValue:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return png_markdown(buffer.getvalue())


def line_plot(
    x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, title: str
) -> MetadataValue:
    fig, ax = _pyplot().subplots(figsize=(5, 3))
    for label, values in series.items():
        ax.plot(x, values, marker=".", label=label)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _figure_markdown(fig)


def histogram(
    values_by_label: dict[str, Sequence[float]], *, bins: int, xlabel: str, title: str
) -> MetadataValue:
    fig, ax = _pyplot().subplots(figsize=(5, 3))
    for label, values in values_by_label.items():
        ax.hist(values, bins=bins, alpha=0.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    return _figure_markdown(fig)


def grouped_bars(values: dict[str, dict[str, float]], *, ylabel: str, title: str
                 ) -> MetadataValue:
    """One group of bars per key of ``values`` (e.g. a benchmark), one bar per inner key (e.g.
    a model), in a colour per inner key; NaN draws no bar."""
    labels = list(dict.fromkeys(label for bars in values.values() for label in bars))
    width = 0.8 / max(len(labels), 1)
    fig, ax = _pyplot().subplots(figsize=(max(5, 1.2 * len(values)), 3))
    for offset, label in enumerate(labels):
        ax.bar([group + offset * width for group in range(len(values))],
               [bars.get(label, float("nan")) for bars in values.values()], width, label=label)
    ax.set_xticks([group + width * (len(labels) - 1) / 2 for group in range(len(values))],
                  list(values), rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _figure_markdown(fig)
