"""The demo's plot: resident vs evicted memory and the fault rate over time, per VM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Series", "write_plot"]


@dataclass
class Series:
    """Samples of one VM."""

    vm_id: str
    workload: str
    t: list[float] = field(default_factory=list)
    resident_mib: list[float] = field(default_factory=list)
    evicted_mib: list[float] = field(default_factory=list)
    faults_per_s: list[float] = field(default_factory=list)


def write_plot(series: Sequence[Series], path: Path) -> Path:
    """Write a PNG with one panel per VM; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    n = max(len(series), 1)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, s in zip(axes.flat, series, strict=False):
        ax.stackplot(
            s.t,
            s.resident_mib,
            s.evicted_mib,
            labels=["resident", "evicted"],
            colors=["#4c72b0", "#dd8452"],
            alpha=0.85,
        )
        ax.set_title(f"{s.vm_id} ({s.workload})", fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax2 = ax.twinx()
        ax2.plot(s.t, s.faults_per_s, color="#c44e52", linewidth=1.2, label="faults/s")
        ax2.set_ylabel("faults/s", color="#c44e52")
        ax2.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    fig.suptitle("tiermem demo: guest memory moved to the page store, and faults bringing it back")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
