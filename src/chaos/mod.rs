//! `outbox-relay chaos`: proves the invariants under the outage of every component.
//!
//! The runner brings up a stack instance of its own (`scripts/stack` with a state dir
//! and a port offset), a toxiproxy server between the relay and every component, fresh
//! databases, topics, slots and group per run, and the relay as child processes of this
//! binary: connector + sink (scenario `kafka`) and direct (scenario `direct`), both at
//! once. It writes a steady load into pg_start, injects faults from a seeded schedule
//! ([`schedule`]), heals everything, waits for the pipeline to drain, and checks:
//!
//! ```text
//!   load ─▶ pg_start ──proxy──▶ connector ──proxy──▶ Kafka ──proxy──▶ sink ──proxy──▶ pg_end
//!              │     ──proxy──▶ direct ───────────────────────────────────proxy──▶ pg_end
//!              └─ witness slot (test_decoding): every outbox commit LSN
//! ```
//!
//! - `verify`: every id exactly once in pg_end, balances equal, balance = sum;
//! - the topic read with `read_committed` holds every outbox id exactly once;
//! - the slot never confirmed past what the next stage held (sampled, [`check`]);
//! - no dead letters; no relay process exited unless a fault made it.
//!
//! The source of truth is what pg_start committed, never the generator's counters.

pub mod check;
pub mod relay;
pub mod schedule;
pub mod stack;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::SourceArgs;
use crate::error::error_chain;
use crate::kafka::{self, TopicSpec};
use crate::load::{self, LoadArgs, LoadSummary};
use crate::{migrate, pg, verify};
use check::{LsnCheck, NextStage, TopicCheck};
use relay::{RelayProc, UnexpectedExit};
use schedule::{Fault, FaultKind, Lane, Schedule};
use stack::{Stack, Toxiproxy};

/// The two pipelines a run can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// pg_start → connector → Kafka → sink → pg_end.
    Kafka,
    /// pg_start → direct → pg_end.
    Direct,
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
        default_value = "kafka,direct"
    )]
    pub scenarios: Vec<Scenario>,
    /// Fault kinds to inject, comma separated, or `all`. Kinds that touch no selected
    /// scenario are left out.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub faults: Vec<String>,
    /// Source transactions per second written by the load, per scenario.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
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
        let kafka = self.scenarios.contains(&Scenario::Kafka);
        let direct = self.scenarios.contains(&Scenario::Direct);
        kinds.retain(|k| (kafka && k.affects_kafka_path()) || (direct && k.affects_direct_path()));
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
    pub fn render(&self) -> String {
        use std::fmt::Write;
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
            let _ = writeln!(
                out,
                "  scenario {:?} (db {}): {}",
                s.scenario,
                s.database,
                if s.pass { "PASS" } else { "FAIL" }
            );
            let _ = writeln!(
                out,
                "    committed at source {}, faults affecting it {}, drain {}",
                s.committed_at_source,
                s.faults,
                s.drain_secs
                    .map(|d| format!("{d:.1}s"))
                    .unwrap_or_else(|| "never".into())
            );
            let _ = writeln!(
                out,
                "    lost {}, duplicated {}, dead letters {}, verify {}",
                s.lost,
                s.duplicated,
                s.dead_letters,
                if s.verify.ok { "ok" } else { "FAILED" }
            );
            if !s.verify.ok {
                for line in s.verify.render().lines() {
                    let _ = writeln!(out, "      {line}");
                }
            }
            if let Some(t) = &s.topic {
                let _ = writeln!(
                    out,
                    "    topic (read_committed): {} records, {} ids, duplicates {}, missing {}, extra {}, unreadable {}",
                    t.records, t.distinct_ids, t.duplicates, t.missing, t.extra, t.unreadable
                );
            }
            let _ = writeln!(
                out,
                "    slot vs next stage: {} samples ({} judged) against {} outbox commits, violations {}",
                s.lsn.samples, s.lsn.judged, s.lsn.outbox_commits, s.lsn.violations
            );
            if let Some(v) = &s.lsn.first_violation {
                let _ = writeln!(out, "      first: {v}");
            }
            let _ = writeln!(out, "    relay starts: {:?}", s.relay_starts);
        }
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
        let _ = write!(out, "chaos: {}", if self.pass { "PASS" } else { "FAIL" });
        out
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
    topic: String,
    progress_topic: String,
    relays: Vec<RelayProc>,
}

