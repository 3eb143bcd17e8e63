#!/usr/bin/env python3
"""The driver of scripts/bench: runs every leg of docs/benchmarks.md on its own stack
instance and writes the report. See scripts/bench --help and docs/benchmarks.md.

Each run (repeated --runs times, every tool in the same run on the same data):
  1. pg_start is emptied, then one logical slot per tool is created, then the backlog of N
     seed-shaped source transactions is written (each its own database transaction), the
     last one (the "marker") after reading X = pg_current_wal_insert_lsn(): every backlog
     transaction ends at or before X, only the marker ends after it.
  2. Source -> Kafka, one tool at a time: pg_recvlogical (ceiling), the connector
     (transactional, then at-least-once), Debezium in Kafka Connect standalone.
  3. Slot -> pg_end: direct mode and a native subscription over TCP loopback, then both
     over the servers' Unix sockets (odd runs start with direct mode, even runs with the
     subscription).
  4. Kafka -> pg_end: the sink on the transactional topic, the seed-style consumer, COPY.
  5. The outbox leg, on a WAL of its own: pg_start's Debezium-shaped outbox
     (bench.outboxevent: uuid id, aggregatetype, aggregateid, type, jsonb payload) gets one
     slot per tool, then N events (4 aggregate types, ~500-byte JSON payloads, one per source
     transaction, the last one after reading X); pg_recvlogical (ceiling), the connector with
     `--preset event-router`, Debezium with its Outbox Event Router tuned for throughput.
  6. Steady state (latency) at fixed source rates, Kafka path then direct mode.
"""

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

import report  # the same formatting for the log lines and the report (matplotlib only when charting)

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PASSWORD = "postgres"
# The suffix of the direct leg's rows that ran over the servers' Unix sockets.
UNIX = " over a Unix socket"


def log(*parts):
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"bench {stamp}:", *parts, file=sys.stderr, flush=True)


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(value):
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# ---------------------------------------------------------------------------------------
# Processes: started by the bench, measured from /proc (CPU, VmHWM) or from wait4's rusage.
# ---------------------------------------------------------------------------------------


class Proc:
    """A child process whose CPU time and peak RSS are read before it is stopped."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.cpu = None
        self.peak_rss = None
        self.exit_status = None

    def sample(self):
        """CPU seconds (user+system) and peak RSS (bytes) so far, from /proc."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            # fields[0] is field 3 (state): utime is field 14, stime field 15.
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            hwm = None
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
            self.cpu, self.peak_rss = cpu, hwm
        except (OSError, IndexError, ValueError):
            pass
        return self.cpu, self.peak_rss

    def alive(self):
        return self.exit_status is None and self.popen.poll() is None

    def wait_exit(self, timeout):
        """Waits for a process that ends by itself; its rusage is the measurement."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self._reaped(status, usage)
                return True
            time.sleep(0.005)
        return False

    def _reaped(self, status, usage):
        self.exit_status = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.exit_status
        self.cpu = usage.ru_utime + usage.ru_stime
        self.peak_rss = usage.ru_maxrss * 1024
        self.log_file.close()

    def stop(self, grace=30):
        """SIGTERM (the relay's graceful stop), SIGKILL after `grace` seconds. Keeps the
        last /proc sample as the measurement (taken by the caller when the work was done)."""
        if self.exit_status is not None:
            return
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        self.exit_status = self.popen.returncode
        self.log_file.close()

    def tail(self, lines=20):
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(what, condition, timeout, every=0.05, procs=()):
    """Polls `condition` until it returns a true value; fails on timeout or if one of
    `procs` exits early."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{what}: {p.name} exited early ({p.popen.returncode}):\n{p.tail()}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(every)


# ---------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------


class Stack:
    def __init__(self, args):
        self.dir = args.stack_dir
        self.offset = args.port_offset
        self.start_port = 8000 + self.offset
        self.end_port = 8001 + self.offset
        self.brokers = ",".join(f"127.0.0.1:{19090 + self.offset + i}" for i in range(3))
        self.start_url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{self.start_port}/db_start"
        self.end_url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{self.end_port}/db_end"
        self.env = {
            "OUTBOX_RELAY_STACK_DIR": self.dir,
            "OUTBOX_RELAY_STACK_PORT_OFFSET": str(self.offset),
        }
        self._socket_dir = None

    def socket_dir(self):
        """The directory of both servers' Unix sockets, as scripts/stack chose it."""
        if self._socket_dir is None:
            out = subprocess.run([str(REPO / "scripts" / "stack"), "env"], env={**os.environ, **self.env},
                                 check=True, capture_output=True, text=True).stdout
            self._socket_dir = next(line.split("=", 1)[1] for line in out.splitlines()
                                    if line.startswith("export PG_SOCKET_DIR="))
        return self._socket_dir

    def relay_url(self, which, unix):
        """A URL for the relay: TCP loopback, or the Unix socket (trusted, no password)."""
        if not unix:
            return self.start_url if which == "start" else self.end_url
        port, db = (self.start_port, "db_start") if which == "start" else (self.end_port, "db_end")
        return f"postgres://postgres@{urllib.parse.quote(self.socket_dir(), safe='')}:{port}/{db}"

    def script(self, *argv):
        subprocess.run(
            [str(REPO / "scripts" / "stack"), *argv],
            env={**os.environ, **self.env},
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def pg(self, which):
        url = self.start_url if which == "start" else self.end_url
        return psycopg.connect(url, autocommit=True)

    def psql(self, which, *argv, **kw):
        port = self.start_port if which == "start" else self.end_port
        db = "db_start" if which == "start" else "db_end"
        return subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
             "-U", "postgres", "-d", db, *argv],
            env={**os.environ, "PGPASSWORD": PASSWORD, "PGOPTIONS": "-c client_min_messages=warning",
                 **kw.pop("env", {})},
            check=True, **kw)


SOURCE_SETUP = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE SEQUENCE IF NOT EXISTS bench.ids;
-- One seed-shaped source transaction per loop iteration, each committed on its own (the
-- COMMIT inside the procedure), so logical decoding sees n transactions. The caller sets
-- synchronous_commit=off: the WAL is the same, only the wait for each flush is skipped.
CREATE OR REPLACE PROCEDURE bench.seed(n int, accounts int) LANGUAGE plpgsql AS $$
DECLARE
    i int; v_id bigint; v_acc bigint; v_amt numeric; v_ts timestamp;
BEGIN
    FOR i IN 1..n LOOP
        v_id := nextval('bench.ids');
        v_acc := 1 + floor(random() * accounts)::bigint;
        v_amt := (CASE WHEN random() < 0.5 THEN -10 ELSE 10 END) * (1 + floor(random() * 10))::int;
        v_ts := localtimestamp;
        INSERT INTO main.transactions (id, account_id, amount, created_at)
            VALUES (v_id, v_acc, v_amt, v_ts);
        INSERT INTO outbox.transactions (id, account_id, amount, created_at)
            VALUES (v_id, v_acc, v_amt, v_ts);
        INSERT INTO main.balance AS b (account_id, current_balance, updated_at)
            VALUES (v_acc, v_amt, v_ts)
            ON CONFLICT (account_id) DO UPDATE
            SET current_balance = b.current_balance + EXCLUDED.current_balance,
                updated_at = EXCLUDED.updated_at;
        COMMIT;
    END LOOP;
END $$;
"""

# The outbox leg's table: Debezium's outbox table (its documentation's column names and
# types), in a publication of its own that both the relay and Debezium read.
OUTBOX_TABLE = "bench.outboxevent"
OUTBOX_PUBLICATION = "bench_outbox"
OUTBOX_AGGREGATES = ("Order", "Customer", "Shipment", "Invoice")
OUTBOX_SETUP = """
CREATE TABLE IF NOT EXISTS bench.outboxevent (
    id uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    payload jsonb);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'bench_outbox') THEN
        CREATE PUBLICATION bench_outbox FOR TABLE bench.outboxevent;
    END IF;
END $$;
-- One event per source transaction: 4 aggregate types (Order<suffix>, ...) in turn, 10,000
-- aggregate ids, a payload of ~500 bytes of JSON (nested objects, an array, decimals).
CREATE OR REPLACE PROCEDURE bench.outbox_seed(n int, suffix text) LANGUAGE plpgsql AS $$
DECLARE
    i int; k bigint; agg text; customer bigint;
BEGIN
    FOR i IN 1..n LOOP
        k := nextval('bench.ids');
        agg := (ARRAY['Order', 'Customer', 'Shipment', 'Invoice'])[1 + k % 4] || suffix;
        customer := k % 1000;
        INSERT INTO bench.outboxevent (id, aggregatetype, aggregateid, type, payload)
        VALUES (gen_random_uuid(), agg, agg || '-' || (k % 10000), agg || 'Created', jsonb_build_object(
            'id', k,
            'status', 'CREATED',
            'createdAt', localtimestamp,
            'amount', round((random() * 1000)::numeric, 2),
            'currency', 'EUR',
            'customer', jsonb_build_object(
                'id', customer, 'name', 'Customer ' || customer,
                'email', 'customer' || customer || '@example.com',
                'address', jsonb_build_object('street', 'Bahnhofstrasse ' || (k % 100),
                    'city', 'Zürich', 'zip', '8001', 'country', 'CH')),
            'lines', jsonb_build_array(
                jsonb_build_object('sku', 'SKU-' || (k % 97), 'name', 'Widget ' || (k % 97),
                                   'qty', 1 + k % 5, 'price', 12.30),
                jsonb_build_object('sku', 'SKU-' || (k % 89), 'name', 'Gadget ' || (k % 89),
                                   'qty', 1 + k % 3, 'price', 4.05)),
            'note', 'Leave the parcel at the reception desk if nobody answers the door.'));
        COMMIT;
    END LOOP;
END $$;
"""

TARGET_SETUP = """
CREATE SCHEMA IF NOT EXISTS bench;
-- The write ceiling: COPY into a table without any index or constraint.
CREATE TABLE IF NOT EXISTS bench.copy_target (
    id bigint, account_id bigint, amount numeric, created_at timestamp);
-- The native subscription's target: the publication's table, with the same primary key
-- as main.transactions (the rows only; native replication keeps no balance).
CREATE SCHEMA IF NOT EXISTS outbox;
CREATE TABLE IF NOT EXISTS outbox.transactions (
    id bigint PRIMARY KEY, account_id bigint, amount numeric, created_at timestamp);
"""


def ensure_commit_timestamps(stack):
    """The latency leg reads commit times with pg_xact_commit_timestamp: both clusters of
    the bench's own stack get track_commit_timestamp=on (a restart)."""
    for which, name in (("start", "pg_start"), ("end", "pg_end")):
        with stack.pg(which) as conn:
            on = conn.execute("SHOW track_commit_timestamp").fetchone()[0] == "on"
            if not on:
                conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
        if not on:
            log(f"{name}: enabling track_commit_timestamp (restart)")
            stack.script("stop", name)
            stack.script("start", name)


def prepare_schemas(stack):
    stack.psql("start", "-f", str(REPO / "sql" / "pg_start.sql"))
    stack.psql("end", "-f", str(REPO / "sql" / "pg_end.sql"))
    stack.psql("start", "-c", SOURCE_SETUP)
    stack.psql("start", "-c", OUTBOX_SETUP)
    stack.psql("end", "-c", TARGET_SETUP)


def drop_bench_slots(stack):
    """Subscriptions and slots left by this bench (also by an interrupted earlier run)."""
    with stack.pg("end") as conn:
        for (name,) in conn.execute(
                "SELECT subname FROM pg_subscription WHERE subname LIKE 'bench\\_%'").fetchall():
            conn.execute(f'ALTER SUBSCRIPTION "{name}" DISABLE')
            conn.execute(f'ALTER SUBSCRIPTION "{name}" SET (slot_name = NONE)')
            conn.execute(f'DROP SUBSCRIPTION "{name}"')
    with stack.pg("start") as conn:
        rows = conn.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE slot_name LIKE 'bench\\_%'"
        ).fetchall()
        for name, pid in rows:
            if pid:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                time.sleep(0.2)
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def empty_target(stack):
    with stack.pg("end") as conn:
        conn.execute(
            "TRUNCATE main.transactions, main.balance, outbox_relay.sink_offsets, "
            "outbox_relay.direct_progress, outbox_relay.dead_letters, bench.copy_target, "
            "outbox.transactions")
        conn.execute("VACUUM ANALYZE main.transactions, main.balance")


