//! `outbox-relay chaos`: proves the invariants under the outage of every component.
//!
//! The runner brings up a stack instance of its own (`scripts/stack` with a state dir
//! and a port offset), a toxiproxy server between the relay and every component, fresh
//! databases, topics, slots and group per run, and the relay as child processes of this
//! binary: connector + sink (scenario `kafka`), direct (scenario `direct`), a routed
//! connector + a sink with a generic inbox (scenario `routes`), and the `event-router`
//! preset on a Debezium-shaped outbox table and on logical messages + a sink with a
//! `payload` inbox (scenario `events`), all at once. It writes a
//! steady load into pg_start, injects faults from a seeded schedule ([`schedule`]), heals
//! everything, waits for the pipeline to drain, and checks:
//!
//! ```text
//!   load ─▶ pg_start ──proxy──▶ connector ──proxy──▶ Kafka ──proxy──▶ sink ──proxy──▶ pg_end
//!              │     ──proxy──▶ direct ───────────────────────────────────proxy──▶ pg_end
//!              │     ──proxy──▶ connector, a route ─▶ topic per account ─▶ sink, an inbox ─▶ pg_end
//!              │     ──proxy──▶ connector, event router ─▶ outbox.event.* ─▶ sink, an inbox ─▶ pg_end
//!              └─ witness slot (test_decoding): every outbox commit LSN
//! ```
//!
//! - `verify`: every id exactly once in pg_end, balances equal, balance = sum (in scenarios
//!   `routes` and `events` the balances are the inbox handler's work, not the built-in
//!   ledger's);
//! - the topic (every routed topic) read with `read_committed` holds every outbox id
//!   exactly once;
//! - the slot never confirmed past what the next stage held (sampled, [`check`]);
//! - no dead letters; no relay process exited unless a fault made it.
//!
//! The source of truth is what pg_start committed, never the generator's counters.

pub mod check;
pub mod relay;
pub mod schedule;
pub mod stack;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cmd::load::{self, LoadArgs, LoadSummary};
use crate::cmd::{migrate, verify};
use crate::config::SourceArgs;
use crate::error::error_chain;
use crate::kafka::{self, TopicSpec};
use crate::pg;
use check::{LsnCheck, NextStage, TopicCheck};
use relay::{Leave, RelayProc, UnexpectedExit};
use schedule::{Fault, FaultKind, Lane, Schedule};
use stack::{Stack, Toxiproxy};

/// The pipelines a run can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// pg_start → connector → Kafka → sink → pg_end.
    Kafka,
    /// pg_start → direct → pg_end.
    Direct,
    /// pg_start → connector with a route (a topic per account, created by the connector
    /// when its first record comes) → Kafka → sink with a generic inbox on the topics'
    /// pattern (`main.transactions`, and the balances kept by a SQL handler) → pg_end.
    Routes,
    /// pg_start → connector with the `event-router` preset on two sources at once: a
    /// Debezium-shaped outbox table, and transactional logical messages of the same
    /// shape (a trigger turns each ledger row into one or the other, by account) →
    /// `outbox.event.<aggregatetype>` topics, created by the connector → sink with a
    /// `payload` inbox on their pattern and the ledger handler → pg_end.
    Events,
}

impl Scenario {
    /// Whether `kind` touches this scenario's pipeline.
    fn affected_by(self, kind: FaultKind) -> bool {
        match self {
            Scenario::Kafka | Scenario::Routes | Scenario::Events => kind.affects_kafka_path(),
            Scenario::Direct => kind.affects_direct_path(),
        }
    }

    /// The scenario's name in database and process names.
    fn short_name(self) -> &'static str {
        match self {
            Scenario::Kafka => "kafka",
            Scenario::Direct => "direct",
            Scenario::Routes => "routes",
            Scenario::Events => "events",
        }
    }

    /// Whether the pipeline goes through Kafka (a connector, a progress topic, a sink).
    fn through_kafka(self) -> bool {
        matches!(self, Scenario::Kafka | Scenario::Routes | Scenario::Events)
    }

    /// The prefix of its relay processes' names (`<prefix>connector`): none for the
    /// first two scenarios, whose processes the reports have always called `connector`,
    /// `sink` and `direct`.
    fn process_prefix(self) -> &'static str {
        match self {
            Scenario::Routes => "routes-",
            Scenario::Events => "events-",
            _ => "",
        }
    }

    /// Whether this scenario's relay process `process` is its `role` (`connector`,
    /// `sink`, `direct`).
    fn plays(self, process: &str, role: &str) -> bool {
        process.strip_prefix(self.process_prefix()) == Some(role)
    }
}

/// Options of `outbox-relay chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Seed of the fault schedule (default: drawn, and printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds of load and faults (the schedule always holds every kind at least once,
    /// so a very short run lasts longer).
    #[arg(long, default_value_t = 180.0)]
    pub duration: f64,
    /// Scenarios to run, at the same time.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kafka,direct,routes,events"
    )]
    pub scenarios: Vec<Scenario>,
    /// Fault kinds to inject, comma separated, or `all`. Kinds that touch no selected
    /// scenario are left out.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub faults: Vec<String>,
    /// Source transactions per second written by the load, per scenario.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// Rows of each large source transaction the load writes beside the small ones,
    /// per scenario (above the relays' `--batch-size` of 5000, each is streamed into
    /// one open destination transaction); 0 writes none.
    #[arg(long, default_value_t = 6000)]
    pub large_rows: u32,
    /// Seconds between two large source transactions of a scenario.
    #[arg(long, default_value_t = 30.0)]
    pub large_every: f64,
    /// The PostgreSQL major version of the stack instance (`scripts/stack up --pg`).
    /// `pg-start-failover` needs 17 or newer (failover slots): with an older one `all`
    /// leaves it out.
    #[arg(long, default_value_t = 15)]
    pub pg: u16,
    /// The stack instance's state dir (not the default stack's).
    #[arg(
        long,
        env = "OUTBOX_RELAY_CHAOS_STACK_DIR",
        default_value = "/var/tmp/outbox-relay-chaos"
    )]
    pub stack_dir: PathBuf,
    /// Added to every port of the stack instance (see scripts/stack).
    #[arg(long, env = "OUTBOX_RELAY_CHAOS_PORT_OFFSET", default_value_t = 1000)]
    pub port_offset: u16,
    /// The stack script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack"))]
    pub stack_script: PathBuf,
    /// The `outbox-relay` binary run as the relay (default: this one).
    #[arg(long)]
    pub relay_binary: Option<PathBuf>,
    /// No fault starts later than this many seconds after the load started (default:
    /// 1.5 × --duration), except the first of each kind: on a slow machine a lane of
    /// broker restarts falls behind its plan, and the run must still end.
    #[arg(long)]
    pub fault_deadline: Option<f64>,
    /// Seconds to wait, after healing, for pg_end to catch up.
    #[arg(long, default_value_t = 300.0)]
    pub drain_timeout: f64,
    /// Print the report as JSON on stdout (the human form goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Print the schedule and exit.
    #[arg(long)]
    pub plan_only: bool,
    /// Keep the run's databases and slots even when it passes.
    #[arg(long)]
    pub keep: bool,
}

impl ChaosArgs {
    /// The enabled fault kinds.
    pub fn kinds(&self) -> Result<Vec<FaultKind>, String> {
        let mut kinds = Vec::new();
        for name in &self.faults {
            if name == "all" {
                kinds.extend(FaultKind::ALL);
            } else {
                kinds.push(name.parse()?);
            }
        }
        kinds.retain(|k| self.scenarios.iter().any(|s| s.affected_by(*k)));
        if self.pg < 17 && kinds.contains(&FaultKind::PgStartFailover) {
            if self
                .faults
                .iter()
                .any(|f| f == FaultKind::PgStartFailover.name())
            {
                return Err(format!(
                    "pg-start-failover needs PostgreSQL 17 or newer (failover slots): add --pg 17 \
                     (this run asks for --pg {})",
                    self.pg
                ));
            }
            kinds.retain(|k| *k != FaultKind::PgStartFailover);
        }
        kinds.sort();
        kinds.dedup();
        Ok(kinds)
    }

    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (now.as_nanos() as u64) % 1_000_000_000
        })
    }
}

/// What happened to one fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultOutcome {
    pub kind: FaultKind,
    pub lane: Lane,
    pub seq: usize,
    /// When it started, seconds after the load started.
    pub started_secs: f64,
    /// From the fault to the end of its heal.
    pub took_secs: f64,
    pub note: String,
    /// An injection or heal step that failed (the run goes on; the final heal fixes).
    pub error: Option<String>,
}

/// The report of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: Scenario,
    pub database: String,
    /// Outbox transactions pg_start holds: the source of truth.
    pub committed_at_source: u64,
    /// What the load generator believes (informative only).
    pub load: Option<LoadSummary>,
    pub faults: usize,
    pub faults_by_kind: BTreeMap<String, u64>,
    /// From the end of the heal until pg_end matched pg_start.
    pub drain_secs: Option<f64>,
    pub lost: u64,
    pub duplicated: u64,
    pub verify: verify::Report,
    pub topic: Option<TopicCheck>,
    pub lsn: LsnCheck,
    pub dead_letters: i64,
    pub relay_starts: BTreeMap<String, u64>,
    pub pass: bool,
}

