"""Writes docs/benchmarks.md and its PNG chart from the results of bench.py."""

from pathlib import Path

HERE = Path(__file__).resolve().parent

DBZ = "Debezium 3.6.1 PostgreSQL connector (Kafka Connect standalone)"
DBZ_TUNED = "Debezium 3.6.1 PostgreSQL connector, tuned (Kafka Connect standalone)"
DBZ_OUTBOX_TUNED = "Debezium 3.6.1 + Outbox Event Router, tuned (Kafka Connect standalone)"
RELAY_EVENT_ROUTER = "outbox-relay connector --preset event-router (transactional)"
KAFKA_FLOOR = "Kafka floor: bare librdkafka producer, same records and transactions, no PostgreSQL"
CEILING = {
    "kafka": "pg_recvlogical (decode ceiling)",
    "outbox": "pg_recvlogical (decode ceiling)",
    "sink": "COPY into an unindexed table (write ceiling)",
    "snapshot": "COPY (SELECT …) TO STDOUT of the outbox (read ceiling)",
}
BASELINE = {
    "kafka": ("Debezium", DBZ),
    "outbox": ("Debezium tuned", DBZ_OUTBOX_TUNED),
    "sink": ("seed-style", "seed-style consumer (1 record per pg_end transaction, Python)"),
    "direct": ("native", "PostgreSQL native logical replication (subscription)"),
    "snapshot": ("COPY TO STDOUT", "COPY (SELECT …) TO STDOUT of the outbox (read ceiling)"),
}
# A second baseline column: Debezium tuned for throughput beside its defaults.
SECOND_BASELINE = {"kafka": ("Debezium tuned", DBZ_TUNED)}
# The suffix of the direct leg's rows that ran over Unix sockets (bench.py's UNIX); such a
# row is compared with the baseline over the same transport.
UNIX = " over a Unix socket"
TITLES = {
    "kafka": "Backlog drain, pg_start → Kafka",
    "outbox": "Backlog drain, Debezium-shaped outbox → Kafka (event router)",
    "direct": "Backlog drain, pg_start → pg_end without Kafka",
    "sink": "Drain, Kafka → pg_end",
    "snapshot": "Initial snapshot of an outbox already holding N rows (rows/s)",
    "large": "One source transaction of many rows (rows/s)",
    "backfill": "On-demand backfill of N rows while `load` writes (rows/s)",
}
LARGE_TOOLS = ("outbox-relay connector, one source transaction", "outbox-relay direct, one source transaction")
SNAPSHOT_TOOLS = ("outbox-relay connector, initial snapshot", "outbox-relay direct, initial snapshot")


# The sink leg's generic-inbox run (bench.py, Bench.sink_generic).
GENERIC_SINK = "outbox-relay sink, generic inbox + handler"

def fmt_int(x):
    return "–" if x is None else f"{x:,.0f}"


