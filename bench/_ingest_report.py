"""The ingest benchmark's samples, and the table, goals and notes made from them."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import statistics
from collections import Counter
from dataclasses import dataclass

from bench import _wrk
from bench._core import Goal, Report, Role, Row, paired_ratio
from bench._ingest_load import Workload

__all__ = [
    "BARE",
    "EVENTS",
    "EVENTS_UNSENT",
    "PG_ONE",
    "PG_TWO",
    "SERVICE",
    "EventTally",
    "Ledger",
    "Sample",
    "report",
]

BARE = "bare Starlette app: json.loads, 200"
SERVICE = "kling-receiver serve: check, record, 200"
EVENTS = "the same with one event endpoint (sink, 204)"
EVENTS_UNSENT = "the same, endpoint set, dispatcher off"
PG_ONE = "the same on PostgreSQL, 1 receiver"
PG_TWO = "the same on PostgreSQL, 2 receivers"
_RATIO_GOAL = 0.5
_P99_GOAL_MS = 50.0
_EVENTS_GOAL = 0.9  # with one endpoint / without, req/s in the same round


@dataclass(frozen=True, slots=True)
class Ledger:
    """What the service said it recorded, and what its database holds after a SIGKILL."""

    answered_ok: int  # 2xx answers wrk received, warm-up and measured run together
    counted: int  # deliveries the service counted as recorded (/api/stats, all receivers)
    recorded: int  # deliveries in the database (events.times_received, summed)
    events: int  # distinct deliveries kept
    tasks: int
    assets: int
    outbound: int  # events in the outbox (written whether or not an endpoint is set)
    outcomes: dict[str, int]
    refused: dict[str, int]


@dataclass(frozen=True, slots=True)
class EventTally:
    """What a run with an event endpoint wrote and what its sink took."""

    dispatching: bool  # False: EVENT_DISPATCH_CONCURRENCY=0, nothing is sent
    written_start: int  # deliveries in the ledger when the measured run began
    sent_start: int  # distinct events the sink had taken then
    written_end: int  # the same two when wrk's measured run ended
    sent_end: int
    drain_seconds: float | None  # from then until no delivery was left; None: not in the bound
    drain_rate: float | None  # events the sink took per second meanwhile
    drain_cpu_per_event: float | None  # the service's CPU seconds meanwhile, per event sent
    outbox: int  # events in the outbox once the service was killed
    deliveries: dict[str, int]  # their deliveries, by state, then
    received: int  # POSTs the sink took, all told
    distinct: int  # distinct webhook-ids among those with a good signature
    bad_signature: int
    types: dict[str, int]
    sink_cpu_seconds: float  # the sink's, in the measured run
    sink_cpu_total: float  # the sink's, from its start to the end of the drain
    attempt_ms: tuple[float, ...]  # each attempt's latency as the service recorded it, sorted
    attempt_ms_measured: tuple[float, ...]  # those of the attempts ended in the measured run


@dataclass(frozen=True, slots=True)
class Sample:
    measured: _wrk.Result
    warmup: _wrk.Result
    server_cpu_seconds: float  # the server processes' user + system time in the measured run
    rss_growth_mib: float  # the largest of the server processes'
    positions: int  # deliveries per wrk thread reached by the end of the measured run
    ledger: Ledger | None = None
    database_cpu_seconds: float | None = None  # PostgreSQL's, in the measured run
    events: EventTally | None = None  # with an event endpoint


def _server_stack() -> str:
    try:
        uvicorn = importlib.metadata.version("uvicorn")
    except importlib.metadata.PackageNotFoundError:
        uvicorn = "?"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn}, 1 process per receiver, {loop} loop, {http}"


def _ledger_problems(name: str, round_number: int, sample: Sample, connections: int) -> list[str]:
    problems = []
    runs = (sample.warmup, sample.measured)
    non_2xx = sum(r.non_2xx for r in runs)
    socket_errors = sum(r.socket_errors for r in runs)
    if non_2xx:
        problems.append(f"round {round_number}: {non_2xx} answers were not 2xx")
    if socket_errors:
        problems.append(f"round {round_number}: {socket_errors} socket errors or timeouts")
    if sample.events is not None:
        problems += _event_problems(round_number, sample.events)
    ledger = sample.ledger
    if ledger is None:
        return problems
    if ledger.refused:
        problems.append(f"round {round_number}: refused {ledger.refused}")
    if ledger.recorded != ledger.counted:
        problems.append(
            f"round {round_number}: the service counted {ledger.counted} recorded deliveries,"
            f" the database holds {ledger.recorded}"
        )
    if ledger.recorded < ledger.answered_ok:
        problems.append(
            f"round {round_number}: {ledger.answered_ok} deliveries answered 2xx,"
            f" only {ledger.recorded} in the database after SIGKILL"
        )
    # What wrk left in flight when each of its two runs ended may be recorded, unanswered.
    if ledger.recorded > ledger.answered_ok + len(runs) * connections:
        problems.append(
            f"round {round_number}: the database holds {ledger.recorded} deliveries,"
            f" more than the {ledger.answered_ok} answered plus those in flight"
        )
    return [f"{name}: {p}" for p in problems]


def _event_problems(round_number: int, tally: EventTally) -> list[str]:
    problems = []
    written = sum(tally.deliveries.values())
    if written != tally.outbox:
        problems.append(
            f"{tally.outbox} events in the outbox, {written} deliveries to the endpoint"
        )
    if tally.bad_signature:
        problems.append(f"{tally.bad_signature} events reached the sink with a bad signature")
    delivered = tally.deliveries.get("delivered", 0)
    if not tally.dispatching:
        if tally.received:
            problems.append(f"the sink received {tally.received} events, none should be sent")
    elif tally.drain_seconds is not None and tally.distinct != delivered:
        problems.append(f"{delivered} deliveries recorded as sent, the sink took {tally.distinct}")
    if tally.deliveries.get("failed"):
        problems.append(f"{tally.deliveries['failed']} deliveries failed for good")
    return [f"round {round_number}: {p}" for p in problems]


def _problems(name: str, runs: list[Sample], connections: int) -> list[str]:
    return [
        problem
        for number, sample in enumerate(runs, start=1)
        for problem in _ledger_problems(name, number, sample, connections)
    ]


def _ledger_goal(target: str, runs: list[Sample], problems: list[str]) -> Goal:
    answered = sum(s.ledger.answered_ok for s in runs if s.ledger)
    recorded = sum(s.ledger.recorded for s in runs if s.ledger)
    return Goal(target, f"{answered} answered, {recorded} recorded", not problems)


def _rps(runs: list[Sample]) -> list[float]:
    return [s.measured.per_second for s in runs]


def _per_second(runs: list[Sample], count: str) -> tuple[float, ...]:
    """Events written (`count` "written") or sent ("sent") per second of the measured run."""
    rates = []
    for sample in runs:
        tally = sample.events
        assert tally is not None
        done = getattr(tally, f"{count}_end") - getattr(tally, f"{count}_start")
        rates.append(done / sample.measured.seconds)
    return tuple(rates)


def _rows(samples: dict[str, list[Sample]]) -> list[Row]:
    bare_rps = _rps(samples[BARE])
    service_rps = _rps(samples[SERVICE])

    def subject_rows(name: str, role: Role) -> list[Row]:
        runs = samples[name]
        rps = _rps(runs)
        rows = [
            Row(
                name,
                role,
                "req/s",
                tuple(rps),
                paired_ratio(rps, bare_rps),
                max(s.rss_growth_mib for s in runs),
            )
        ]
        # Each subject runs once a round, so the n-th samples of two subjects share a round.
        same_round = tuple(p / s for p, s in zip(rps, service_rps, strict=True))
        if name in (PG_ONE, PG_TWO):
            rows.append(
                Row(f"  / {SERVICE.split(':')[0]} on SQLite, same round", role, "x", same_round)
            )
        if name in (EVENTS, EVENTS_UNSENT):
            rows += [
                Row(f"  / {SERVICE.split(':')[0]} with none, same round", role, "x", same_round),
                Row("  events written, measured run", role, "ev/s", _per_second(runs, "written")),
            ]
            if name == EVENTS:
                rows.append(
                    Row("  events sent, measured run", role, "ev/s", _per_second(runs, "sent"))
                )
        rows += [
            Row("  p50 latency", role, "ms", tuple(s.measured.p50_ms for s in runs)),
            Row("  p99 latency", role, "ms", tuple(s.measured.p99_ms for s in runs)),
        ]
        return rows

    rows = subject_rows(BARE, Role.baseline) + subject_rows(SERVICE, Role.subject)
    for name in (EVENTS, EVENTS_UNSENT, PG_ONE, PG_TWO):
        if name in samples:
            rows += subject_rows(name, Role.reference if name == EVENTS_UNSENT else Role.subject)
    return rows


def report(
    options: argparse.Namespace,
    seed: int,
    wrk_version: str,
    workload: Workload,
    samples: dict[str, list[Sample]],
    disk: str,
    database: str | None,
) -> Report:
    """The ingest table: the bare app, the service on SQLite and, with `database`, on it."""
    service = samples[SERVICE]
    ratio = paired_ratio(_rps(service), _rps(samples[BARE]))
    p99 = statistics.median(s.measured.p99_ms for s in service)
    worst_p99 = max(s.measured.p99_ms for s in service)
    connections = options.ingest_connections
    problems = _problems(SERVICE, service, connections)
    goals = [
        Goal(
            f"service / bare app >= {_RATIO_GOAL:.2f} (req/s)", f"{ratio:.2f}", ratio >= _RATIO_GOAL
        ),
        Goal(
            f"service p99 < {_P99_GOAL_MS:.0f} ms (median of rounds)",
            f"{p99:.1f} ms (worst {worst_p99:.1f})",
            p99 < _P99_GOAL_MS,
        ),
        _ledger_goal("every answer 2xx; every 200 in the ledger after SIGKILL", service, problems),
    ]
    if EVENTS in samples:
        events = samples[EVENTS]
        quotient = paired_ratio(_rps(events), _rps(service))
        with_one = paired_ratio(_rps(events), _rps(samples[BARE]))
        goals.append(
            Goal(
                f"with one event endpoint / without >= {_EVENTS_GOAL:.2f} (req/s, same round)",
                f"{quotient:.2f} (of the bare app {with_one:.2f} / {ratio:.2f}"
                f" = {with_one / ratio:.2f})",
                quotient >= _EVENTS_GOAL,
            )
        )
    events_names = [name for name in (EVENTS, EVENTS_UNSENT) if name in samples]
    if events_names:
        ev_problems = [
            p for name in events_names for p in _problems(name, samples[name], connections)
        ]
        ev_runs = [s for name in events_names for s in samples[name]]
        goals.append(
            _ledger_goal(
                "the same with an event endpoint; its sink and outbox agree",
                ev_runs,
                ev_problems,
            )
        )
        problems += ev_problems
    postgres = [name for name in (PG_ONE, PG_TWO) if name in samples]
    if postgres:
        pg_problems = [p for name in postgres for p in _problems(name, samples[name], connections)]
        pg_runs = [s for name in postgres for s in samples[name]]
        goals.append(
            _ledger_goal("the same on PostgreSQL, 1 and 2 receivers", pg_runs, pg_problems)
        )
        problems += pg_problems
    return Report(
        "ingest",
        _setup(options, seed, wrk_version, workload, disk, database, len(samples)),
        tuple(_rows(samples)),
        tuple(goals),
        tuple(_notes(options, workload, samples, problems, disk)),
    )


def _setup(
    options: argparse.Namespace,
    seed: int,
    wrk_version: str,
    workload: Workload,
    disk: str,
    database: str | None,
    subjects: int,
) -> tuple[str, ...]:
    sizes = workload.body_bytes
    smallest = min(lo for lo, _, _ in sizes.values())
    largest = max(hi for _, _, hi in sizes.values())
    medians = ", ".join(f"{kind} {median}" for kind, (_, median, _) in sizes.items())
    mix = ", ".join(f"{kind} {share:.0%}" for kind, share in workload.mix.items())
    setup = [
        f"load     {wrk_version}, {options.ingest_threads} threads,"
        f" {options.ingest_connections} connections, closed loop; per subject and round"
        f" {options.ingest_warmup} s warm-up, then {options.ingest_seconds} s measured",
        f"bodies   Kling callbacks, each task to its own signed URL: {mix};"
        f" {workload.duplicate_share:.1%} sent twice, {workload.out_of_order_share:.1%} of tasks"
        f" with processing after the end",
        f"         {smallest}-{largest} B (median by status: {medians}); {workload.families};"
        f" pool of {workload.tasks} tasks",
        f"servers  {_server_stack()}, access log off: the options `serve` uses, for"
        f" {'both' if subjects == 2 else 'all'}",
        "service  fresh DATA_DIR each round, SQLite WAL synchronous=FULL; DOWNLOAD_CONCURRENCY=0;"
        " no Kling API key (no poller); LOG_LEVEL=INFO: one JSON line per delivery, to a file",
    ]
    if options.ingest_events or options.ingest_events_unsent:
        setup += [
            "events   the outbox is written in every service run; with an endpoint:"
            " EVENT_WEBHOOK_URLS=http://127.0.0.1:PORT/events, ALLOW_PRIVATE_EVENT_URLS=true,"
            + (
                f" EVENT_DISPATCH_CONCURRENCY={options.ingest_events_concurrency}"
                if options.ingest_events_concurrency is not None
                else f" EVENT_DISPATCH_CONCURRENCY unset (the default, {_default_concurrency()})"
            )
            + (", or 0 for the 'dispatcher off' row" if options.ingest_events_unsent else ""),
            "         the endpoint: bench._event_sink, its own process, fresh each run (asyncio"
            " Protocol, no framework: checks the signature, counts, answers 204); after wrk's"
            f" run the dispatcher has up to {options.ingest_events_drain:g} s to send what is"
            " left, then the service is killed and outbox and sink are compared",
        ]
    if database is not None:
        half = options.ingest_threads // 2
        setup += [
            f"postgres {database} on 127.0.0.1 (tests/pg_server.py: Debian's binaries), one"
            " server for the run, cluster on the scratch disk, fsync and synchronous_commit on,"
            " settings otherwise default; a fresh database for each run, dropped after it",
            "         each receiver a `serve` as above with DATABASE_URL (its pool: up to 8"
            " connections); 2 receivers share the database and secrets, and wrk's threads are"
            f" split between them ({half} thread(s), {options.ingest_connections // 2}"
            " connections each); a task's deliveries all come from one thread, so go to one"
            " receiver",
        ]
    setup += [
        "disk     scratch"
        + (", DATA_DIR and the PostgreSQL cluster" if database else " and DATA_DIR")
        + f" on {disk}",
        f"rounds   {options.rounds}, subject order shuffled each round (--ingest-seed {seed})",
        f"ratio    median over rounds of (subject req/s / {BARE} req/s in the same round)",
    ]
    if database is not None:
        setup.append(
            "         '/ ... on SQLite' rows: per round, the PostgreSQL subject's req/s / the"
            " SQLite service's in the same round; median in the median column"
        )
    return tuple(setup)


def _default_concurrency() -> int:
    from receiver.settings import Settings

    default = Settings.model_fields["event_dispatch_concurrency"].default
    return int(default)


def _event_notes(options: argparse.Namespace, samples: dict[str, list[Sample]]) -> list[str]:
    """Per round: what was written, what the sink had by the run's end and after the drain."""
    notes = []
    for name, label in ((EVENTS, "with one event endpoint"), (EVENTS_UNSENT, "dispatcher off")):
        runs = samples.get(name)
        if not runs:
            continue
        rounds = []
        types: Counter[str] = Counter()
        for sample in runs:
            tally = sample.events
            assert tally is not None and sample.ledger is not None
            types.update(tally.types)
            behind = tally.written_end - tally.sent_end
            text = (
                f"{tally.outbox} events for {sample.ledger.recorded} deliveries,"
                f" {tally.written_end - tally.written_start} in the measured run"
            )
            if tally.dispatching:
                caught = (
                    f"all sent {tally.drain_seconds:.1f} s after"
                    if tally.drain_seconds is not None
                    else f"{tally.deliveries.get('pending', 0)} still unsent"
                    f" {options.ingest_events_drain:g} s after"
                )
                text += (
                    f"; {behind} unsent when wrk stopped, {caught}; the sink took"
                    f" {tally.distinct} ({tally.received} POSTs), the ledger says"
                    f" {tally.deliveries.get('delivered', 0)} delivered"
                )
            else:
                text += f"; {tally.deliveries.get('pending', 0)} deliveries waiting, none sent"
            rounds.append(text)
        notes.append(
            f"{label}, by round: "
            + "; ".join(f"({n}) {t}" for n, t in enumerate(rounds, start=1))
            + "."
        )
        if any(s.events and s.events.dispatching for s in runs):
            attempts = sorted(ms for s in runs if s.events for ms in s.events.attempt_ms)
            loaded = sorted(ms for s in runs if s.events for ms in s.events.attempt_ms_measured)
            sink_us = statistics.median(
                s.events.sink_cpu_total / max(1, s.events.received) * 1e6 for s in runs if s.events
            )
            sink_cores = statistics.median(
                s.events.sink_cpu_seconds / s.measured.seconds for s in runs if s.events
            )
            total = sum(types.values()) or 1
            notes.append(
                f"{label}: events by type "
                + ", ".join(f"{k} {v / total:.1%}" for k, v in types.most_common())
                + f"; each attempt (resolve, sign, POST, answer) as the dispatcher timed it, all"
                f" rounds: p50 {_quantile(attempts, 0.5):.1f} ms, p99"
                f" {_quantile(attempts, 0.99):.1f} ms ({len(attempts)}), of those ended in the"
                f" measured runs p50 {_quantile(loaded, 0.5):.1f} ms, p99"
                f" {_quantile(loaded, 0.99):.1f} ms ({len(loaded)});"
                f" the sink's CPU {sink_us:.0f} us per event (start and drain included),"
                f" {sink_cores:.2f} cores in the measured run (medians)."
            )
            notes.append(_keeping_up(label, runs))
    return notes


