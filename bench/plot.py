"""The bench's picture (``--plot PATH``): sagas/s and chains/s by pool and concurrency,
and the one-at-a-time latency CDFs of saga and chain. Needs matplotlib (the ``bench``
extra; ``make bench`` installs it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _cdf(samples: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(samples)
    count = len(ordered)
    return ordered, [(i + 1) / count for i in range(count)]


def write_plot(
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    samples: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
) -> Path:
    """``rows``: one per worker (``pool``, ``concurrency``, ``median`` with ``chains`` and
    ``sagas`` per second); ``samples``: per worker label, ``saga`` and ``chain`` latencies
    in ms."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    figure, (bars, cdf) = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = [f"{row['pool']} -c {row['concurrency']}" for row in rows]
    positions = range(len(rows))
    width = 0.38
    chains = [row["median"]["chains"] for row in rows]
    sagas = [row["median"]["sagas"] for row in rows]
    bars.bar([p - width / 2 for p in positions], chains, width, label="bare chain (4 tasks)")
    bars.bar([p + width / 2 for p in positions], sagas, width, label="saga (4 steps)")
    for p, (chain, saga) in enumerate(zip(chains, sagas, strict=True)):
        bars.annotate(f"{saga / chain:.2f}x", (p + width / 2, saga), ha="center", va="bottom")
    bars.set_xticks(list(positions), labels)
    bars.set_ylabel("completed per second")
    bars.set_title("throughput by pool and concurrency")
    bars.legend(loc="upper left")

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (label, latencies) in enumerate(samples.items()):
        for kind, style in (("saga", "-"), ("chain", ":")):
            if latencies.get(kind):
                xs, ys = _cdf(latencies[kind])
                colour = colours[number % len(colours)]
                cdf.plot(xs, ys, style, color=colour, label=f"{kind}, {label}")
    cdf.set_xscale("log")
    cdf.set_xlabel("latency, one at a time (ms, log scale)")
    cdf.set_ylabel("fraction completed within")
    cdf.set_title("latency CDF: saga vs chain")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize="small")

    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
