//! The `outbox-relay` command: parses arguments and hands over to the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use outbox_relay::config::{SourceArgs, TargetArgs};
use outbox_relay::{connector, direct, load, migrate, sink, verify};

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
    },
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate { source, target } => {
            migrate::source(&source.source_url).await?;
            migrate::target(&target.target_url).await?;
            eprintln!("migrate: pg_start and pg_end schemas are in place");
        }
        Command::Connector(args) => {
            connector::run(args, shutdown_signal()).await?;
        }
        Command::Sink(args) => {
            let mut stop = shutdown_signal();
            let stats = sink::run_until(&args, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })
            .await?;
            eprintln!("sink: {}", serde_json::to_string(&stats)?);
        }
        Command::Direct(args) => {
            direct::run(args, shutdown_signal()).await?;
        }
        Command::Load(args) => {
            let summary = load::run(&args).await?;
            println!(
                "load: committed {} in {:.1}s ({:.0}/s), found committed on retry {}, retried {}, failed {}",
                summary.committed,
                summary.elapsed_secs,
                summary.committed as f64 / summary.elapsed_secs.max(1e-9),
                summary.found_committed,
                summary.retried,
                summary.failed
            );
        }
        Command::Verify(args) => {
            let report = verify::run(&args)
                .await
                .context("verify could not read the databases")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.render());
            }
            if !report.ok {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
