"""Helpers shared by the tutorial notebooks: their scale, the banner above results, plot style.

A notebook's numbers describe one backend on one machine on one day, so each notebook
starts by printing all three with `print_banner`.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.harness.backends import probe_product
from tests.harness.urls import parse_endpoint

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SCALE_VARIABLE = "TUTORIAL_SCALE"
# "test" keeps the test run small and fast, and "site" is what the published outputs show.
TEST_SCALE = "test"
SITE_SCALE = "site"
SCALES = (TEST_SCALE, SITE_SCALE)

# Dark text on an opaque white figure reads the same on the site's light and dark palettes,
# because the PNG carries its own background instead of showing the page through it.
PLOT_STYLE = {
    "figure.facecolor": "white",
    "figure.edgecolor": "white",
    "savefig.facecolor": "white",
    "savefig.transparent": False,
    "axes.facecolor": "white",
    "axes.edgecolor": "#333333",
    "axes.labelcolor": "#1a1a1a",
    "axes.titlesize": 13,
    "axes.labelsize": 11,
    "axes.grid": True,
    "grid.color": "#d0d0d0",
    "grid.linewidth": 0.8,
    "xtick.color": "#1a1a1a",
    "ytick.color": "#1a1a1a",
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "text.color": "#1a1a1a",
    "legend.fontsize": 10,
    "legend.framealpha": 1.0,
    "figure.dpi": 110,
    "figure.figsize": (10, 4),
    "font.size": 11,
}


@dataclass(frozen=True)
class Machine:
    """The computer a notebook ran on, as far as its numbers depend on it."""

    cpus: int
    cpu_model: str
    memory_gib: float | None
    system: str


def read_database_url(environ: Mapping[str, str] = os.environ) -> str:
    """Return DATABASE_URL, the database a notebook measures."""
    url = environ.get("DATABASE_URL", "").strip()
    if not url:
        raise RuntimeError(
            "DATABASE_URL is not set: set it to postgresql://USER:PASSWORD@HOST:PORT/DATABASE, "
            "or run the notebooks with `python -m tests.harness.notebooks`, which starts a "
            "database and sets it"
        )
    return url


def read_scale(environ: Mapping[str, str] = os.environ) -> str:
    """Return the notebook scale from TUTORIAL_SCALE: "test" when unset, or "site"."""
    scale = environ.get(SCALE_VARIABLE, TEST_SCALE).strip().lower() or TEST_SCALE
    if scale not in SCALES:
        raise ValueError(
            f"{SCALE_VARIABLE} is {environ[SCALE_VARIABLE]!r}, expected one of "
            f"{', '.join(SCALES)}. Unset it for the small test sizes, or set it to "
            f"{SITE_SCALE} for the sizes the site shows."
        )
    return scale


def describe_machine() -> Machine:
    return Machine(
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        cpu_model=_cpu_model(),
        memory_gib=_memory_gib(),
        system=f"{platform.system()} {platform.release()} {platform.machine()}",
    )


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU model"


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return None


def print_banner(database_url: str, scale: str) -> None:
    """Print the backend, the machine and the date that the results below come from."""
    product, version = probe_product(database_url)
    endpoint = parse_endpoint(database_url)
    machine = describe_machine()
    memory = f", {machine.memory_gib:.1f} GiB memory" if machine.memory_gib else ""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    print(f"Backend: {product} {version}, server at {endpoint}")
    print(f"Machine that ran this notebook: {machine.cpus} CPUs ({machine.cpu_model}){memory}")
    print(f"System:  {machine.system}")
    print(f"Date:    {today}")
    print(f"Scale:   {scale} ({SCALE_VARIABLE})")


def use_plot_style() -> None:
    """Make matplotlib draw figures on white, readable on light and dark pages."""
    import matplotlib

    # Set explicitly, so that a matplotlibrc of the reader's cannot make the figures transparent.
    matplotlib.rcParams.update(PLOT_STYLE)


def set_log_y_scale(axes: Axes) -> None:
    """Put the y axis on a log scale labelled with plain numbers (4, 10, 40), not powers of ten."""
    from matplotlib.ticker import LogFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(LogFormatter())
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
