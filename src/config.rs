//! Command-line and environment settings shared by the commands.
//!
//! Every default points at the local stack (`scripts/stack up`): the seed's addresses,
//! database names and topic, so that each command runs there with no flags at all.
//! Every flag can also be set by an `OUTBOX_RELAY_…` environment variable.

/// pg_start, the source database.
pub const DEFAULT_SOURCE_URL: &str = "postgres://postgres:postgres@127.0.0.1:8000/db_start";
/// pg_end, the target database.
pub const DEFAULT_TARGET_URL: &str = "postgres://postgres:postgres@127.0.0.1:8001/db_end";
/// The three local brokers.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:19090,127.0.0.1:19091,127.0.0.1:19092";
/// The seed's topic.
pub const DEFAULT_TOPIC: &str = "outbox-transactions";

/// Where the source database is.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// pg_start connection URL (libpq URL or key=value form).
    #[arg(long, env = "OUTBOX_RELAY_SOURCE_URL", default_value = DEFAULT_SOURCE_URL, hide_env_values = true)]
    pub source_url: String,
}

/// Where the target database is.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// pg_end connection URL (libpq URL or key=value form).
    #[arg(long, env = "OUTBOX_RELAY_TARGET_URL", default_value = DEFAULT_TARGET_URL, hide_env_values = true)]
    pub target_url: String,
}

/// Where the brokers and the topic are.
#[derive(clap::Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "OUTBOX_RELAY_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// The topic the outbox is published to.
    #[arg(long, env = "OUTBOX_RELAY_TOPIC", default_value = DEFAULT_TOPIC)]
    pub topic: String,
}