/// The report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub duration_secs: f64,
    pub elapsed_secs: f64,
    pub stack_dir: String,
    pub port_offset: u16,
    pub faults: usize,
    /// Planned faults not started because the fault deadline had passed.
    pub faults_skipped: usize,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub fault_errors: Vec<String>,
    /// Times toxiproxy was restarted because a call to its API failed (each cut every
    /// connection through it, a fault beyond the schedule's).
    pub toxiproxy_restarts: u32,
    /// SIGTERMs that did not end in a clean exit within 60 s.
    pub unclean_terms: Vec<String>,
    pub unexpected_exits: Vec<UnexpectedExit>,
    pub scenarios: Vec<ScenarioReport>,
    pub outcomes: Vec<FaultOutcome>,
    pub pass: bool,
}

impl ChaosReport {
    /// The human-readable form: the run, each scenario, what the processes did, and
    /// the verdict on the last line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chaos report: seed {} duration {:.0}s (elapsed {:.0}s), stack {} offset {}",
            self.seed, self.duration_secs, self.elapsed_secs, self.stack_dir, self.port_offset
        );
        let _ = writeln!(
            out,
            "  faults injected: {} (planned but skipped after the deadline: {})",
            self.faults, self.faults_skipped
        );
        for (kind, n) in &self.faults_by_kind {
            let _ = writeln!(out, "    {kind:<24} {n}");
        }
        for s in &self.scenarios {
            s.render_into(&mut out);
        }
        self.render_process_findings(&mut out);
        let _ = write!(out, "chaos: {}", if self.pass { "PASS" } else { "FAIL" });
        out
    }

    /// Unexpected exits and failed fault steps (the first ten of each), unclean
    /// SIGTERMs, toxiproxy restarts; a line only for what happened, except the exits.
    fn render_process_findings(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "  unexpected relay exits: {}",
            self.unexpected_exits.len()
        );
        for e in self.unexpected_exits.iter().take(10) {
            let _ = writeln!(out, "    {} {} at t+{:.1}s", e.process, e.status, e.at_secs);
        }
        if !self.unclean_terms.is_empty() {
            let _ = writeln!(out, "  unclean SIGTERMs: {:?}", self.unclean_terms);
        }
        if self.toxiproxy_restarts > 0 {
            let _ = writeln!(
                out,
                "  toxiproxy restarted after a failed call: {} times",
                self.toxiproxy_restarts
            );
        }
        if !self.fault_errors.is_empty() {
            let _ = writeln!(
                out,
                "  fault steps that failed: {}",
                self.fault_errors.len()
            );
            for e in self.fault_errors.iter().take(10) {
                let _ = writeln!(out, "    {e}");
            }
        }
    }
}

impl ScenarioReport {
    /// The scenario's lines of the run's report: verdict, counts, verify's findings
    /// when it failed, the topic, the LSN check, the relay starts.
    fn render_into(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "  scenario {:?} (db {}): {}",
            self.scenario,
            self.database,
            if self.pass { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(
            out,
            "    committed at source {}, faults affecting it {}, drain {}",
            self.committed_at_source,
            self.faults,
            self.drain_secs
                .map(|d| format!("{d:.1}s"))
                .unwrap_or_else(|| "never".into())
        );
        let _ = writeln!(
            out,
            "    lost {}, duplicated {}, dead letters {}, verify {}",
            self.lost,
            self.duplicated,
            self.dead_letters,
            if self.verify.ok { "ok" } else { "FAILED" }
        );
        if !self.verify.ok {
            for line in self.verify.render().lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
        if let Some(t) = &self.topic {
            let _ = writeln!(
                out,
                "    topic (read_committed): {} records, {} ids, duplicates {}, missing {}, extra {}, unreadable {}",
                t.records, t.distinct_ids, t.duplicates, t.missing, t.extra, t.unreadable
            );
        }
        let _ = writeln!(
            out,
            "    slot vs next stage: {} samples ({} judged) against {} outbox commits, violations {}",
            self.lsn.samples, self.lsn.judged, self.lsn.outbox_commits, self.lsn.violations
        );
        if let Some(v) = &self.lsn.first_violation {
            let _ = writeln!(out, "      first: {v}");
        }
        let _ = writeln!(out, "    relay starts: {:?}", self.relay_starts);
    }
}

/// One scenario's names and processes.
struct ScenarioRun {
    scenario: Scenario,
    db: String,
    source_url: String,
    target_url: String,
    slot: String,
    witness: String,
    /// What the witness gave so far ([`check::witness_reader`]).
    witness_commits: check::WitnessCommits,
    /// The topic (scenarios `routes` and `events`: the routed topics' common prefix).
    topic: String,
    progress_topic: String,
    relays: Vec<RelayProc>,
}

impl ScenarioRun {
    /// The topics its connector writes: one, or (scenarios `routes` and `events`) every
    /// one of a prefix.
    fn topics(&self) -> check::Topics {
        match self.scenario {
            Scenario::Routes | Scenario::Events => check::Topics::Prefix(self.topic.clone()),
            _ => check::Topics::Name(self.topic.clone()),
        }
    }
}

/// What the fault lanes share.
struct Ctx {
    stack: Stack,
    toxi: Mutex<Toxiproxy>,
    runs: Vec<ScenarioRun>,
    t0: Instant,
    unclean_terms: Mutex<Vec<String>>,
    /// Where the relay processes record exits nobody asked for.
    unexpected: Arc<Mutex<Vec<UnexpectedExit>>>,
}

impl Ctx {
    /// The relay processes of `role` (`connector`, `sink`, `direct`) in every scenario:
    /// a relay fault hits all of them at once.
    fn relays(&self, role: &str) -> Vec<&RelayProc> {
        self.runs
            .iter()
            .flat_map(|r| r.relays.iter().filter(|p| r.scenario.plays(&p.name, role)))
            .collect()
    }

    /// A topic of the run whose partition leaders `leader-kill` looks up: the Kafka
    /// scenario's, else the first account's routed topic, else the first event topic.
    fn kafka_topic(&self) -> Option<String> {
        let run = [Scenario::Kafka, Scenario::Routes, Scenario::Events]
            .iter()
            .find_map(|s| self.runs.iter().find(|r| r.scenario == *s))?;
        Some(match run.scenario {
            Scenario::Routes => format!("{}1", run.topic),
            Scenario::Events => format!("{}t0", run.topic),
            _ => run.topic.clone(),
        })
    }

    /// Runs `f` on toxiproxy; a failed call restarts it ([`Toxiproxy::call`]).
    fn toxi(&self, f: impl FnOnce(&Toxiproxy) -> Result<(), String>) -> Result<(), String> {
        tokio::task::block_in_place(|| {
            let mut toxi = locked(&self.toxi);
            let t = self.t0.elapsed().as_secs_f64();
            toxi.call(f).inspect_err(|error| {
                eprintln!("chaos: t+{t:.1}s toxiproxy: {error} (restarted)");
            })
        })
    }
}

/// Runs the chaos test; the report's `pass` says whether it passed.
///
/// The steps, in order: plan the schedule; bring up the stack instance; prepare each
/// scenario (databases, topics, slots, relay processes); start the relays; start the
/// load and the LSN samplers; run the fault schedule; heal; drain; stop the relays;
/// judge; report and clean up.
pub async fn run(args: &ChaosArgs) -> Result<ChaosReport, String> {
    let seed = args.seed();
    let schedule = plan(args, seed)?;
    if args.plan_only {
        return Ok(empty_report(args, seed, &schedule));
    }
    let stack = bring_up_stack(args).await?;
    let run_dir = create_run_dir(&stack, seed)?;
    let ctx = prepare_runs(args, &stack, &run_dir).await?;
    let supervisor = start_pipelines(&ctx).await?;

    let t_load = Instant::now();
    let observers = Observers::start(args, &ctx);
    let deadline =
        t_load + Duration::from_secs_f64(args.fault_deadline.unwrap_or(args.duration * 1.5));
    let lanes = run_schedule(&ctx, &schedule, t_load, deadline).await;
    observers.lanes_done.store(true, Ordering::Relaxed);
    let load_summaries = heal_after_schedule(&ctx, observers.loads, t_load).await;
    let healed = Instant::now();
    eprintln!(
        "chaos: healed and load done at t+{:.1}s; draining",
        t_load.elapsed().as_secs_f64()
    );

    // Concurrently: each scenario's drain time is its own.
    let drains: Vec<Option<f64>> = futures_util::future::join_all(
        ctx.runs
            .iter()
            .map(|run| drain(run, healed, Duration::from_secs_f64(args.drain_timeout))),
    )
    .await;
    let all_samples = stop_sampling(observers.stop_sampling, observers.samplers).await;
    stop_relays(&ctx, supervisor).await;

    let mut scenarios = Vec::new();
    for (i, run) in ctx.runs.iter().enumerate() {
        scenarios.push(
            judge(
                &stack,
                run,
                &lanes.outcomes,
                drains[i],
                load_summaries[i].clone(),
                &all_samples[i],
            )
            .await?,
        );
    }
    let report = assemble_report(args, seed, &ctx, lanes, scenarios);
    let _ = std::fs::write(
        run_dir.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    );
    cleanup(&stack, &ctx.runs, report.pass && !args.keep).await;
    Ok(report)
}

/// Plans the schedule of `seed` and prints it, with the command line that repeats it.
fn plan(args: &ChaosArgs, seed: u64) -> Result<Schedule, String> {
    let kinds = args.kinds()?;
    let duration_ms = (args.duration.max(1.0) * 1000.0) as u64;
    let schedule = Schedule::plan(seed, duration_ms, &kinds);
    eprintln!("{}", schedule.render());
    eprintln!(
        "chaos: reproduce with: outbox-relay chaos --seed {seed} --duration {} --pg {} --scenarios {} --faults {}",
        args.duration,
        args.pg,
        args.scenarios
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(","),
        args.faults.join(",")
    );
    Ok(schedule)
}

/// Brings up the stack instance of `args`; fails unless its brokers also listen on
/// the ports the relay reaches them through toxiproxy.
async fn bring_up_stack(args: &ChaosArgs) -> Result<Stack, String> {
    let failover = args.kinds()?.contains(&FaultKind::PgStartFailover);
    let stack = Stack {
        script: args.stack_script.clone(),
        dir: args.stack_dir.clone(),
        offset: args.port_offset,
        // scripts/stack keeps the profile until `reset`, whatever a later `up` asks.
        standby: failover || args.stack_dir.join("standby-profile").exists(),
        pg: args.pg,
    };
    eprintln!(
        "chaos: stack {} offset {} (pg {} {}, brokers {})",
        stack.dir.display(),
        stack.offset,
        stack.pg_start_port(),
        stack.pg_end_port(),
        stack.brokers()
    );
    let pg = args.pg.to_string();
    let mut up = vec!["up", "--pg", &pg];
    if stack.standby {
        up.push("--standby");
    }
    stack.run_async(&up).await?;
    if !stack.proxied_listener_up() {
        return Err(format!(
            "the brokers of {} do not listen on their proxied ports ({}..): they were started \
             without OUTBOX_RELAY_STACK_KAFKA_PROXY=1; stop them (scripts/stack down with the same \
             dir and offset) and run again",
            stack.dir.display(),
            stack.broker_proxied_port(1)
        ));
    }
    set_wal_sender_timeout(&stack).await?;
    Ok(stack)
}

/// pg_start's `wal_sender_timeout` on the runner's instance: a `long-stall` (35-60 s,
/// see the schedule) outlasts it twice or more, so the relay's silence timeout ends its
/// stalled sessions while the stall lasts, and so does the walsender's.
const LONG_STALL_WAL_SENDER_TIMEOUT: &str = "15s";

/// Sets [`LONG_STALL_WAL_SENDER_TIMEOUT`] on the source (ALTER SYSTEM, kept in the
/// data dir, and a reload), on both servers under the standby profile.
async fn set_wal_sender_timeout(stack: &Stack) -> Result<(), String> {
    let mut ports = vec![stack.pg_start_port()];
    if stack.standby {
        ports.push(stack.pg_standby_port());
    }
    for port in ports {
        set_wal_sender_timeout_on(port).await?;
    }
    Ok(())
}

async fn set_wal_sender_timeout_on(port: u16) -> Result<(), String> {
    let client = admin(Stack::url(port, "postgres")).await?;
    // Two statements: ALTER SYSTEM cannot run inside the implicit transaction of a batch.
    for sql in [
        format!("ALTER SYSTEM SET wal_sender_timeout = '{LONG_STALL_WAL_SENDER_TIMEOUT}'"),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| format!("setting pg_start's wal_sender_timeout: {}", error_chain(&e)))?;
    }
    Ok(())
}

/// Creates this run's own directory for the logs and the report.
fn create_run_dir(stack: &Stack, seed: u64) -> Result<PathBuf, String> {
    let run_dir = stack
        .dir
        .join("chaos")
        .join(format!("run-{seed}-{}", unix_secs()));
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    eprintln!("chaos: logs in {}", run_dir.display());
    Ok(run_dir)
}

/// Starts toxiproxy and prepares every scenario of `args` (fresh databases, topics and
/// names, relay processes not yet started); `t0`, the start of the run's clock, is
/// taken here.
async fn prepare_runs(
    args: &ChaosArgs,
    stack: &Stack,
    run_dir: &std::path::Path,
) -> Result<Arc<Ctx>, String> {
    let toxi_bin = stack::toxiproxy_binary(&stack.dir)?;
    let toxi = Toxiproxy::start(&toxi_bin, stack, &run_dir.join("toxiproxy.log"))?;
    let binary = match &args.relay_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|e| format!("current exe: {e}"))?,
    };

    let t0 = Instant::now();
    let unexpected = Arc::new(Mutex::new(Vec::new()));
    let tag = format!("chaos_{}", unix_secs());
    drop_stale_slots(stack).await?;
    let spawner = RelaySpawner {
        binary: &binary,
        run_dir,
        unexpected: &unexpected,
        t0,
        metrics_port_base: 9641 + stack.offset,
    };
    let mut runs = Vec::new();
    for scenario in &args.scenarios {
        runs.push(prepare(stack, *scenario, &tag, &spawner).await?);
    }
    Ok(Arc::new(Ctx {
        stack: stack.clone(),
        toxi: Mutex::new(toxi),
        runs,
        t0,
        unclean_terms: Mutex::new(Vec::new()),
        unexpected,
    }))
}

