"""Plots as Dagster metadata: a PNG embedded in markdown, which the UI renders inline."""


import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dagster import MetadataValue


def _figure_markdown(fig) -> MetadataValue:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return MetadataValue.md(f"![plot](data:image/png;base64,{encoded})")


def line_plot(
    x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, title: str
) -> MetadataValue:
    fig, ax = plt.subplots(figsize=(5, 3))
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
    fig, ax = plt.subplots(figsize=(5, 3))
    for label, values in values_by_label.items():
        ax.hist(values, bins=bins, alpha=0.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    return _figure_markdown(fig)
