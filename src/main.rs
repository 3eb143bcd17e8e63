//! The `outbox-relay` command: parses arguments and hands over to the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use outbox_relay::cmd::{backfill, chaos, check, load, migrate, reconcile, status, verify};
use outbox_relay::config::{SourceArgs, TargetArgs};
use outbox_relay::{connector, direct, sink, telemetry};

#[derive(Parser)]
#[command(name = "outbox-relay", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "OUTBOX_RELAY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// A TOML configuration file (see docs/configuration.md); flags and OUTBOX_RELAY_*
    /// environment variables override it.
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the schemas in sql/ to pg_start and pg_end (idempotent).
    Migrate {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        target: TargetArgs,
        /// Only the relay's own bookkeeping (the schema outbox_relay in pg_end): nothing
        /// in pg_start and none of the demo's tables, for your own outbox and inbox
        #[arg(long)]
        relay_only: bool,
    },
    /// Validate the configuration and connect to everything it names; exit 1 on a failed
    /// check, 2 on a configuration it cannot use at all.
    Check(check::CheckArgs),
    /// Print docs/configuration.md: every setting with its flag, variable and default.
    #[command(hide = true)]
    ConfigReference,
    /// Stream the outbox's inserts from a replication slot into Kafka, exactly once.
    Connector(connector::ConnectorArgs),
    /// Stream the outbox's inserts from a replication slot straight into pg_end (no Kafka).
    Direct(direct::DirectArgs),
    /// Write seed-shaped business transactions into pg_start.
    Load(load::LoadArgs),
    /// Compare pg_start and pg_end; exit 1 on any difference.
    Verify(verify::VerifyArgs),
    /// Apply the topic's records to pg_end, exactly once, offsets stored in pg_end.
    Sink(sink::SinkArgs),
    /// Health and lag of every component: slots, topic, sink offsets, dead letters;
    /// exit 1 if a component is unreachable or a slot is lost.
    Status(status::StatusArgs),
    /// Send an outbox table's rows again (all, or those a WHERE clause selects) while the
    /// relays stream, e.g. after pg_end was restored from a backup; `status` shows it.
    Backfill(backfill::BackfillArgs),
    /// Copy the transactions pg_end lacks from pg_start (after a lost slot or an empty
    /// pg_end); report, never overwrite, rows that differ; exit 1 unless equal after.
    Reconcile(reconcile::ReconcileArgs),
    /// Run the pipelines on a stack instance of its own under a seeded schedule of
    /// faults, then heal, drain and check; exit 1 unless nothing was lost or repeated.
    Chaos(chaos::ChaosArgs),
}

impl Command {
    /// The Kafka settings of the commands that talk to Kafka.
    fn kafka(&self) -> Option<&outbox_relay::config::KafkaArgs> {
        match self {
            Command::Connector(args) => Some(&args.kafka),
            Command::Sink(args) => Some(&args.kafka),
            Command::Status(args) => Some(&args.kafka),
            Command::Check(args) => Some(&args.kafka),
            _ => None,
        }
    }
}

/// A watch that turns true on SIGTERM or SIGINT: long-running commands stop reading,
/// make what they hold durable, and exit 0.
fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