/// Restarts, every half second, each relay process that exited while no fault held it
/// down, until stopped.
struct Supervisor {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    fn spawn(ctx: Arc<Ctx>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for relay in ctx.runs.iter().flat_map(|r| &r.relays) {
                        relay.supervise();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        Self { stop, task }
    }

    /// Returns once the supervisor has stopped: no relay is restarted after this.
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// Starts every relay and its supervisor, and returns once every relay slot is active:
/// relays up, slots created, before the load starts. On an error the relays started
/// are shut down (they would outlive the runner, holding their metrics ports).
async fn start_pipelines(ctx: &Arc<Ctx>) -> Result<Supervisor, String> {
    let relays = || ctx.runs.iter().flat_map(|r| &r.relays);
    if let Err(error) = relays().try_for_each(RelayProc::start) {
        for relay in relays() {
            relay.shutdown().await;
        }
        return Err(error);
    }
    let supervisor = Supervisor::spawn(ctx.clone());
    for run in &ctx.runs {
        if let Err(error) = wait_for_slot(&ctx.stack, run, Duration::from_secs(180)).await {
            supervisor.stop().await;
            for relay in relays() {
                relay.shutdown().await;
            }
            return Err(error);
        }
    }
    eprintln!(
        "chaos: pipelines up after {:.1}s; load and faults start",
        ctx.t0.elapsed().as_secs_f64()
    );
    Ok(supervisor)
}

/// The tasks that run beside the faults, one of each per scenario: the LSN sampler and
/// the steady load.
struct Observers {
    /// Set to end the samplers.
    stop_sampling: Arc<AtomicBool>,
    samplers: Vec<tokio::task::JoinHandle<Vec<check::Sample>>>,
    /// Set once the fault lanes are done: the load ends after its minimum time.
    lanes_done: Arc<AtomicBool>,
    loads: Vec<tokio::task::JoinHandle<LoadSummary>>,
}

impl Observers {
    /// Spawns each scenario's sampler (against the next stage of its pipeline) and load.
    fn start(args: &ChaosArgs, ctx: &Ctx) -> Self {
        let stop_sampling = Arc::new(AtomicBool::new(false));
        let lanes_done = Arc::new(AtomicBool::new(false));
        let mut samplers = Vec::new();
        let mut loads = Vec::new();
        for run in &ctx.runs {
            let next = if run.scenario.through_kafka() {
                NextStage::ProgressTopic {
                    brokers: ctx.stack.brokers(),
                    topic: run.progress_topic.clone(),
                }
            } else {
                NextStage::PgEnd {
                    url: Stack::url(ctx.stack.pg_end_port(), &run.db),
                }
            };
            samplers.push(tokio::spawn(check::sample_lsns(
                run.source_url.clone(),
                run.slot.clone(),
                next,
                Duration::from_millis(if run.scenario.through_kafka() {
                    1000
                } else {
                    250
                }),
                stop_sampling.clone(),
            )));
            // Ends with the samplers; the judge consumes what is left.
            tokio::spawn(check::witness_reader(
                run.source_url.clone(),
                run.witness.clone(),
                run.witness_commits.clone(),
                stop_sampling.clone(),
            ));
            let url = run.source_url.clone();
            let large = (args.large_rows > 1 && args.large_every > 0.0)
                .then_some((args.large_rows, args.large_every));
            let (rate, min_secs, done) = (args.rate, args.duration, lanes_done.clone());
            loads.push(tokio::spawn(async move {
                let small = steady_load(url.clone(), rate, 1, 5.0, min_secs, done.clone());
                let large = async {
                    match large {
                        Some((rows, every)) => {
                            steady_load(url.clone(), 1.0 / every, rows, every, min_secs, done).await
                        }
                        None => LoadSummary::default(),
                    }
                };
                let (mut small, large) = tokio::join!(small, large);
                small.absorb(&large);
                small
            }));
        }
        Self {
            stop_sampling,
            samplers,
            lanes_done,
            loads,
        }
    }
}

/// What the fault lanes did.
struct LaneResults {
    /// Every injected fault, in the order they ended (both lanes mixed).
    outcomes: Vec<FaultOutcome>,
    /// Planned faults not started because the fault deadline had passed.
    skipped: usize,
}

/// Runs both lanes of the schedule at once and returns when both are done.
async fn run_schedule(
    ctx: &Arc<Ctx>,
    schedule: &Schedule,
    t_load: Instant,
    deadline: Instant,
) -> LaneResults {
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let skipped = Arc::new(Mutex::new(0usize));
    let mut lanes = Vec::new();
    for lane in [schedule.db.clone(), schedule.kafka.clone()] {
        let (ctx, outcomes, skipped) = (ctx.clone(), outcomes.clone(), skipped.clone());
        lanes.push(tokio::spawn(async move {
            run_lane(&ctx, lane, t_load, deadline, &outcomes, &skipped).await
        }));
    }
    for lane in lanes {
        let _ = lane.await;
    }
    let outcomes = std::mem::take(&mut *locked(&outcomes));
    let skipped = *locked(&skipped);
    LaneResults { outcomes, skipped }
}

/// Injects the faults of one lane, one after the other, each at its planned moment or
/// as soon as the previous one has healed. Past `deadline` only the first fault of each
/// kind still runs (so every kind is injected at least once); the others are counted in
/// `skipped`.
async fn run_lane(
    ctx: &Ctx,
    lane: Vec<Fault>,
    t_load: Instant,
    deadline: Instant,
    outcomes: &Mutex<Vec<FaultOutcome>>,
    skipped: &Mutex<usize>,
) {
    let kinds_in_lane = {
        let mut k: Vec<FaultKind> = lane.iter().map(|f| f.kind).collect();
        k.sort();
        k.dedup();
        k.len()
    };
    for fault in lane {
        if fault.seq >= kinds_in_lane && Instant::now() > deadline {
            *locked(skipped) += 1;
            continue;
        }
        let due = t_load + Duration::from_millis(fault.at_ms);
        tokio::time::sleep_until(due.into()).await;
        let outcome = inject(ctx, &fault, t_load).await;
        eprintln!("{}", outcome_line(&outcome));
        locked(outcomes).push(outcome);
    }
}

/// The log line of one fault that has been injected and healed.
fn outcome_line(outcome: &FaultOutcome) -> String {
    format!(
        "chaos: t+{:>6.1}s {:<5} #{:<3} {:<22} {:>5.1}s {}{}",
        outcome.started_secs,
        format!("{:?}", outcome.lane).to_lowercase(),
        outcome.seq,
        outcome.kind.name(),
        outcome.took_secs,
        outcome.note,
        outcome
            .error
            .as_deref()
            .map(|e| format!(" ERROR: {e}"))
            .unwrap_or_default()
    )
}

/// Heals everything, waits for each scenario's load to end, and heals again: the load
/// may have outlasted the first heal, and a component may have been hit by a late
/// step. The load summaries, in scenario order (`None`: the load task failed).
async fn heal_after_schedule(
    ctx: &Ctx,
    loads: Vec<tokio::task::JoinHandle<LoadSummary>>,
    t_load: Instant,
) -> Vec<Option<LoadSummary>> {
    eprintln!(
        "chaos: schedule done at t+{:.1}s; healing",
        t_load.elapsed().as_secs_f64()
    );
    heal(ctx).await;
    let mut load_summaries = Vec::new();
    for load in loads {
        load_summaries.push(match load.await {
            Ok(summary) => Some(summary),
            Err(error) => {
                eprintln!("chaos: load task: {error}");
                None
            }
        });
    }
    heal(ctx).await;
    load_summaries
}

/// Ends the samplers; their samples, in scenario order.
async fn stop_sampling(
    stop: Arc<AtomicBool>,
    samplers: Vec<tokio::task::JoinHandle<Vec<check::Sample>>>,
) -> Vec<Vec<check::Sample>> {
    stop.store(true, Ordering::Relaxed);
    let mut all_samples = Vec::new();
    for sampler in samplers {
        all_samples.push(sampler.await.unwrap_or_default());
    }
    all_samples
}

/// Stops the supervisor, then every relay with SIGTERM: a clean exit is part of the
/// contract, and one that is not clean within 60 s is recorded.
async fn stop_relays(ctx: &Ctx, supervisor: Supervisor) {
    supervisor.stop().await;
    for relay in ctx.runs.iter().flat_map(|r| &r.relays) {
        let (status, clean) = relay.term(Duration::from_secs(60)).await;
        if !clean {
            locked(&ctx.unclean_terms)
                .push(format!("{} at the end of the run: {status}", relay.name));
        }
    }
}

/// The run's report from the scenarios' reports and what the lanes and the relays
/// recorded; it passes when every scenario passed and no relay exited unexpectedly.
fn assemble_report(
    args: &ChaosArgs,
    seed: u64,
    ctx: &Ctx,
    lanes: LaneResults,
    scenarios: Vec<ScenarioReport>,
) -> ChaosReport {
    let unexpected_exits = locked(&ctx.unexpected).clone();
    let outcomes = lanes.outcomes;
    let fault_errors: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.error
                .as_ref()
                .map(|e| format!("{} #{} {}: {e}", o.kind, o.seq, o.started_secs))
        })
        .collect();
    let pass = scenarios.iter().all(|s| s.pass) && unexpected_exits.is_empty();
    ChaosReport {
        seed,
        duration_secs: args.duration,
        elapsed_secs: ctx.t0.elapsed().as_secs_f64(),
        stack_dir: ctx.stack.dir.display().to_string(),
        port_offset: ctx.stack.offset,
        faults: outcomes.len(),
        faults_skipped: lanes.skipped,
        faults_by_kind: count_by_kind(outcomes.iter().map(|o| o.kind)),
        fault_errors,
        toxiproxy_restarts: locked(&ctx.toxi).restarts,
        unclean_terms: locked(&ctx.unclean_terms).clone(),
        unexpected_exits,
        scenarios,
        outcomes,
        pass,
    }
}

