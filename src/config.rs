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
/// The seed's outbox table.
pub const DEFAULT_TABLE: &str = "outbox.transactions";
/// The publication the relay reads the outbox through (and creates if missing).
pub const DEFAULT_PUBLICATION: &str = "outbox_relay";
/// The connector's replication slot.
pub const DEFAULT_SLOT: &str = "outbox_relay";
/// Direct mode's replication slot.
pub const DEFAULT_DIRECT_SLOT: &str = "outbox_relay_direct";
/// The base name of the connector's compacted progress topics (one per slot:
/// `kafka::progress_topic_of`).
pub const DEFAULT_PROGRESS_TOPIC: &str = "outbox-relay-progress";
/// The topic of the rows and messages the connector cannot route.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "outbox-relay-dead-letters";
/// The sinks' consumer group.
pub const DEFAULT_SINK_GROUP: &str = "outbox-relay-sink";

/// Where the source database is.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// pg_start connection URL (libpq URL or key=value form). Takes libpq's sslmode
    /// (disable, prefer, require, verify-ca, verify-full), sslrootcert, sslcert and sslkey,
    /// and password_file=PATH to read the password from a file (see docs/security.md).
    /// Several hosts with target_session_attrs=read-write (`postgres://u@a:5432,b:5432/db?target_session_attrs=read-write`)
    /// follow a promotion (see docs/operations.md).
    #[arg(long, env = "OUTBOX_RELAY_SOURCE_URL", default_value = DEFAULT_SOURCE_URL, hide_env_values = true, value_parser = PgUrlParser)]
    pub source_url: String,
}

/// Where the target database is.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// pg_end connection URL (libpq URL or key=value form), with the same TLS and
    /// password_file parameters as --source-url.
    #[arg(long, env = "OUTBOX_RELAY_TARGET_URL", default_value = DEFAULT_TARGET_URL, hide_env_values = true, value_parser = PgUrlParser)]
    pub target_url: String,
}

/// The outbox: its table and the publication that holds it.
#[derive(clap::Args, Debug, Clone)]
pub struct OutboxArgs {
    /// The publication that holds the outbox table.
    #[arg(long, env = "OUTBOX_RELAY_PUBLICATION", default_value = DEFAULT_PUBLICATION)]
    pub publication: String,
    /// The outbox table, schema-qualified.
    #[arg(long, env = "OUTBOX_RELAY_TABLE", default_value = DEFAULT_TABLE)]
    pub table: String,
}

/// Both pipelines' slots, for the commands that look at both (`check`, `status`).
#[derive(clap::Args, Debug, Clone)]
pub struct SlotsArgs {
    /// The connector's slot (its progress-topic key as well).
    #[arg(long, env = "OUTBOX_RELAY_SLOT", default_value = DEFAULT_SLOT)]
    pub slot: String,
    /// Direct mode's slot (its `outbox_relay.direct_progress` key as well).
    #[arg(long, env = "OUTBOX_RELAY_DIRECT_SLOT", default_value = DEFAULT_DIRECT_SLOT)]
    pub direct_slot: String,
}

impl Default for SlotsArgs {
    fn default() -> Self {
        Self {
            slot: DEFAULT_SLOT.into(),
            direct_slot: DEFAULT_DIRECT_SLOT.into(),
        }
    }
}

/// The value parser of the PostgreSQL URL flags: [`crate::pg::check_url`] at parse
/// time, so that a bad sslmode or a missing certificate or password file stops the
/// command at once. Unlike clap's default message, its error does not repeat the
/// value, which may hold a password.
#[derive(Debug, Clone, Copy)]
pub struct PgUrlParser;