/// Parses the command line merged with the configuration file, if any.
fn parse_cli() -> Result<Cli, ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    let command = outbox_relay::config::with_env_vars(Cli::command());
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (argv, origins) = outbox_relay::config::file::merge(&command, argv).map_err(|error| {
        eprintln!("error: {error}");
        ExitCode::from(2)
    })?;
    command
        .try_get_matches_from(argv)
        .and_then(|matches| Cli::from_arg_matches(&matches))
        .map_err(|error| {
            // Name the file's key when its value is the one clap refused.
            let flag = error
                .get(clap::error::ContextKind::InvalidArg)
                .map(|arg| arg.to_string())
                .and_then(|arg| {
                    arg.split_whitespace()
                        .next()
                        .map(|f| f.trim_start_matches('-').to_string())
                });
            match flag.and_then(|f| origins.keys.get(&f)) {
                Some(key) => {
                    // The value parser's own message, without clap's rendering of the
                    // flag and its pointer to `--help`: the user wrote a key, not a flag.
                    let value = error
                        .get(clap::error::ContextKind::InvalidValue)
                        .map(|value| value.to_string());
                    let reason = match (std::error::Error::source(&error), value) {
                        (Some(source), Some(value)) if !source.to_string().contains(&value) => {
                            format!("invalid value '{value}': {source}")
                        }
                        (Some(source), _) => source.to_string(),
                        (None, Some(value)) => {
                            match error.get(clap::error::ContextKind::ValidValue) {
                                Some(valid) => {
                                    format!("invalid value '{value}' (possible values: {valid})")
                                }
                                None => format!("invalid value '{value}'"),
                            }
                        }
                        (None, None) => error.to_string(),
                    };
                    eprintln!(
                        "error: configuration file {}: key `{key}`: {}",
                        origins.path.display(),
                        reason.trim_end()
                    );
                    ExitCode::from(2)
                }
                None => {
                    let _ = error.print();
                    ExitCode::from(if error.use_stderr() { 2 } else { 0 })
                }
            }
        })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal, never in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging(cli.log_format);
    if let Some(kafka) = cli.command.kafka() {
        if let Err(error) = outbox_relay::kafka::set_client_properties(&kafka.kafka_property) {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    }
    // The replication pipelines (connector, direct) run on one thread: the slot
    // reader task hands the decoder one event per message, and waking a task parked on
    // another thread for each costs more than decoding the message (their CPU per
    // transaction halved on one thread; blocking Kafka calls go to the blocking pool).
    // The sink decodes on one thread while it applies on another, and `chaos` blocks in
    // place: they, and the rest, get the multi-threaded runtime.
    let runtime = match cli.command {
        Command::Connector(_) | Command::Direct(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli.command));
    // A blocking call still waiting on a server that does not answer (its loop sees
    // the stop at its next turn) must not hold the exit back.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate {
            source,
            target,
            relay_only: false,
        } => {
            migrate::source(&source.source_url).await?;
            migrate::target(&target.target_url).await?;
            eprintln!("migrate: pg_start and pg_end schemas are in place");
        }
        Command::Migrate {
            target,
            relay_only: true,
            ..
        } => {
            migrate::relay_only(&target.target_url).await?;
            eprintln!("migrate: the relay's schema outbox_relay is in place in pg_end");
        }
        Command::ConfigReference => {
            use clap::CommandFactory;
            let command = outbox_relay::config::with_env_vars(Cli::command());
            stdout(&outbox_relay::config::reference(&command));
        }
        Command::Check(args) => {
            let lines = check::run(&args).await;
            let ok = lines.iter().all(|l| l.ok);
            return print_report(&lines, args.json, check::render(&lines), ok);
        }
        Command::Connector(args) => {
            connector::run(args, shutdown_signal()).await?;
        }
        Command::Sink(args) => {
            // Spans only when an OTLP endpoint is configured (docs/operations.md, "Tracing").
            let telemetry = match telemetry::Settings::from_env()? {
                Some(settings) => Some(telemetry::init(&settings, "outbox-relay-sink")?),
                None => None,
            };
            let result = sink::run(args, shutdown_signal()).await;
            if let Some(telemetry) = telemetry {
                // Flushes the queued spans while the runtime still carries the requests.
                let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            }
            eprintln!("sink: {}", serde_json::to_string(&result?)?);
        }
        Command::Direct(args) => {
            direct::run(args, shutdown_signal()).await?;
        }
        Command::Load(args) => {
            let summary = load::run(&args).await?;
            stdout(&format!(
                "load: committed {} in {:.1}s ({:.0}/s), found committed on retry {}, retried {}, failed {}\n",
                summary.committed,
                summary.elapsed_secs,
                summary.committed as f64 / summary.elapsed_secs.max(1e-9),
                summary.found_committed,
                summary.retried,
                summary.failed
            ));
        }
        Command::Status(args) => {
            let report = status::run(&args).await;
            return print_report(&report, args.json, report.render(), report.ok);
        }
        Command::Backfill(args) => {
            let requested = backfill::run(&args).await?;
            match &requested.request {
                outbox_relay::pipeline::backfill::Request::Start { id, table, .. } => {
                    stdout(&format!(
                        "backfill {id} requested at pg_start LSN {} for the relays of slot(s) \
                         {}: they send the rows of {table} again (inboxes count each event id \
                         once); `outbox-relay status` shows how far it got. A relay that has \
                         taken a backfill {id} before ignores this request (its log says so): \
                         an id is used once, so give a new --id to send the rows again\n",
                        requested.lsn,
                        requested.slots.join(", ")
                    ))
                }
                outbox_relay::pipeline::backfill::Request::Cancel { id, .. } => stdout(&format!(
                    "cancel of backfill {id} requested at pg_start LSN {}: a relay running or \
                     queueing it stops it (`outbox-relay status` then shows it cancelled); a \
                     relay without a running backfill {id} ignores the request (its log says \
                     so)\n",
                    requested.lsn
                )),
            }
        }
        Command::Reconcile(args) => {
            let report = reconcile::run(&args).await?;
            return print_report(&report, args.json, report.render(), report.ok());
        }
        Command::Chaos(args) => {
            let report = chaos::run(&args).await.map_err(anyhow::Error::msg)?;
            eprintln!("{}", report.render());
            if args.json {
                stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?));
            }
            if !report.pass {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Verify(args) => {
            let report = verify::run(&args)
                .await
                .context("verify could not read the databases")?;
            return print_report(&report, args.json, report.render(), report.ok);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to stdout. A reader that went away (`status --json | head`) is not
/// an error: the command's exit code stands, and nothing panics.
fn stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {error}");
        }
    }
}

/// Prints a one-shot command's report, as JSON or as text, on stdout; exit 1 unless `ok`.
fn print_report(
    report: &impl serde::Serialize,
    json: bool,
    text: String,
    ok: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        stdout(&format!("{}\n", serde_json::to_string_pretty(report)?));
    } else {
        stdout(&format!("{text}\n"));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