/// How many faults of each kind, by the kind's name.
fn count_by_kind(kinds: impl IntoIterator<Item = FaultKind>) -> BTreeMap<String, u64> {
    let mut by_kind = BTreeMap::new();
    for kind in kinds {
        *by_kind.entry(kind.name().to_string()).or_default() += 1;
    }
    by_kind
}

/// Locks `m` even when a task panicked while holding it: what the other tasks recorded
/// still belongs in the report.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `rate` transactions of `rows` rows per second into `source_url` for at
/// least `min_secs` and until the fault lanes are done, in chunks of [`load::run`] of
/// `chunk_secs` each (a few seconds, so the load ends soon after the last fault). A
/// chunk that fails (pg_start refusing for longer than the generator's patience) is
/// logged and the next one starts.
async fn steady_load(
    source_url: String,
    rate: f64,
    rows: u32,
    chunk_secs: f64,
    min_secs: f64,
    done: Arc<AtomicBool>,
) -> LoadSummary {
    let start = Instant::now();
    let mut total = LoadSummary::default();
    while start.elapsed().as_secs_f64() < min_secs || !done.load(Ordering::Relaxed) {
        let args = LoadArgs {
            source: SourceArgs {
                source_url: source_url.clone(),
            },
            rate,
            count: None,
            duration: Some(chunk_secs),
            concurrency: if rows > 1 { 1 } else { 4 },
            accounts: 10,
            rows_per_transaction: rows,
            give_up_after: 900.0,
            progress_every: 0.0,
        };
        match load::run(&args).await {
            Ok(s) => total.absorb(&s),
            Err(error) => {
                eprintln!("chaos: load chunk failed: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    total.elapsed_secs = start.elapsed().as_secs_f64();
    total
}

/// The report of a run that only planned: the schedule's faults, nothing injected.
fn empty_report(args: &ChaosArgs, seed: u64, schedule: &Schedule) -> ChaosReport {
    ChaosReport {
        seed,
        duration_secs: args.duration,
        elapsed_secs: 0.0,
        stack_dir: args.stack_dir.display().to_string(),
        port_offset: args.port_offset,
        faults: schedule.len(),
        faults_skipped: 0,
        faults_by_kind: count_by_kind(schedule.all().iter().map(|f| f.kind)),
        fault_errors: Vec::new(),
        toxiproxy_restarts: 0,
        unclean_terms: Vec::new(),
        unexpected_exits: Vec::new(),
        scenarios: Vec::new(),
        outcomes: Vec::new(),
        pass: true,
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A connection to `url` (a `postgres` database), waiting up to 120 s for it.
async fn admin(url: String) -> Result<tokio_postgres::Client, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match pg::connect(&url).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%e, "waiting for the database");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cannot connect to {}: {e}", pg::redact_url(&url))),
        }
    }
}

/// Drops the inactive slots of earlier runs on this instance (a run that failed keeps its
/// relay slots, one stopped by hand keeps all): they pin WAL, and enough of them use up
/// `max_replication_slots`, so that this run could not create its own. Their databases
/// are kept for inspection.
async fn drop_stale_slots(stack: &Stack) -> Result<(), String> {
    let source = source_admin(stack).await?;
    let dropped = source
        .query(
            "SELECT slot_name, pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name LIKE 'chaos\\_%' AND NOT active",
            &[],
        )
        .await
        .map_err(|e| format!("dropping earlier runs' slots: {}", error_chain(&e)))?;
    if !dropped.is_empty() {
        eprintln!(
            "chaos: dropped {} inactive slots of earlier runs (their databases are kept)",
            dropped.len()
        );
    }
    Ok(())
}

/// What every relay process of a run is made with.
struct RelaySpawner<'a> {
    binary: &'a std::path::Path,
    run_dir: &'a std::path::Path,
    unexpected: &'a Arc<Mutex<Vec<UnexpectedExit>>>,
    t0: Instant,
    /// Each relay process serves its metrics on a port of this instance, this plus its
    /// number (the defaults, 9641-9643, belong to the relay of the default stack, or of
    /// another runner).
    metrics_port_base: u16,
}

impl RelaySpawner<'_> {
    /// The relay process `name` (not started), running `outbox-relay <args>`, number `n`
    /// of the run for its metrics ports (base + n, and base + 10 + n for a successor in
    /// a hand-over).
    fn relay(&self, name: &str, args: &[&str], n: u16) -> RelayProc {
        RelayProc::new(
            name,
            self.binary,
            args.iter().map(|a| a.to_string()).collect(),
            [self.metrics_port_base + n, self.metrics_port_base + 10 + n],
            self.run_dir,
            self.unexpected.clone(),
            self.t0,
        )
    }
}