def fmt(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"


def row_of(summary, leg, tool):
    return next((r for r in summary.get(leg, []) if r["tool"] == tool), None)


def leg_table(data, leg):
    summary = data["summary"]
    rows = summary.get(leg)
    if not rows:
        return []
    ceiling = row_of(summary, leg, CEILING.get(leg, ""))
    base_name, base_tool = BASELINE.get(leg, ("", ""))
    base = row_of(summary, leg, base_tool)
    second_name, second_tool = SECOND_BASELINE.get(leg, ("", ""))
    second = row_of(summary, leg, second_tool)

    def base_of(row):
        if row["tool"].endswith(UNIX):
            return row_of(summary, leg, base_tool + UNIX)
        return base
    head = ["tool", "tx/s (median)", "spread (min–max)", "time (s)", "startup (s)"]
    if ceiling:
        head.append("× ceiling")
    if base:
        head.append(f"× {base_name}")
    if second:
        head.append(f"× {second_name}")
    head += ["CPU s / 100k tx", "peak RSS (MiB)"]
    brokers = any(r.get("broker_cpu_per_100k") is not None for r in rows)
    if brokers:
        head.append("brokers' CPU s / 100k tx")
    machine = any(r.get("machine_cpu_per_100k") is not None for r in rows)
    if machine:
        head.append("machine CPU s / 100k tx")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["tool"] + (f" ({r['note']})" if r.get("note") else ""),
            fmt_int(r["tps"]),
            f"{fmt_int(r['tps_min'])}–{fmt_int(r['tps_max'])}",
            fmt(r["seconds"]),
            fmt(r.get("startup")),
        ]
        if ceiling:
            cells.append(f"{r['tps'] / ceiling['tps']:.2f}")
        if base:
            b = base_of(r)
            cells.append(f"{r['tps'] / b['tps']:.2f}" if b else "–")
        if second:
            cells.append(f"{r['tps'] / second['tps']:.2f}")
        cells.append(fmt(r.get("cpu_per_100k")))
        cells.append(fmt(r["peak_rss"] / 2**20, 0) if r.get("peak_rss") else "–")
        if brokers:
            cells.append(fmt(r.get("broker_cpu_per_100k")))
        if machine:
            cells.append(fmt(r.get("machine_cpu_per_100k")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def latency_table(data):
    rows = data["summary"].get("steady", [])
    if not rows:
        return []
    lines = [
        "| path | target rate (tx/s) | achieved (tx/s) | samples per run | p50 (ms) | p99 (ms, median) | p99 spread (ms) | max (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = STEADY_NAMES
    for r in rows:
        lines.append(
            f"| {names.get(r['path'], r['path'])} | {r['rate']:,} | {fmt_int(r['achieved'])} | "
            f"{fmt_int(r.get('count'))} | {fmt_int(r['p50'])} | {fmt_int(r['p99'])} | {fmt_int(r['p99_min'])}–{fmt_int(r['p99_max'])} | "
            f"{fmt_int(r['max'])} |")
    if any(r["path"] == "kafka-lowlat" for r in rows):
        lines += ["", "¹ connector `--linger-ms 5`, sink `--batch-linger-ms 5 --consumer-property "
                  "fetch.wait.max.ms=10`; every other row runs with the defaults (connector linger 20 ms, "
                  "sink linger 20 ms, the sink's fetch wait 100 ms)."]
    if any(r["path"].startswith("kafka-floor") for r in rows):
        lines += ["", "² no PostgreSQL and no relay: records arrive at the rate and a bare librdkafka "
                  "producer with the connector's settings commits what has arrived, with a progress "
                  "record on a second topic, taking turns over 4 transactional ids and starting commits at "
                  "most every 50 ms (the connector's transactions at that rate, without its linger); a "
                  "read_committed consumer times arrival → visible."]
    if any(r["path"] == "kafka-floor-alo" for r in rows):
        lines += ["", "³ the at-least-once path's floor: no transactions, one idempotent producer "
                  "(acks=all, the connector's settings) makes the connector's at-least-once batches: "
                  "what has arrived, once the oldest of it has waited the connector's 20 ms linger and "
                  "the batch before is acknowledged, with a progress record; the consumer times "
                  "arrival → visible; `load` writes the rate into pg_start meanwhile."]
    return lines


STEADY_NAMES = {"kafka": "Kafka, transactional connector + sink",
                "kafka-lowlat": "Kafka, transactional, short batching windows¹",
                "kafka-alo": "Kafka, at-least-once connector + sink", "direct": "direct mode",
                "kafka-floor": "Kafka floor: bare producer + read_committed consumer²",
                "kafka-floor-loaded": "Kafka floor, while `load` writes the rate into pg_start²",
                "kafka-floor-streamed": "Kafka floor, each record handed to the open transaction as it arrives²",
                "kafka-floor-alo": "Kafka floor, at-least-once, while `load` writes the rate into pg_start³"}


def pair(v):
    return "–" if v is None or v[0] is None else f"{fmt_int(v[0])} / {fmt_int(v[1])}"


def cpu_cell(cpu, top=4):
    """`1.58 busy: brokers 0.81, pg_start exited 0.24, ...`: the machine's busy cores, then
    the `top` groups that used most (bench.CpuUse; the log line and the report)."""
    if not cpu:
        return "–"
    groups = [f"{k} {v:.2f}" for k, v in cpu.items() if k != "machine"][:top]
    return f"{cpu.get('machine', 0):.2f} busy: " + ", ".join(groups)


def pressure_cell(p):
    if not p:
        return "–"
    return f"{p.get('cpu_some', 0):.0%} / {p.get('io_some', 0):.0%}"


def stages_table(data):
    """Where the Kafka path's time goes, each stage from the source commit (p50 / p99)."""
    rows = [r for r in data["summary"].get("steady", []) if r.get("stages")]
    if not rows:
        return []
    lines = [
        "Each column is measured from the source transaction's commit on pg_start (p50 / p99, ms; "
        "medians of the runs): the record handed to the producer (its Kafka CreateTime), the "
        "connector's Kafka commit returned (its `outbox_relay_end_to_end_latency_seconds{stage=\"connector\"}` "
        "histogram, so to within a bucket), visible to a read_committed consumer of the topic (a "
        "probe in the bench: an upper bound, it reads at its own pace), committed in pg_end. For "
        "the floor, from the record's arrival. The last column is the end stage's own histogram "
        "(the sink's, direct mode's) over the same step: it should agree with the measured "
        "pg_end figure to within a bucket (10 ms up to 100 ms, 50 ms up to 300 ms).",
        "",
        "| path | rate (tx/s) | handed to the producer | Kafka commit returned | visible (read_committed) | committed in pg_end | histogram of the end stage |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["summary"].get("steady", []):
        st = r.get("stages") or {}
        if not st and not r.get("histogram"):
            continue
        lines.append(f"| {STEADY_NAMES.get(r['path'], r['path'])} | {r['rate']:,} | {pair(st.get('handed'))} | "
                     f"{pair(st.get('kafka_commit'))} | {pair(st.get('visible'))} | "
                     f"{pair(st.get('applied'))} | {pair(r.get('histogram'))} |")
    return lines


def warmup_table(data):
    rows = [r for r in data["summary"].get("steady", []) if r.get("warmup")]
    if not rows:
        return []
    lines = [
        "The relays start one second into `load` writing the first rate, on a slot made before "
        "the load began. Per second of source commit from the start: `settled` is the first "
        "second from which every second's median latency stays within 1.5× (or 10 ms) of the "
        "median of the load's second half (a backlog carried from the start raises a whole "
        "second; a tail spike of the brokers' does not move its median); the worst run; "
        "target: within 10 s.",
        "",
        "| path | rate (tx/s) | settled after (s, worst run) | first second's p99 (ms) | second half's p50 / p99 (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["warmup"]
        settled = "never" if w["settled"] is None else f"{w['settled']}"
        lines.append(f"| {STEADY_NAMES.get(r['path'], r['path'])} | {r['rate']:,} | {settled} | "
                     f"{fmt_int(w['first_p99'])} | {pair([w.get('steady_p50'), w['steady_p99']])} |")
    return lines


def targets(data):
    s = data["summary"]
    out = []

    def ratio(leg, tool, other):
        a, b = row_of(s, leg, tool), row_of(s, leg, other)
        return (a["tps"] / b["tps"]) if a and b else None

    def line(target, value, ok):
        mark = "–" if ok is None else ("met" if ok else "**missed**")
        out.append(f"| {target} | {value} | {mark} |")

    tx = "outbox-relay connector (transactional)"
    alo = "outbox-relay connector (at-least-once)"
    for tool in (tx, alo):
        r = ratio("kafka", tool, BASELINE["kafka"][1])
        line(f"{tool.split('(')[1][:-1]} connector ≥ 2× Debezium", fmt(r, 2) + "×" if r else "not measured",
             None if r is None else r >= 2)
        r = ratio("kafka", tool, CEILING["kafka"])
        line(f"{tool.split('(')[1][:-1]} connector ≥ 0.7× pg_recvlogical", fmt(r, 2) + "×" if r else "not measured",
             None if r is None else r >= 0.7)
    for tool in (tx, alo):
        r = ratio("kafka", tool, DBZ_TUNED)
        line(f"{tool.split('(')[1][:-1]} connector vs Debezium tuned for throughput (no target)",
             fmt(r, 2) + "×" if r else "not measured", None)
    r = ratio("outbox", RELAY_EVENT_ROUTER, DBZ_OUTBOX_TUNED)
    line("event-router preset ≥ 3× Debezium's Outbox Event Router, tuned", fmt(r, 2) + "×" if r else "not measured",
         None if r is None else r >= 3)
    r = ratio("outbox", RELAY_EVENT_ROUTER, CEILING["outbox"])
    line("event-router preset ≥ 0.8× pg_recvlogical", fmt(r, 2) + "×" if r else "not measured",
         None if r is None else r >= 0.8)
    busy = machine_share(data, "outbox", RELAY_EVENT_ROUTER)
    if busy is not None:
        line("event-router preset: share of the machine's cores busy during its drain "
             "(no target; near 1, the drain is bound by the machine's CPU)", f"{busy:.2f}", None)
    for tool in SNAPSHOT_TOOLS:
        r = ratio("snapshot", tool, CEILING["snapshot"])
        line(f"{tool.split(',')[0][len('outbox-relay '):]}: chunked initial snapshot ≥ 0.7× COPY TO STDOUT",
             fmt(r, 2) + "×" if r else "not measured", None if r is None else r >= 0.7)
        rss = [x["peak_rss"] for x in s.get("snapshot", []) if x["tool"].startswith(tool) and x.get("peak_rss")]
        if rss:
            line(f"{tool.split(',')[0][len('outbox-relay '):]}: peak RSS during the snapshot < 128 MiB",
                 f"{max(rss) / 2**20:.0f} MiB", max(rss) < 128 * 2**20)
    for tool in LARGE_TOOLS:
        rss = [x["peak_rss"] for x in s.get("large", []) if x["tool"].startswith(tool) and x.get("peak_rss")]
        if rss:
            n = max(x["n"] for x in s.get("large", []))
            line(f"{tool.split(',')[0][len('outbox-relay '):]}: peak RSS through one source transaction "
                 f"of {n:,} rows < 256 MiB", f"{max(rss) / 2**20:.0f} MiB", max(rss) < 256 * 2**20)
    for x in s.get("backfill", []):
        line(f"{x['tool'][len('outbox-relay '):]}: live p99 while backfilling {x['n']:,} rows "
             "(reported; no target)", f"{fmt_int(x['live_p99'])} ms over {fmt_int(x['live_count'])} "
             f"transactions (p50 {fmt_int(x['live_p50'])} ms)", None)
    r = ratio("sink", "outbox-relay sink", BASELINE["sink"][1])
    line("sink ≥ 10× the seed-style consumer", fmt(r, 1) + "×" if r else "not measured",
         None if r is None else r >= 10)
    r = ratio("sink", "outbox-relay sink", CEILING["sink"])
    line("sink ≥ 0.3× COPY", fmt(r, 2) + "×" if r else "not measured", None if r is None else r >= 0.3)
    r = ratio("sink", GENERIC_SINK, "outbox-relay sink")
    line("generic inbox + handler ≥ 0.5× the ledger profile (same records)",
         fmt(r, 2) + "×" if r else "not measured", None if r is None else r >= 0.5)
    for suffix, label in (("", "TCP loopback"), (UNIX, "Unix sockets")):
        r = ratio("direct", "outbox-relay direct" + suffix, BASELINE["direct"][1] + suffix)
        line(f"direct ≥ native logical replication ({label})", fmt(r, 2) + "×" if r else "not measured",
             None if r is None else r >= 1)
    for path, label in (("kafka", "transactional, defaults"),
                        ("kafka-lowlat", "transactional, short batching windows"),
                        ("kafka-alo", "at-least-once, defaults")):
        k1000 = next((x for x in s.get("steady", []) if x["path"] == path and x["rate"] == 1000), None)
        if k1000 or path == "kafka":
            line(f"p99 end-to-end < 100 ms at 1,000 tx/s (Kafka path, {label})",
                 f"{fmt_int(k1000['p99'])} ms (source achieved {fmt_int(k1000['achieved'])} tx/s)"
                 if k1000 else "not measured",
                 None if k1000 is None else k1000["p99"] < 100)
    steady = {(x["path"], x["rate"]): x for x in s.get("steady", [])}
    # The target is judged against the floor measured with the source's load on the same
    # cores (the relay never runs without it); the idle-source floor is shown beside it.
    floor, k = steady.get(("kafka-floor", 1000)), steady.get(("kafka", 1000))
    loaded = steady.get(("kafka-floor-loaded", 1000))
    if loaded and k:
        r = k["p99"] / loaded["p99"]
        line("p99 at 1,000 tx/s, transactional, within 1.5× the Kafka floor's (bare producer + "
             "read_committed consumer, same transactions, while `load` writes the rate into "
             "pg_start)", f"{r:.2f}× ({fmt_int(k['p99'])} ms against {fmt_int(loaded['p99'])} ms)",
             r <= 1.5)
    if floor and k:
        r = k["p99"] / floor["p99"]
        line("p99 at 1,000 tx/s, transactional, against the floor with pg_start idle"
             + (" (no target)" if loaded else ", within 1.5×"),
             f"{r:.2f}× ({fmt_int(k['p99'])} ms against {fmt_int(floor['p99'])} ms)",
             None if loaded else r <= 1.5)
    alo = steady.get(("kafka-alo", 1000))
    if alo:
        line("p99 end-to-end < 50 ms at 1,000 tx/s (Kafka path, at-least-once, defaults)",
             f"{fmt_int(alo['p99'])} ms", alo["p99"] < 50)
    alo_floor = steady.get(("kafka-floor-alo", 1000))
    if alo and alo_floor:
        r = alo["p99"] / alo_floor["p99"]
        line("p99 at 1,000 tx/s, at-least-once, within 1.5× its Kafka floor's (bare idempotent "
             "producer + consumer, while `load` writes the rate into pg_start)",
             f"{r:.2f}× ({fmt_int(alo['p99'])} ms against {fmt_int(alo_floor['p99'])} ms)", r <= 1.5)
    d = steady.get(("direct", 1000))
    if d:
        line("p99 end-to-end < 30 ms at 1,000 tx/s (direct mode)", f"{fmt_int(d['p99'])} ms", d["p99"] < 30)
    for x in s.get("steady", []):
        if x.get("warmup"):
            w = x["warmup"]["settled"]
            line(f"{STEADY_NAMES.get(x['path'], x['path'])}: started under load at {x['rate']:,} tx/s, "
                 "steady latency within 10 s", "never" if w is None else f"{w} s", w is not None and w <= 10)
    for leg, tool, label in (("kafka", tx, "connector"), ("sink", "outbox-relay sink", "sink"),
                             ("sink", GENERIC_SINK, "sink, generic inbox")):
        r = row_of(s, leg, tool)
        rss = r.get("peak_rss") if r else None
        line(f"{label} < 64 MiB peak RSS draining {data['n']:,}",
             f"{rss / 2**20:.0f} MiB" if rss else "not measured", None if rss is None else rss < 64 * 2**20)
    return ["| target | measured | |", "|---|---|---|", *out]


def machine_share(data, leg, tool):
    """How much of the machine's cores were busy while `tool` drained: its rate times the
    whole machine's CPU per transaction (every process: the relay, the brokers, the
    walsender, the bench's own polling) over the cores."""
    row = row_of(data["summary"], leg, tool)
    cores = data.get("machine", {}).get("nproc")
    if not (row and cores and row.get("machine_cpu_per_100k")):
        return None
    return row["tps"] * row["machine_cpu_per_100k"] / 100_000 / cores


def chart(data, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    legs = [leg for leg in ("kafka", "outbox", "direct", "sink", "snapshot", "large", "backfill")
            if data["summary"].get(leg)]
    steady = data["summary"].get("steady", [])
    panels = len(legs) + (1 if steady else 0)
    cols = 2 if panels > 1 else 1
    rows_n = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows_n, cols, figsize=(6.2 * cols, 4.6 * rows_n), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.axis("off")
    short = {
        "pg_recvlogical (decode ceiling)": "pg_recvlogical\n(ceiling)",
        "outbox-relay connector (transactional)": "relay\ntransactional",
        "outbox-relay connector (at-least-once)": "relay\nat-least-once",
        DBZ: "Debezium\n3.6.1",
        DBZ_TUNED: "Debezium\ntuned",
        RELAY_EVENT_ROUTER: "relay\nevent-router",
        DBZ_OUTBOX_TUNED: "Debezium router\ntuned",
        "outbox-relay direct": "relay\ndirect",
        "PostgreSQL native logical replication (subscription)": "native\nsubscription",
        "outbox-relay direct" + UNIX: "relay direct\nUnix socket",
        "PostgreSQL native logical replication (subscription)" + UNIX: "native\nUnix socket",
        "outbox-relay sink": "relay\nsink",
        GENERIC_SINK: "relay sink\ngeneric inbox",
        "seed-style consumer (1 record per pg_end transaction, Python)": "seed-style\nconsumer",
        "COPY into an unindexed table (write ceiling)": "COPY\n(ceiling)",
        LARGE_TOOLS[0]: "relay\nconnector",
        LARGE_TOOLS[1]: "relay\ndirect",
        LARGE_TOOLS[0] + ", 2 SIGKILLs": "connector\n2 SIGKILLs",
        LARGE_TOOLS[1] + ", 2 SIGKILLs": "direct\n2 SIGKILLs",
    }
    for ax, leg in zip(axes, legs):
        rows = data["summary"][leg]
        names = [short.get(r["tool"], r["tool"]) for r in rows]
        vals = [r["tps"] for r in rows]
        err = [[r["tps"] - r["tps_min"] for r in rows], [r["tps_max"] - r["tps"] for r in rows]]
        colors = ["#d62728" if r["tool"].startswith("outbox-relay") else "#7f7f7f" for r in rows]
        ax.bar(names, vals, yerr=err, color=colors, capsize=4)
        ax.set_title(TITLES[leg], fontsize=10)
        if leg == "sink":
            ax.set_yscale("log")
        ax.set_ylabel("transactions/s (median, min–max)")
        ax.tick_params(axis="x", labelsize=8)
        for i, (v, r) in enumerate(zip(vals, rows)):
            ax.text(i, r["tps_max"] * (1.15 if leg == "sink" else 1.02), f"{v:,.0f}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_ylim(top=max(r["tps_max"] for r in rows) * (3 if leg == "sink" else 1.12))
    if steady:
        ax = axes[len(legs)]
        for p, label, color in (("kafka", "Kafka (transactional)", "#1f77b4"),
                                ("kafka-lowlat", "Kafka (transactional, short windows)", "#ff7f0e"),
                                ("kafka-alo", "Kafka (at-least-once)", "#9467bd"),
                                ("direct", "direct mode", "#2ca02c"),
                                ("kafka-floor", "Kafka floor (brokers alone)", "#7f7f7f")):
            pts = [x for x in steady if x["path"] == p]
            if pts:
                ax.plot([x["rate"] for x in pts], [x["p99"] for x in pts], "o-", color=color, label=f"{label} p99")
                ax.plot([x["rate"] for x in pts], [x["p50"] for x in pts], "o--", color=color, alpha=0.6,
                        label=f"{label} p50")
        ax.axhline(100, color="#d62728", linestyle=":", linewidth=1, label="100 ms target")
        ax.set_xlabel("source rate (tx/s)")
        ax.set_ylabel("source commit → pg_end commit (ms)")
        ax.set_title("End-to-end latency, steady state", fontsize=10)
        ax.legend(fontsize=7)
    m = data["machine"]
    fig.suptitle(f"outbox-relay benchmarks: N={data['n']:,}, {data['runs_count']} runs, "
                 f"{m['nproc']} cores, {data['started'][:10]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data, md_path):
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    png = md_path.with_suffix(".png")
    chart(data, png)
    m = data["machine"]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by scripts/bench (scripts/bench.d/report.py): edit those, not this file. -->",
        "",
        f"Generated by `{data['command']}` on {data['started'][:16].replace('T', ' ')} UTC "
        f"(finished {data['finished'][11:16]} UTC).",
        f"N = **{data['n']:,}** source transactions per run, **{data['runs_count']} runs**; every figure "
        "is the median of the runs, with the spread (min–max) beside it. All competitors of a leg ran in "
        "the same run on the same WAL, one after the other, so the ratios hold on a noisy machine.",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']:.0f} GiB memory, Linux {m['kernel']}, "
        f"{m['postgres']}, Apache Kafka 4.1.2 (3 KRaft nodes, RF 3, min.insync.replicas=2), all of it on "
        "the same machine as the tools measured (the whole stack shares the 2 cores).",
        "",
        f"![benchmarks]({png.name})",
        "",
        "## Targets",
        "",
        *targets(data),
        "",
    ]
    for leg in ("kafka", "outbox", "direct", "sink", "snapshot", "large", "backfill"):
        table = leg_table(data, leg)
        if table:
            lines += [f"## {TITLES[leg]}", "", *table, ""]
    lat = latency_table(data)
    if lat:
        lines += ["## End-to-end latency at fixed source rates", "", *lat, ""]
    st = stages_table(data)
    if st:
        lines += ["### Where the time goes", "", *st, ""]
    wu = warmup_table(data)
    if wu:
        lines += ["### Started under load", "", *wu, ""]
    # The sessions' notes belong to the main report; a side report (--report) has its tables.
    notes = HERE / "notes.md"
    if notes.exists() and md_path.name == "benchmarks.md":
        lines += [notes.read_text().rstrip(), ""]
    elif notes.exists():
        lines += ["How each figure is measured, and the sessions' notes: "
                  "[benchmarks.md](benchmarks.md).", ""]
    failures = [(run["run"], f) for run in data["runs"] for f in run.get("failures", [])]
    if failures:
        lines += ["## Failures", "", "Measurements that failed in a run (their figures are missing above):", ""]
        for run, f in failures:
            lines.append(f"- run {run}, {f['leg']} / {f['tool']}: `{f['error'].splitlines()[0][:300]}`")
        lines.append("")
    lines += ["## Per-run figures", "", "| run | leg | tool | tx/s | time (s) |", "|---|---|---|---|---|"]
    for run in data["runs"]:
        for leg, results in run["legs"].items():
            for r in results:
                lines.append(f"| {run['run']} | {leg} | {r['tool']} | {fmt_int(r['tps'])} | {fmt(r['seconds'])} |")
    lines.append("")
    steady_runs = [(run["run"], x) for run in data["runs"] for x in run.get("steady", [])]
    if steady_runs:
        lines += ["Steady state per run (p50 / p99, ms; the first run on a freshly started stack is "
                  "the cold one). The last column is the CPU over the step in cores: the machine's "
                  "busy time, then the four process groups that used most (`brokers`: this stack's "
                  "three, `other brokers`: any other stack's; `pg_start exited`: pg_start's processes "
                  "that ended during the step, i.e. `load`'s connections; `relay X`: the relay's "
                  "subcommand X):", "",
                  "| run | path | rate (tx/s) | end to end | handed to the producer | Kafka commit returned | "
                  "visible (read_committed) | end stage's histogram | settled after start under load (s) | "
                  "CPU / I/O pressure (share of the step some task waited) | "
                  "busy cores: the machine's, then who used them |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, x in steady_runs:
            st = x.get("stages") or {}
            w = x.get("warmup")
            settled = "–" if not w else ("never" if w["settled"] is None else str(w["settled"]))
            lines.append(f"| {n} | {STEADY_NAMES.get(x['path'], x['path'])} | {x['rate']:,} | "
                         f"{pair([x['p50'], x['p99']])} | {pair(st.get('handed'))} | "
                         f"{pair(st.get('kafka_commit'))} | {pair(st.get('visible'))} | "
                         f"{pair(x.get('histogram'))} | {settled} | {pressure_cell(x.get('pressure'))} | "
                         f"{cpu_cell(x.get('cpu'))} |")
        lines.append("")
    md_path.write_text("\n".join(lines))