impl clap::builder::TypedValueParser for PgUrlParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        use clap::error::ErrorKind;
        let name = arg
            .and_then(|a| a.get_long())
            .map(|long| format!("--{long}"))
            .unwrap_or_else(|| "the PostgreSQL URL".into());
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                ErrorKind::InvalidUtf8,
                format!("{name} is not valid UTF-8\n"),
            )
            .with_cmd(cmd)
        })?;
        crate::pg::check_url(text).map_err(|error| {
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid {name}: {error}\n"),
            )
            .with_cmd(cmd)
        })?;
        Ok(text.to_string())
    }
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
    /// A librdkafka property for every Kafka client (producer, consumers, admin), as
    /// KEY=VALUE: security.protocol, sasl.mechanism, sasl.username, ssl.ca.location, …
    /// Repeatable; `;`-separated in the variable. KEY_file=PATH reads the value from a
    /// file (sasl.password_file=/run/secrets/kafka). See docs/security.md.
    #[arg(
        long = "kafka-property",
        env = "OUTBOX_RELAY_KAFKA_PROPERTIES",
        value_delimiter = ';',
        value_parser = crate::kafka::KafkaProperty::parse,
        hide_env_values = true
    )]
    pub kafka_property: Vec<crate::kafka::KafkaProperty>,
}

impl KafkaArgs {
    /// `brokers` and `topic` with no extra client property.
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            kafka_property: Vec::new(),
        }
    }
}