def _keeping_up(label: str, runs: list[Sample]) -> str:
    """How much of what was written the dispatcher sent under load, and what it costs alone."""
    tallies = [s.events for s in runs if s.events is not None]
    shares = [
        (t.sent_end - t.sent_start) / (t.written_end - t.written_start)
        for t in tallies
        if t.written_end > t.written_start
    ]
    written = statistics.median(_per_second(runs, "written"))
    text = (
        f"{label}: while wrk ran, the sink took {statistics.median(shares):.1%} of the events"
        " written (median of rounds)"
    )
    rates = [t.drain_rate for t in tallies if t.drain_rate is not None]
    costs = [t.drain_cpu_per_event for t in tallies if t.drain_cpu_per_event is not None]
    if rates and costs:
        cost = statistics.median(costs)
        text += (
            f"; once it stopped, the dispatcher sent {statistics.median(rates):.0f} events/s,"
            f" the service spending {cost * 1e6:.0f} us of CPU per event sent (medians): sending"
            f" the measured run's {written:.0f} events/s as they were written would take"
            f" {written * cost:.1f} cores for that alone"
        )
    return text + "."


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _notes(
    options: argparse.Namespace,
    workload: Workload,
    samples: dict[str, list[Sample]],
    problems: list[str],
    disk: str,
) -> list[str]:
    bare, service = samples[BARE], samples[SERVICE]

    def per_request_us(runs: list[Sample]) -> float:
        return statistics.median(
            s.server_cpu_seconds / s.measured.requests * 1e6 for s in runs if s.measured.requests
        )

    def database_us(runs: list[Sample]) -> float:
        return statistics.median(
            (s.database_cpu_seconds or 0.0) / s.measured.requests * 1e6
            for s in runs
            if s.measured.requests
        )

    def wrk_cores(runs: list[Sample]) -> float:
        return statistics.median(s.measured.cpu_seconds / s.measured.seconds for s in runs)

    def server_cores(runs: list[Sample]) -> float:
        return statistics.median(s.server_cpu_seconds / s.measured.seconds for s in runs)

    def database_cores(runs: list[Sample]) -> float:
        return statistics.median((s.database_cpu_seconds or 0.0) / s.measured.seconds for s in runs)

    outcomes: Counter[str] = Counter()
    for sample in service:
        if sample.ledger:
            outcomes.update(sample.ledger.outcomes)
    total = sum(outcomes.values()) or 1
    last = service[-1].ledger
    notes = [
        "latency is wrk's: from writing a request to reading its whole answer, on"
        f" {options.ingest_connections} connections each waiting for its answer before the next"
        " request (closed loop: no coordinated-omission correction); p50/p99 per round"
        " as wrk's histogram gives them.",
        f"with all {options.ingest_connections} connections always waiting, mean latency is"
        f" {options.ingest_connections} / throughput (Little's law): a p99 under"
        f" {_P99_GOAL_MS:.0f} ms needs well over"
        f" {options.ingest_connections / (_P99_GOAL_MS / 1000):.0f} req/s.",
        f"server CPU per request (user + system of the server process over the measured run,"
        f" median): bare {per_request_us(bare):.0f} us, service {per_request_us(service):.0f} us."
        f" Cores used, bare / service runs: server {server_cores(bare):.2f} /"
        f" {server_cores(service):.2f}, wrk {wrk_cores(bare):.2f} / {wrk_cores(service):.2f},"
        f" of the {os.cpu_count()} they share with each other and whatever else runs.",
    ]
    for name, label in ((EVENTS, "with one event endpoint"), (EVENTS_UNSENT, "dispatcher off")):
        runs = samples.get(name)
        if runs:
            notes.append(
                f"{label}: server CPU per request (median) {per_request_us(runs):.0f} us, against"
                f" {per_request_us(service):.0f} us without an endpoint; cores used: server"
                f" {server_cores(runs):.2f}, wrk {wrk_cores(runs):.2f}."
            )
    notes += _event_notes(options, samples)
    for name, label in ((PG_ONE, "1 receiver"), (PG_TWO, "2 receivers")):
        runs = samples.get(name)
        if runs:
            notes.append(
                f"on PostgreSQL, {label}: CPU per request (medians) receivers"
                f" {per_request_us(runs):.0f} us + PostgreSQL {database_us(runs):.0f} us"
                " (postmaster and backends, those that ended included); cores used: receivers"
                f" {server_cores(runs):.2f}, PostgreSQL {database_cores(runs):.2f}, wrk"
                f" {wrk_cores(runs):.2f}."
            )
    notes += [
        "the service's outcomes over all rounds (SQLite): "
        + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(outcomes.items()))
        + (
            f"; last round's ledger: {last.tasks} tasks, {last.events} distinct deliveries,"
            f" {last.assets} assets queued (not downloaded)"
            if last
            else ""
        ),
        "every service run ends with SIGKILL (every receiver); the database is then opened and"
        " must hold each delivery that was answered 200 (answered <= recorded <= answered +"
        " those in flight when wrk stopped), and exactly what the service counted.",
    ]
    service_runs = [
        s
        for name in (SERVICE, EVENTS, EVENTS_UNSENT, PG_ONE, PG_TWO)
        for s in samples.get(name, [])
    ]
    wrapped = max(s.positions for s in service_runs) - workload.capacity(options.ingest_threads)
    if wrapped > 0:
        notes.append(
            f"the pool of {workload.tasks} tasks came round again: up to"
            f" {wrapped * options.ingest_threads} deliveries of a service round repeated earlier"
            " ones (duplicates, cheaper than new deliveries); raise --ingest-tasks"
        )
    if "tmpfs" in disk:
        notes.append("the scratch directory is on tmpfs: no disk was measured; pass --dir")
    notes += problems
    return notes
