"""Load generation and latency plots behind `tandem bench`.

`plot_latency` is imported lazily so that importing the load generator (or registering the CLI
command) does not pay for matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tandem.bench.loadgen import LoadResult, run_load, run_load_sync

if TYPE_CHECKING:
    from tandem.bench.plot import plot_latency

__all__ = ["LoadResult", "plot_latency", "run_load", "run_load_sync"]


def __getattr__(name: str) -> Any:
    """Lazy attribute access for `plot_latency`."""
    if name == "plot_latency":
        from tandem.bench.plot import plot_latency

        return plot_latency
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