def empty_source(stack):
    with stack.pg("start") as conn:
        conn.execute(f"TRUNCATE main.transactions, outbox.transactions, main.balance, {OUTBOX_TABLE}")
        conn.execute("CHECKPOINT")


def ledger_equal(stack, what):
    """Checks that pg_end's ledger (rows, distinct ids, sum of amounts, sum of balances)
    equals pg_start's; returns the row count."""
    sides = []
    for which in ("end", "start"):
        with stack.pg(which) as conn:
            rows = conn.execute(
                "SELECT count(*), count(DISTINCT id), sum(amount) FROM main.transactions").fetchone()
            balances = conn.execute("SELECT sum(current_balance) FROM main.balance").fetchone()[0]
            sides.append((tuple(rows), balances))
    if sides[0] != sides[1]:
        raise RuntimeError(f"{what}: pg_end {sides[0]}, pg_start {sides[1]}")
    return sides[0][0][0]


def write_backlog(stack, n, clients=2, call="bench.seed({k}, 10)", table="outbox.transactions"):
    """n transactions, each `CALL <call>` with k=1 writing one (seed-shaped by default),
    in `clients` parallel sessions; returns (X, seconds) where X is the insert LSN read
    before the last transaction (the marker). `table` must then hold n rows."""
    started = time.monotonic()
    per = [(n - 1) // clients + (1 if i < (n - 1) % clients else 0) for i in range(clients)]
    port = str(stack.start_port)
    procs = [
        subprocess.Popen(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", port,
             "-U", "postgres", "-d", "db_start", "-c", "CALL " + call.format(k=k)],
            env={**os.environ, "PGPASSWORD": PASSWORD,
                 "PGOPTIONS": "-c synchronous_commit=off"})
        for k in per if k > 0
    ]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("writing the backlog failed")
    with stack.pg("start") as conn:
        x = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        conn.execute("CALL " + call.format(k=1))
        count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        conn.execute("CHECKPOINT")
    if count != n:
        raise RuntimeError(f"backlog has {count} rows, expected {n}")
    return lsn_int(x), time.monotonic() - started


# ---------------------------------------------------------------------------------------
# Kafka helpers
# ---------------------------------------------------------------------------------------


