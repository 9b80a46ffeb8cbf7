"""Round-robin rounds (``--rounds K``) and the I/O-bound matrix (``--io-matrix``).

The machine is noisy (other processes take the CPU for seconds at a time), so a figure
means something only next to another one measured at the same time: each round runs
chains, then sagas, then (when installed) DBOS's workflow back to back, and the report
gives every round's figures, their medians and the median of the same-round ratios.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.bench import Bench, Options, Session

Peer = Callable[["Options"], dict[str, Any]]  # runs DBOS's workflow, returns its figures


@dataclass(frozen=True)
class Round:
    chains: float  # per second
    sagas: float
    dbos: float | None = None
    # CPU ms of the worker's processes per chain / saga (None where /proc is not there)
    chain_cpu_ms: float | None = None
    saga_cpu_ms: float | None = None

    def ratios(self) -> dict[str, float]:
        found = {"sagas/chains": self.sagas / self.chains}
        if self.dbos:
            found["sagas/dbos"] = self.sagas / self.dbos
        return found


def medians(rounds: Sequence[Round]) -> dict[str, float]:
    """Median of each figure and of each same-round ratio (pure)."""
    figures: dict[str, list[float]] = {"chains": [], "sagas": []}
    for one in rounds:
        figures["chains"].append(one.chains)
        figures["sagas"].append(one.sagas)
        if one.dbos:
            figures.setdefault("dbos", []).append(one.dbos)
        if one.chain_cpu_ms is not None and one.saga_cpu_ms is not None:
            figures.setdefault("chain_cpu_ms", []).append(one.chain_cpu_ms)
            figures.setdefault("saga_cpu_ms", []).append(one.saga_cpu_ms)
        for name, value in one.ratios().items():
            figures.setdefault(name, []).append(value)
    return {name: statistics.median(values) for name, values in figures.items()}


def format_round(number: int, one: Round) -> str:
    dbos = f"  dbos/s {one.dbos:7.1f}" if one.dbos else ""
    ratios = "  ".join(f"{name} {value:.2f}" for name, value in one.ratios().items())
    return f"round {number}: chains/s {one.chains:7.1f}  sagas/s {one.sagas:7.1f}{dbos}  {ratios}"


def _figure(name: str, value: float) -> str:
    if "/" in name:
        return f"{name} {value:.2f}"
    if name.endswith("_cpu_ms"):
        return f"{name.removesuffix('_cpu_ms')} CPU {value:.1f} ms"
    return f"{name}/s {value:.1f}"


def format_medians(found: dict[str, float], rounds: int) -> str:
    parts = [_figure(name, value) for name, value in found.items()]
    return f"median of {rounds} round(s): " + "  ".join(parts)


def format_latency(summary: dict[str, Any], count: int) -> str:
    def one(kind: str) -> str:
        cuts = summary[f"{kind}_latency_ms"]
        return f"{kind} p50 {cuts['p50']:.1f} / p99 {cuts['p99']:.1f} ms"

    return f"latency one at a time (n={count}): {one('saga')}, {one('chain')}"


def run_rounds(
    bench: Bench, rounds: int, peer: Peer | None, say: Callable[[str], None]
) -> list[Round]:
    """Warm up, then ``rounds`` x (chains, sagas[, DBOS]); ``say`` each round's line."""
    bench.warm_up()
    done = []
    for number in range(1, rounds + 1):
        chains = bench.chain_throughput(f"chains_round_{number}")
        sagas = bench.saga_throughput(f"sagas_round_{number}", count_txns=False)
        dbos = peer(bench.options)["per_second"] if peer else None
        chain_cpu, saga_cpu = chains["cpu_ms_per_chain"], sagas["cpu_ms_per_saga"]
        done.append(
            Round(
                chains["per_second"],
                sagas["per_second"],
                dbos,
                chain_cpu["worker"] if chain_cpu else None,
                saga_cpu["worker"] if saga_cpu else None,
            )
        )
        say(format_round(number, done[-1]))
    return done


def rounds_summary(bench: Bench, done: Sequence[Round]) -> dict[str, Any]:
    options = bench.options
    return {
        "pool": options.pool,
        "concurrency": options.concurrency,
        "step_ms": options.step_ms,
        "n": options.n,
        "chain_acks_late": options.chain_acks_late,
        "inline_steps": options.inline_steps,
        "rounds": [one.__dict__ for one in done],
        "median": medians(done),
        "saga_latency_ms": bench.results.get("saga_latency_ms"),
        "chain_latency_ms": bench.results.get("chain_latency_ms"),
    }


def run_in_rounds(
    current: Session, options: Options, peer: Peer | None, say: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """``--rounds K`` on one worker; then the one-at-a-time latencies."""
    with current.bench(options) as bench:
        acks = ", chains acks_late" if options.chain_acks_late else ""
        acks += ", sagas inline_steps" if options.inline_steps else ""
        say(
            f"{options.pool} -c {options.concurrency}, step {options.step_ms:g} ms, "
            f"N={options.n}{acks}"
        )
        done = run_rounds(bench, options.rounds, peer, say)
        bench.saga_latency()
        bench.chain_latency()
        summary = rounds_summary(bench, done)
        say(format_medians(summary["median"], len(done)))
        say(format_latency(summary, options.latency_n))
        return summary, bench.samples


def run_matrix(
    current: Session,
    options: Options,
    matrix: Sequence[tuple[str, int]],
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """Each (pool, concurrency) of ``matrix`` in turn, on a worker of its own."""
    rows, samples = [], {}
    for pool, concurrency in matrix:
        one = replace(options, pool=pool, concurrency=concurrency)
        summary, latencies = run_in_rounds(current, one, None, say)
        rows.append(summary)
        samples[f"{pool} -c {concurrency}"] = latencies
    return rows, samples


def format_matrix(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'pool':<18}{'chains/s':>10}{'sagas/s':>10}{'ratio':>8}"
        f"{'saga p50 ms':>13}{'chain p50 ms':>14}"
        f"{'worker CPU ms/chain':>21}{'/saga':>7}"
    )
    lines = [header]
    for row in rows:
        median = row["median"]
        saga_p50 = (row["saga_latency_ms"] or {}).get("p50", float("nan"))
        chain_p50 = (row["chain_latency_ms"] or {}).get("p50", float("nan"))
        lines.append(
            f"{row['pool'] + ' -c ' + str(row['concurrency']):<18}"
            f"{median['chains']:>10.1f}{median['sagas']:>10.1f}{median['sagas/chains']:>8.2f}"
            f"{saga_p50:>13.1f}{chain_p50:>14.1f}"
            f"{median.get('chain_cpu_ms', float('nan')):>21.1f}"
            f"{median.get('saga_cpu_ms', float('nan')):>7.1f}"
        )
    return "\n".join(lines)