/// What the fault lanes share.
struct Ctx {
    stack: Stack,
    toxi: Mutex<Toxiproxy>,
    runs: Vec<ScenarioRun>,
    t0: Instant,
    unclean_terms: Mutex<Vec<String>>,
}

impl Ctx {
    fn relay(&self, name: &str) -> Option<&RelayProc> {
        self.runs
            .iter()
            .flat_map(|r| &r.relays)
            .find(|p| p.name == name)
    }

    fn kafka_topic(&self) -> Option<&str> {
        self.runs
            .iter()
            .find(|r| r.scenario == Scenario::Kafka)
            .map(|r| r.topic.as_str())
    }

    /// Runs `f` on toxiproxy; a failed call restarts it ([`Toxiproxy::call`]).
    fn toxi(&self, f: impl FnOnce(&Toxiproxy) -> Result<(), String>) -> Result<(), String> {
        tokio::task::block_in_place(|| {
            let mut toxi = self.toxi.lock().unwrap_or_else(|e| e.into_inner());
            let t = self.t0.elapsed().as_secs_f64();
            toxi.call(f).inspect_err(|error| {
                eprintln!("chaos: t+{t:.1}s toxiproxy: {error} (restarted)");
            })
        })
    }
}

/// Runs the chaos test; the report's `pass` says whether it passed.
pub async fn run(args: &ChaosArgs) -> Result<ChaosReport, String> {
    let seed = args.seed();
    let kinds = args.kinds()?;
    let duration_ms = (args.duration.max(1.0) * 1000.0) as u64;
    let schedule = Schedule::plan(seed, duration_ms, &kinds);
    eprintln!("{}", schedule.render());
    eprintln!(
        "chaos: reproduce with: outbox-relay chaos --seed {seed} --duration {} --scenarios {} --faults {}",
        args.duration,
        args.scenarios
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(","),
        args.faults.join(",")
    );
    if args.plan_only {
        return Ok(empty_report(args, seed, &schedule));
    }
    let stack = Stack {
        script: args.stack_script.clone(),
        dir: args.stack_dir.clone(),
        offset: args.port_offset,
    };
    eprintln!(
        "chaos: stack {} offset {} (pg {} {}, brokers {})",
        stack.dir.display(),
        stack.offset,
        stack.pg_start_port(),
        stack.pg_end_port(),
        stack.brokers()
    );
    stack.run_async(&["up"]).await?;
    if !stack.proxied_listener_up() {
        return Err(format!(
            "the brokers of {} do not listen on their proxied ports ({}..): they were started \
             without OUTBOX_RELAY_STACK_KAFKA_PROXY=1; stop them (scripts/stack down with the same \
             dir and offset) and run again",
            stack.dir.display(),
            stack.broker_proxied_port(1)
        ));
    }
    let run_dir = stack
        .dir
        .join("chaos")
        .join(format!("run-{seed}-{}", unix_secs()));
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    eprintln!("chaos: logs in {}", run_dir.display());
    let toxi_bin = stack::toxiproxy_binary(&stack.dir)?;
    let toxi = Toxiproxy::start(&toxi_bin, &stack, &run_dir.join("toxiproxy.log"))?;
    let binary = match &args.relay_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|e| format!("current exe: {e}"))?,
    };

    let t0 = Instant::now();
    let unexpected = Arc::new(Mutex::new(Vec::new()));
    let tag = format!("chaos_{}", unix_secs());
    drop_stale_slots(&stack).await?;
    let mut runs = Vec::new();
    for scenario in &args.scenarios {
        runs.push(
            prepare(
                &stack,
                *scenario,
                &tag,
                &binary,
                &run_dir,
                unexpected.clone(),
                t0,
            )
            .await?,
        );
    }
    let ctx = Arc::new(Ctx {
        stack: stack.clone(),
        toxi: Mutex::new(toxi),
        runs,
        t0,
        unclean_terms: Mutex::new(Vec::new()),
    });

    // Relays up, slots created, before the load starts.
    for run in &ctx.runs {
        for relay in &run.relays {
            relay.start()?;
        }
    }
    let stop_supervisor = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (ctx, stop) = (ctx.clone(), stop_supervisor.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for relay in ctx.runs.iter().flat_map(|r| &r.relays) {
                    relay.supervise();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    for run in &ctx.runs {
        wait_for_slot(&stack, run, Duration::from_secs(180)).await?;
    }
    eprintln!(
        "chaos: pipelines up after {:.1}s; load and faults start",
        t0.elapsed().as_secs_f64()
    );

    let t_load = Instant::now();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let mut samplers = Vec::new();
    let mut loads = Vec::new();
    let lanes_done = Arc::new(AtomicBool::new(false));
    for run in &ctx.runs {
        let next = match run.scenario {
            Scenario::Direct => NextStage::PgEnd {
                url: Stack::url(stack.pg_end_port(), &run.db),
            },
            Scenario::Kafka => NextStage::ProgressTopic {
                brokers: stack.brokers(),
                topic: run.progress_topic.clone(),
            },
        };
        samplers.push(tokio::spawn(check::sample_lsns(
            run.source_url.clone(),
            run.slot.clone(),
            next,
            Duration::from_millis(match run.scenario {
                Scenario::Direct => 250,
                Scenario::Kafka => 1000,
            }),
            stop_sampling.clone(),
        )));
        loads.push(tokio::spawn(steady_load(
            run.source_url.clone(),
            args.rate,
            args.duration,
            lanes_done.clone(),
        )));
    }

    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let skipped = Arc::new(Mutex::new(0usize));
    let deadline =
        t_load + Duration::from_secs_f64(args.fault_deadline.unwrap_or(args.duration * 1.5));
    let mut lanes = Vec::new();
    for lane in [schedule.db.clone(), schedule.kafka.clone()] {
        let (ctx, outcomes, skipped) = (ctx.clone(), outcomes.clone(), skipped.clone());
        let kinds_in_lane = {
            let mut k: Vec<FaultKind> = lane.iter().map(|f| f.kind).collect();
            k.sort();
            k.dedup();
            k.len()
        };
        lanes.push(tokio::spawn(async move {
            for fault in lane {
                if fault.seq >= kinds_in_lane && Instant::now() > deadline {
                    *skipped.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                    continue;
                }
                let due = t_load + Duration::from_millis(fault.at_ms);
                tokio::time::sleep_until(due.into()).await;
                let outcome = inject(&ctx, &fault, t_load).await;
                eprintln!(
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
                );
                outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(outcome);
            }
        }));
    }
    for lane in lanes {
        let _ = lane.await;
    }
    lanes_done.store(true, Ordering::Relaxed);
    eprintln!(
        "chaos: schedule done at t+{:.1}s; healing",
        t_load.elapsed().as_secs_f64()
    );
    heal(&ctx).await;
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
    // Heal again: the load may have outlasted the heal, and a component may have been
    // hit by a late step.
    heal(&ctx).await;
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
    stop_sampling.store(true, Ordering::Relaxed);
    let mut all_samples = Vec::new();
    for sampler in samplers {
        all_samples.push(sampler.await.unwrap_or_default());
    }
    // Relays down with SIGTERM: a clean exit is part of the contract.
    stop_supervisor.store(true, Ordering::Relaxed);
    let _ = supervisor.await;
    for relay in ctx.runs.iter().flat_map(|r| &r.relays) {
        let (status, clean) = relay.term(Duration::from_secs(60)).await;
        if !clean {
            ctx.unclean_terms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{} at the end of the run: {status}", relay.name));
        }
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner()));
    let mut scenarios = Vec::new();
    for (i, run) in ctx.runs.iter().enumerate() {
        scenarios.push(
            judge(
                &stack,
                run,
                &outcomes,
                drains[i],
                load_summaries[i].clone(),
                &all_samples[i],
            )
            .await?,
        );
    }
    let unexpected_exits = unexpected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut faults_by_kind = BTreeMap::new();
    for o in &outcomes {
        *faults_by_kind.entry(o.kind.name().to_string()).or_default() += 1;
    }
    let fault_errors: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.error
                .as_ref()
                .map(|e| format!("{} #{} {}: {e}", o.kind, o.seq, o.started_secs))
        })
        .collect();
    let pass = scenarios.iter().all(|s| s.pass) && unexpected_exits.is_empty();
    let report = ChaosReport {
        seed,
        duration_secs: args.duration,
        elapsed_secs: t0.elapsed().as_secs_f64(),
        stack_dir: stack.dir.display().to_string(),
        port_offset: stack.offset,
        faults: outcomes.len(),
        faults_skipped: *skipped.lock().unwrap_or_else(|e| e.into_inner()),
        faults_by_kind,
        fault_errors,
        toxiproxy_restarts: ctx.toxi.lock().unwrap_or_else(|e| e.into_inner()).restarts,
        unclean_terms: ctx
            .unclean_terms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        unexpected_exits,
        scenarios,
        outcomes,
        pass,
    };
    let _ = std::fs::write(
        run_dir.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    );
    cleanup(&stack, &ctx.runs, report.pass && !args.keep).await;
    Ok(report)
}