/// Fresh databases, topics and names for one scenario, and its relay processes (not
/// started).
async fn prepare(
    stack: &Stack,
    scenario: Scenario,
    tag: &str,
    spawner: &RelaySpawner<'_>,
) -> Result<ScenarioRun, String> {
    let short = scenario.short_name();
    let db = format!("{tag}_{short}");
    let (source_url, target_url) = create_databases(stack, &db).await?;
    let slot = format!("{db}_slot");
    let witness = format!("{db}_witness");
    let source = pg::connect(&source_url)
        .await
        .map_err(|e| format!("connect {db}: {e}"))?;
    check::create_witness(&source, &witness, stack.failover_slots())
        .await
        .map_err(|e| format!("witness slot: {}", error_chain(&e)))?;
    let topic = match scenario {
        Scenario::Routes => format!("{db}_account_"),
        Scenario::Events => format!("outbox.event.{db}_"),
        _ => format!("{db}_txns"),
    };
    if scenario == Scenario::Events {
        source
            .batch_execute(&events_outbox(&db))
            .await
            .map_err(|e| format!("the events outbox of {db}: {e}"))?;
    }
    // The connector's --progress-topic; its records are in the slot's own topic.
    let progress_base = format!("{db}_progress");
    let progress_topic = kafka::progress_topic_of(&progress_base, &slot);
    let relay_source = stack.relay_source_url(&db);
    let relay_target = Stack::url(stack.pg_end_proxy_port(), &db);
    let relays = match scenario {
        Scenario::Kafka => {
            create_topics(stack, Some(&topic), &progress_topic).await?;
            let proxied = stack.proxied_brokers();
            let group = format!("{db}_sink");
            vec![
                spawner.relay(
                    "connector",
                    &[
                        "connector",
                        "--source-url",
                        &relay_source,
                        "--brokers",
                        &proxied,
                        "--topic",
                        &topic,
                        "--progress-topic",
                        &progress_base,
                        "--slot",
                        &slot,
                    ],
                    0,
                ),
                spawner.relay(
                    "sink",
                    &[
                        "sink",
                        "--target-url",
                        &relay_target,
                        "--brokers",
                        &proxied,
                        "--topic",
                        &topic,
                        "--group",
                        &group,
                    ],
                    1,
                ),
            ]
        }
        Scenario::Direct => vec![spawner.relay(
            "direct",
            &[
                "direct",
                "--source-url",
                &relay_source,
                "--target-url",
                &relay_target,
                "--slot",
                &slot,
            ],
            2,
        )],
        Scenario::Routes | Scenario::Events => {
            // The routed topics are the connector's to create; the progress topic is
            // made here, as for the Kafka scenario.
            create_topics(stack, None, &progress_topic).await?;
            let (routes, inbox, first_port) = if scenario == Scenario::Routes {
                let route = format!(
                    "{{table = \"outbox.transactions\", key = \"account_id\", topic = \"{topic}${{account_id}}\"}}"
                );
                let inbox = format!(
                    "{{name = \"ledger-as-inbox\", topics = [\"^{topic}.*\"], \
                     table = \"main.transactions\", handler = \"{LEDGER_HANDLER}\"}}"
                );
                (vec![route], inbox, 3)
            } else {
                let table = "{table = \"outbox.events\", preset = \"event-router\"}".to_string();
                let messages =
                    format!("{{message_prefix = \"{db}_ledger\", preset = \"event-router\"}}");
                let pattern = format!("^{}.*", topic.replace('.', "\\."));
                let inbox = format!(
                    "{{name = \"ledger-events\", topics = ['{pattern}'], format = \"payload\", \
                     table = \"main.transactions\", handler = \"{LEDGER_HANDLER}\"}}"
                );
                (vec![table, messages], inbox, 5)
            };
            let proxied = stack.proxied_brokers();
            let group = format!("{db}_sink");
            let dead_letters = format!("{db}_dead_letters");
            let mut connector = vec![
                "connector",
                "--source-url",
                &relay_source,
                "--brokers",
                &proxied,
                "--dead-letter-topic",
                &dead_letters,
                "--progress-topic",
                &progress_base,
                "--slot",
                &slot,
            ];
            for route in &routes {
                connector.extend(["--route", route.as_str()]);
            }
            let prefix = scenario.process_prefix();
            vec![
                spawner.relay(&format!("{prefix}connector"), &connector, first_port),
                spawner.relay(
                    &format!("{prefix}sink"),
                    &[
                        "sink",
                        "--target-url",
                        &relay_target,
                        "--brokers",
                        &proxied,
                        "--inbox",
                        &inbox,
                        "--group",
                        &group,
                    ],
                    first_port + 1,
                ),
            ]
        }
    };
    eprintln!("chaos: scenario {short}: database {db}, slot {slot}, witness {witness}");
    Ok(ScenarioRun {
        scenario,
        db,
        source_url,
        target_url,
        slot,
        witness,
        witness_commits: Default::default(),
        topic,
        progress_topic,
        relays,
    })
}

/// The source's primary, database `postgres`.
async fn source_admin(stack: &Stack) -> Result<tokio_postgres::Client, String> {
    admin(stack.source_url("postgres")).await
}

async fn pg_end_admin(stack: &Stack) -> Result<tokio_postgres::Client, String> {
    admin(Stack::url(stack.pg_end_port(), "postgres")).await
}

/// Creates database `db` on the source and on pg_end and migrates both; their URLs
/// (the runner's, not through toxiproxy).
async fn create_databases(stack: &Stack, db: &str) -> Result<(String, String), String> {
    for admin in [source_admin(stack).await?, pg_end_admin(stack).await?] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .map_err(|e| format!("create database {db}: {e}"))?;
    }
    let source_url = stack.source_url(db);
    let target_url = Stack::url(stack.pg_end_port(), db);
    migrate::source(&source_url)
        .await
        .map_err(|e| format!("migrate {db} on pg_start: {e}"))?;
    migrate::target(&target_url)
        .await
        .map_err(|e| format!("migrate {db} on pg_end: {e}"))?;
    Ok((source_url, target_url))
}

/// Scenario `events`' outbox on pg_start: Debezium's outbox table (`outbox.events`), and
/// a trigger that turns each ledger row the load writes into an event of that shape, in
/// the same transaction: a row of `outbox.events` for an even account, a transactional
/// logical message (prefix `<db>_ledger`) for an odd one. The payload is the ledger row
/// as JSON (what the inbox writes into `main.transactions`); the aggregate type, which
/// names the topic, is `<db>_t<account % 4>` for rows and `<db>_m<account % 4>` for
/// messages. The event id is derived from the row's id, so it is the same on a replay.
/// The relay's publication holds `outbox.events` alone.
fn events_outbox(db: &str) -> String {
    format!(
        "CREATE TABLE outbox.events (
             id uuid PRIMARY KEY,
             aggregatetype varchar(255) NOT NULL,
             aggregateid varchar(255) NOT NULL,
             type varchar(255) NOT NULL,
             payload jsonb);
         CREATE FUNCTION outbox.transactions_as_events() RETURNS trigger LANGUAGE plpgsql AS $f$
         DECLARE
             event_id uuid := md5('ledger:' || NEW.id)::uuid;
         BEGIN
             IF NEW.account_id % 2 = 0 THEN
                 INSERT INTO outbox.events (id, aggregatetype, aggregateid, type, payload)
                 VALUES (event_id, '{db}_t' || NEW.account_id % 4, NEW.account_id::text,
                         'credit', to_jsonb(NEW));
             ELSE
                 PERFORM pg_logical_emit_message(true, '{db}_ledger', jsonb_build_object(
                     'id', event_id, 'aggregatetype', '{db}_m' || NEW.account_id % 4,
                     'aggregateid', NEW.account_id::text, 'type', 'credit',
                     'payload', to_jsonb(NEW))::text);
             END IF;
             RETURN NULL;
         END $f$;
         CREATE TRIGGER as_events AFTER INSERT ON outbox.transactions
             FOR EACH ROW EXECUTE FUNCTION outbox.transactions_as_events();
         ALTER PUBLICATION outbox_relay SET TABLE outbox.events;"
    )
}

