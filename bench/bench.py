"""Benchmark: a 4-step no-op saga against a bare Celery chain of four no-op tasks.

    python bench/bench.py [--n 2000] [--pool prefork] [--concurrency 2] [--step-ms 0]
                          [--rounds K] [--io-matrix] [--plot docs/bench.png]
                          [--coordinator-hop] [--json]

It creates a throwaway PostgreSQL database, flushes a dedicated Redis DB, starts a real
``celery worker`` for ``bench.app`` (``--pool``, ``--concurrency``) and, in one run, measures:

1. throughput of N bare chains (``noop_1 | noop_2 | noop_3 | noop_4``), completion read
   from Redis (the last task ``ZADD``s its completion time);
2. throughput of N sagas, completion read from the ``saga`` table, and PostgreSQL
   transactions per saga (``pg_stat_database``);
3. latency at low load, one saga (then one chain) at a time: publish -> completion.

``--step-ms S``: every step (and chain task) waits S ms first, as a call to another service
would. ``--rounds K``: K rounds round-robin (chains, sagas and, when ``make bench-peers``
made ``.venv-peers``, DBOS's direct workflow of the same 4 steps: ``bench/dbos_peer.py``),
per-round figures, then medians and same-round ratios (the machine's noise moves all of a
round together). ``--io-matrix``: the I/O-bound case (``--step-ms 20``) on prefork -c 8,
threads -c 32 and gevent -c 200 in turn. ``--plot PATH``: a PNG of throughput by pool and
concurrency and of the latency CDFs (``bench/plot.py``, needs matplotlib).

A saga costs 4 task hops (the caller writes the saga and publishes its first step; each
step task applies its own outcome), a chain 4. With ``--coordinator-hop`` every step's
outcome takes a second hop through the coordinator task (``step | celery_sagas.advance``):
8 hops, a ceiling of 4/8 = 0.5.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from celery_sagas.store import upgrade  # noqa: E402  (needs the repository on sys.path)

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
HOPS_PER_SAGA = 4  # 4 steps, each applying its own outcome (the caller starts the saga)
HOPS_PER_SAGA_WITH_COORDINATOR_HOP = 8  # 4 x (step + advance)
HOPS_PER_SAGA_INLINE = 1  # inline_steps: the first step's delivery runs the other three
HOPS_PER_CHAIN = 4
THROUGHPUT_POLL = 0.2
LATENCY_POLL = 0.005
# PostgreSQL >= 15 flushes an idle backend's pending statistics after at most 10 s
# (PGSTAT_IDLE_INTERVAL): the counters are read once they stayed unchanged that long.
STATS_QUIET_SECONDS = 11.0
STATS_POLL = 0.5
POOLS = ("prefork", "threads", "gevent", "solo")
IO_STEP_MS = 20.0
IO_MATRIX = (("prefork", 8), ("threads", 32), ("gevent", 200))

T = TypeVar("T")


class BenchError(Exception):
    """A precondition or a wait failed; the message says which."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    n: int
    concurrency: int
    warmup: int
    latency_n: int
    redis_url: str
    redis_db: int
    pg_admin_url: str
    timeout: float
    keep: bool
    coordinator_hop: bool
    as_json: bool
    compare_start: bool = True
    pool: str = "prefork"
    step_ms: float = 0.0
    rounds: int = 1
    io_matrix: bool = False
    plot: Path | None = None
    peers: bool = True
    chain_acks_late: bool = False
    inline_steps: bool = False
    untimed_steps: bool = False


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Throughput and latency of celery-sagas against bare Celery chains.",
    )
    parser.add_argument("--n", type=int, default=2000, help="chains and sagas per run")
    parser.add_argument(
        "--pool", choices=POOLS, default="prefork", help="the worker's pool (celery -P)"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's pool size")
    parser.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="each step and chain task waits this long first (an HTTP call's time)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="K > 1: chains, sagas and DBOS (if .venv-peers exists) round-robin K times; "
        "medians and same-round ratios",
    )
    parser.add_argument(
        "--io-matrix",
        action="store_true",
        help=f"the I/O-bound case (--step-ms {IO_STEP_MS:g} unless given) on "
        + ", ".join(f"{pool} -c {c}" for pool, c in IO_MATRIX),
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="write a PNG of the figures (needs matplotlib)"
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="leave DBOS out of the rounds even if installed"
    )
    parser.add_argument("--warmup", type=int, default=50, help="uncounted sagas and chains")
    parser.add_argument(
        "--latency-n", type=int, default=200, help="sagas and chains run one at a time"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis server")
    parser.add_argument(
        "--redis-db",
        type=int,
        default=12,
        choices=range(1, 16),
        metavar="1..15",
        help="Redis DB number for the run (flushed!; leased like the test suite does)",
    )
    parser.add_argument(
        "--pg-admin-url",
        default=DEFAULT_PG_ADMIN_URL,
        help="a PostgreSQL database the bench database is created from",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds any single wait may take"
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database and Redis DB")
    parser.add_argument(
        "--coordinator-hop",
        action="store_true",
        help="sagas with sagas_coordinator_hop: each outcome through celery_sagas.advance",
    )
    parser.add_argument(
        "--no-compare-start",
        action="store_true",
        help="skip the second saga run started message-only (start_saga.enqueue)",
    )
    parser.add_argument(
        "--chain-acks-late",
        action="store_true",
        help="the chain tasks take the sagas' delivery settings (acks_late, "
        "reject_on_worker_lost): a baseline that survives a killed worker too",
    )
    parser.add_argument(
        "--inline-steps",
        action="store_true",
        help="sagas with sagas_inline_steps: each saga's later steps run in its first "
        "step's delivery (steps keep the default 300 s timeout, timed by the worker)",
    )
    parser.add_argument(
        "--untimed-steps",
        action="store_true",
        help="declare the saga's steps timeout=None (no time limit, as a chain's tasks)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.latency_n < 1 or args.warmup < 0:
        parser.error("--n, --concurrency and --latency-n must be >= 1, --warmup >= 0")
    if args.rounds < 1 or args.step_ms < 0:
        parser.error("--rounds must be >= 1 and --step-ms >= 0")
    step_ms = args.step_ms
    if args.io_matrix and "--step-ms" not in (argv if argv is not None else sys.argv):
        step_ms = IO_STEP_MS
    return Options(
        n=args.n,
        concurrency=args.concurrency,
        warmup=args.warmup,
        latency_n=args.latency_n,
        redis_url=args.redis_url.rstrip("/"),
        redis_db=args.redis_db,
        pg_admin_url=args.pg_admin_url,
        timeout=args.timeout,
        keep=args.keep,
        coordinator_hop=args.coordinator_hop,
        as_json=args.json,
        compare_start=not args.no_compare_start,
        pool=args.pool,
        step_ms=step_ms,
        rounds=args.rounds,
        io_matrix=args.io_matrix,
        plot=args.plot,
        peers=not args.no_peers,
        chain_acks_late=args.chain_acks_late,
        inline_steps=args.inline_steps,
        untimed_steps=args.untimed_steps,
    )


# --------------------------------------------------------------------------- waiting


def progress(text: str) -> None:
    sys.stderr.write(f"\r\033[K{text}")
    sys.stderr.flush()


def end_progress() -> None:
    sys.stderr.write("\r\033[K")
    sys.stderr.flush()


def wait_for(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout: float,
    interval: float,
) -> T:
    """Call ``check`` every ``interval`` s until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    if len(seconds) < 2:
        only = seconds[0] * 1000 if seconds else float("nan")
        return {"p50": only, "p90": only, "p99": only}
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50": cuts[49] * 1000, "p90": cuts[89] * 1000, "p99": cuts[98] * 1000}


# --------------------------------------------------------------------------- services


def redis_url_for(options: Options) -> str:
    return f"{options.redis_url}/{options.redis_db}"


def check_redis(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BenchError(f"Redis does not answer at {url}: {exc}") from exc
    return client


# The test suite leases Redis DBs 1..15 with this key in DB 0 (tests/support/databases.py):
# taking the same lease keeps `make test` and `make bench` side by side out of each other's DB.
REDIS_LEASE_KEY = "celery_sagas:test:redis-db-lease:{db}"
REDIS_LEASE_SECONDS = 3600


def lease_owner_is_gone(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def leased_redis_db(server_url: str, db: int) -> Iterator[None]:
    control = redis.Redis.from_url(f"{server_url}/0", decode_responses=True, socket_timeout=10)
    key, me = REDIS_LEASE_KEY.format(db=db), f"{socket.gethostname()}:{os.getpid()}"
    if not control.set(key, me, nx=True, ex=REDIS_LEASE_SECONDS):
        holder = control.get(key)
        if holder and not lease_owner_is_gone(holder):
            raise BenchError(f"Redis DB {db} is leased by {holder} (a test run?): use --redis-db")
        control.set(key, me, ex=REDIS_LEASE_SECONDS)
    try:
        yield
    finally:
        if control.get(key) == me:
            control.delete(key)
        control.close()


def admin_engine(url: str) -> sa.Engine:
    return sa.create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 3},
    )


def check_postgres(admin: sa.Engine) -> None:
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        url = admin.url.render_as_string(hide_password=True)
        raise BenchError(f"PostgreSQL does not answer at {url}: {exc.orig}") from exc


def create_database(admin: sa.Engine, name: str) -> str:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return admin.url.set(database=name).render_as_string(hide_password=False)


def drop_database(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def create_schema(url: str) -> None:
    from celery_sagas.store import shared_engine

    upgrade(url)
    shared_engine(url).dispose()  # hold no connection to the bench database


# --------------------------------------------------------------------------- the worker


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    hostname: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"the worker exited with code {self.process.returncode}; "
                f"its log ({self.log_path}):\n{self.log_tail()}"
            )


def start_worker(pool: str, concurrency: int, env: dict[str, str], log_dir: Path) -> Worker:
    hostname = f"bench-{os.getpid()}-{pool}{concurrency}@{socket.gethostname()}"
    log_path = log_dir / f"worker-{pool}-{concurrency}.log"
    command = [
        sys.executable, "-m", "celery", "-A", "bench.app", "worker",
        "-P", pool, "-c", str(concurrency), "-n", hostname,
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=log_dir,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(process, hostname, log_path)


def wait_until_ready(worker: Worker, app: Any, timeout: float) -> None:
    def answered() -> bool | None:
        worker.check_alive()
        replies = app.control.ping(destination=[worker.hostname], timeout=0.5)
        return True if replies else None

    progress(f"waiting for worker {worker.hostname} …")
    wait_for(
        answered, what=f"worker {worker.hostname} to answer a ping", timeout=timeout, interval=0.1
    )
    end_progress()


def stop_worker(worker: Worker, grace: float = 20.0) -> None:
    """SIGTERM the worker's process group (warm shutdown), SIGKILL it after ``grace`` s."""
    if worker.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.process.pid, signal.SIGTERM)
    try:
        worker.process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)


# --------------------------------------------------------------------------- observing


class SagaTable:
    """Reads the bench database on one held connection. Every read ends in ROLLBACK, so the
    bench's own polling shows in ``xact_rollback`` (counted in ``reads``), not in commits."""

    def __init__(self, conn: sa.Connection, saga_name: str) -> None:
        self.conn = conn
        self.saga_name = saga_name
        self.reads = 0

    def _fetch(self, sql: str, **params: Any) -> Any:
        try:
            return self.conn.execute(sa.text(sql), params).one_or_none()
        finally:
            self.conn.rollback()
            self.reads += 1

    def backend_pid(self) -> int:
        return int(self._fetch("SELECT pg_backend_pid()")[0])

    def count_in(self, state: str) -> int:
        row = self._fetch("SELECT count(*) FROM saga WHERE state = :s", s=state)
        return int(row[0])

    def count_settled_badly(self) -> int:
        sql = "SELECT count(*) FROM saga WHERE state NOT IN ('STARTED', 'PENDING', 'COMPLETED')"
        return int(self._fetch(sql)[0])

    def step_messages_written(self) -> int:
        """How many step messages (outbox rows) were written so far: progress while every
        saga is still PENDING (the queue is FIFO, so all sagas finish near the end)."""
        return int(self._fetch("SELECT coalesce(max(id), 0) FROM saga_outbox")[0])

    def last_finished_at(self) -> float:
        row = self._fetch("SELECT max(finished_at) FROM saga WHERE state = 'COMPLETED'")
        return float(row[0].timestamp())

    def timestamps(self, business_key: str) -> tuple[float, float] | None:
        """(created_at, finished_at) of a finished saga, else None."""
        row = self._fetch(
            "SELECT state, created_at, finished_at FROM saga WHERE name = :n AND business_key = :k",
            n=self.saga_name,
            k=business_key,
        )
        if row is None or row.finished_at is None:
            return None
        if row.state != "COMPLETED":
            raise BenchError(f"saga {business_key} ended {row.state}, not COMPLETED")
        return row.created_at.timestamp(), row.finished_at.timestamp()


@dataclass(frozen=True)
class TxnCounts:
    commits: int
    rollbacks: int


def read_txn_counts(admin: sa.Engine, database: str) -> TxnCounts:
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        row = conn.execute(
            sa.text("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = :d"),
            {"d": database},
        ).one()
    return TxnCounts(int(row.xact_commit), int(row.xact_rollback))


def settled_txn_counts(admin: sa.Engine, database: str, timeout: float) -> TxnCounts:
    """The counters once they stayed unchanged for ``STATS_QUIET_SECONDS``."""
    last = read_txn_counts(admin, database)
    quiet_since = time.monotonic()

    def settled() -> TxnCounts | None:
        nonlocal last, quiet_since
        now = read_txn_counts(admin, database)
        if now != last:
            last, quiet_since = now, time.monotonic()
        quiet = time.monotonic() - quiet_since
        progress(f"statistics: {now.commits} commits, quiet for {quiet:.1f}s …")
        return now if quiet >= STATS_QUIET_SECONDS else None

    counts = wait_for(
        settled, what="pg_stat_database to settle", timeout=timeout, interval=STATS_POLL
    )
    end_progress()
    return counts


class ChainLog:
    """Chain completions: the sorted set ``bench.app`` writes (member = chain id, score =
    completion time)."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    def clear(self) -> None:
        self.client.delete(self.key)

    def count(self) -> int:
        return int(self.client.zcard(self.key))

    def last_completion(self) -> float:
        ((_, score),) = self.client.zrange(self.key, -1, -1, withscores=True)
        return float(score)

    def completed_at(self, chain_id: str) -> float | None:
        score = self.client.zscore(self.key, chain_id)
        return None if score is None else float(score)


# --------------------------------------------------------------------------- CPU accounting

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` from /proc (None if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


CpuSample = dict[str, dict[int, float]]  # role -> pid -> CPU seconds


class CpuMeter:
    """CPU time per role (worker processes, PostgreSQL backends of the bench database,
    the Redis server, this publishing process) between two samples. Unlike wall-clock
    throughput it is not skewed by other load on the machine. Linux and local servers only;
    roles it cannot see are left out."""

    def __init__(
        self, worker_pid: int, postgres_pids: Callable[[], list[int]], redis_pid: int | None
    ) -> None:
        self.worker_pid = worker_pid
        self.postgres_pids = postgres_pids
        self.redis_pid = redis_pid

    @staticmethod
    def available() -> bool:
        return Path("/proc/self/stat").exists()

    def sample(self) -> CpuSample:
        roles = {
            "worker": [self.worker_pid, *child_pids(self.worker_pid)],
            "postgres": self.postgres_pids(),
            "redis": [self.redis_pid] if self.redis_pid else [],
        }
        sample = {
            role: {pid: cpu for pid in pids if (cpu := cpu_seconds(pid)) is not None}
            for role, pids in roles.items()
        }
        sample["publisher"] = {os.getpid(): time.process_time()}
        return sample

    @staticmethod
    def used_ms(before: CpuSample, after: CpuSample, per: int) -> dict[str, float]:
        """CPU milliseconds per item, by role and in total."""
        used = {
            role: sum(cpu - before.get(role, {}).get(pid, 0.0) for pid, cpu in pids.items())
            for role, pids in after.items()
            if pids
        }
        used["total"] = sum(used.values())
        return {role: seconds * 1000 / per for role, seconds in used.items()}


def redis_server_pid(client: redis.Redis) -> int | None:
    host = client.connection_pool.connection_kwargs.get("host")
    return int(client.info("server")["process_id"]) if host in LOCAL_HOSTS else None


def postgres_backend_pids(admin: sa.Engine, database: str, own_pid: int) -> list[int]:
    if admin.url.host not in LOCAL_HOSTS:
        return []
    with admin.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> :own"),
            {"d": database, "own": own_pid},
        ).all()
    return [int(row.pid) for row in rows]


# --------------------------------------------------------------------------- workloads


@dataclass
class Bench:
    options: Options
    bench_app: ModuleType
    worker: Worker
    sagas: SagaTable
    chains: ChainLog
    admin: sa.Engine
    database: str
    cpu: CpuMeter | None
    results: dict[str, Any] = field(default_factory=dict)
    # one-at-a-time latencies in ms, every sample (for the plot's CDFs)
    samples: dict[str, list[float]] = field(default_factory=dict)
    # prefixes business keys and chain ids: workers run in turn on one database must not
    # find the sagas of the previous one (a start with a known key is a no-op)
    tag: str = ""

    # -- publishing --

    def publish_chain(self, chain_id: str) -> None:
        from celery import chain

        m = self.bench_app
        chain(m.noop_1.si(), m.noop_2.si(), m.noop_3.si(), m.noop_4.s(chain_id)).apply_async()

    def publish_saga(self, business_key: str, durable: bool = True) -> None:
        """The durable start (the caller writes the saga, then publishes its first step),
        or the message-only one (``enqueue``: a start task creates it in the worker)."""
        if durable:
            self.bench_app.start_saga.delay({"id": business_key})
        else:
            self.bench_app.start_saga.enqueue({"id": business_key})

    # -- waiting --

    def wait_for_count(
        self,
        label: str,
        count: Callable[[], int],
        target: int,
        detail: Callable[[], str] = lambda: "",
    ) -> None:
        started = time.monotonic()

        def reached() -> bool | None:
            self.worker.check_alive()
            done = count()
            elapsed = time.monotonic() - started
            progress(f"{label}: {done}/{target} done{detail()}, {elapsed:.1f}s")
            return True if done >= target else None

        wait_for(
            reached,
            what=f"{label} ({target} to finish)",
            timeout=self.options.timeout,
            interval=THROUGHPUT_POLL,
        )
        end_progress()

    def wait_for_sagas(self, label: str, target: int) -> None:
        def completed() -> int:
            if self.sagas.count_settled_badly():
                raise BenchError(f"{label}: a saga ended FAILED or COMPENSATION_FAILED")
            return self.sagas.count_in("COMPLETED")

        def messages() -> str:
            return f", {self.sagas.step_messages_written()} step messages written"

        self.wait_for_count(label, completed, target, messages)

    def cpu_sample(self) -> CpuSample | None:
        return self.cpu.sample() if self.cpu else None

    def cpu_ms_per_item(self, before: CpuSample | None) -> dict[str, float] | None:
        if self.cpu is None or before is None:
            return None
        return CpuMeter.used_ms(before, self.cpu.sample(), self.options.n)

    # -- phases --

    def warm_up(self) -> None:
        count = self.options.warmup
        if not count:
            return
        self.chains.clear()
        completed = self.sagas.count_in("COMPLETED")
        for i in range(count):
            self.publish_chain(f"{self.tag}warm-{i}")
            self.publish_saga(f"{self.tag}warm-{i}")
        self.wait_for_count("warm-up chains", self.chains.count, count)
        self.wait_for_sagas("warm-up sagas", completed + count)

    def chain_throughput(self, key: str = "chains") -> dict[str, Any]:
        n = self.options.n
        self.chains.clear()
        cpu_before = self.cpu_sample()
        first_publish = time.time()
        for i in range(n):
            self.publish_chain(f"{self.tag}tput-{i}")
        published = time.time() - first_publish
        self.wait_for_count("chains", self.chains.count, n)
        cpu_ms = self.cpu_ms_per_item(cpu_before)
        elapsed = self.chains.last_completion() - first_publish
        self.results[key] = {
            "per_second": n / elapsed,
            "seconds": elapsed,
            "publish_seconds": published,
            "cpu_ms_per_chain": cpu_ms,
        }
        return dict(self.results[key])

    def saga_throughput(
        self, label: str = "sagas", durable: bool = True, count_txns: bool = True
    ) -> dict[str, Any]:
        """``count_txns``: also PostgreSQL transactions per saga (waits twice for the
        statistics to settle, ~11 s each)."""
        n = self.options.n
        before_completed = self.sagas.count_in("COMPLETED")
        before = (
            settled_txn_counts(self.admin, self.database, self.options.timeout)
            if count_txns
            else None
        )
        reads_before = self.sagas.reads
        cpu_before = self.cpu_sample()
        first_publish = time.time()
        for i in range(n):
            self.publish_saga(f"{self.tag}{label}-{i}", durable)
        published = time.time() - first_publish
        self.wait_for_sagas(label, before_completed + n)
        cpu_ms = self.cpu_ms_per_item(cpu_before)
        elapsed = self.sagas.last_finished_at() - first_publish
        self.results[label] = {
            "per_second": n / elapsed,
            "seconds": elapsed,
            "publish_seconds": published,
            "starts_per_second": n / published,  # what the caller sustains
            "cpu_ms_per_saga": cpu_ms,
        }
        if before is not None:
            after = settled_txn_counts(self.admin, self.database, self.options.timeout)
            own_reads = self.sagas.reads - reads_before
            self.results[label]["commits_per_saga"] = (after.commits - before.commits) / n
            self.results[label]["read_only_txns_per_saga"] = (
                after.rollbacks - before.rollbacks - own_reads
            ) / n
        return dict(self.results[label])

    def saga_latency(self) -> None:
        end_to_end, in_database = [], []
        for i in range(self.options.latency_n):
            key = f"{self.tag}lat-{i}"
            published = time.time()
            self.publish_saga(key)
            created, finished = wait_for(
                lambda key=key: self.sagas.timestamps(key),
                what=f"latency saga {key} to finish",
                timeout=self.options.timeout,
                interval=LATENCY_POLL,
            )
            end_to_end.append(finished - published)
            in_database.append(finished - created)
            progress(f"saga latency: {i + 1}/{self.options.latency_n}")
        end_progress()
        self.samples["saga"] = [seconds * 1000 for seconds in end_to_end]
        self.results["saga_latency_ms"] = percentiles_ms(end_to_end)
        self.results["saga_latency_created_to_finished_ms"] = percentiles_ms(in_database)

    def chain_latency(self) -> None:
        latencies = []
        for i in range(self.options.latency_n):
            chain_id = f"{self.tag}lat-{i}"
            published = time.time()
            self.publish_chain(chain_id)
            finished = wait_for(
                lambda chain_id=chain_id: self.chains.completed_at(chain_id),
                what=f"latency chain {chain_id} to finish",
                timeout=self.options.timeout,
                interval=LATENCY_POLL,
            )
            latencies.append(finished - published)
            progress(f"chain latency: {i + 1}/{self.options.latency_n}")
        end_progress()
        self.samples["chain"] = [seconds * 1000 for seconds in latencies]
        self.results["chain_latency_ms"] = percentiles_ms(latencies)

    def run(self) -> dict[str, Any]:
        self.results["load_average_before"] = round(os.getloadavg()[0], 2)
        self.warm_up()
        self.chain_throughput()
        self.saga_throughput()
        if self.options.compare_start:
            self.saga_throughput("sagas_message_only", durable=False)
        self.saga_latency()
        self.chain_latency()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        chains_per_s = self.results["chains"]["per_second"]
        sagas_per_s = self.results["sagas"]["per_second"]
        hops = hops_per_saga(self.options)
        return {
            "coordinator_hop": self.options.coordinator_hop,
            "inline_steps": self.options.inline_steps,
            "untimed_steps": self.options.untimed_steps,
            "chain_acks_late": self.options.chain_acks_late,
            "n": self.options.n,
            "pool": self.options.pool,
            "concurrency": self.options.concurrency,
            "step_ms": self.options.step_ms,
            "cpus": os.cpu_count(),
            "latency_n": self.options.latency_n,
            "chains_per_second": chains_per_s,
            "sagas_per_second": sagas_per_s,
            "ratio_sagas_to_chains": sagas_per_s / chains_per_s,
            "hop_ceiling": HOPS_PER_CHAIN / hops,
            "hops_per_saga": hops,
            "hops_per_chain": HOPS_PER_CHAIN,
            **self.results,
        }


# --------------------------------------------------------------------------- report


def hops_per_saga(options: Options) -> int:
    """Task deliveries per saga in the mode ``options`` names (the caller starts it)."""
    if options.coordinator_hop:
        return HOPS_PER_SAGA_WITH_COORDINATOR_HOP
    return HOPS_PER_SAGA_INLINE if options.inline_steps else HOPS_PER_SAGA


def format_table(summary: dict[str, Any]) -> str:
    chains, sagas = summary["chains"], summary["sagas"]
    hops = summary["hops_per_saga"]
    saga_lat, chain_lat = summary["saga_latency_ms"], summary["chain_latency_ms"]
    in_db = summary["saga_latency_created_to_finished_ms"]
    rows = [
        ("N (chains, sagas)", f"{summary['n']}"),
        ("each step waits (--step-ms)", f"{summary['step_ms']:g} ms"),
        (
            "worker",
            f"{summary['pool']} -c {summary['concurrency']} ({summary['cpus']} CPUs, "
            f"1-min load before: {summary['load_average_before']})",
        ),
        (
            "sagas",
            saga_mode(summary),
        ),
        (
            "chains",
            "acks_late, reject_on_worker_lost (as saga tasks; --chain-acks-late)"
            if summary.get("chain_acks_late")
            else "Celery's defaults (acked before they run)",
        ),
        (
            f"chains/s ({HOPS_PER_CHAIN} hops)",
            f"{summary['chains_per_second']:.1f}  ({chains['seconds']:.1f}s)",
        ),
        (
            f"sagas/s ({hops} hops)",
            f"{summary['sagas_per_second']:.1f}  ({sagas['seconds']:.1f}s)",
        ),
        (
            "durable starts/s in the caller",
            f"{sagas['starts_per_second']:.1f}  ({sagas['publish_seconds']:.1f}s for N, "
            "one thread: saga + outbox row committed, then published)",
        ),
        *message_only_rows(summary),
        (
            "ratio sagas/chains",
            f"{summary['ratio_sagas_to_chains']:.2f}  "
            f"(hop ceiling {HOPS_PER_CHAIN}/{hops} = {summary['hop_ceiling']:.2f})",
        ),
        (
            f"saga latency, 1 at a time (n={summary['latency_n']})",
            f"p50 {saga_lat['p50']:.1f} ms  p90 {saga_lat['p90']:.1f} ms  "
            f"p99 {saga_lat['p99']:.1f} ms",
        ),
        (
            "  of which created_at -> finished_at",
            f"p50 {in_db['p50']:.1f} ms  p90 {in_db['p90']:.1f} ms  p99 {in_db['p99']:.1f} ms",
        ),
        (
            f"chain latency, 1 at a time (n={summary['latency_n']})",
            f"p50 {chain_lat['p50']:.1f} ms  p90 {chain_lat['p90']:.1f} ms  "
            f"p99 {chain_lat['p99']:.1f} ms",
        ),
        *cpu_rows(chains.get("cpu_ms_per_chain"), sagas.get("cpu_ms_per_saga")),
        ("DB commits per saga", f"{sagas['commits_per_saga']:.2f}"),
        ("DB read-only transactions per saga", f"{sagas['read_only_txns_per_saga']:.2f}"),
        ("task hops per saga / chain", f"{hops} / {HOPS_PER_CHAIN}"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def saga_mode(summary: dict[str, Any]) -> str:
    if summary["coordinator_hop"]:
        return "each outcome through celery_sagas.advance (coordinator_hop)"
    if summary.get("inline_steps"):
        timing = "without time limits" if summary.get("untimed_steps") else "300 s timeouts"
        return f"inline_steps: steps 2-4 run in step 1's delivery (steps with {timing})"
    return "each step task applies its own outcome (default)"


def message_only_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    other = summary.get("sagas_message_only")
    if not other:
        return []
    return [
        (
            f"message-only start: sagas/s ({summary['hops_per_saga'] + 1} hops)",
            f"{other['per_second']:.1f}  ({other['seconds']:.1f}s; "
            f"{other['starts_per_second']:.1f} enqueues/s in the caller)",
        )
    ]


def describe_cpu(cpu_ms: dict[str, float]) -> str:
    parts = [f"{role} {ms:.1f}" for role, ms in cpu_ms.items() if role != "total"]
    return f"{cpu_ms['total']:.1f} ms  ({', '.join(parts)})"


def cpu_rows(
    per_chain: dict[str, float] | None, per_saga: dict[str, float] | None
) -> list[tuple[str, str]]:
    if not per_chain or not per_saga:
        return []
    return [
        ("CPU per chain (throughput run)", describe_cpu(per_chain)),
        ("CPU per saga (throughput run)", describe_cpu(per_saga)),
        ("CPU ratio chain/saga", f"{per_chain['total'] / per_saga['total']:.2f}"),
    ]


# --------------------------------------------------------------------------- main


def load_bench_app(env: dict[str, str]) -> ModuleType:
    """Import ``bench.app`` configured like the worker (it reads the environment)."""
    os.environ.update(env)
    return importlib.import_module("bench.app")


@contextlib.contextmanager
def bench_database(admin: sa.Engine, options: Options) -> Iterator[tuple[str, str]]:
    name = f"celery_sagas_bench_{os.getpid()}"
    url = create_database(admin, name)
    try:
        create_schema(url)
        yield name, url
    finally:
        if options.keep:
            print(f"kept database {name} ({url})", file=sys.stderr)
        else:
            drop_database(admin, name)


@contextlib.contextmanager
def running_worker(
    options: Options, env: dict[str, str], bench_app: ModuleType, log_dir: Path
) -> Iterator[Worker]:
    worker = start_worker(options.pool, options.concurrency, env, log_dir)
    try:
        wait_until_ready(worker, bench_app.app, timeout=min(options.timeout, 60.0))
        yield worker
    except BaseException:
        end_progress()
        print(f"worker log ({worker.log_path}), last lines:\n{worker.log_tail()}", file=sys.stderr)
        raise
    finally:
        stop_worker(worker)


def make_cpu_meter(
    worker: Worker, admin: sa.Engine, database: str, sagas: SagaTable, broker: redis.Redis
) -> CpuMeter | None:
    if not CpuMeter.available():
        return None
    own_backend = sagas.backend_pid()
    return CpuMeter(
        worker.process.pid,
        lambda: postgres_backend_pids(admin, database, own_backend),
        redis_server_pid(broker),
    )


@dataclass
class Session:
    """The servers of one run, shared by the workers it starts in turn (``--io-matrix``):
    one bench database, one Redis DB, the bench app imported in this process."""

    options: Options
    stack: contextlib.ExitStack
    broker: redis.Redis
    admin: sa.Engine
    database: str
    db_url: str
    env: dict[str, str]
    bench_app: ModuleType
    log_dir: Path

    @contextlib.contextmanager
    def bench(self, options: Options) -> Iterator[Bench]:
        """A worker of ``options.pool`` / ``options.concurrency`` and a Bench driving it."""
        env = {**self.env, "BENCH_STEP_MS": f"{options.step_ms:g}"}
        with contextlib.ExitStack() as stack:
            worker = stack.enter_context(running_worker(options, env, self.bench_app, self.log_dir))
            engine = sa.create_engine(self.db_url, poolclass=NullPool)
            stack.callback(engine.dispose)
            sagas = SagaTable(stack.enter_context(engine.connect()), self.bench_app.SAGA_NAME)
            yield Bench(
                tag=f"{options.pool}{options.concurrency}-",
                options=options,
                bench_app=self.bench_app,
                worker=worker,
                sagas=sagas,
                chains=ChainLog(self.broker, self.bench_app.CHAIN_DONE_KEY),
                admin=self.admin,
                database=self.database,
                cpu=make_cpu_meter(worker, self.admin, self.database, sagas, self.broker),
            )


@contextlib.contextmanager
def session(options: Options) -> Iterator[Session]:
    broker_url = redis_url_for(options)
    broker = check_redis(broker_url)
    admin = admin_engine(options.pg_admin_url)
    check_postgres(admin)
    with contextlib.ExitStack() as stack:
        stack.enter_context(leased_redis_db(options.redis_url, options.redis_db))
        database, db_url = stack.enter_context(bench_database(admin, options))
        broker.flushdb()
        if not options.keep:
            stack.callback(broker.flushdb)
        env = {
            "CELERY_BROKER_URL": broker_url,
            "SAGAS_DATABASE_URL": db_url,
            "BENCH_REDIS_URL": broker_url,
            "SAGAS_COORDINATOR_HOP": "true" if options.coordinator_hop else "false",
            "BENCH_CHAIN_ACKS_LATE": "true" if options.chain_acks_late else "false",
            "SAGAS_INLINE_STEPS": "true" if options.inline_steps else "false",
            "BENCH_UNTIMED_STEPS": "true" if options.untimed_steps else "false",
            "SAGAS_SIGNING_KEY": "bench-signing-key",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        bench_app = load_bench_app(env)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sagas-bench-")))
        yield Session(options, stack, broker, admin, database, db_url, env, bench_app, log_dir)


def run(options: Options) -> dict[str, Any]:
    """One worker, one run: the table ``format_table`` prints."""
    with session(options) as current, current.bench(options) as bench:
        summary = bench.run()
        summary["latency_samples_ms"] = bench.samples
        return summary


def reporter(as_json: bool) -> Callable[[str], None]:
    """Prints a line of the report as the run goes (to stderr under --json, whose stdout
    is the JSON)."""

    def say(text: str) -> None:
        end_progress()
        print(text, file=sys.stderr if as_json else sys.stdout, flush=True)

    return say


def single_row(summary: dict[str, Any]) -> dict[str, Any]:
    """A single run as a row of the plot's throughput panel."""
    return {
        "pool": summary["pool"],
        "concurrency": summary["concurrency"],
        "median": {"chains": summary["chains_per_second"], "sagas": summary["sagas_per_second"]},
    }


def measure(
    options: Options, say: Callable[[str], None]
) -> tuple[Any, str, list[dict[str, Any]], dict[str, Any]]:
    """(JSON summary, text report, plot rows, plot samples) of the mode ``options`` asks."""
    from bench import peers, rounds

    if options.io_matrix:
        with session(options) as current:
            rows, samples = rounds.run_matrix(current, options, IO_MATRIX, say)
        return rows, rounds.format_matrix(rows), rows, samples
    if options.rounds > 1:
        peer = peers.run_dbos if options.peers and peers.dbos_available() else None
        if peer is None:
            say("DBOS: not in the rounds (make bench-peers installs it into .venv-peers)")
        with session(options) as current:
            summary, latencies = rounds.run_in_rounds(current, options, peer, say)
        label = f"{options.pool} -c {options.concurrency}"
        return summary, "", [summary], {label: latencies}
    summary = run(options)
    latencies = summary.pop("latency_samples_ms")
    label = f"{options.pool} -c {options.concurrency}"
    return summary, format_table(summary), [single_row(summary)], {label: latencies}


def main(argv: list[str] | None = None) -> int:
    from bench.peers import PeerError

    options = parse_options(argv)
    try:
        summary, report, rows, samples = measure(options, reporter(options.as_json))
    except (BenchError, PeerError) as exc:
        end_progress()
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        end_progress()
        print("interrupted", file=sys.stderr)
        return 130
    if options.as_json:
        print(json.dumps(summary, indent=2))
    elif report:
        print(report)
    if options.plot is not None:
        from bench.plot import write_plot

        title = (
            f"celery-sagas vs bare Celery chains, N={options.n}, each step waits "
            f"{options.step_ms:g} ms ({os.cpu_count()} CPUs, shared)"
        )
        print(f"plot: {write_plot(options.plot, rows, samples, title)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