/// Writes `rate` transactions per second into `source_url` for at least `min_secs`
/// and until the fault lanes are done, in chunks of [`load::run`] (each a few seconds,
/// so the load ends soon after the last fault). A chunk that fails (pg_start refusing
/// for longer than the generator's patience) is logged and the next one starts.
async fn steady_load(
    source_url: String,
    rate: f64,
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
            duration: Some(5.0),
            concurrency: 4,
            accounts: 10,
            give_up_after: 900.0,
            progress_every: 0.0,
        };
        match load::run(&args).await {
            Ok(s) => {
                total.committed += s.committed;
                total.found_committed += s.found_committed;
                total.retried += s.retried;
                total.failed += s.failed;
            }
            Err(error) => {
                eprintln!("chaos: load chunk failed: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    total.elapsed_secs = start.elapsed().as_secs_f64();
    total
}

fn empty_report(args: &ChaosArgs, seed: u64, schedule: &Schedule) -> ChaosReport {
    let mut faults_by_kind = BTreeMap::new();
    for f in schedule.all() {
        *faults_by_kind.entry(f.kind.name().to_string()).or_default() += 1;
    }
    ChaosReport {
        seed,
        duration_secs: args.duration,
        elapsed_secs: 0.0,
        stack_dir: args.stack_dir.display().to_string(),
        port_offset: args.port_offset,
        faults: schedule.len(),
        faults_skipped: 0,
        faults_by_kind,
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

async fn admin(port: u16) -> Result<tokio_postgres::Client, String> {
    let url = Stack::url(port, "postgres");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match pg::connect(&url).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%e, "waiting for the database");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cannot connect to port {port}: {e}")),
        }
    }
}

/// Drops the inactive slots of earlier runs on this instance (a run that failed keeps its
/// relay slots, one stopped by hand keeps all): they pin WAL, and enough of them use up
/// `max_replication_slots`, so that this run could not create its own. Their databases
/// are kept for inspection.
async fn drop_stale_slots(stack: &Stack) -> Result<(), String> {
    let source = admin(stack.pg_start_port()).await?;
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

/// Fresh databases, topics and names for one scenario.
async fn prepare(
    stack: &Stack,
    scenario: Scenario,
    tag: &str,
    binary: &std::path::Path,
    run_dir: &std::path::Path,
    unexpected: Arc<Mutex<Vec<UnexpectedExit>>>,
    t0: Instant,
) -> Result<ScenarioRun, String> {
    let short = match scenario {
        Scenario::Kafka => "kafka",
        Scenario::Direct => "direct",
    };
    let db = format!("{tag}_{short}");
    for port in [stack.pg_start_port(), stack.pg_end_port()] {
        admin(port)
            .await?
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .map_err(|e| format!("create database {db}: {e}"))?;
    }
    let source_url = Stack::url(stack.pg_start_port(), &db);
    let target_url = Stack::url(stack.pg_end_port(), &db);
    migrate::source(&source_url)
        .await
        .map_err(|e| format!("migrate {db} on pg_start: {e}"))?;
    migrate::target(&target_url)
        .await
        .map_err(|e| format!("migrate {db} on pg_end: {e}"))?;
    let slot = format!("{db}_slot");
    let witness = format!("{db}_witness");
    let source = pg::connect(&source_url)
        .await
        .map_err(|e| format!("connect {db}: {e}"))?;
    check::create_witness(&source, &witness)
        .await
        .map_err(|e| format!("witness slot: {}", error_chain(&e)))?;
    let topic = format!("{db}_txns");
    let progress_topic = format!("{db}_progress");
    let relay_source = Stack::url(stack.pg_start_proxy_port(), &db);
    let relay_target = Stack::url(stack.pg_end_proxy_port(), &db);
    let s = |v: &str| v.to_string();
    // Each relay process serves its metrics on a port of this instance (the defaults,
    // 9641-9643, belong to the relay of the default stack, or of another runner).
    let metrics = |n: u16| {
        vec![(
            s("OUTBOX_RELAY_METRICS_ADDR"),
            format!("127.0.0.1:{}", 9641 + stack.offset + n),
        )]
    };
    let relays = match scenario {
        Scenario::Kafka => {
            let brokers = stack.brokers();
            for spec in [
                TopicSpec {
                    name: &topic,
                    partitions: 3,
                    replication_factor: 3,
                    configs: &[],
                },
                TopicSpec {
                    name: &progress_topic,
                    partitions: 1,
                    replication_factor: 3,
                    configs: &[("cleanup.policy", "compact")],
                },
            ] {
                kafka::ensure_topic(&brokers, &spec)
                    .await
                    .map_err(|e| format!("create topic {}: {e}", spec.name))?;
            }
            let proxied = stack.proxied_brokers();
            vec![
                RelayProc::new(
                    "connector",
                    binary,
                    vec![
                        s("connector"),
                        s("--source-url"),
                        relay_source.clone(),
                        s("--brokers"),
                        proxied.clone(),
                        s("--topic"),
                        topic.clone(),
                        s("--progress-topic"),
                        progress_topic.clone(),
                        s("--slot"),
                        slot.clone(),
                    ],
                    metrics(0),
                    run_dir,
                    unexpected.clone(),
                    t0,
                ),
                RelayProc::new(
                    "sink",
                    binary,
                    vec![
                        s("sink"),
                        s("--target-url"),
                        relay_target.clone(),
                        s("--brokers"),
                        proxied,
                        s("--topic"),
                        topic.clone(),
                        s("--group"),
                        format!("{db}_sink"),
                    ],
                    metrics(1),
                    run_dir,
                    unexpected,
                    t0,
                ),
            ]
        }
        Scenario::Direct => vec![RelayProc::new(
            "direct",
            binary,
            vec![
                s("direct"),
                s("--source-url"),
                relay_source,
                s("--target-url"),
                relay_target,
                s("--slot"),
                slot.clone(),
            ],
            metrics(2),
            run_dir,
            unexpected,
            t0,
        )],
    };
    eprintln!("chaos: scenario {short}: database {db}, slot {slot}, witness {witness}");
    Ok(ScenarioRun {
        scenario,
        db,
        source_url,
        target_url,
        slot,
        witness,
        topic,
        progress_topic,
        relays,
    })
}

async fn wait_for_slot(stack: &Stack, run: &ScenarioRun, timeout: Duration) -> Result<(), String> {
    let client = admin(stack.pg_start_port()).await?;
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
    let commits = check::witness_commits(&source, &run.witness)
        .await
        .map_err(|e| format!("witness: {e}"))?;
    let history = match run.scenario {
        Scenario::Kafka => {
            let (brokers, topic, slot) = (
                stack.brokers(),
                run.progress_topic.clone(),
                run.slot.clone(),
            );
            tokio::task::spawn_blocking(move || {
                check::progress_history(&brokers, &topic, &slot, Duration::from_secs(120))
            })
            .await
            .map_err(|e| format!("progress history: {e}"))??
        }
        Scenario::Direct => Vec::new(),
    };
    let lsn = check::judge_lsns(&check::resolve_samples(samples, &history), &commits);
    let dead_letters = check::dead_letters(&target)
        .await
        .map_err(|e| format!("dead letters: {e}"))?;
    let topic = match run.scenario {
        Scenario::Kafka => {
            let (brokers, topic, ids) = (stack.brokers(), run.topic.clone(), ids.clone());
            Some(
                tokio::task::spawn_blocking(move || {
                    check::check_topic(&brokers, &topic, &ids, Duration::from_secs(300))
                })
                .await
                .map_err(|e| format!("topic check: {e}"))??,
            )
        }
        Scenario::Direct => None,
    };
    let affecting: Vec<&FaultOutcome> = outcomes
        .iter()
        .filter(|o| match run.scenario {
            Scenario::Kafka => o.kind.affects_kafka_path(),
            Scenario::Direct => o.kind.affects_direct_path(),
        })
        .collect();
    let mut faults_by_kind = BTreeMap::new();
    for o in &affecting {
        *faults_by_kind.entry(o.kind.name().to_string()).or_default() += 1;
    }
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
        faults_by_kind,
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

/// Drops the witness slots (they hold WAL) and, when `everything`, the relay slots and
/// the databases.
async fn cleanup(stack: &Stack, runs: &[ScenarioRun], everything: bool) {
    let Ok(source) = admin(stack.pg_start_port()).await else {
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
            for port in [stack.pg_start_port(), stack.pg_end_port()] {
                if let Ok(client) = admin(port).await {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", run.db))
                        .await;
                }
            }
        }
    }
}

/// Injects one fault, holds it, heals it.
async fn inject(ctx: &Ctx, fault: &Fault, t_load: Instant) -> FaultOutcome {
    let started = Instant::now();
    let started_secs = started.duration_since(t_load).as_secs_f64();
    let hold = Duration::from_millis(fault.hold_ms);
    let mut note = String::new();
    let result: Result<(), String> = async {
        use FaultKind::*;
        let stack = &ctx.stack;
        match fault.kind {
            PgStartKill | PgStartCrash | PgEndKill | PgEndCrash => {
                let name = match fault.kind {
                    PgEndKill | PgEndCrash => "pg_end",
                    _ => "pg_start",
                };
                let how = match fault.kind {
                    PgStartCrash | PgEndCrash => "crash",
                    _ => "kill",
                };
                stack.run_async(&[how, name]).await?;
                tokio::time::sleep(hold).await;
                stack.run_async(&["start", name]).await
            }
            PgEndHang => {
                stack.run_async(&["pause", "pg_end"]).await?;
                tokio::time::sleep(hold).await;
                stack.run_async(&["resume", "pg_end"]).await
            }
            WalsenderKill => {
                let client = admin(stack.pg_start_port()).await?;
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
                note = format!("walsenders of {ended:?} terminated");
                Ok(())
            }
            NetPgStartCut | NetPgEndCut | NetPgStartBlackhole | NetPgEndBlackhole => {
                let name = if matches!(fault.kind, NetPgStartCut | NetPgStartBlackhole) {
                    "pg_start"
                } else {
                    "pg_end"
                };
                net_fault(ctx, &[name], matches!(fault.kind, NetPgStartCut | NetPgEndCut), hold)
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
                let targets: Vec<u8> = if fault.kind == LeaderKill {
                    let topic = ctx.kafka_topic().unwrap_or_default().to_string();
                    let partition = i32::from(fault.targets.first().copied().unwrap_or(0));
                    let brokers = stack.brokers();
                    let leader = tokio::task::spawn_blocking(move || {
                        check::partition_leader(&brokers, &topic, partition)
                    })
                    .await
                    .ok()
                    .flatten()
                    .ok_or("no leader found in the metadata")?;
                    note = format!("partition {partition} led by kafka{leader}");
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
            BrokerHang => {
                let name = format!("kafka{}", fault.targets.first().copied().unwrap_or(1));
                stack.run_async(&["pause", &name]).await?;
                tokio::time::sleep(hold).await;
                stack.run_async(&["resume", &name]).await
            }
            DirectKill | ConnectorKill | SinkKill | DirectTerm | ConnectorTerm | SinkTerm => {
                let name = match fault.kind {
                    DirectKill | DirectTerm => "direct",
                    ConnectorKill | ConnectorTerm => "connector",
                    _ => "sink",
                };
                let relay = ctx.relay(name).ok_or(format!("no {name} in this run"))?;
                if matches!(fault.kind, DirectKill | ConnectorKill | SinkKill) {
                    relay.kill();
                } else {
                    let (status, clean) = relay.term(Duration::from_secs(60)).await;
                    note = format!("exit {status}");
                    if !clean {
                        ctx.unclean_terms
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!(
                                "{name} at t+{:.1}s: {status}",
                                ctx.t0.elapsed().as_secs_f64()
                            ));
                    }
                }
                tokio::time::sleep(hold).await;
                relay.start()
            }
        }
    }
    .await;
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

async fn net_fault(ctx: &Ctx, names: &[&str], cut: bool, hold: Duration) -> Result<(), String> {
    ctx.toxi(|t| {
        for name in names {
            if cut {
                t.set_enabled(name, false)?;
            } else {
                t.blackhole(name)?;
            }
        }
        Ok(())
    })?;
    tokio::time::sleep(hold).await;
    ctx.toxi(|t| {
        for name in names {
            if cut {
                t.set_enabled(name, true)?;
            } else {
                t.unblackhole(name)?;
            }
        }
        Ok(())
    })
}