/// Settings read from a TOML configuration file, merged under the command line.
///
/// Precedence, highest first: a flag on the command line, its `OUTBOX_RELAY_…`
/// environment variable, the configuration file, the built-in default.
///
/// The file's keys are the commands' long flag names in snake_case. Top-level keys
/// apply to every command that has such a flag (`source_url`, `brokers`, …); a table
/// named after a command applies to that command only and wins over the top level:
///
/// ```toml
/// source_url = "postgres://relay@db1:5432/app"
/// brokers = "k1:9092,k2:9092,k3:9092"
///
/// [connector]
/// slot = "outbox_relay"
/// batch_size = 5000
/// ```
///
/// Unknown keys and tables are refused with an error that names them, as is a value of
/// the wrong type; the values are then checked by the same parsers as the flags.
pub mod file {
    use std::collections::BTreeMap;
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};

    use clap::{ArgAction, Command};
    use thiserror::Error;

    /// The flag that names the configuration file.
    pub const CONFIG_FLAG: &str = "config";
    /// Its environment variable.
    pub const CONFIG_ENV: &str = "OUTBOX_RELAY_CONFIG";

    #[derive(Debug, Error)]
    pub enum ConfigError {
        #[error("cannot read the configuration file {path}: {source}")]
        Read {
            path: PathBuf,
            #[source]
            source: std::io::Error,
        },
        #[error("the configuration file {path} is not valid TOML: {message}")]
        Syntax { path: PathBuf, message: String },
        #[error("configuration file {path}: unknown key `{key}`{hint}")]
        UnknownKey {
            path: PathBuf,
            key: String,
            hint: String,
        },
        #[error("configuration file {path}: key `{key}` must be {expected}, not {found}")]
        WrongType {
            path: PathBuf,
            key: String,
            expected: &'static str,
            found: &'static str,
        },
    }

    /// The commands that inspect a deployment rather than run a part of it.
    const INSPECTORS: [&str; 4] = ["check", "status", "verify", "reconcile"];

    /// An inspector's key, and the relays' keys that give it, first found wins: the
    /// routes and inboxes a deployment declares under `[connector]`, `[sink]` or
    /// `[direct]` are the ones `check`, `verify` and `reconcile` must see.
    const DESCRIBED_BY_RELAYS: &[(&str, &[(&str, &str)])] = &[
        ("route", &[("connector", "route"), ("direct", "route")]),
        ("inbox", &[("sink", "inbox"), ("direct", "inbox")]),
        ("topic", &[("connector", "topic"), ("sink", "topic")]),
        ("slot", &[("connector", "slot")]),
        ("direct_slot", &[("direct", "slot")]),
        (
            "publication",
            &[("connector", "publication"), ("direct", "publication")],
        ),
        ("table", &[("connector", "table"), ("direct", "table")]),
        ("progress_topic", &[("connector", "progress_topic")]),
        ("dead_letter_topic", &[("connector", "dead_letter_topic")]),
    ];

    /// Where each injected flag came from, to name the key when clap refuses its value.
    #[derive(Debug, Default)]
    pub struct Origins {
        pub path: PathBuf,
        /// Long flag name → `section.key` in the file.
        pub keys: BTreeMap<String, String>,
    }

    fn type_name(value: &toml::Value) -> &'static str {
        match value {
            toml::Value::String(_) => "a string",
            toml::Value::Integer(_) => "an integer",
            toml::Value::Float(_) => "a number",
            toml::Value::Boolean(_) => "a boolean",
            toml::Value::Datetime(_) => "a date",
            toml::Value::Array(_) => "an array",
            toml::Value::Table(_) => "a table",
        }
    }

    /// `t` as an inline TOML table, on one line.
    fn inline_table(t: &toml::Table) -> String {
        let fields: Vec<String> = t
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::Table(inner) => inline_table(inner),
                    other => other.to_string(),
                };
                format!("{} = {v}", toml::Value::String(k.clone()))
            })
            .collect();
        format!("{{{}}}", fields.join(", "))
    }

    /// The configuration file named on the command line or in the environment.
    pub fn path_from(argv: &[OsString]) -> Option<PathBuf> {
        let flag = format!("--{CONFIG_FLAG}");
        let prefix = format!("--{CONFIG_FLAG}=");
        let mut args = argv.iter().skip(1);
        while let Some(arg) = args.next() {
            let text = arg.to_string_lossy();
            if text == flag {
                return args.next().map(PathBuf::from);
            }
            if let Some(path) = text.strip_prefix(&prefix) {
                return Some(PathBuf::from(path));
            }
        }
        std::env::var_os(CONFIG_ENV).map(PathBuf::from)
    }

    /// Returns `argv` with the file's settings for the chosen subcommand appended as
    /// flags, skipping those given on the command line or in the environment.
    pub fn merge(
        command: &Command,
        argv: Vec<OsString>,
    ) -> Result<(Vec<OsString>, Origins), ConfigError> {
        let Some(path) = path_from(&argv) else {
            return Ok((argv, Origins::default()));
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        merge_text(command, argv, &path, &text)
    }

    /// [`merge`] on the file's text.
    pub fn merge_text(
        command: &Command,
        mut argv: Vec<OsString>,
        path: &Path,
        text: &str,
    ) -> Result<(Vec<OsString>, Origins), ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        let unknown = |key: String, hint: String| ConfigError::UnknownKey {
            path: path.to_path_buf(),
            key,
            hint,
        };
        let has_flag = |sub: &Command, key: &str| {
            let long = key.replace('_', "-");
            sub.get_arguments()
                .any(|a| a.get_long() == Some(long.as_str()))
        };

        // Validate the whole file, whichever command runs.
        for (key, value) in &table {
            match value {
                toml::Value::Table(section) => {
                    let Some(sub) = command.find_subcommand(key) else {
                        return Err(unknown(
                            key.clone(),
                            " (a table must be named after a command, e.g. [connector])".into(),
                        ));
                    };
                    for inner in section.keys() {
                        if !has_flag(sub, inner) {
                            return Err(unknown(
                                format!("{key}.{inner}"),
                                format!(
                                    ": `outbox-relay {key}` has no --{} flag",
                                    inner.replace('_', "-")
                                ),
                            ));
                        }
                    }
                }
                _ => {
                    if !command.get_subcommands().any(|sub| has_flag(sub, key)) {
                        return Err(unknown(
                            key.clone(),
                            ": no command has such a setting".into(),
                        ));
                    }
                }
            }
        }

        // The chosen subcommand: the first argument that names one.
        let Some(sub) = argv
            .iter()
            .skip(1)
            .find_map(|a| command.find_subcommand(a.to_string_lossy().as_ref()))
        else {
            return Ok((argv, Origins::default()));
        };
        let name = sub.get_name().to_string();
        let mut settings: BTreeMap<String, (String, toml::Value)> = BTreeMap::new();
        for (key, value) in &table {
            if !matches!(value, toml::Value::Table(_)) && has_flag(sub, key) {
                settings.insert(key.clone(), (key.clone(), value.clone()));
            }
        }
        if let Some(toml::Value::Table(section)) = table.get(&name) {
            for (key, value) in section {
                settings.insert(key.clone(), (format!("{name}.{key}"), value.clone()));
            }
        }
        // A command that inspects a deployment reads what describes it from the relays'
        // tables too, where neither the top level nor its own table says it.
        if INSPECTORS.contains(&name.as_str()) {
            for (key, sources) in DESCRIBED_BY_RELAYS {
                if settings.contains_key(*key) || !has_flag(sub, key) {
                    continue;
                }
                let found = sources.iter().find_map(|(relay, relay_key)| {
                    let toml::Value::Table(section) = table.get(*relay)? else {
                        return None;
                    };
                    let value = section.get(*relay_key)?;
                    Some((format!("{relay}.{relay_key}"), value.clone()))
                });
                if let Some(found) = found {
                    settings.insert(key.to_string(), found);
                }
            }
            // A file that runs direct mode and no Kafka relay describes a deployment
            // without Kafka: its inspection skips Kafka as `--no-kafka` would.
            let relays = |name: &str| matches!(table.get(name), Some(toml::Value::Table(_)));
            if relays("direct")
                && !relays("connector")
                && !relays("sink")
                && has_flag(sub, "no_kafka")
                && !settings.contains_key("no_kafka")
            {
                settings.insert(
                    "no_kafka".into(),
                    ("[direct] without [connector] or [sink]".into(), true.into()),
                );
            }
        }

        let given: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut origins = Origins {
            path: path.to_path_buf(),
            keys: BTreeMap::new(),
        };
        for (key, (origin, value)) in settings {
            let long = key.replace('_', "-");
            let Some(arg) = sub
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()))
            else {
                continue;
            };
            let flag = format!("--{long}");
            let on_command_line = given
                .iter()
                .any(|g| *g == flag || g.starts_with(&format!("{flag}=")));
            let in_environment = arg
                .get_env()
                .is_some_and(|env| std::env::var_os(env).is_some());
            if on_command_line || in_environment {
                continue;
            }
            let wrong_type = |expected| ConfigError::WrongType {
                path: path.to_path_buf(),
                key: origin.clone(),
                expected,
                found: type_name(&value),
            };
            if let (ArgAction::Append, toml::Value::Array(_) | toml::Value::Table(_)) =
                (arg.get_action(), &value)
            {
                // A repeatable flag: one value per item; a table (a `[[route]]`, or one
                // `route = {…}`) as an inline TOML table on one line.
                let items = match &value {
                    toml::Value::Array(items) => items.clone(),
                    table => vec![table.clone()],
                };
                for item in &items {
                    let text = match item {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Table(t) => inline_table(t),
                        other => other.to_string(),
                    };
                    argv.push(format!("{flag}={text}").into());
                }
                origins.keys.insert(long, origin);
                continue;
            }
            if matches!(arg.get_action(), ArgAction::SetTrue) {
                match value {
                    toml::Value::Boolean(true) => argv.push(flag.into()),
                    toml::Value::Boolean(false) => {}
                    _ => return Err(wrong_type("a boolean")),
                }
            } else {
                let text = match &value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    _ => return Err(wrong_type("a string, a number or a boolean")),
                };
                argv.push(format!("{flag}={text}").into());
            }
            origins.keys.insert(long, origin);
        }
        Ok((argv, origins))
    }
}