def machine_busy():
    """CPU seconds the whole machine has been busy (every process, the kernel's work
    included) since boot, from /proc/stat; None where it cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def admin(stack):
    return AdminClient({"bootstrap.servers": stack.brokers})


def create_topic(stack, name, partitions=3):
    client = admin(stack)
    futures = client.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=3)])
    for f in futures.values():
        try:
            f.result(30)
        except Exception as e:  # noqa: BLE001 - an existing topic is fine
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def delete_topics(stack, prefix, wait=False):
    """Deletes the topics whose names start with `prefix`; with `wait`, until the brokers
    no longer list them (so that the next tool creates them afresh)."""
    a = admin(stack)
    names = [t for t in a.list_topics(timeout=30).topics if t.startswith(prefix)]
    if names:
        for f in a.delete_topics(names, operation_timeout=30).values():
            try:
                f.result(60)
            except Exception as e:  # noqa: BLE001
                log(f"deleting topics: {e}")
    if wait and names:
        wait_for(f"deleting {prefix}*", lambda: not any(
            t.startswith(prefix) for t in admin(stack).list_topics(timeout=30).topics), 120, every=0.5)


class Watermarks:
    """High watermarks of one topic or several (sum over partitions); 0 until every topic
    exists."""

    def __init__(self, stack, topics):
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.consumer = Consumer({"bootstrap.servers": stack.brokers, "group.id": "bench-watch",
                                  "enable.auto.commit": False})
        self.partitions = None

    def total(self):
        if self.partitions is None:
            partitions = []
            for topic in self.topics:
                md = self.consumer.list_topics(topic, timeout=10)
                t = md.topics.get(topic)
                if t is None or t.error is not None or not t.partitions:
                    return 0
                partitions += [TopicPartition(topic, p) for p in sorted(t.partitions)]
            self.partitions = partitions
        total = 0
        for tp in self.partitions:
            try:
                _, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            except KafkaException:
                # A new topic's leaders may not be known yet (NOT_LEADER_FOR_PARTITION): ask again.
                return 0
            total += max(high, 0)
        return total

    def close(self):
        self.consumer.close()


class Visibility:
    """When each record of a topic became visible to a read_committed consumer: a thread
    reads the topic (a broker answers a fetch as soon as a record is visible; 100 ms is
    only the wait when none is, the sink's setting) and notes, per record id (the JSON value's
    "id"), the record's CreateTime (the moment the producer was handed it: the relay sets
    no timestamp, so librdkafka stamps the produce call) and the moment it arrived here."""

    def __init__(self, stack, topic):
        self.consumer = Consumer({
            "bootstrap.servers": stack.brokers, "group.id": f"bench-visible-{topic}",
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "fetch.wait.max.ms": 100})
        md = self.consumer.list_topics(topic, timeout=10).topics[topic]
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions])
        self.seen = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            # poll returns with the first record; consume(n, timeout) would wait for n.
            first = self.consumer.poll(0.05)
            now = time.time()
            if first is None:
                continue
            msgs = [first, *self.consumer.consume(1000, 0)]
            for m in msgs:
                if m.error() or m.value() is None:
                    continue
                try:
                    i = json.loads(m.value())["id"]
                except (ValueError, KeyError, TypeError):
                    continue
                self.seen.setdefault(i, (m.timestamp()[1] / 1000.0, now))

    def wait(self, ids, timeout, procs=()):
        wait_for("the records to be visible", lambda: all(i in self.seen for i in ids),
                 timeout, every=0.2, procs=procs)

    def close(self):
        self.stopping.set()
        self.thread.join()
        self.consumer.close()


class Pressure:
    """The kernel's pressure stall information over an interval: the share of it during
    which some task waited for a CPU, for I/O, and during which all did for I/O (None where
    /proc/pressure is not there). A step whose tail is far from its neighbours' shows here
    whether the machine, not the path, was short."""

    def __init__(self):
        self.started = time.monotonic()
        self.totals = self.read()

    @staticmethod
    def read():
        totals = {}
        for kind in ("cpu", "io"):
            try:
                text = Path(f"/proc/pressure/{kind}").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                scope, *fields = line.split()
                totals[f"{kind}_{scope}"] = int(fields[-1].split("=")[1])
        return totals

    def shares(self):
        elapsed = (time.monotonic() - self.started) * 1e6
        now = self.read()
        return {k: (now[k] - v) / elapsed for k, v in self.totals.items() if k in now} or None


class CpuUse:
    """Where the machine's CPU went over an interval, by process group, in cores (CPU
    seconds per second of the interval): this stack's servers (pg_start and pg_end split
    into walsenders, client backends, autovacuum workers and the rest, with the CPU of the
    workers that exited during the interval, which their postmaster reaped, as `exited`),
    its brokers, the other stacks' brokers, each relay process by subcommand, Kafka
    Connect, the bench itself (its probes and the floor's producer), the rest, and the
    machine's total from /proc/stat. Pressure says that the cores were short; this says
    who had them."""

    def __init__(self, stack):
        self.stack_dir = stack.dir.rstrip("/") + "/"
        self.started = time.monotonic()
        self.total = self.busy()
        self.procs = self.read()

    @staticmethod
    def busy():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # without idle and iowait

    @staticmethod
    def read():
        """pid -> (ppid, argv, own ticks, reaped children's ticks)."""
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            procs[int(d)] = (int(f[1]), [a.decode(errors="replace") for a in argv if a],
                             int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
        return procs

    def group(self, pid, procs):
        ppid, argv, _, _ = procs[pid]
        line = " ".join(argv)
        if pid == os.getpid():
            return "bench"
        if argv and argv[0].endswith("/postgres") and "-D" in argv:
            return self.cluster(line) + " postmaster"
        parent = procs.get(ppid)
        if parent and parent[1] and parent[1][0].endswith("/postgres") and "-D" in parent[1]:
            cluster = self.cluster(" ".join(parent[1]))
            if "walsender" in line:
                return f"{cluster} walsender"
            if "autovacuum worker" in line:
                return f"{cluster} autovacuum"
            if re.search(r"\d+\.\d+\.\d+\.\d+\(\d+\)|\[local\]", line):
                return f"{cluster} backends"
            return f"{cluster} background"
        if "java" in (argv[0] if argv else ""):
            if "ConnectStandalone" in line:
                return "kafka connect"
            return "brokers" if self.stack_dir in line else "other brokers"
        if argv and argv[0].endswith("outbox-relay"):
            sub = next((a for a in argv[1:] if not a.startswith("-")), "?")
            return f"relay {sub}"
        return "other"

    def cluster(self, line):
        name = "pg_start" if "/pg_start/" in line else "pg_end" if "/pg_end/" in line else "pg"
        return name if self.stack_dir in line else f"other {name}"

    def shares(self):
        elapsed = time.monotonic() - self.started
        now, total = self.read(), self.busy()
        out = {}

        def add(group, ticks):
            out[group] = out.get(group, 0) + ticks / CLK_TCK / elapsed

        for pid, (_, _, own, reaped) in now.items():
            before = self.procs.get(pid)
            group = self.group(pid, now)
            add(group, own - (before[2] if before else 0))
            if group.endswith("postmaster"):
                # Its children that exited in the interval, less what they had used before it.
                gone = sum(p[2] + p[3] for q, p in self.procs.items()
                           if p[0] == pid and q not in now)
                add(group.replace("postmaster", "exited"),
                    reaped - (before[3] if before else 0) - gone)
        out["machine"] = (total - self.total) / CLK_TCK / elapsed
        return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def scrape_histogram(addr, name, label):
    """Cumulative bucket counts {le: count} of one histogram series at /metrics."""
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    buckets = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and label in line:
            le = re.search(r'le="([^"]+)"', line).group(1)
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_quantile(before, after, q):
    """Prometheus's histogram_quantile over the samples recorded between two scrapes
    (linear inside the bucket), in ms."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0) for le in les]
    if not counts or counts[-1] <= 0:
        return None
    rank = q / 100 * counts[-1]
    lower, below = 0.0, 0.0
    for le, count in zip(les, counts):
        if count >= rank:
            if le == float("inf"):
                return lower * 1000
            return (lower + (le - lower) * (rank - below) / max(count - below, 1e-9)) * 1000
        lower, below = le, count
    return None


class ProgressReader:
    """The connector's committed progress records (read_committed) for one slot."""

    def __init__(self, stack, topic, slot):
        self.slot = slot.encode()
        self.consumer = Consumer({
            "bootstrap.servers": stack.brokers, "group.id": "bench-progress",
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "topic.metadata.refresh.interval.ms": 500})
        self.consumer.assign([TopicPartition(topic, 0, 0)])
        self.lsn = 0

    def poll(self):
        while True:
            msg = self.consumer.poll(0.02)
            if msg is None:
                return self.lsn
            if msg.error() or msg.key() != self.slot or msg.value() is None:
                continue
            record = json.loads(msg.value())
            if record.get("state") == "streaming":
                self.lsn = max(self.lsn, lsn_int(record["lsn"]))

    def close(self):
        self.consumer.close()


def topic_ids(stack, topic):
    """(distinct ids, duplicated records) of a topic of seed-shaped JSON rows, read_committed."""
    consumer = Consumer({"bootstrap.servers": stack.brokers, "group.id": f"bench-ids-{topic}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True})
    md = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    left, seen, duplicated = set(md.partitions), set(), 0
    while left:
        for msg in consumer.consume(10_000, timeout=1.0):
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    left.discard(msg.partition())
                continue
            i = json.loads(msg.value())["id"]
            if i in seen:
                duplicated += 1
            seen.add(i)
    consumer.close()
    return len(seen), duplicated


def last_data_offsets(stack, topic):
    """Per partition, the offset of the last record a read_committed consumer sees."""
    c = Consumer({"bootstrap.servers": stack.brokers, "group.id": "bench-tail",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "enable.partition.eof": True})
    md = c.list_topics(topic, timeout=10)
    result = {}
    for p in sorted(md.topics[topic].partitions):
        for attempt in range(30):
            try:
                low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                break
            except KafkaException:
                if attempt == 29:
                    raise
                time.sleep(1)
        if high <= low:
            continue
        c.assign([TopicPartition(topic, p, max(low, high - 200))])
        last = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = c.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == -191:  # _PARTITION_EOF
                    break
                continue
            last = msg.offset()
        if last is not None:
            result[p] = last
    c.close()
    return result


# ---------------------------------------------------------------------------------------
# Legs
# ---------------------------------------------------------------------------------------


def debezium_label(tuned, outbox):
    """The report's name of a Debezium run (report.py names the same rows)."""
    if outbox:
        return "Debezium 3.6.1 + Outbox Event Router, tuned (Kafka Connect standalone)" if tuned else \
            "Debezium 3.6.1 + Outbox Event Router (Kafka Connect standalone)"
    return "Debezium 3.6.1 PostgreSQL connector, tuned (Kafka Connect standalone)" if tuned else \
        "Debezium 3.6.1 PostgreSQL connector (Kafka Connect standalone)"


def result(tool, n, seconds, proc=None, startup=None, note=None, count=None):
    r = {"tool": tool, "n": count or n, "seconds": seconds, "tps": (count or n) / seconds}
    if proc is not None:
        cpu, rss = proc.cpu, proc.peak_rss
        if cpu is not None:
            r["cpu_per_100k"] = cpu / (count or n) * 100_000
        if rss is not None:
            r["peak_rss"] = rss
    if startup is not None:
        r["startup"] = startup
    if note:
        r["note"] = note
    return r


class Bench:
    def __init__(self, args, stack, binary):
        self.args = args
        self.stack = stack
        self.bin = binary
        self.logs = Path(args.stack_dir) / "bench-logs"
        self.native_started = float("-inf")
        # steady_floor's topics so far (each gets new ones).
        self.floors = 0
        # The large transaction's time without kills, per relay (as `snapshot_clean`).
        self.large_clean = {}
        # The initial snapshot's time without kills, per relay: the runs with kills are
        # killed at fractions of it.
        self.snapshot_clean = {}
        self.logs.mkdir(parents=True, exist_ok=True)

    def relay(self, name, *argv, env=None):
        # The metrics endpoint is turned off: its default ports are shared by every relay on
        # the machine (and the bench runs a connector and a sink at once).
        return Proc(name, [self.bin, *argv], self.logs / f"{name}.log",
                    env={"OUTBOX_RELAY_LOG": "warn", "OUTBOX_RELAY_METRICS_ADDR": "off", **(env or {})})

    def broker_cpu(self):
        """CPU seconds used so far by the three Kafka brokers of the bench's stack."""
        total = 0.0
        for n in (1, 2, 3):
            try:
                pid = Path(self.args.stack_dir, f"kafka{n}", "kafka.pid").read_text().strip()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            except (OSError, ValueError, IndexError):
                return None
        return total

    # --- source -> Kafka -------------------------------------------------------------

    def kafka_floor(self, r, suffix):
        """The Kafka half of the outbox leg alone, with no PostgreSQL in the loop: a bare
        librdkafka producer (confluent-kafka) writes N records shaped as the event-router
        preset writes them (the table's own payloads, aggregate ids as keys, the id
        header) into 4 fresh topics, in transactions of 5,000 taking turns over 4
        transactional ids with the relay's producer settings. The records are made
        before the clock starts, and the topics and producers are set up before it too,
        so this is the floor of what the brokers take on this machine, not a tool."""
        batch, producers = 5000, 4
        topics = [f"bench-r{r}-floor.{a}" for a in OUTBOX_AGGREGATES]
        for t in topics:
            create_topic(self.stack, t)
        with self.stack.pg("start") as conn:
            sample = conn.execute(
                f"SELECT aggregatetype, aggregateid, id::text, payload::text FROM {OUTBOX_TABLE} "
                "WHERE aggregatetype LIKE %s LIMIT 4000", ("%" + suffix,)).fetchall()
        if not sample:
            raise RuntimeError("no outbox rows to model the floor's records on")
        topic_of = {a + suffix: f"bench-r{r}-floor.{a}" for a in OUTBOX_AGGREGATES}
        records = [(topic_of[agg], key.encode(), value.encode(), [("id", ident.encode())])
                   for agg, key, ident, value in sample]
        conf = {"bootstrap.servers": self.stack.brokers, "enable.idempotence": True,
                "acks": "all", "linger.ms": 2, "batch.num.messages": 10000,
                "queue.buffering.max.kbytes": 16384, "queue.buffering.max.messages": 100000}
        ps = []
        for i in range(producers):
            p = Producer({**conf, "transactional.id": f"bench-r{r}-floor-{i}"})
            p.init_transactions(30)
            ps.append(p)
        n, m = self.args.n, len(records)
        brokers_before = self.broker_cpu()
        started = time.monotonic()
        for first in range(0, n, batch):
            p = ps[(first // batch) % producers]
            p.begin_transaction()
            for k in range(first, min(n, first + batch)):
                topic, key, value, headers = records[k % m]
                while True:
                    try:
                        p.produce(topic, value=value, key=key, headers=headers)
                        break
                    except BufferError:
                        p.poll(0.001)
            p.commit_transaction(30)
        seconds = time.monotonic() - started
        brokers_after = self.broker_cpu()
        for p in ps:
            p.flush(10)
        res = result("Kafka floor: bare librdkafka producer, same records and transactions, "
                     "no PostgreSQL", n, seconds)
        if brokers_before is not None and brokers_after is not None:
            res["broker_cpu_per_100k"] = (brokers_after - brokers_before) / n * 100_000
        return res

    def recvlogical(self, r, slot, x, publication="outbox_relay"):
        argv = ["pg_recvlogical", "-h", "127.0.0.1", "-p", str(self.stack.start_port),
                "-U", "postgres", "-d", "db_start", "--slot", slot, "--start", "--no-loop",
                "-o", "proto_version=1", "-o", f"publication_names={publication}",
                f"--endpos={lsn_text(x + 1)}", "-f", "/dev/null"]
        name = f"r{r}-recvlogical" + ("" if publication == "outbox_relay" else f"-{publication}")
        p = Proc(name, argv, self.logs / f"{name}.log", env={"PGPASSWORD": PASSWORD})
        if not p.wait_exit(1800):
            p.stop()
            raise RuntimeError("pg_recvlogical did not finish")
        if p.exit_status != 0:
            raise RuntimeError(f"pg_recvlogical failed:\n{p.tail()}")
        return result("pg_recvlogical (decode ceiling)", self.args.n,
                      time.monotonic() - p.started, p)

    def connector(self, r, slot, x, mode, preset=None):
        """The connector on the seed's outbox (one topic), or with `preset` (event-router)
        on the outbox leg's table, into the topics the preset routes to."""
        if preset:
            topic = None
            progress = f"bench-r{r}-progress-{preset}"
            target = ["--table", OUTBOX_TABLE, "--publication", OUTBOX_PUBLICATION, "--preset", preset]
            name = f"r{r}-connector-{preset}"
        else:
            topic = f"bench-r{r}-{mode}"
            progress = f"bench-r{r}-progress-{mode}"
            target = ["--topic", topic]
            name = f"r{r}-connector-{mode}"
        p = self.relay(name, "connector",
                       "--source-url", self.stack.start_url, "--brokers", self.stack.brokers,
                       *target, "--progress-topic", progress, "--slot", slot,
                       "--no-create-slot", "--no-create-publication", "--delivery", mode,
                       *self.args.connector_extra.split())
        first = [None]
        brokers_before = self.broker_cpu()
        try:
            if mode == "transactional":
                # Done when the progress record committed with the last Kafka transaction
                # passes X: the marker (the last source transaction) is committed in Kafka.
                reader = [None]

                # The slot's own progress topic (kafka::progress_topic_of).
                own = f"{progress}.{slot}"

                def done():
                    if reader[0] is None:
                        client = admin(self.stack)
                        if own not in client.list_topics(timeout=10).topics:
                            return False
                        reader[0] = ProgressReader(self.stack, own, slot)
                    lsn = reader[0].poll()
                    if lsn and first[0] is None:
                        first[0] = time.monotonic()
                    return lsn > x
                wait_for(f"connector {mode}", done, 1800, procs=[p])
                reader[0].close()
            else:
                # Done when every one of the N records is acknowledged (no control records
                # without transactions, and a clean run writes no duplicate).
                marks = Watermarks(self.stack, topic)

                def done():
                    total = marks.total()
                    if total and first[0] is None:
                        first[0] = time.monotonic()
                    return total >= self.args.n
                wait_for(f"connector {mode}", done, 1800, every=0.05, procs=[p])
                marks.close()
            elapsed = time.monotonic() - p.started
            p.sample()
            brokers_after = self.broker_cpu()
        finally:
            p.stop()
        label = f"outbox-relay connector ({'transactional' if mode == 'transactional' else 'at-least-once'})"
        if preset:
            label = f"outbox-relay connector --preset {preset} ({mode})"
        if self.args.connector_extra:
            label += f" [{self.args.connector_extra}]"
        res = result(label, self.args.n, elapsed, p,
                     startup=(first[0] - p.started) if first[0] else None)
        if brokers_before is not None and brokers_after is not None:
            res["broker_cpu_per_100k"] = (brokers_after - brokers_before) / self.args.n * 100_000
        return res, topic

    # Debezium as its documentation recommends tuning it for throughput: bigger batches
    # and queue between the connector and Kafka Connect, a shorter poll interval, and a
    # producer that batches (worker-level `producer.*`, which Kafka Connect passes to every
    # source connector's producer, as `producer.override.*` would for one connector).
    DEBEZIUM_TUNED_CONNECTOR = {"max.batch.size": "20480", "max.queue.size": "81920",
                                "poll.interval.ms": "50"}
    DEBEZIUM_TUNED_WORKER = {"producer.linger.ms": "20", "producer.batch.size": "1048576"}

    def debezium(self, r, slot, tuned=False, outbox_suffix=None):
        """Debezium's PostgreSQL connector in Kafka Connect standalone, draining its slot:
        on the seed's outbox into one topic (JSON converter, keyed by account_id), or, with
        `outbox_suffix`, on the outbox leg's table through its Outbox Event Router (string
        converters, the router's defaults) into outbox.event.<aggregatetype>. `tuned`: the
        throughput settings above, else Debezium's and Kafka Connect's defaults."""
        variant = ("-outbox" if outbox_suffix is not None else "") + ("-tuned" if tuned else "")
        libs = Path(self.args.stack_dir) / "debezium-libs"
        run_dir = Path(self.args.stack_dir) / f"debezium-r{r}{variant}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "offsets").unlink(missing_ok=True)
        connect_log = self.logs / f"r{r}-debezium{variant}-connect.log"
        connect_log.unlink(missing_ok=True)
        name = f"bench-debezium-r{r}{variant}"
        prefix = f"bench_r{r}" + ("_tuned" if tuned else "")
        if outbox_suffix is None:
            topics = [f"{prefix}.outbox.transactions"]
            create_topic(self.stack, topics[0])
            converters = ("key.converter=org.apache.kafka.connect.json.JsonConverter\n"
                          "value.converter=org.apache.kafka.connect.json.JsonConverter\n"
                          "key.converter.schemas.enable=false\n"
                          "value.converter.schemas.enable=false\n")
            source = ("publication.name=outbox_relay\n"
                      "table.include.list=outbox.transactions\n"
                      "message.key.columns=outbox.transactions:account_id\n")
        else:
            # Debezium creates them (the caller has deleted the relay's), as the relay does.
            topics = [f"outbox.event.{a}{outbox_suffix}" for a in OUTBOX_AGGREGATES]
            converters = ("key.converter=org.apache.kafka.connect.storage.StringConverter\n"
                          "value.converter=org.apache.kafka.connect.storage.StringConverter\n")
            source = (f"publication.name={OUTBOX_PUBLICATION}\n"
                      f"table.include.list={OUTBOX_TABLE}\n"
                      "topic.creation.default.partitions=3\n"
                      "topic.creation.default.replication.factor=3\n"
                      "topic.creation.default.min.insync.replicas=2\n"
                      "transforms=outbox\n"
                      "transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n")
        tuning_worker = "".join(f"{k}={v}\n" for k, v in self.DEBEZIUM_TUNED_WORKER.items()) if tuned else ""
        tuning = "".join(f"{k}={v}\n" for k, v in self.DEBEZIUM_TUNED_CONNECTOR.items()) if tuned else ""
        worker = run_dir / "worker.properties"
        worker.write_text(f"""bootstrap.servers={self.stack.brokers}
{converters}offset.storage.file.filename={run_dir}/offsets
offset.flush.interval.ms=10000
plugin.discovery=service_load
listeners=http://127.0.0.1:{18083 + self.stack.offset}
{tuning_worker}""")
        connector = run_dir / "connector.properties"
        connector.write_text(f"""name={name}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname=127.0.0.1
database.port={self.stack.start_port}
database.user=postgres
database.password={PASSWORD}
database.dbname=db_start
topic.prefix={prefix}
plugin.name=pgoutput
slot.name={slot}
publication.autocreate.mode=disabled
{source}snapshot.mode={self.args.debezium_snapshot_mode}
{tuning}""")
        argv = ["java", "-Xms256m", "-Xmx2g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={HERE / 'log4j2-connect.xml'}",
                f"-Dbench.connect.log={connect_log}",
                "-cp", f"{libs}/*", "org.apache.kafka.connect.cli.ConnectStandalone",
                str(worker), str(connector)]
        marks = Watermarks(self.stack, topics)
        p = Proc(f"r{r}-debezium{variant}", argv, self.logs / f"r{r}-debezium{variant}.log")
        first = [None]
        brokers_before = self.broker_cpu()
        status_url = f"http://127.0.0.1:{18083 + self.stack.offset}/connectors/{name}/status"
        checked = [0.0]

        def failed():
            # A task that fails stays failed inside a live JVM: ask Connect's REST API.
            if time.monotonic() - checked[0] < 2:
                return
            checked[0] = time.monotonic()
            try:
                with urllib.request.urlopen(status_url, timeout=2) as resp:
                    status = json.load(resp)
            except (OSError, ValueError):
                return
            states = [status.get("connector", {}).get("state")] + [t.get("state") for t in status.get("tasks", [])]
            if "FAILED" in states:
                raise RuntimeError(f"debezium failed: {json.dumps(status)[:2000]}")
        try:
            def done():
                failed()
                total = marks.total()
                if total and first[0] is None:
                    first[0] = time.monotonic()
                return total >= self.args.n
            wait_for("debezium", done, 3600, every=0.05, procs=[p])
            elapsed = time.monotonic() - p.started
            p.sample()
            brokers_after = self.broker_cpu()
        finally:
            marks.close()
            p.stop(grace=20)
        res = result(debezium_label(tuned, outbox_suffix is not None), self.args.n, elapsed, p,
                     startup=(first[0] - p.started) if first[0] else None)
        if brokers_before is not None and brokers_after is not None:
            res["broker_cpu_per_100k"] = (brokers_after - brokers_before) / self.args.n * 100_000
        return res

    # --- slot -> pg_end -------------------------------------------------------------

    def direct(self, r, slot, x, unix=False):
        empty_target(self.stack)
        p = self.relay(f"r{r}-direct{'-unix' if unix else ''}", "direct",
                       "--source-url", self.stack.relay_url("start", unix),
                       "--target-url", self.stack.relay_url("end", unix), "--slot", slot,
                       "--no-create-slot", "--no-create-publication")
        first = [None]
        with self.stack.pg("end") as conn:
            def done():
                row = conn.execute(
                    "SELECT commit_lsn::text FROM outbox_relay.direct_progress WHERE slot_name = %s",
                    (slot,)).fetchone()
                lsn = lsn_int(row[0]) if row else 0
                if lsn and first[0] is None:
                    first[0] = time.monotonic()
                return lsn > x
            try:
                wait_for("direct", done, 3600, every=0.05, procs=[p])
                elapsed = time.monotonic() - p.started
                p.sample()
            finally:
                p.stop()
            count = conn.execute("SELECT count(*) FROM main.transactions").fetchone()[0]
        if count != self.args.n:
            raise RuntimeError(f"direct: pg_end has {count} rows, expected {self.args.n}")
        return result("outbox-relay direct" + (UNIX if unix else ""), self.args.n, elapsed, p,
                      startup=(first[0] - p.started) if first[0] else None)

    def native(self, r, slot, x, unix=False):
        empty_target(self.stack)
        sub = slot
        host = self.stack.socket_dir() if unix else "127.0.0.1"
        with self.stack.pg("end") as conn:
            conn.execute(
                f"CREATE SUBSCRIPTION {sub} CONNECTION 'host={host} port={self.stack.start_port} "
                f"dbname=db_start user=postgres password={PASSWORD}' PUBLICATION outbox_relay "
                f"WITH (create_slot = false, slot_name = '{slot}', copy_data = false, enabled = false)")
            oid = conn.execute("SELECT oid FROM pg_subscription WHERE subname = %s", (sub,)).fetchone()[0]
            # PostgreSQL 15's launcher starts no apply worker within wal_retrieve_retry_interval
            # of the last one it started (for any subscription): wait that out, untimed.
            retry = conn.execute("SELECT setting::int FROM pg_settings "
                                 "WHERE name = 'wal_retrieve_retry_interval'").fetchone()[0] / 1000
            time.sleep(max(0.0, self.native_started + retry + 0.2 - time.monotonic()))
            started = self.native_started = time.monotonic()
            conn.execute(f"ALTER SUBSCRIPTION {sub} ENABLE")
            worker = [None]
            first = [None]
            cpu = {}

            def done():
                if worker[0] is None:
                    row = conn.execute(
                        "SELECT pid FROM pg_stat_subscription WHERE subid = %s AND pid IS NOT NULL",
                        (oid,)).fetchone()
                    if row:
                        worker[0] = row[0]
                row = conn.execute(
                    "SELECT remote_lsn::text FROM pg_replication_origin_status WHERE external_id = %s",
                    (f"pg_{oid}",)).fetchone()
                lsn = lsn_int(row[0]) if row and row[0] else 0
                if lsn and first[0] is None:
                    first[0] = time.monotonic()
                if worker[0]:
                    try:
                        fields = Path(f"/proc/{worker[0]}/stat").read_text().rsplit(")", 1)[1].split()
                        cpu["cpu"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
                        for line in Path(f"/proc/{worker[0]}/status").read_text().splitlines():
                            if line.startswith("VmHWM:"):
                                cpu["rss"] = int(line.split()[1]) * 1024
                    except OSError:
                        pass
                return lsn > x
            wait_for("native subscription", done, 3600, every=0.05)
            elapsed = time.monotonic() - started
            conn.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
            count = conn.execute("SELECT count(*) FROM outbox.transactions").fetchone()[0]
        if count != self.args.n:
            raise RuntimeError(f"native: pg_end has {count} rows, expected {self.args.n}")
        r_ = result("PostgreSQL native logical replication (subscription)" + (UNIX if unix else ""),
                    self.args.n, elapsed,
                    startup=(first[0] - started) if first[0] else None,
                    note="apply worker; rows only, no balance")
        if "cpu" in cpu:
            r_["cpu_per_100k"] = cpu["cpu"] / self.args.n * 100_000
            r_["peak_rss"] = cpu.get("rss")
        return r_

    # --- Kafka -> pg_end ------------------------------------------------------------

    def sink(self, r, topic, generic=False):
        """The sink on the backlog's topic: the built-in ledger profile, or (generic) the
        same ledger declared as a generic inbox, main.transactions with the balance
        handler of docs/sink.md, on the same records."""
        empty_target(self.stack)
        targets = last_data_offsets(self.stack, topic)
        inbox = (["--inbox", "{name = \"ledger-generic\", table = \"main.transactions\", handler = \""
                  + LEDGER_HANDLER + "\"}"] if generic else [])
        p = self.relay(f"r{r}-sink" + ("-generic" if generic else ""), "sink",
                       "--target-url", self.stack.end_url,
                       "--brokers", self.stack.brokers, "--topic", topic,
                       "--group", f"bench-r{r}-sink" + ("-generic" if generic else ""),
                       *inbox, *self.args.sink_extra.split())
        first = [None]
        with self.stack.pg("end") as conn:
            def done():
                rows = dict(conn.execute(
                    "SELECT partition, last_offset FROM outbox_relay.sink_offsets WHERE topic = %s",
                    (topic,)).fetchall())
                if rows and first[0] is None:
                    first[0] = time.monotonic()
                return all(rows.get(part, -1) >= off for part, off in targets.items())
            try:
                wait_for("sink", done, 3600, every=0.05, procs=[p])
                elapsed = time.monotonic() - p.started
                p.sample()
            finally:
                p.stop()
            count = conn.execute("SELECT count(*) FROM main.transactions").fetchone()[0]
        if count != self.args.n:
            raise RuntimeError(f"sink: pg_end has {count} rows, expected {self.args.n}")
        label = ("outbox-relay sink, generic inbox + handler" if generic else "outbox-relay sink") + (
            f" [{self.args.sink_extra}]" if self.args.sink_extra else "")
        return result(label, self.args.n, elapsed, p,
                      startup=(first[0] - p.started) if first[0] else None,
                      note="main.transactions + balance handler as an --inbox" if generic else None)

    def sink_generic(self, r, topic):
        return self.sink(r, topic, generic=True)

    def naive(self, r, topic):
        empty_target(self.stack)
        count = min(self.args.n, self.args.naive_count)
        p = Proc(f"r{r}-naive", [sys.executable, str(HERE / "naive_consumer.py"), self.stack.brokers,
                                 topic, f"bench-r{r}-naive", self.stack.end_url, str(count)],
                 self.logs / f"r{r}-naive.log")
        if not p.wait_exit(3600):
            p.stop()
            raise RuntimeError("the naive consumer did not finish")
        if p.exit_status != 0:
            raise RuntimeError(f"the naive consumer failed:\n{p.tail()}")
        # Its own clock: from before creating the consumer to the last commit (the
        # interpreter's start and exit are left out).
        elapsed = json.loads(Path(p.log_path).read_text().strip().splitlines()[-1])["seconds"]
        note = None if count == self.args.n else f"timed on the first {count:,} records"
        return result("seed-style consumer (1 record per pg_end transaction, Python)", count,
                      elapsed, p, note=note, count=count)

    def copy(self, r):
        empty_target(self.stack)
        path = Path(self.args.stack_dir) / "copy-rows.csv"
        with open(path, "wb") as f:
            subprocess.run(
                ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(self.stack.start_port), "-U",
                 "postgres", "-d", "db_start", "-c",
                 "COPY (SELECT id, account_id, amount, created_at FROM main.transactions) TO STDOUT"],
                env={**os.environ, "PGPASSWORD": PASSWORD}, stdout=f, check=True)
        p = Proc(f"r{r}-copy", ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                                "-p", str(self.stack.end_port), "-U", "postgres", "-d", "db_end",
                                "-c", f"\\copy bench.copy_target FROM '{path}'"],
                 self.logs / f"r{r}-copy.log", env={"PGPASSWORD": PASSWORD})
        if not p.wait_exit(1800) or p.exit_status != 0:
            raise RuntimeError(f"COPY failed:\n{p.tail()}")
        elapsed = time.monotonic() - p.started
        path.unlink()
        return result("COPY into an unindexed table (write ceiling)", self.args.n, elapsed,
                      note="client: psql \\copy")

    # --- initial snapshot (issue #27) ------------------------------------------------

    def copy_out(self, r):
        """`COPY (SELECT ...) TO STDOUT` of the outbox, into /dev/null: the read ceiling
        the chunked snapshot is measured against."""
        p = Proc(f"r{r}-copy-out", ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                                    "-p", str(self.stack.start_port), "-U", "postgres", "-d",
                                    "db_start", "-o", "/dev/null", "-c",
                                    "COPY (SELECT id, account_id, amount, created_at "
                                    "FROM outbox.transactions) TO STDOUT"],
                 self.logs / f"r{r}-copy-out.log", env={"PGPASSWORD": PASSWORD})
        if not p.wait_exit(1800) or p.exit_status != 0:
            raise RuntimeError(f"COPY TO STDOUT failed:\n{p.tail()}")
        return result("COPY (SELECT …) TO STDOUT of the outbox (read ceiling)", self.args.n,
                      time.monotonic() - p.started, note="client: psql")

    def snapshot_runs(self, name, argv, kills, kill_after, done, broker=False, before_kill=None):
        """Runs the relay `argv` on a new slot until `done()`; with `kills`, SIGKILLs it
        `kill_after` seconds after each start (unless done by then) and starts it again,
        calling `before_kill()` first. With `broker`, a broker is SIGKILLed before the
        second run and started again after it. Returns (seconds, peak RSS of any run, CPU s
        of all runs)."""
        started = time.monotonic()
        peak, cpu = 0, 0.0
        for i in range(kills + 1):
            outage = broker and i == 1 and kills > 1
            if outage:
                self.stack.script("kill", "kafka2")
            # At info, each run's log says where it resumed.
            p = self.relay(f"{name}-{i}", *argv, env={"OUTBOX_RELAY_LOG": "info"})
            try:
                if i < kills:
                    deadline = p.started + kill_after
                    wait_for(f"{name} run {i}", lambda: done() or time.monotonic() >= deadline,
                             3600, every=0.1, procs=[p])
                    p.sample()
                    if not done() and before_kill is not None:
                        before_kill()
                    if not done():
                        os.killpg(p.pid, signal.SIGKILL)
                        p.popen.wait(10)
                        p.exit_status = p.popen.returncode
                        p.log_file.close()
                        log(f"{name}: SIGKILL {i + 1} of {kills} after {kill_after:.1f} s"
                            f"{' (a broker down)' if outage else ''}, "
                            f"{time.monotonic() - started:.1f} s in")
                    if outage:
                        self.stack.script("start", "kafka2")
                    if done():
                        break
                else:
                    wait_for(name, done, 3600, every=0.1, procs=[p])
                    p.sample()
            finally:
                p.stop()
                peak = max(peak, p.peak_rss or 0)
                cpu += p.cpu or 0.0
        if not done():
            wait_for(name, done, 3600, every=0.1)
        return time.monotonic() - started, peak, cpu

    def snapshot_connector(self, r, kills):
        """The connector's initial snapshot of the whole outbox (a new slot), into a topic;
        then every id is checked to be there exactly once (read_committed)."""
        n = self.args.n
        slot, topic = f"bench_r{r}_snap_tx", f"bench-r{r}-snapshot"
        progress = f"bench-r{r}-progress-snapshot"
        argv = ["connector", "--source-url", self.stack.start_url, "--brokers", self.stack.brokers,
                "--topic", topic, "--progress-topic", progress, "--slot", slot,
                "--no-create-publication", *self.args.connector_extra.split()]
        reader = [None]

        def done():
            if reader[0] is None:
                own = f"{progress}.{slot}"
                if own not in admin(self.stack).list_topics(timeout=10).topics:
                    return False
                reader[0] = ProgressReader(self.stack, own, slot)
            return reader[0].poll() > 0
        try:
            seconds, peak, cpu = self.snapshot_runs(
                f"r{r}-snapshot-connector", argv, kills,
                self.snapshot_clean.get("connector", 10.0) / (kills + 1), done, broker=True)
        finally:
            if reader[0] is not None:
                reader[0].close()
        if not kills:
            self.snapshot_clean["connector"] = seconds
        ids, duplicated = topic_ids(self.stack, topic)
        if ids != n or duplicated:
            raise RuntimeError(f"snapshot connector: {ids} distinct ids of {n}, {duplicated} duplicates")
        label = "outbox-relay connector, initial snapshot" + (
            f", {kills} SIGKILLs + a broker" if kills > 1 else f", {kills} SIGKILLs" if kills else "")
        res = result(label, n, seconds, note=f"{ids:,} ids once in the topic")
        res["peak_rss"], res["cpu_per_100k"] = peak, cpu / n * 100_000
        return res

    def snapshot_direct(self, r, kills):
        """Direct mode's initial snapshot of the whole outbox (a new slot) into pg_end;
        then pg_end's rows and balances are compared with pg_start's."""
        n = self.args.n
        empty_target(self.stack)
        slot = f"bench_r{r}_snap_direct"
        argv = ["direct", "--source-url", self.stack.start_url, "--target-url", self.stack.end_url,
                "--slot", slot, "--no-create-publication"]
        with self.stack.pg("end") as conn:
            def done():
                row = conn.execute(
                    "SELECT commit_lsn::text FROM outbox_relay.direct_progress WHERE slot_name = %s",
                    (slot,)).fetchone()
                return bool(row) and lsn_int(row[0]) > 0
            seconds, peak, cpu = self.snapshot_runs(
                f"r{r}-snapshot-direct", argv, kills,
                self.snapshot_clean.get("direct", 10.0) / (kills + 1), done)
            if not kills:
                self.snapshot_clean["direct"] = seconds
        rows = ledger_equal(self.stack, "snapshot direct")
        label = "outbox-relay direct, initial snapshot" + (f", {kills} SIGKILLs" if kills else "")
        res = result(label, n, seconds, note=f"pg_end = pg_start ({rows:,} rows, balances)")
        res["peak_rss"], res["cpu_per_100k"] = peak, cpu / n * 100_000
        return res

    # --- one large source transaction (issue #27) -----------------------------------

    def write_large_transaction(self, n):
        """ONE pg_start transaction of n seed-shaped rows (ledger, outbox, balances), as a
        batch job writes; returns (an LSN below its commit record, seconds)."""
        started = time.monotonic()
        with self.stack.pg("start") as conn:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO main.transactions (id, account_id, amount, created_at) "
                    "SELECT g, g %% 1000, (g %% 10000) * 0.01, "
                    "timestamp '2026-12-04 12:00' + g * interval '1 ms' "
                    "FROM generate_series(1, %s) g", (n,))
                conn.execute("INSERT INTO outbox.transactions SELECT * FROM main.transactions ORDER BY id")
                conn.execute(
                    "INSERT INTO main.balance (account_id, current_balance, updated_at) "
                    "SELECT account_id, sum(amount), max(created_at) FROM main.transactions "
                    "GROUP BY account_id")
                x = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
            conn.execute("CHECKPOINT")
        return lsn_int(x), time.monotonic() - started

    def large_connector(self, r, slot, x, kills):
        """The connector streams the large transaction (written after `slot` was made) into
        one Kafka transaction; before each kill, a read_committed reader counts what it sees
        (all or nothing); at the end every id must be in the topic exactly once."""
        n = self.args.large_rows
        topic, progress = f"bench-r{r}-large-{kills}", f"bench-r{r}-progress-large-{kills}"
        argv = ["connector", "--source-url", self.stack.start_url, "--brokers", self.stack.brokers,
                "--topic", topic, "--progress-topic", progress, "--slot", slot,
                "--no-create-publication", *self.args.connector_extra.split()]
        reader, visible = [None], []

        def done():
            if reader[0] is None:
                own = f"{progress}.{slot}"
                if own not in admin(self.stack).list_topics(timeout=10).topics:
                    return False
                reader[0] = ProgressReader(self.stack, own, slot)
            return reader[0].poll() > x

        def before_kill():
            try:
                visible.append(topic_ids(self.stack, topic)[0])
            except Exception as e:  # noqa: BLE001 - the topic may not exist yet
                log(f"large connector: reading before the kill: {e}")
        try:
            seconds, peak, cpu = self.snapshot_runs(
                f"r{r}-large-connector-{kills}", argv, kills,
                self.large_clean.get("connector", 20.0) / (kills + 1), done,
                before_kill=before_kill)
        finally:
            if reader[0] is not None:
                reader[0].close()
        if not kills:
            self.large_clean["connector"] = seconds
        ids, duplicated = topic_ids(self.stack, topic)
        if ids != n or duplicated:
            raise RuntimeError(f"large connector: {ids} distinct ids of {n}, {duplicated} duplicates")
        if any(v not in (0, n) for v in visible):
            raise RuntimeError(f"large connector: read_committed saw part of the transaction: {visible}")
        label = "outbox-relay connector, one source transaction" + (f", {kills} SIGKILLs" if kills else "")
        note = f"{ids:,} ids once in the topic"
        if visible:
            note += f"; read_committed before each kill saw {', '.join(f'{v:,}' for v in visible)}"
        res = result(label, n, seconds, note=note)
        res["peak_rss"], res["cpu_per_100k"] = peak, cpu / n * 100_000
        return res

    def large_direct(self, r, slot, x, kills):
        """Direct mode applies the large transaction into one pg_end transaction; before
        each kill pg_end's row count is taken (all or nothing); at the end pg_end must equal
        pg_start."""
        n = self.args.large_rows
        empty_target(self.stack)
        argv = ["direct", "--source-url", self.stack.start_url, "--target-url", self.stack.end_url,
                "--slot", slot, "--no-create-publication"]
        visible = []
        with self.stack.pg("end") as conn:
            def done():
                row = conn.execute(
                    "SELECT commit_lsn::text FROM outbox_relay.direct_progress WHERE slot_name = %s",
                    (slot,)).fetchone()
                return bool(row) and lsn_int(row[0]) > x

            def before_kill():
                visible.append(conn.execute("SELECT count(*) FROM main.transactions").fetchone()[0])
            seconds, peak, cpu = self.snapshot_runs(
                f"r{r}-large-direct-{kills}", argv, kills,
                self.large_clean.get("direct", 20.0) / (kills + 1), done, before_kill=before_kill)
            if not kills:
                self.large_clean["direct"] = seconds
        rows = ledger_equal(self.stack, "large direct")
        if any(v not in (0, n) for v in visible):
            raise RuntimeError(f"large direct: pg_end showed part of the transaction: {visible}")
        label = "outbox-relay direct, one source transaction" + (f", {kills} SIGKILLs" if kills else "")
        note = f"pg_end = pg_start ({rows:,} rows, balances)"
        if visible:
            note += f"; pg_end rows before each kill: {', '.join(f'{v:,}' for v in visible)}"
        res = result(label, n, seconds, note=note)
        res["peak_rss"], res["cpu_per_100k"] = peak, cpu / n * 100_000
        return res

    # --- on-demand backfill while the stream goes on (issue #27) ----------------------

    def backfill(self, r, path):
        """pg_start holds N rows that pg_end lacks (written before the slot, as pg_end looks
        after a restore from an old backup); the relay streams while `load` writes
        --backfill-rate tx/s, and `outbox-relay backfill` asks it to send the N again.
        Measures the backfill's time, and the end-to-end latency of the live transactions
        committed while it ran; pg_end must then equal pg_start."""
        n = self.args.n
        empty_target(self.stack)
        slot = f"bench_r{r}_bf_{path.replace('-', '_')}"
        with self.stack.pg("start") as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        topic, progress = f"bench-r{r}-bf-{path}", f"bench-r{r}-progress-bf"
        status = [self.bin, "status", "--json", "--source-url", self.stack.start_url,
                  "--target-url", self.stack.end_url]
        procs = []
        try:
            if path == "kafka":
                procs.append(self.relay(
                    f"r{r}-bf-connector", "connector", "--source-url", self.stack.start_url,
                    "--brokers", self.stack.brokers, "--topic", topic, "--progress-topic", progress,
                    "--slot", slot, "--no-create-slot", "--no-create-publication",
                    *self.args.connector_extra.split()))
                procs.append(self.relay(
                    f"r{r}-bf-sink", "sink", "--target-url", self.stack.end_url,
                    "--brokers", self.stack.brokers, "--topic", topic,
                    "--group", f"bench-r{r}-bf-sink", *self.args.sink_extra.split()))
                status += ["--brokers", self.stack.brokers, "--topic", topic,
                           "--progress-topic", progress, "--slot", slot]
            else:
                procs.append(self.relay(
                    f"r{r}-bf-direct", "direct", "--source-url", self.stack.start_url,
                    "--target-url", self.stack.end_url, "--slot", slot, "--no-create-slot",
                    "--no-create-publication"))
                status += ["--no-kafka", "--direct-slot", slot]
            self.load(50, 2.0)
            with self.stack.pg("end") as conn:
                wait_for(f"backfill {path} warm-up", lambda: conn.execute(
                    "SELECT count(*) FROM main.transactions").fetchone()[0] > 0, 120,
                    every=0.2, procs=procs)
            loader = subprocess.Popen(
                self.load_argv(self.args.backfill_rate, self.args.backfill_load_seconds),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(3)
            with self.stack.pg("start") as src:
                t0 = src.execute("SELECT clock_timestamp()").fetchone()[0]
            started = time.monotonic()
            backfill_id = f"bench-r{r}-{path}"
            subprocess.run([self.bin, "backfill", "--source-url", self.stack.start_url,
                            "--id", backfill_id, "--for-slot", slot],
                           check=True, capture_output=True)

            def state():
                shown = json.loads(subprocess.run(status, capture_output=True, text=True).stdout)
                part = (shown["kafka"].get("progress") if path == "kafka"
                        else shown["pg_end"].get("direct")) or {}
                return next((b for b in part.get("backfills", []) if b["id"] == backfill_id), None)
            done = wait_for(f"backfill {path}", lambda: (lambda b: b if b and b["state"] != "running"
                                                         else None)(state()),
                            3600, every=0.5, procs=procs)
            seconds = time.monotonic() - started
            with self.stack.pg("start") as src:
                t1 = src.execute("SELECT clock_timestamp()").fetchone()[0]
            if done["state"] != "done" or done["rows"] < n:
                raise RuntimeError(f"backfill {path}: {done}")
            loader.wait()
            live = self.arrived_latencies(t0, t1, procs)
            # The load went on after t1: pg_end is compared once it has those too.
            self.commit_times(f"backfill {path}: the load's last transactions", procs, t1)
            rows = ledger_equal(self.stack, f"backfill {path}")
            peak = max(p.sample()[1] or 0 for p in procs)
        finally:
            for p in procs:
                p.stop()
        label = {"kafka": "outbox-relay connector + sink", "direct": "outbox-relay direct"}[path]
        if live["p99"] is None:
            raise RuntimeError(f"backfill {path}: no live transaction committed during it")
        if live["seconds"] < seconds * 0.9:
            raise RuntimeError(f"backfill {path}: the load ended before the backfill "
                               f"({live['seconds']:.0f} s of {seconds:.0f} s): raise --backfill-load-seconds")
        note = (f"{done['rows']:,} rows sent again; live load {self.args.backfill_rate}/s meanwhile: "
                f"p50 {live['p50']:.0f} ms, p99 {live['p99']:.0f} ms, max {live['max']:.0f} ms "
                f"over {live['count']:,} transactions; pg_end = pg_start ({rows:,} rows)")
        res = result(label, n, seconds, note=note)
        res.update({"peak_rss": peak, "live_p50": live["p50"], "live_p99": live["p99"],
                    "live_max": live["max"], "live_count": live["count"]})
        return res

    def arrived_latencies(self, t0, t1, procs):
        """End-to-end latency (pg_end commit - pg_start commit) of the transactions pg_start
        committed between t0 and t1, once all of them are in pg_end."""
        source, target = self.commit_times("the live transactions", procs, t0, t1, timeout=600)
        lat = sorted((ts - source[i]).total_seconds() * 1000 for i, ts in target.items())
        span = (max(source.values()) - min(source.values())).total_seconds() if source else 0
        return {"count": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                "max": lat[-1] if lat else None, "seconds": span}

    def commit_times(self, what, procs, since, until=None, timeout=300):
        """The commit times of the transactions pg_start committed from `since` (to
        `until`), in pg_start and, once every one of them is there, in pg_end: two
        {id: commit timestamp}."""
        with self.stack.pg("start") as src:
            rows = src.execute(
                "SELECT id, pg_xact_commit_timestamp(xmin) FROM main.transactions "
                "WHERE pg_xact_commit_timestamp(xmin) BETWEEN %s AND coalesce(%s::timestamptz, 'infinity')",
                (since, until)).fetchall()
        ids = [i for i, _ in rows]
        with self.stack.pg("end") as dst:
            wait_for(what, lambda: dst.execute(
                "SELECT count(*) FROM main.transactions WHERE id = ANY(%s)", (ids,)).fetchone()[0]
                >= len(ids), timeout, every=0.5, procs=procs)
            target = dst.execute(
                "SELECT id, pg_xact_commit_timestamp(xmin) FROM main.transactions WHERE id = ANY(%s)",
                (ids,)).fetchall()
        return dict(rows), dict(target)

    def load_argv(self, rate, seconds):
        """`outbox-relay load` writing `rate` source transactions a second for `seconds`."""
        return [self.bin, "load", "--source-url", self.stack.start_url, "--rate", str(rate),
                "--duration", str(seconds), "--concurrency", str(self.args.load_concurrency),
                "--progress-every", "0"]

    # --- steady state ---------------------------------------------------------------

    def steady(self, r):
        out = []
        for path in self.args.steady_paths:
            if path.startswith("kafka-floor"):
                out += self.steady_floor(r, path)
                continue
            empty_source(self.stack)
            empty_target(self.stack)
            slot = f"bench_r{r}_ss_{path.replace('-', '_')}"
            with self.stack.pg("start") as conn:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            procs = []
            # The relays serve /metrics on ports of their own choosing (they log the
            # address): their latency histograms are read around each step.
            metered = {}
            probes = None
            env = {"OUTBOX_RELAY_LOG": os.environ.get("BENCH_STEADY_LOG", "warn,outbox_relay::metrics=info")}
            try:
                if path.startswith("kafka"):
                    topic = f"bench-r{r}-ss-{path}"

                def start():
                    if path.startswith("kafka"):
                        delivery = "at-least-once" if path == "kafka-alo" else "transactional"
                        # kafka-lowlat: the same exactly-once path, configured for latency:
                        # the connector's and the sink's batching windows and the consumer's
                        # fetch wait (librdkafka's default is 500 ms) made short.
                        lowlat = path == "kafka-lowlat"
                        conn_extra = ["--linger-ms", "5"] if lowlat else []
                        sink_extra = (["--batch-linger-ms", "5", "--consumer-property",
                                       "fetch.wait.max.ms=10"] if lowlat else [])
                        connector = self.relay(
                            f"r{r}-ss-{path}-connector", "connector", "--source-url", self.stack.start_url,
                            "--brokers", self.stack.brokers, "--topic", topic,
                            "--progress-topic", f"bench-r{r}-progress-ss", "--slot", slot,
                            "--no-create-slot", "--no-create-publication", "--delivery", delivery,
                            "--metrics-addr", "127.0.0.1:0",
                            *conn_extra, *self.args.connector_extra.split(), env=env)
                        sink = self.relay(
                            f"r{r}-ss-{path}-sink", "sink", "--target-url", self.stack.end_url,
                            "--brokers", self.stack.brokers, "--topic", topic,
                            "--group", f"bench-r{r}-ss-sink-{path}", "--metrics-addr",
                            "127.0.0.1:0", *sink_extra, *self.args.sink_extra.split(), env=env)
                        procs.extend([connector, sink])
                        metered.update(connector=connector, sink=sink)
                    else:
                        direct = self.relay(
                            f"r{r}-ss-direct", "direct", "--source-url", self.stack.start_url,
                            "--target-url", self.stack.end_url, "--slot", slot,
                            "--no-create-slot", "--no-create-publication", "--metrics-addr",
                            "127.0.0.1:0", env=env)
                        procs.append(direct)
                        metered.update(direct=direct)

                # Warm-up: the relays start while `load` already writes the first rate
                # (item 3 of #29: steady latency within 10 s of a start under load).
                warmup = self.start_under_load(path, start, procs)
                probes = {stage: metrics_addr(p) for stage, p in metered.items()}
                if path.startswith("kafka"):
                    probes["visibility"] = Visibility(self.stack, topic)
                for i, rate in enumerate(self.args.rates):
                    res = self.step(path, rate, procs, probes)
                    if i == 0:
                        res["warmup"] = warmup
                    out.append({"path": path, "rate": rate, **res})
            finally:
                if probes and "visibility" in probes:
                    probes["visibility"].close()
                for p in procs:
                    p.stop()
        return out

    def start_under_load(self, path, start, procs):
        """Starts the relays (`start`) one second into `load` writing the first rate for
        WARMUP_SECONDS (5 s with --quick), and reads every transaction's latency by the
        second of its source commit from the start. A backlog carried from the start
        raises every latency of a second, so `settled` is the first second from which
        every second's median stays within 1.5x (or 10 ms) of the median of the load's
        second half (None: never); a tail spike of one second (the brokers') does not
        count as not settled. The first second's p99 and the second half's p99 are kept."""
        rate = self.args.rates[0]
        seconds = 5 if self.args.quick else WARMUP_SECONDS
        with self.stack.pg("start") as src:
            t0 = src.execute("SELECT clock_timestamp()").fetchone()[0]
        load = subprocess.Popen(self.load_argv(rate, seconds), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            start()
            started = time.time()
            if load.wait(seconds + 120) != 0:
                raise RuntimeError("load failed during the warm-up")
        finally:
            if load.poll() is None:
                load.kill()
        source, target = self.commit_times(f"steady {path} warm-up", procs, t0)
        windows, tail = {}, []
        for i, ts in target.items():
            at = source[i].timestamp() - started
            ms = (ts - source[i]).total_seconds() * 1000
            # The load's last second (a part of one, its last transactions waiting out
            # the linger with nothing after them) is not the relays' warm-up.
            if at < seconds - 2:
                windows.setdefault(max(-1, int(at // 1)), []).append(ms)
            if at >= seconds / 2:
                tail.append(ms)
        tail.sort()
        steady_p50, steady_p99 = percentile(tail, 50), percentile(tail, 99)
        per_second = [(w, percentile(sorted(v), 50), percentile(sorted(v), 99))
                      for w, v in sorted(windows.items())]
        settled = settled_second(per_second, steady_p50)
        return {"settled": None if settled is None else max(settled, 0),
                "first_p99": per_second[0][2] if per_second else None,
                "steady_p50": steady_p50, "steady_p99": steady_p99, "per_second": per_second}

    def load(self, rate, seconds):
        p = subprocess.run(self.load_argv(rate, seconds), capture_output=True, text=True,
                           check=True)
        m = re.search(r"committed (\d+)", p.stdout)
        return int(m.group(1)) if m else 0

    def step_seconds(self, rate):
        # Long enough that p99 rests on MIN_LATENCY_SAMPLES transactions (not with --quick).
        seconds = self.args.steady_seconds
        if not self.args.quick:
            seconds = max(seconds, MIN_LATENCY_SAMPLES / rate)
        return seconds

    def step(self, path, rate, procs, probes):
        """One rate: `load` writes it for the step's seconds, and every transaction's
        latency is read from the two servers' commit timestamps. `probes`: the relays'
        /metrics addresses by histogram stage ("connector", "sink", "direct") and, on the
        Kafka paths, a Visibility on the topic. The Kafka paths' latency is split into
        stages: source commit -> the record handed to the producer (its CreateTime) -> the
        Kafka transaction committed (the connector's histogram, bucketed) -> visible to a
        read_committed consumer -> committed in pg_end; every figure from the source's
        commit, so p99s add up as a reader expects. `histogram` is the end stage's own
        histogram (the sink's or direct mode's) over the step, beside the measured figure
        it should agree with to within a bucket."""
        with self.stack.pg("start") as src:
            t0 = src.execute("SELECT clock_timestamp()").fetchone()[0]
        seconds = self.step_seconds(rate)
        histograms = {k: v for k, v in probes.items() if k != "visibility"}
        before = {stage: scrape_histogram(addr, LATENCY_METRIC, f'stage="{stage}"')
                  for stage, addr in histograms.items()}
        pressure, cpu = Pressure(), CpuUse(self.stack)
        committed = self.load(rate, seconds)
        pressure, cpu = pressure.shares(), cpu.shares()
        source, target = self.commit_times(f"steady {path} {rate}/s", procs, t0)
        ids = list(source)
        lat = sorted((ts - source[i]).total_seconds() * 1000 for i, ts in target.items())
        res = {
            "achieved": committed / seconds,
            "count": len(lat),
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99),
            "max": lat[-1] if lat else None,
            "pressure": pressure,
            "cpu": cpu,
        }
        after = {stage: scrape_histogram(addr, LATENCY_METRIC, f'stage="{stage}"')
                 for stage, addr in histograms.items()}
        end = "sink" if "sink" in after else "direct"
        res["histogram"] = [histogram_quantile(before[end], after[end], q) for q in (50, 99)]
        if "visibility" in probes:
            visibility = probes["visibility"]
            visibility.wait(ids, 60, procs)
            start = {i: ts.timestamp() for i, ts in source.items()}
            handed = sorted((visibility.seen[i][0] - start[i]) * 1000 for i in ids)
            visible = sorted((visibility.seen[i][1] - start[i]) * 1000 for i in ids)
            res["stages"] = {
                "handed": [percentile(handed, 50), percentile(handed, 99)],
                "kafka_commit": [histogram_quantile(before["connector"], after["connector"], q)
                                 for q in (50, 99)],
                "visible": [percentile(visible, 50), percentile(visible, 99)],
                "applied": [res["p50"], res["p99"]],
            }
        return res

    def steady_floor(self, r, path):
        """The Kafka path's floor: no PostgreSQL and no relay. Records \"arrive\" at each
        rate (their CreateTime is the moment they are due) and a bare librdkafka producer
        with the connector's settings commits what has arrived in one transaction, with a
        progress record on a second topic, taking turns over 4 transactional ids and
        starting commits at most every 50 ms: the transactions the connector makes at that
        rate by default, at the least latency the connector's rules allow (no linger). A
        read_committed consumer times arrival -> visible. `loaded`
        (kafka-floor-loaded): the same while `load` writes the rate into pg_start, which
        nothing reads (no slot): the brokers beside the source's own work. `streamed`
        (kafka-floor-streamed, not among the defaults): each record is handed to the open
        transaction as it arrives instead of when its commit starts, the commits as
        above, one transaction open at a time: the lever "stream records into the open
        Kafka transaction" measured on the brokers alone (notes, twenty-seventh session).
        `kafka-floor-alo`: the at-least-once path's floor, while `load` writes the rate
        into pg_start: no transactions, one idempotent producer (acks=all, the connector's
        settings) makes the connector's at-least-once batches (what has arrived, once the
        oldest of it has waited the connector's 20 ms linger and the batch before is
        acknowledged, with a progress record); its "Kafka commit" stage is the batch's
        acknowledgement. (Each record handed over as it arrives, librdkafka batching
        alone, was slower than the relay here: p99 339-835 ms, many small produce
        requests for the brokers; notes, twenty-eighth session.)"""
        loaded = path in ("kafka-floor-loaded", "kafka-floor-alo")
        mode = {"kafka-floor-streamed": "streamed", "kafka-floor-alo": "alo"}.get(path, "batch")
        self.floors += 1
        topic = f"bench-r{r}-ss-floor{self.floors}"
        progress = f"{topic}-progress"
        create_topic(self.stack, topic)
        create_topic(self.stack, progress, partitions=1)
        conf = {"bootstrap.servers": self.stack.brokers, "enable.idempotence": True,
                "acks": "all", "linger.ms": 2, "batch.num.messages": 10000,
                "queue.buffering.max.kbytes": 16384, "queue.buffering.max.messages": 100000}
        if mode == "alo":
            producers = [Producer(conf)]
        else:
            producers = [Producer({**conf, "transactional.id": f"{topic}-{i}"}) for i in range(4)]
            for p in producers:
                p.init_transactions(30)
        out = []
        visibility = None
        try:
            first = 0
            # Warm-up as the relays': a moment at 50/s, then the consumer.
            first = self.floor_load(producers, topic, progress, 50, 2.0, first, {}, mode)
            visibility = Visibility(self.stack, topic)
            for rate in self.args.rates:
                seconds = self.step_seconds(rate)
                ids = list(range(first, first + int(rate * seconds)))
                times = {}
                if loaded:
                    empty_source(self.stack)
                    source = subprocess.Popen(self.load_argv(rate, seconds + 2),
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                pressure, cpu = Pressure(), CpuUse(self.stack)
                first = self.floor_load(producers, topic, progress, rate, seconds, first, times,
                                        mode)
                pressure, cpu = pressure.shares(), cpu.shares()
                if loaded:
                    source.wait(60)
                visibility.wait(ids, 120)
                # CreateTime is the arrival here (set by floor_load).
                arrival = {i: visibility.seen[i][0] for i in ids}
                lat = sorted((visibility.seen[i][1] - arrival[i]) * 1000 for i in ids)
                handed = sorted((times[i][0] - arrival[i]) * 1000 for i in ids)
                committed = sorted((times[i][1] - arrival[i]) * 1000 for i in ids)
                out.append({"path": path, "rate": rate, "achieved": len(ids) / seconds,
                            "count": len(lat), "p50": percentile(lat, 50),
                            "p99": percentile(lat, 99), "max": lat[-1], "pressure": pressure, "cpu": cpu,
                            "stages": {
                                "handed": [percentile(handed, 50), percentile(handed, 99)],
                                "kafka_commit": [percentile(committed, 50), percentile(committed, 99)],
                                "visible": [percentile(lat, 50), percentile(lat, 99)]}})
        finally:
            if visibility:
                visibility.close()
        return out

    @staticmethod
    def floor_load(producers, topic, progress, rate, seconds, first, times, mode="batch"):
        """Ids first.. arriving at `rate` for `seconds`, committed as steady_floor says;
        returns the next id. `times` gets, per id, when it was handed to the producer and
        when its transaction's commit returned (`alo`: when its batch was acknowledged).
        `batch`: the ids that have arrived are handed over when a transaction begins;
        `streamed`: each id is handed to the open transaction when it arrives (the first
        one of a transaction begins it); `alo`: batches without transactions."""
        streamed = mode == "streamed"
        total = int(rate * seconds)
        interval = FLOOR_COMMIT_INTERVAL
        start = time.time()
        sent, turn, last_start = 0, 0, float("-inf")
        handed = {}  # id -> when it was handed to the producer, for the open transaction

        def produce(p, k):
            i = first + k
            value = json.dumps({"id": i, "account_id": i % 10 + 1, "amount": "10.00",
                                "created_at": "2026-12-05T00:00:00.000000"}).encode()
            handed[i] = time.time()
            p.produce(topic, key=str(i % 10 + 1).encode(), value=value,
                      timestamp=int((start + k / rate) * 1000))

        while sent < total or handed:
            now = time.time()
            due = min(total, int((now - start) * rate) + 1)
            p = producers[turn]
            if streamed and due > sent:
                if not handed:
                    p.begin_transaction()
                for k in range(sent, due):
                    produce(p, k)
                p.poll(0)
                sent = due
            # A batch may start once the commit interval has passed since the last one
            # began (`alo`: once its oldest record has waited the linger).
            gate = (start + sent / rate + FLOOR_ALO_LINGER if mode == "alo"
                    else last_start + interval)
            ready = handed if streamed else due > sent
            if not ready or now < gate:
                # Streamed: the next arrival or the gate, whichever is first; batched:
                # the gate, and at least one arrival to send.
                wake = gate if mode == "alo" else (min if streamed else max)(start + sent / rate, gate)
                time.sleep(max(0.0005, wake - now))
                continue
            last_start = now
            if not streamed:
                if mode != "alo":
                    p.begin_transaction()
                for k in range(sent, due):
                    produce(p, k)
                sent = due
            p.produce(progress, key=b"floor", value=json.dumps({"next": first + sent}).encode())
            if mode == "alo":
                p.flush(30)
            else:
                p.commit_transaction(30)
            settled = time.time()
            for i, at in handed.items():
                times[i] = (at, settled)
            handed = {}
            turn = (turn + 1) % len(producers)
        return first + total


def settled_second(per_second, steady_p50):
    """The first second from which every second's median stays within 1.5x (or 10 ms)
    of the steady median; None: the last one does not."""
    settled = None
    if steady_p50 is None:
        return None
    for w, p50, _ in reversed(per_second):
        if p50 > max(1.5 * steady_p50, steady_p50 + 10):
            break
        settled = w
    return settled


def metrics_addr(proc, timeout=60):
    """The address a relay started with `--metrics-addr 127.0.0.1:0` serves /metrics on
    (from its log)."""
    found = []

    def logged():
        text = Path(proc.log_path).read_text(errors="replace")
        m = re.search(r"serving /metrics.*?addr=(\S+)", text)
        if m:
            found.append(re.sub(r"\x1b\[[0-9;]*m", "", m.group(1)))
        return bool(found)
    wait_for("the connector's /metrics address", logged, timeout, procs=[proc])
    return found[0]


LATENCY_METRIC = "outbox_relay_end_to_end_latency_seconds"
# The connector's --commit-interval-ms default for Kafka transactions, as the floor's.
FLOOR_COMMIT_INTERVAL = 0.05
# The connector's --linger-ms default, as the at-least-once floor's.
FLOOR_ALO_LINGER = 0.02
# The steady leg's paths, in the order they run; the defaults are all but the streamed
# floor (a measured lever, not a figure of the report).
STEADY_PATHS = ("kafka-floor", "kafka-floor-loaded", "kafka-floor-alo", "kafka-floor-streamed",
                "kafka", "kafka-lowlat", "kafka-alo", "direct")
DEFAULT_STEADY_PATHS = tuple(p for p in STEADY_PATHS if p != "kafka-floor-streamed")
# How long `load` writes while the relays start (Bench.start_under_load).
WARMUP_SECONDS = 20
# A Kafka step's stages, each from the source's commit (`Bench.step`).
STAGE_NAMES = {"handed": "handed to the producer", "kafka_commit": "Kafka commit returned",
               "visible": "visible (read_committed)", "applied": "committed in pg_end"}


def fmt_pair(v):
    return "p50/p99 " + "/".join("–" if x is None else f"{x:.0f}" for x in v) + " ms"


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# The samples a steady step's p99 rests on, at least (its 100 slowest make the tail).
MIN_LATENCY_SAMPLES = 10_000


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------
# One run, all runs, the report
# ---------------------------------------------------------------------------------------


# The seed's balance rule as a generic inbox's handler (docs/sink.md, "the ledger, as an inbox").
LEDGER_HANDLER = (
    "INSERT INTO main.balance AS b (account_id, current_balance, updated_at) "
    "SELECT account_id, sum(amount), max(created_at) FROM new_events "
    "GROUP BY account_id ORDER BY account_id "
    "ON CONFLICT (account_id) DO UPDATE "
    "SET current_balance = b.current_balance + EXCLUDED.current_balance, "
    "updated_at = GREATEST(b.updated_at, EXCLUDED.updated_at)")


def one_run(bench, r, legs):
    stack, n = bench.stack, bench.args.n
    out = {"run": r, "legs": {}}
    delete_topics(stack, f"bench-r{r}-")
    delete_topics(stack, f"bench_r{r}.")
    delete_topics(stack, f"bench_r{r}_tuned.")
    delete_topics(stack, "outbox.event.")
    drop_bench_slots(stack)
    empty_source(stack)
    empty_target(stack)
    debezium = not bench.args.skip_debezium
    tools = ["recv", "tx", "alo", "dbz", "dbz_tuned", "direct", "native", "direct_unix", "native_unix"]
    slots = {t: f"bench_r{r}_{t}" for t in tools}
    x = None
    if legs & {"kafka", "direct", "sink"}:
        log(f"run {r}: preparing pg_start, slots and a backlog of {n:,} transactions")
        with stack.pg("start") as conn:
            for s in slots.values():
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (s,))
        x, seed_secs = write_backlog(stack, n)
        out["backlog_seconds"] = seed_secs
        log(f"run {r}: backlog written in {seed_secs:.1f} s ({n / seed_secs:,.0f}/s), X = {lsn_text(x)}")

    def record(leg, fn, *argv):
        """Runs one tool; a failure is logged and kept in the results, and the run goes on."""
        busy_before = machine_busy()
        try:
            res = fn(*argv)
        except Exception as e:  # noqa: BLE001 - one tool's failure must not lose the others' figures
            log(f"run {r}: {leg}: {fn.__name__} FAILED: {e}")
            out.setdefault("failures", []).append({"leg": leg, "tool": fn.__name__, "error": str(e)[:2000]})
            return None
        if isinstance(res, tuple):
            res, extra_value = res
        else:
            extra_value = None
        busy_after = machine_busy()
        if busy_before is not None and busy_after is not None:
            res["machine_cpu_per_100k"] = (busy_after - busy_before) / res["n"] * 100_000
        out["legs"].setdefault(leg, []).append(res)
        extra = f", {res['cpu_per_100k']:.1f} CPU s/100k" if res.get("cpu_per_100k") is not None else ""
        rss = f", {res['peak_rss'] / 2**20:.0f} MiB" if res.get("peak_rss") else ""
        log(f"run {r}: {res['tool']}: {res['seconds']:.1f} s, {res['tps']:,.0f} tx/s{extra}{rss}")
        return extra_value

    kafka_topic = None
    if "kafka" in legs:
        record("kafka", bench.recvlogical, r, slots["recv"], x)
        kafka_topic = record("kafka", bench.connector, r, slots["tx"], x, "transactional")
        record("kafka", bench.connector, r, slots["alo"], x, "at-least-once")
        if debezium:
            record("kafka", bench.debezium, r, slots["dbz"])
            record("kafka", bench.debezium, r, slots["dbz_tuned"], True)
    if "direct" in legs:
        # Each tool over TCP loopback and over the Unix socket, on its own slot; odd runs
        # start with the relay and even runs with the subscription, so neither always
        # runs first after the Kafka leg.
        pairs = [(bench.direct, "direct"), (bench.native, "native")]
        if r % 2 == 0:
            pairs.reverse()
        for unix in (False, True):
            for fn, tool in pairs:
                record("direct", fn, r, slots[tool + ("_unix" if unix else "")], x, unix)
    drop_bench_slots(stack)
    if "sink" in legs and kafka_topic:
        record("sink", bench.sink, r, kafka_topic)
        record("sink", bench.sink_generic, r, kafka_topic)
        record("sink", bench.naive, r, kafka_topic)
        record("sink", bench.copy, r)
    if "outbox" in legs:
        # A WAL of its own: slots made now skip the seed-shaped backlog above.
        suffix = f"_r{r}"
        empty_source(stack)
        oslots = {t: f"bench_r{r}_outbox_{t}" for t in ("recv", "relay", "dbz")}
        with stack.pg("start") as conn:
            for s in oslots.values():
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (s,))
        ox, secs = write_backlog(stack, n, call=f"bench.outbox_seed({{k}}, '{suffix}')", table=OUTBOX_TABLE)
        out["outbox_backlog_seconds"] = secs
        log(f"run {r}: outbox backlog written in {secs:.1f} s ({n / secs:,.0f}/s), X = {lsn_text(ox)}")
        record("outbox", bench.recvlogical, r, oslots["recv"], ox, OUTBOX_PUBLICATION)
        record("outbox", bench.connector, r, oslots["relay"], ox, "transactional", "event-router")
        record("outbox", bench.kafka_floor, r, suffix)
        if debezium:
            # Both write outbox.event.<aggregatetype>: Debezium into topics of its own making.
            delete_topics(stack, "outbox.event.", wait=True)
            record("outbox", bench.debezium, r, oslots["dbz"], True, suffix)
        drop_bench_slots(stack)
    if "snapshot" in legs:
        # The outbox already holds N rows when the relay first starts: its initial snapshot.
        drop_bench_slots(stack)
        empty_source(stack)
        empty_target(stack)
        _, secs = write_backlog(stack, n)
        log(f"run {r}: outbox of {n:,} rows written in {secs:.1f} s")
        kills = bench.args.snapshot_kills
        record("snapshot", bench.copy_out, r)
        record("snapshot", bench.snapshot_connector, r, 0)
        drop_bench_slots(stack)
        record("snapshot", bench.snapshot_direct, r, 0)
        drop_bench_slots(stack)
        if kills:
            delete_topics(stack, f"bench-r{r}-", wait=True)
            record("snapshot", bench.snapshot_connector, r, kills)
            drop_bench_slots(stack)
            record("snapshot", bench.snapshot_direct, r, kills)
            drop_bench_slots(stack)
    if "large" in legs:
        # One source transaction of --large-rows rows, written after the slots were made.
        drop_bench_slots(stack)
        empty_source(stack)
        empty_target(stack)
        kills = bench.args.large_kills
        lslots = {(tool, k): f"bench_r{r}_large_{tool}_{k}" for tool in ("tx", "direct")
                  for k in sorted({0, kills})}
        with stack.pg("start") as conn:
            for s in lslots.values():
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (s,))
        lx, secs = bench.write_large_transaction(bench.args.large_rows)
        log(f"run {r}: one source transaction of {bench.args.large_rows:,} rows written in {secs:.1f} s")
        for k in sorted({0, kills}):
            record("large", bench.large_connector, r, lslots[("tx", k)], lx, k)
            record("large", bench.large_direct, r, lslots[("direct", k)], lx, k)
        drop_bench_slots(stack)
    if "backfill" in legs:
        # N rows pg_end lacks, written before the slots (as after a restore of pg_end from
        # an old backup), sent again by a backfill while `load` writes.
        drop_bench_slots(stack)
        empty_source(stack)
        _, secs = bench.write_large_transaction(n)
        log(f"run {r}: {n:,} rows written in {secs:.1f} s")
        record("backfill", bench.backfill, r, "kafka")
        record("backfill", bench.backfill, r, "direct")
        drop_bench_slots(stack)
    if "steady" in legs:
        try:
            out["steady"] = bench.steady(r)
        except Exception as e:  # noqa: BLE001
            log(f"run {r}: steady state FAILED: {e}")
            out.setdefault("failures", []).append({"leg": "steady", "tool": "steady", "error": str(e)[:2000]})
            out["steady"] = []
        for s in out["steady"]:
            log(f"run {r}: steady {s['path']} {s['rate']}/s (achieved {s['achieved']:.0f}/s): "
                f"p50 {s['p50']:.0f} ms, p99 {s['p99']:.0f} ms, max {s['max']:.0f} ms"
                + "".join(f"; {STAGE_NAMES[k]} {fmt_pair(v)}" for k, v in s.get("stages", {}).items())
                + (f"; {s['path']}'s histogram {fmt_pair(s['histogram'])}" if s.get("histogram") else "")
                + (f"; pressure cpu / io {report.pressure_cell(s['pressure'])}" if s.get("pressure") else "")
                + (f"; cores {report.cpu_cell(s['cpu'], top=6)}" if s.get("cpu") else "")
                + (f"; started under load: settled after {s['warmup']['settled']} s "
                   f"(first second's p99 {s['warmup']['first_p99']:.0f} ms)" if s.get("warmup") else ""))
        drop_bench_slots(stack)
    delete_topics(stack, f"bench-r{r}-")
    delete_topics(stack, f"bench_r{r}.")
    delete_topics(stack, f"bench_r{r}_tuned.")
    delete_topics(stack, "outbox.event.")
    return out


def summarize(runs):
    """Median and spread per (leg, tool)."""
    table = {}
    for run in runs:
        for leg, results in run["legs"].items():
            for res in results:
                table.setdefault(leg, {}).setdefault(res["tool"], []).append(res)
    summary = {}
    for leg, tools in table.items():
        summary[leg] = []
        for tool, rs in tools.items():
            tps = [x["tps"] for x in rs]
            row = {"tool": tool, "tps": statistics.median(tps), "tps_min": min(tps),
                   "tps_max": max(tps), "runs": len(rs), "n": rs[0]["n"],
                   "seconds": statistics.median(x["seconds"] for x in rs)}
            for key in ("cpu_per_100k", "peak_rss", "startup", "broker_cpu_per_100k",
                        "machine_cpu_per_100k", "live_p50", "live_p99", "live_max", "live_count"):
                vals = [x[key] for x in rs if x.get(key) is not None]
                if vals:
                    row[key] = max(vals) if key == "peak_rss" else statistics.median(vals)
            notes = {x["note"] for x in rs if x.get("note")}
            if notes:
                row["note"] = "; ".join(sorted(notes))
            summary[leg].append(row)
    steady = {}
    for run in runs:
        for s in run.get("steady", []):
            steady.setdefault((s["path"], s["rate"]), []).append(s)
    summary["steady"] = [
        {"path": path, "rate": rate, "runs": len(ss),
         "achieved": statistics.median(s["achieved"] for s in ss),
         "p50": statistics.median(s["p50"] for s in ss),
         "p99": statistics.median(s["p99"] for s in ss),
         "count": min(s["count"] for s in ss),
         "p99_min": min(s["p99"] for s in ss), "p99_max": max(s["p99"] for s in ss),
         "max": max(s["max"] for s in ss),
         **({"stages": {k: [median_or_none(s["stages"][k][j] for s in ss) for j in (0, 1)]
                        for k in ss[0]["stages"]}} if all("stages" in s for s in ss) else {}),
         **({"histogram": [median_or_none(s["histogram"][j] for s in ss) for j in (0, 1)]}
            if all(s.get("histogram") for s in ss) else {}),
         # The warm-up: the worst run's settling time (None, "never", beats any number).
         **({"warmup": {
             "settled": None if any(s["warmup"]["settled"] is None for s in ss)
             else max(s["warmup"]["settled"] for s in ss),
             "first_p99": median_or_none(s["warmup"]["first_p99"] for s in ss),
             "steady_p50": median_or_none(s["warmup"].get("steady_p50") for s in ss),
             "steady_p99": median_or_none(s["warmup"]["steady_p99"] for s in ss)}}
            if all(s.get("warmup") for s in ss) else {})}
        for (path, rate), ss in sorted(steady.items())
    ]
    return summary


def machine():
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pg = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "memory_gib": mem / 2**30, "kernel": platform.release(),
            "cpu": cpu, "postgres": pg}


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--legs", default="kafka,direct,sink,outbox,steady")
    ap.add_argument("--rates")
    ap.add_argument("--steady-seconds", type=float)
    ap.add_argument("--steady-paths", default=",".join(DEFAULT_STEADY_PATHS))
    ap.add_argument("--naive-count", type=int, default=5_000)
    ap.add_argument("--load-concurrency", type=int, default=8)
    ap.add_argument("--skip-debezium", action="store_true")
    ap.add_argument("--connector-extra", default="", help="extra connector flags (experiments)")
    ap.add_argument("--sink-extra", default="", help="extra sink flags (experiments)")
    ap.add_argument("--debezium-snapshot-mode", default="no_data")
    ap.add_argument("--large-rows", type=int, default=2_000_000,
                    help="large leg: rows of the one source transaction")
    ap.add_argument("--large-kills", type=int, default=0,
                    help="large leg: also run each relay with this many SIGKILLs during it")
    ap.add_argument("--backfill-rate", type=int, default=1000,
                    help="backfill leg: the live load's rate (tx/s) while the backfill runs")
    ap.add_argument("--backfill-load-seconds", type=float, default=120,
                    help="backfill leg: how long the live load runs (longer than the backfill)")
    ap.add_argument("--snapshot-kills", type=int, default=0,
                    help="snapshot leg: also run each relay's snapshot with this many SIGKILLs")
    ap.add_argument("--stack-dir", required=True)
    ap.add_argument("--port-offset", type=int, required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--report", help="write the markdown report and chart here (docs/benchmarks.md)")
    ap.add_argument("--results", required=True, help="JSON results file")
    ap.add_argument("--command", default="scripts/bench")
    args = ap.parse_args()
    if args.quick:
        args.n = args.n or 20_000
        args.runs = args.runs or 2
        args.rates = args.rates or "250,1000"
        args.steady_seconds = args.steady_seconds or 4
        args.naive_count = min(args.naive_count, 1_000)
    # The large leg alone: N is its one transaction's rows.
    args.n = args.n or (args.large_rows if args.legs == "large" else 1_000_000)
    args.runs = args.runs or 3
    args.rates = [int(x) for x in (args.rates or "250,500,1000,2000").split(",")]
    args.steady_seconds = args.steady_seconds or 15
    legs = set(args.legs.split(","))
    unknown = legs - {"kafka", "direct", "sink", "outbox", "steady", "snapshot", "large", "backfill"}
    if unknown:
        sys.exit(f"bench: unknown leg(s) {', '.join(sorted(unknown))}; "
                 "use kafka, direct, sink, outbox, steady, snapshot, large, backfill")
    if "sink" in legs and "kafka" not in legs:
        sys.exit("bench: the sink leg drains the topic the kafka leg writes; use --legs kafka,sink")
    args.steady_paths = args.steady_paths.split(",")
    unknown = set(args.steady_paths) - set(STEADY_PATHS)
    if unknown:
        sys.exit(f"bench: unknown steady path(s) {', '.join(sorted(unknown))}; "
                 f"use {', '.join(sorted(STEADY_PATHS))}")

    stack = Stack(args)
    ensure_commit_timestamps(stack)
    prepare_schemas(stack)
    bench = Bench(args, stack, args.bin)
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = []
    for r in range(1, args.runs + 1):
        runs.append(one_run(bench, r, legs))
        Path(args.results).write_text(json.dumps({"runs": runs}, indent=1, default=str))
    finished = datetime.datetime.now(datetime.timezone.utc)
    data = {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "command": args.command,
        "n": args.n, "runs_count": args.runs, "rates": args.rates,
        "steady_seconds": args.steady_seconds, "naive_count": args.naive_count,
        "machine": machine(),
        "runs": runs,
        "summary": summarize(runs),
    }
    Path(args.results).write_text(json.dumps(data, indent=1, default=str))
    log(f"results: {args.results}")
    if args.report:
        report.write(data, Path(args.report))
        log(f"report: {args.report}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