/// The seed's balance rule as a generic inbox's handler (docs/sink.md, "the ledger, as
/// an inbox"): scenario `routes` checks it with the same `verify` as the built-in ledger.
const LEDGER_HANDLER: &str =
    "INSERT INTO main.balance AS b (account_id, current_balance, updated_at) \
     SELECT account_id, sum(amount), max(created_at) FROM new_events \
     GROUP BY account_id ORDER BY account_id \
     ON CONFLICT (account_id) DO UPDATE \
     SET current_balance = b.current_balance + EXCLUDED.current_balance, \
     updated_at = GREATEST(b.updated_at, EXCLUDED.updated_at)";

/// Creates a scenario's topic, if any (3 partitions), and its compacted progress topic,
/// each replicated on the three brokers.
async fn create_topics(
    stack: &Stack,
    topic: Option<&str>,
    progress_topic: &str,
) -> Result<(), String> {
    let brokers = stack.brokers();
    let data = topic.map(|name| TopicSpec {
        name,
        partitions: 3,
        replication_factor: 3,
        configs: &[],
    });
    let progress = TopicSpec {
        name: progress_topic,
        partitions: 1,
        replication_factor: 3,
        configs: &[("cleanup.policy", "compact")],
    };
    for spec in data.into_iter().chain([progress]) {
        kafka::ensure_topic(&brokers, &spec)
            .await
            .map_err(|e| format!("create topic {}: {e}", spec.name))?;
    }
    Ok(())
}

async fn wait_for_slot(stack: &Stack, run: &ScenarioRun, timeout: Duration) -> Result<(), String> {
    let client = source_admin(stack).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let found = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&run.slot],
            )
            .await
            .map_err(|e| e.to_string())?;
        if found.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("slot {} not active after {timeout:?}", run.slot));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every component up, every proxy clean, every relay running.