/// The reference of every setting, as Markdown: `docs/configuration.md` is this text
/// (`outbox-relay config-reference > docs/configuration.md`; a test keeps them equal).
pub fn reference(command: &clap::Command) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Generated by `outbox-relay config-reference > docs/configuration.md`; a test keeps it current. -->\n\n\
         Every setting can be given three ways; the first found wins:\n\n\
         1. a flag on the command line (`--batch-size 5000`);\n\
         2. its environment variable (`OUTBOX_RELAY_BATCH_SIZE=5000`), where it has one;\n\
         3. the TOML file named by `--config FILE` or `OUTBOX_RELAY_CONFIG`, with the flag's name in\n   \
            snake_case as the key, at the top level (for every command that has the setting) or in a\n   \
            table named after the command (for that command only);\n\n\
         and otherwise the default, which points at the local stack (`scripts/stack up`).\n\
         Unknown keys and values of the wrong type are refused with an error that names the key.\n\n\
         The key follows the flag, not the variable. `direct`'s slot is its `--slot`\n\
         (`OUTBOX_RELAY_DIRECT_SLOT`), so its key is `slot`: a top-level `slot` names the\n\
         connector's and direct mode's slot alike, while `status` and `check` read direct mode's\n\
         as `direct_slot`. Put `slot` under `[connector]` and `[direct]` when both run. Likewise\n\
         the sink's `--batch-size` is the key `batch_size` but the variable\n\
         `OUTBOX_RELAY_SINK_BATCH_SIZE`.\n\n\
         A repeatable flag takes an array in the file (`kafka_property = [\"a=b\", \"c=d\"]`,\n\
         `[[route]]` and `[[inbox]]` tables). Its variable holds several values only where the\n\
         table says so: `;`-separated for `--kafka-property`, one per line for `--route`;\n\
         `OUTBOX_RELAY_INBOX` and `OUTBOX_RELAY_CONSUMER_PROPERTY` hold one value each (an\n\
         inbox's handler may span lines).\n\n\
         `check`, `status`, `verify` and `reconcile` inspect the deployment the file describes: a\n\
         key they have that is neither at the top level nor in their own table is read from the\n\
         relays' tables, the first found of: `route` from `[connector]`, then `[direct]`;\n\
         `inbox` from `[sink]`, then `[direct]`; `topic` from `[connector]`, then `[sink]`;\n\
         `publication` and `table` from `[connector]`, then `[direct]`; `slot`,\n\
         `progress_topic` and `dead_letter_topic` from `[connector]`; `direct_slot` from\n\
         `[direct]`'s `slot`. So `[[sink.inbox]]` tables are the inboxes `verify` compares.\n\
         A file with a `[direct]` table and neither `[connector]` nor `[sink]` describes a\n\
         deployment without Kafka: `check` and `status` skip Kafka as with `--no-kafka`.\n\n\
         ```toml\n\
         # relay.toml\n\
         source_url = \"postgres://relay:secret@db1:5432/app\"\n\
         target_url = \"postgres://relay:secret@db2:5432/inbox\"\n\
         brokers = \"k1:9092,k2:9092,k3:9092\"\n\n\
         [connector]\n\
         slot = \"outbox_relay\"\n\
         batch_size = 5000\n\n\
         [sink]\n\
         group = \"outbox-relay-sink\"\n\
         ```\n\n\
         Global: `--config FILE` (`OUTBOX_RELAY_CONFIG`), `--log-format text|json` (`OUTBOX_RELAY_LOG_FORMAT`);\n\
         the log filter is `OUTBOX_RELAY_LOG` (tracing's EnvFilter syntax, default `info`).\n",
    );
    let mut subcommands: Vec<&clap::Command> = command
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .collect();
    subcommands.sort_by_key(|s| s.get_name());
    for sub in subcommands {
        let _ = write!(out, "\n## `{}`\n\n", sub.get_name());
        if let Some(about) = sub.get_about() {
            let _ = write!(out, "{about}\n\n");
        }
        out.push_str("| key | flag | environment | default | meaning |\n|---|---|---|---|---|\n");
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") || arg.is_global_set() {
                continue;
            }
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",");
            // Defaults under the source tree (the chaos runner's stack script) are shown
            // relative to it, so that the reference is the same in every checkout.
            let default = default.replace(env!("CARGO_MANIFEST_DIR"), "<repo>");
            let default = if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
                "false".to_string()
            } else if default.is_empty() {
                "—".to_string()
            } else {
                format!("`{default}`")
            };
            let help = arg
                .get_help()
                .map(|h| h.to_string().replace('\n', " ").replace('|', "\\|"))
                .unwrap_or_default();
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_else(|| "—".into());
            let _ = writeln!(
                out,
                "| `{}` | `--{long}` | {env} | {default} | {help} |",
                long.replace('-', "_")
            );
        }
    }
    out
}