async fn heal(ctx: &Ctx) {
    for attempt in 0..5 {
        let toxi = ctx.toxi(|t| t.heal_all());
        // `up` also fails when a component answers slowly to its final status probe;
        // `status` says whether everything is up after all.
        let up = match ctx.stack.run_async(&["up"]).await {
            Err(_) if ctx.stack.run_async(&["status"]).await.is_ok() => Ok(()),
            other => other,
        };
        match (toxi, up) {
            (Ok(()), Ok(())) => break,
            (t, u) => {
                eprintln!("chaos: heal attempt {attempt} failed: {t:?} {u:?}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    for relay in ctx.runs.iter().flat_map(|r| &r.relays) {
        if let Err(e) = relay.start() {
            eprintln!("chaos: {e}");
        }
    }
}

/// Polls `verify` until the pair matches; the time it took from `healed`.
async fn drain(run: &ScenarioRun, healed: Instant, timeout: Duration) -> Option<f64> {
    let deadline = healed + timeout;
    loop {
        let ok = async {
            let source = pg::connect(&run.source_url).await.ok()?;
            let target = pg::connect(&run.target_url).await.ok()?;
            verify::compare(&source, &target).await.ok().map(|r| r.ok)
        }
        .await;
        if ok == Some(true) {
            let secs = healed.elapsed().as_secs_f64();
            eprintln!(
                "chaos: {:?} drained {secs:.1}s after the heal",
                run.scenario
            );
            return Some(secs);
        }
        if Instant::now() > deadline {
            eprintln!("chaos: {:?} did not drain within {timeout:?}", run.scenario);
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Judges one scenario once it has drained (or not): `verify`, the LSN samples against
/// the witness's commits, the dead letters and, for Kafka, the topic. It passes only when
/// every check found nothing and pg_start holds as many outbox ids as transactions.
async fn judge(
    stack: &Stack,
    run: &ScenarioRun,
    outcomes: &[FaultOutcome],
    drain_secs: Option<f64>,
    load: Option<LoadSummary>,
    samples: &[check::Sample],
) -> Result<ScenarioReport, String> {
    let source = pg::connect(&run.source_url)
        .await
        .map_err(|e| format!("connect pg_start: {e}"))?;
    let target = pg::connect(&run.target_url)
        .await
        .map_err(|e| format!("connect pg_end: {e}"))?;
    let report = verify::compare(&source, &target)
        .await
        .map_err(|e| format!("verify: {e}"))?;
    let ids = check::source_ids(&source)
        .await
        .map_err(|e| format!("outbox ids: {e}"))?;
    check::consume_witness(&source, &run.witness, &run.witness_commits)
        .await
        .map_err(|e| format!("witness: {e}"))?;
    let commits: Vec<_> = locked(&run.witness_commits).iter().copied().collect();
    let history = if run.scenario.through_kafka() {
        read_progress_history(stack, run).await?
    } else {
        Vec::new()
    };
    let lsn = check::judge_lsns(&check::resolve_samples(samples, &history), &commits);
    let dead_letters = check::dead_letters(&target)
        .await
        .map_err(|e| format!("dead letters: {e}"))?;
    let topic = if run.scenario.through_kafka() {
        Some(read_topic(stack, run, &ids).await?)
    } else {
        None
    };
    let affecting: Vec<&FaultOutcome> = outcomes
        .iter()
        .filter(|o| run.scenario.affected_by(o.kind))
        .collect();
    let lost = report.missing_count + topic.as_ref().map_or(0, |t| t.missing);
    let double_counted = if report.missing_count == 0 {
        report.balance_diffs.len() as u64
    } else {
        0
    };
    let duplicated =
        report.extra_count + double_counted + topic.as_ref().map_or(0, |t| t.duplicates + t.extra);
    let pass = report.ok
        && lost == 0
        && duplicated == 0
        && lsn.violations == 0
        && lsn.judged > 0
        && dead_letters == 0
        && drain_secs.is_some()
        && ids.len() as u64 == report.source_transactions;
    Ok(ScenarioReport {
        scenario: run.scenario,
        database: run.db.clone(),
        committed_at_source: ids.len() as u64,
        load,
        faults: affecting.len(),
        faults_by_kind: count_by_kind(affecting.iter().map(|o| o.kind)),
        drain_secs,
        lost,
        duplicated,
        verify: report,
        topic,
        lsn,
        dead_letters,
        relay_starts: run
            .relays
            .iter()
            .map(|r| (r.name.clone(), r.starts()))
            .collect(),
        pass,
    })
}

/// The connector's committed streaming positions in its progress topic (see
/// [`check::progress_history`]), read on a blocking thread.
async fn read_progress_history(
    stack: &Stack,
    run: &ScenarioRun,
) -> Result<Vec<(i64, crate::lsn::Lsn)>, String> {
    let (brokers, topic, slot) = (
        stack.brokers(),
        run.progress_topic.clone(),
        run.slot.clone(),
    );
    tokio::task::spawn_blocking(move || {
        check::progress_history(&brokers, &topic, &slot, Duration::from_secs(120))
    })
    .await
    .map_err(|e| format!("progress history: {e}"))?
}

/// The topic, or every routed topic, read back against pg_start's outbox ids (see
/// [`check::check_topic`]), on a blocking thread.
async fn read_topic(
    stack: &Stack,
    run: &ScenarioRun,
    ids: &std::collections::HashSet<i64>,
) -> Result<TopicCheck, String> {
    let (brokers, topics, ids) = (stack.brokers(), run.topics(), ids.clone());
    tokio::task::spawn_blocking(move || {
        check::check_topic(&brokers, &topics, &ids, Duration::from_secs(300))
    })
    .await
    .map_err(|e| format!("topic check: {e}"))?
}

/// Drops the witness slots (they hold WAL) and, when `everything`, the relay slots and
/// the databases.
async fn cleanup(stack: &Stack, runs: &[ScenarioRun], everything: bool) {
    let Ok(source) = source_admin(stack).await else {
        return;
    };
    for run in runs {
        let mut slots = vec![run.witness.clone()];
        if everything {
            slots.push(run.slot.clone());
        }
        for slot in slots {
            let _ = source
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&slot],
                )
                .await;
            for _ in 0..20 {
                if source
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        if everything {
            for client in [source_admin(stack).await, pg_end_admin(stack).await]
                .into_iter()
                .flatten()
            {
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", run.db))
                    .await;
            }
        }
    }
}

/// Injects one fault, holds it, heals it; what happened, timed from `t_load`.
async fn inject(ctx: &Ctx, fault: &Fault, t_load: Instant) -> FaultOutcome {
    let started = Instant::now();
    let started_secs = started.duration_since(t_load).as_secs_f64();
    let hold = Duration::from_millis(fault.hold_ms);
    let mut note = String::new();
    let result = inject_and_heal(ctx, fault, hold, &mut note).await;
    FaultOutcome {
        kind: fault.kind,
        lane: fault.lane,
        seq: fault.seq,
        started_secs,
        took_secs: started.elapsed().as_secs_f64(),
        note,
        error: result.err(),
    }
}

/// Injects `fault`, holds it for `hold`, and heals what it broke. `note` gets what the
/// log line should say beyond the kind (which walsenders, which leader, which exit),
/// even when a later step fails.
async fn inject_and_heal(
    ctx: &Ctx,
    fault: &Fault,
    hold: Duration,
    note: &mut String,
) -> Result<(), String> {
    use FaultKind::*;
    match fault.kind {
        PgStartKill | PgStartCrash | PgEndKill | PgEndCrash => {
            let name = match fault.kind {
                PgEndKill | PgEndCrash => "pg_end".to_string(),
                _ => ctx.stack.primary().await?,
            };
            let name = name.as_str();
            if name != "pg_start" {
                *note = format!("the primary is {name}");
            }
            let how = match fault.kind {
                PgStartCrash | PgEndCrash => "crash",
                _ => "kill",
            };
            ctx.stack.run_async(&[how, name]).await?;
            tokio::time::sleep(hold).await;
            ctx.stack.run_async(&["start", name]).await
        }
        PgEndHang => hang(&ctx.stack, "pg_end", hold).await,
        WalsenderKill => {
            *note = kill_walsenders(ctx).await?;
            Ok(())
        }
        PgStartFailover => {
            let started = Instant::now();
            ctx.stack.run_async(&["failover"]).await?;
            *note = format!(
                "{} is the primary now, after {:.1}s",
                ctx.stack.primary().await?,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        NetPgStartCut | NetPgEndCut | NetPgStartBlackhole | NetPgEndBlackhole => {
            let names = if matches!(fault.kind, NetPgStartCut | NetPgStartBlackhole) {
                ctx.stack.source_proxies()
            } else {
                vec!["pg_end"]
            };
            net_fault(
                ctx,
                &names,
                matches!(fault.kind, NetPgStartCut | NetPgEndCut),
                hold,
            )
            .await
        }
        NetKafkaCut | NetKafkaBlackhole => {
            net_fault(
                ctx,
                &["kafka1", "kafka2", "kafka3"],
                fault.kind == NetKafkaCut,
                hold,
            )
            .await
        }
        BrokerKill | BrokersTwoDown | BrokersAllDown | LeaderKill => {
            brokers_down(ctx, fault, hold, note).await
        }
        BrokerHang => {
            let name = format!("kafka{}", fault.targets.first().copied().unwrap_or(1));
            hang(&ctx.stack, &name, hold).await
        }
        DirectKill | ConnectorKill | SinkKill | DirectTerm | ConnectorTerm | SinkTerm => {
            relay_down(ctx, fault.kind, hold, note).await
        }
        DirectTakeover | DirectUpgrade | ConnectorTakeover | ConnectorUpgrade => {
            hand_over(ctx, fault.kind, hold, note).await
        }
        LongStall => {
            let name = schedule::long_stall_target(&fault.targets);
            *note = format!("on {name}");
            let names = match name {
                "pg_start" => ctx.stack.source_proxies(),
                _ => vec![name],
            };
            ctx.toxi(|t| names.iter().try_for_each(|n| t.stall(n)))?;
            tokio::time::sleep(hold).await;
            ctx.toxi(|t| names.iter().try_for_each(|n| t.unstall(n)))
        }
    }
}

/// A second instance of the direct relay or the connector started beside the active
/// one (it stands by), both kept for `side_by_side`, then the active one SIGKILLed
/// (`*-takeover`) or SIGTERMed (`*-upgrade`, a rolling upgrade): the new instance takes
/// over ([`RelayProc::hand_over`]).
async fn hand_over(
    ctx: &Ctx,
    kind: FaultKind,
    side_by_side: Duration,
    note: &mut String,
) -> Result<(), String> {
    use FaultKind::*;
    let name = match kind {
        DirectTakeover | DirectUpgrade => "direct",
        _ => "connector",
    };
    let leave = match kind {
        DirectTakeover | ConnectorTakeover => Leave::Kill,
        _ => Leave::Term(Duration::from_secs(60)),
    };
    let relays = ctx.relays(name);
    if relays.is_empty() {
        return Err(format!("no {name} in this run"));
    }
    let done = futures_util::future::join_all(
        relays
            .iter()
            .map(|relay| relay.hand_over(leave, side_by_side)),
    )
    .await;
    let mut notes = Vec::new();
    let mut failed = Vec::new();
    for (relay, done) in relays.iter().zip(done) {
        match done {
            Ok(done) => {
                notes.push(format!("{}: {}", relay.name, done.note));
                if let Some(status) = done.unclean {
                    locked(&ctx.unclean_terms).push(format!(
                        "{} (hand-over) at t+{:.1}s: {status}",
                        relay.name,
                        ctx.t0.elapsed().as_secs_f64()
                    ));
                }
            }
            Err(e) => failed.push(format!("{}: {e}", relay.name)),
        }
    }
    *note = notes.join("; ");
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Stops every process of component `name` with SIGSTOP for `hold`, then SIGCONT.
async fn hang(stack: &Stack, name: &str, hold: Duration) -> Result<(), String> {
    stack.run_async(&["pause", name]).await?;
    tokio::time::sleep(hold).await;
    stack.run_async(&["resume", name]).await
}

/// Terminates the walsenders serving the run's relay slots; the note says whose.
async fn kill_walsenders(ctx: &Ctx) -> Result<String, String> {
    let client = source_admin(&ctx.stack).await?;
    let slots: Vec<String> = ctx.runs.iter().map(|r| r.slot.clone()).collect();
    let rows = client
        .query(
            "SELECT slot_name::text, pg_terminate_backend(active_pid) FROM pg_replication_slots
                         WHERE slot_name = ANY($1) AND active_pid IS NOT NULL",
            &[&slots],
        )
        .await
        .map_err(|e| e.to_string())?;
    let ended: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    Ok(format!("walsenders of {ended:?} terminated"))
}

/// Kills the fault's brokers (for `leader-kill`, the leader of its partition, found in
/// the metadata), holds, and starts them again together.
async fn brokers_down(
    ctx: &Ctx,
    fault: &Fault,
    hold: Duration,
    note: &mut String,
) -> Result<(), String> {
    let stack = &ctx.stack;
    let targets: Vec<u8> = if fault.kind == FaultKind::LeaderKill {
        let topic = ctx.kafka_topic().unwrap_or_default();
        let partition = i32::from(fault.targets.first().copied().unwrap_or(0));
        let brokers = stack.brokers();
        let leader = tokio::task::spawn_blocking(move || {
            check::partition_leader(&brokers, &topic, partition)
        })
        .await
        .ok()
        .flatten()
        .ok_or("no leader found in the metadata")?;
        *note = format!("partition {partition} led by kafka{leader}");
        vec![leader]
    } else {
        fault.targets.clone()
    };
    for n in &targets {
        stack.run_async(&["kill", &format!("kafka{n}")]).await?;
    }
    tokio::time::sleep(hold).await;
    // Started together: with two or three down, none finishes booting
    // without another (a controller quorum is two of three). Not `up`,
    // which would also heal the other lane's fault.
    let starts = targets.iter().map(|n| {
        let name = format!("kafka{n}");
        async move { stack.run_async(&["start", &name]).await }
    });
    futures_util::future::join_all(starts)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, String>>()
        .map(|_| ())
}

/// Takes a relay process down (SIGKILL, or SIGTERM and a wait for its exit, whose
/// status goes to the note and, when not clean, to the run's unclean terms), holds,
/// and starts it again.
async fn relay_down(
    ctx: &Ctx,
    kind: FaultKind,
    hold: Duration,
    note: &mut String,
) -> Result<(), String> {
    use FaultKind::*;
    let name = match kind {
        DirectKill | DirectTerm => "direct",
        ConnectorKill | ConnectorTerm => "connector",
        _ => "sink",
    };
    let relays = ctx.relays(name);
    if relays.is_empty() {
        return Err(format!("no {name} in this run"));
    }
    if matches!(kind, DirectKill | ConnectorKill | SinkKill) {
        relays.iter().for_each(|relay| relay.kill());
    } else {
        let exits = futures_util::future::join_all(
            relays
                .iter()
                .map(|relay| relay.term(Duration::from_secs(60))),
        )
        .await;
        let mut notes = Vec::new();
        for (relay, (status, clean)) in relays.iter().zip(exits) {
            notes.push(format!("{}: {status}", relay.name));
            if !clean {
                locked(&ctx.unclean_terms).push(format!(
                    "{} at t+{:.1}s: {status}",
                    relay.name,
                    ctx.t0.elapsed().as_secs_f64()
                ));
            }
        }
        *note = notes.join("; ");
    }
    tokio::time::sleep(hold).await;
    relays.iter().try_for_each(|relay| relay.start())
}

/// Cuts (`cut`) or blackholes the proxies of `names` for `hold`, then restores them.
async fn net_fault(ctx: &Ctx, names: &[&str], cut: bool, hold: Duration) -> Result<(), String> {
    ctx.toxi(|t| set_net_fault(t, names, cut, true))?;
    tokio::time::sleep(hold).await;
    ctx.toxi(|t| set_net_fault(t, names, cut, false))
}

/// With `on`, disables (`cut`) or blackholes each proxy of `names`; without, undoes it.
fn set_net_fault(t: &Toxiproxy, names: &[&str], cut: bool, on: bool) -> Result<(), String> {
    for name in names {
        match (cut, on) {
            (true, _) => t.set_enabled(name, !on)?,
            (false, true) => t.blackhole(name)?,
            (false, false) => t.unblackhole(name)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario_report(scenario: Scenario, pass: bool) -> ScenarioReport {
        let verify = verify::Report {
            ok: pass,
            source_transactions: 120,
            target_transactions: if pass { 120 } else { 119 },
            missing_count: u64::from(!pass),
            missing_sample: if pass { vec![] } else { vec![42] },
            ..verify::Report::default()
        };
        ScenarioReport {
            scenario,
            database: format!("chaos_1_{scenario:?}"),
            committed_at_source: 120,
            load: None,
            faults: 7,
            faults_by_kind: [
                ("broker-kill".to_string(), 2),
                ("pg-end-kill".to_string(), 5),
            ]
            .into(),
            drain_secs: pass.then_some(12.345),
            lost: u64::from(!pass),
            duplicated: 0,
            verify,
            topic: (scenario == Scenario::Kafka).then(|| TopicCheck {
                records: 121,
                distinct_ids: 120,
                duplicates: 1,
                ..TopicCheck::default()
            }),
            lsn: LsnCheck {
                samples: 300,
                judged: 280,
                outbox_commits: 120,
                violations: u64::from(!pass) as usize,
                first_violation: (!pass).then(|| "slot confirmed 0/20 while ...".into()),
            },
            dead_letters: 0,
            relay_starts: [("connector".to_string(), 3), ("sink".to_string(), 1)].into(),
            pass,
        }
    }

    fn full_report(pass: bool) -> ChaosReport {
        ChaosReport {
            seed: 1234,
            duration_secs: 180.0,
            elapsed_secs: 401.7,
            stack_dir: "/var/tmp/outbox-relay-chaos".into(),
            port_offset: 1000,
            faults: 40,
            faults_skipped: 2,
            faults_by_kind: [("broker-kill".to_string(), 4), ("sink-term".to_string(), 1)].into(),
            fault_errors: if pass {
                vec![]
            } else {
                (0..12)
                    .map(|i| format!("broker-kill #{i} 3.5: refused"))
                    .collect()
            },
            toxiproxy_restarts: u32::from(!pass) * 2,
            unclean_terms: if pass {
                vec![]
            } else {
                vec!["sink at t+3.0s: signal 9".into()]
            },
            unexpected_exits: if pass {
                vec![]
            } else {
                (0..11)
                    .map(|i| UnexpectedExit {
                        process: "connector".into(),
                        status: "exit status: 1".into(),
                        at_secs: f64::from(i) * 1.25,
                    })
                    .collect()
            },
            scenarios: if pass {
                vec![scenario_report(Scenario::Kafka, true)]
            } else {
                vec![
                    scenario_report(Scenario::Kafka, false),
                    scenario_report(Scenario::Direct, true),
                ]
            },
            outcomes: vec![],
            pass,
        }
    }

    /// The text of [`full_report`] passing and failing, as the one-function `render`
    /// wrote it before it was split (the passing report without its direct scenario,
    /// which the failing one shows).
    const BOTH_REPORTS: &str = r#"chaos report: seed 1234 duration 180s (elapsed 402s), stack /var/tmp/outbox-relay-chaos offset 1000
  faults injected: 40 (planned but skipped after the deadline: 2)
    broker-kill              4
    sink-term                1
  scenario Kafka (db chaos_1_Kafka): PASS
    committed at source 120, faults affecting it 7, drain 12.3s
    lost 0, duplicated 0, dead letters 0, verify ok
    topic (read_committed): 121 records, 120 ids, duplicates 1, missing 0, extra 0, unreadable 0
    slot vs next stage: 300 samples (280 judged) against 120 outbox commits, violations 0
    relay starts: {"connector": 3, "sink": 1}
  unexpected relay exits: 0
chaos: PASS
=====
chaos report: seed 1234 duration 180s (elapsed 402s), stack /var/tmp/outbox-relay-chaos offset 1000
  faults injected: 40 (planned but skipped after the deadline: 2)
    broker-kill              4
    sink-term                1
  scenario Kafka (db chaos_1_Kafka): FAIL
    committed at source 120, faults affecting it 7, drain never
    lost 1, duplicated 0, dead letters 0, verify FAILED
      verify: FAILED: pg_start has 120 transactions, pg_end 119
        missing in pg_end: 1 (first ids: [42])
    topic (read_committed): 121 records, 120 ids, duplicates 1, missing 0, extra 0, unreadable 0
    slot vs next stage: 300 samples (280 judged) against 120 outbox commits, violations 1
      first: slot confirmed 0/20 while ...
    relay starts: {"connector": 3, "sink": 1}
  scenario Direct (db chaos_1_Direct): PASS
    committed at source 120, faults affecting it 7, drain 12.3s
    lost 0, duplicated 0, dead letters 0, verify ok
    slot vs next stage: 300 samples (280 judged) against 120 outbox commits, violations 0
    relay starts: {"connector": 3, "sink": 1}
  unexpected relay exits: 11
    connector exit status: 1 at t+0.0s
    connector exit status: 1 at t+1.2s
    connector exit status: 1 at t+2.5s
    connector exit status: 1 at t+3.8s
    connector exit status: 1 at t+5.0s
    connector exit status: 1 at t+6.2s
    connector exit status: 1 at t+7.5s
    connector exit status: 1 at t+8.8s
    connector exit status: 1 at t+10.0s
    connector exit status: 1 at t+11.2s
  unclean SIGTERMs: ["sink at t+3.0s: signal 9"]
  toxiproxy restarted after a failed call: 2 times
  fault steps that failed: 12
    broker-kill #0 3.5: refused
    broker-kill #1 3.5: refused
    broker-kill #2 3.5: refused
    broker-kill #3 3.5: refused
    broker-kill #4 3.5: refused
    broker-kill #5 3.5: refused
    broker-kill #6 3.5: refused
    broker-kill #7 3.5: refused
    broker-kill #8 3.5: refused
    broker-kill #9 3.5: refused
chaos: FAIL"#;

    #[test]
    fn render_is_pinned() {
        let text = [full_report(true).render(), full_report(false).render()].join("\n=====\n");
        assert_eq!(text, BOTH_REPORTS);
    }

    #[test]
    fn faults_are_counted_by_kind_name() {
        use FaultKind::*;
        let counted = count_by_kind([SinkKill, BrokerKill, SinkKill]);
        assert_eq!(
            counted.into_iter().collect::<Vec<_>>(),
            [("broker-kill".to_string(), 1), ("sink-kill".to_string(), 2)]
        );
    }

    #[test]
    fn outcome_line_is_aligned_and_names_the_error() {
        let outcome = FaultOutcome {
            kind: FaultKind::LeaderKill,
            lane: Lane::Kafka,
            seq: 3,
            started_secs: 12.34,
            took_secs: 5.0,
            note: "partition 1 led by kafka2".into(),
            error: Some("refused".into()),
        };
        assert_eq!(
            outcome_line(&outcome),
            "chaos: t+  12.3s kafka #3   leader-kill              5.0s partition 1 led by kafka2 ERROR: refused"
        );
    }

    #[test]
    fn a_relay_fault_finds_its_role_in_every_scenario() {
        assert!(Scenario::Kafka.plays("connector", "connector"));
        assert!(Scenario::Routes.plays("routes-connector", "connector"));
        assert!(Scenario::Routes.plays("routes-sink", "sink"));
        assert!(Scenario::Direct.plays("direct", "direct"));
        assert!(!Scenario::Routes.plays("routes-connector", "sink"));
        assert!(!Scenario::Kafka.plays("routes-connector", "connector"));
        assert!(!Scenario::Routes.plays("connector", "connector"));
        assert!(Scenario::Events.plays("events-connector", "connector"));
        assert!(Scenario::Events.plays("events-sink", "sink"));
        assert!(!Scenario::Events.plays("routes-sink", "sink"));
        assert!(Scenario::Events.through_kafka());
    }

    #[test]
    fn kinds_leave_out_what_touches_no_selected_scenario() {
        let args = |scenarios: Vec<Scenario>, faults: &[&str]| ChaosArgs {
            seed: Some(1),
            duration: 1.0,
            scenarios,
            faults: faults.iter().map(|f| f.to_string()).collect(),
            rate: 1.0,
            large_rows: 0,
            large_every: 30.0,
            pg: 15,
            stack_dir: PathBuf::new(),
            port_offset: 0,
            stack_script: PathBuf::new(),
            relay_binary: None,
            fault_deadline: None,
            drain_timeout: 1.0,
            json: false,
            plan_only: true,
            keep: false,
        };
        let direct = args(vec![Scenario::Direct], &["all"]).kinds().unwrap();
        assert!(direct.iter().all(|k| k.affects_direct_path()));
        assert!(direct.contains(&FaultKind::DirectKill));
        let kafka = args(
            vec![Scenario::Kafka],
            &["direct-kill", "sink-kill", "sink-kill"],
        );
        assert_eq!(kafka.kinds().unwrap(), [FaultKind::SinkKill]);
        assert!(args(vec![Scenario::Kafka], &["nope"]).kinds().is_err());
        // The routes scenario is a Kafka path: its connector and sink, no direct relay.
        let routes = args(vec![Scenario::Routes], &["all"]).kinds().unwrap();
        assert!(routes.contains(&FaultKind::ConnectorTakeover));
        assert!(routes.contains(&FaultKind::SinkKill));
        assert!(routes.contains(&FaultKind::LeaderKill));
        assert!(!routes.contains(&FaultKind::DirectKill));
        // pg-start-failover needs PostgreSQL 17: left out of `all` before, refused when named.
        assert!(!direct.contains(&FaultKind::PgStartFailover));
        assert!(args(vec![Scenario::Direct], &["pg-start-failover"])
            .kinds()
            .unwrap_err()
            .contains("--pg 17"));
        let mut on_17 = args(vec![Scenario::Direct], &["all"]);
        on_17.pg = 17;
        assert!(on_17.kinds().unwrap().contains(&FaultKind::PgStartFailover));
    }
}