/// Flags that ask for a one-time action: an environment variable left set would repeat
/// it at every restart of a container, so they have none.
const ONE_SHOT: [&str; 7] = [
    "help",
    "version",
    "from-beginning",
    "from-offset",
    "from-timestamp",
    "from-lsn",
    "dry-run",
];

/// Gives every long flag of every command an environment variable: the one declared,
/// or `OUTBOX_RELAY_` + the flag in upper snake case (`--batch-size` →
/// `OUTBOX_RELAY_BATCH_SIZE`), except the one-shot flags. One rule, so that every
/// setting can come from the environment of a container.
pub fn with_env_vars(command: clap::Command) -> clap::Command {
    fn add(arg: clap::Arg) -> clap::Arg {
        match arg.get_long() {
            Some(long) if arg.get_env().is_none() && !ONE_SHOT.contains(&long) => {
                let name = format!("OUTBOX_RELAY_{}", long.to_uppercase().replace('-', "_"));
                arg.env(name)
            }
            _ => arg,
        }
    }
    command
        .mut_args(add)
        .mut_subcommands(|sub| sub.mut_args(add))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::path::Path;

    use clap::{Args, Command};

    use super::file::{merge_text, ConfigError};

    /// The commands without their environment variables, so that a developer's
    /// `OUTBOX_RELAY_*` (from `scripts/stack env`) cannot change what the tests see.
    fn cli() -> Command {
        let hermetic = |c: Command| c.mut_args(|a| a.env(None));
        Command::new("outbox-relay")
            .subcommand(hermetic(crate::connector::ConnectorArgs::augment_args(
                Command::new("connector"),
            )))
            .subcommand(hermetic(crate::direct::DirectArgs::augment_args(
                Command::new("direct"),
            )))
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn merged(args: &[&str], text: &str) -> Result<Vec<String>, ConfigError> {
        merge_text(&cli(), argv(args), Path::new("relay.toml"), text).map(|(v, _)| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn top_level_and_command_keys_become_flags_under_the_command_line() {
        let text = r#"
            source_url = "postgres://a@h/db"
            [connector]
            slot = "s1"
            batch_size = 100
            no_create_slot = true
            [direct]
            slot = "d1"
        "#;
        let args = merged(&["outbox-relay", "connector", "--batch-size", "7"], text).unwrap();
        assert!(args.contains(&"--source-url=postgres://a@h/db".to_string()));
        assert!(args.contains(&"--slot=s1".to_string()));
        assert!(args.contains(&"--no-create-slot".to_string()));
        assert!(
            !args.iter().any(|a| a == "--batch-size=100"),
            "the flag wins: {args:?}"
        );
        assert!(!args.iter().any(|a| a == "--slot=d1"));
    }

    #[test]
    fn route_tables_become_one_route_flag_each() {
        let text = r#"
            [[route]]
            table = "public.outbox"
            preset = "event-router"

            [[route]]
            message_prefix = "orders"
            topic = "orders.${type}"
            headers = { "event-type" = "type" }
        "#;
        let args = merged(&["outbox-relay", "connector"], text).unwrap();
        let routes: Vec<crate::route::RouteSpec> = args
            .iter()
            .filter_map(|a| a.strip_prefix("--route="))
            .map(|r| crate::route::RouteSpec::parse(r).unwrap())
            .collect();
        assert_eq!(routes.len(), 2, "{args:?}");
        assert_eq!(
            routes[0],
            crate::route::RouteSpec::event_router("public.outbox")
        );
        assert_eq!(routes[1].message_prefix.as_deref(), Some("orders"));
        assert_eq!(routes[1].topic.as_deref(), Some("orders.${type}"));
        assert_eq!(
            routes[1]
                .headers
                .as_ref()
                .unwrap()
                .get("event-type")
                .map(String::as_str),
            Some("type")
        );
        // And the command line parses them.
        let matches = cli().try_get_matches_from(&args).unwrap();
        let (_, sub) = matches.subcommand().unwrap();
        assert_eq!(
            sub.get_many::<crate::route::RouteSpec>("routes")
                .unwrap()
                .count(),
            2
        );
    }

    #[test]
    fn one_table_for_a_repeatable_key_is_one_value() {
        let text = r#"
            [connector]
            route = { table = "public.outbox", preset = "event-router" }
        "#;
        let args = merged(&["outbox-relay", "connector"], text).unwrap();
        let routes: Vec<_> = args.iter().filter(|a| a.starts_with("--route=")).collect();
        assert_eq!(routes.len(), 1, "{args:?}");
        let route = crate::route::RouteSpec::parse(routes[0].strip_prefix("--route=").unwrap());
        assert_eq!(
            route.unwrap(),
            crate::route::RouteSpec::event_router("public.outbox")
        );
    }

    #[test]
    fn inspectors_read_the_routes_and_inboxes_the_relays_tables_declare() {
        let hermetic = |c: Command| c.mut_args(|a| a.env(None));
        let cli = cli()
            .subcommand(hermetic(crate::sink::SinkArgs::augment_args(Command::new(
                "sink",
            ))))
            .subcommand(hermetic(crate::cmd::verify::VerifyArgs::augment_args(
                Command::new("verify"),
            )))
            .subcommand(hermetic(crate::cmd::status::StatusArgs::augment_args(
                Command::new("status"),
            )));
        let merged = |args: &[&str], text: &str| -> Vec<String> {
            merge_text(&cli, argv(args), Path::new("relay.toml"), text)
                .unwrap()
                .0
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let text = r#"
            [connector]
            progress_topic = "progress"
            slot = "s1"
            [[connector.route]]
            table = "public.outbox"
            preset = "event-router"
            [direct]
            slot = "s2"
            [[sink.inbox]]
            table = "inbox.events"
        "#;
        let verify = merged(&["outbox-relay", "verify"], text);
        assert!(
            verify
                .iter()
                .any(|a| a.starts_with("--route=") && a.contains("public.outbox"))
                && verify
                    .iter()
                    .any(|a| a.starts_with("--inbox=") && a.contains("inbox.events")),
            "{verify:?}"
        );
        let status = merged(&["outbox-relay", "status"], text);
        for flag in ["--progress-topic=progress", "--slot=s1", "--direct-slot=s2"] {
            assert!(status.iter().any(|a| a == flag), "{flag}: {status:?}");
        }
        // The top level, the command's own table and the command line come first.
        let own = format!("{text}\n[[verify.inbox]]\ntable = \"inbox.mine\"\n");
        let verify = merged(&["outbox-relay", "verify"], &own);
        let inboxes: Vec<_> = verify
            .iter()
            .filter(|a| a.starts_with("--inbox="))
            .collect();
        assert!(
            inboxes.len() == 1 && inboxes[0].contains("inbox.mine"),
            "{verify:?}"
        );
        let status = merged(&["outbox-relay", "status", "--slot", "s9"], text);
        assert!(!status.iter().any(|a| a == "--slot=s1"), "{status:?}");
        // A file with direct mode and no Kafka relay is inspected without Kafka.
        let no_kafka = |argv: &[String]| argv.iter().any(|a| a.starts_with("--no-kafka"));
        assert!(!no_kafka(&status), "{status:?}");
        let direct_only = merged(&["outbox-relay", "status"], "[direct]\nslot = \"s2\"\n");
        assert!(no_kafka(&direct_only), "{direct_only:?}");
        // A relay reads only its own tables and the top level.
        let direct = merged(&["outbox-relay", "direct"], text);
        assert!(
            !direct
                .iter()
                .any(|a| a.starts_with("--inbox=") || a.starts_with("--route=")),
            "{direct:?}"
        );
    }

    #[test]
    fn inbox_tables_with_multi_line_handlers_become_one_inbox_flag_each() {
        let text = r#"
            [[inbox]]
            table = "inbox.events"
            topics = ["^outbox\\.event\\..*"]
            handler = """
            UPDATE inbox.counters c
            SET n = c.n + 1
            FROM new_events e WHERE e.id = c.id"""
            [inbox.columns]
            event_id = "$header.id"

            [[inbox]]
            profile = "ledger"
        "#;
        let args = merged(&["outbox-relay", "direct"], text).unwrap();
        let inboxes: Vec<crate::inbox::InboxSpec> = args
            .iter()
            .filter_map(|a| a.strip_prefix("--inbox="))
            .map(|r| crate::inbox::InboxSpec::parse(r).unwrap())
            .collect();
        assert_eq!(inboxes.len(), 2, "{args:?}");
        let handler = inboxes[0].handler.as_deref().unwrap();
        assert!(handler.contains("SET n = c.n + 1\n"), "{handler:?}");
        assert_eq!(
            inboxes[0].topics.as_deref(),
            Some(&["^outbox\\.event\\..*".to_string()][..])
        );
        assert_eq!(
            inboxes[0].columns.as_ref().unwrap()["event_id"],
            "$header.id"
        );
        assert_eq!(inboxes[1].profile, Some(crate::inbox::Profile::Ledger));
        let matches = cli().try_get_matches_from(&args).unwrap();
        let (_, sub) = matches.subcommand().unwrap();
        assert_eq!(
            sub.get_many::<crate::inbox::InboxSpec>("inboxes")
                .unwrap()
                .count(),
            2
        );
    }

    #[test]
    fn unknown_keys_and_tables_are_refused_by_name() {
        let error = merged(
            &["outbox-relay", "connector"],
            "[connector]\nbach_size = 1\n",
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("unknown key `connector.bach_size`"),
            "{error}"
        );
        let error =
            merged(&["outbox-relay", "connector"], "[conector]\nslot = \"x\"\n").unwrap_err();
        assert!(
            error.to_string().contains("unknown key `conector`"),
            "{error}"
        );
        let error = merged(&["outbox-relay", "connector"], "sloot = \"x\"\n").unwrap_err();
        assert!(error.to_string().contains("unknown key `sloot`"), "{error}");
    }

    #[test]
    fn values_of_the_wrong_type_are_refused_by_name() {
        let error = merged(
            &["outbox-relay", "connector"],
            "[connector]\nno_create_slot = \"yes\"\n",
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("key `connector.no_create_slot` must be a boolean"),
            "{error}"
        );
        let error = merged(
            &["outbox-relay", "connector"],
            "[connector]\nslot = [1, 2]\n",
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("key `connector.slot` must be"),
            "{error}"
        );
        let error = merged(&["outbox-relay", "connector"], "[connector\nslot = 1\n").unwrap_err();
        assert!(error.to_string().contains("not valid TOML"), "{error}");
    }
}
