//! `outbox-relay check`: validates the configuration and connects to everything it
//! names, printing one line per check (ok, or what to fix); exits non-zero on any
//! failure. It changes nothing: no slot, publication or topic is created.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::config::{KafkaArgs, OutboxArgs, SlotsArgs, SourceArgs, TargetArgs};
use crate::inbox::{self, InboxSpec, Inboxes};
use crate::kafka;
use crate::pg;
use crate::record::decode::Format;
use crate::route::{Rendered, Route, RouteArgs, RouteSource};
use crate::source::{self, TableName};

/// Options of `outbox-relay check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub slots: SlotsArgs,
    #[command(flatten)]
    pub outbox: OutboxArgs,
    #[command(flatten)]
    pub route: RouteArgs,
    #[command(flatten)]
    pub transaction_timeout: crate::connector::TransactionTimeout,
    /// An inbox, as the sink's (docs/sink.md, "Inboxes"); `[[inbox]]` in the
    /// configuration file. With any, each is checked against pg_end as the sink checks
    /// it at start (table, id, columns, and the statements as PostgreSQL plans them),
    /// instead of the seed's ledger tables (still checked when an inbox is `profile =
    /// "ledger"`).
    #[arg(long = "inbox", value_parser = InboxSpec::parse)]
    pub inboxes: Vec<InboxSpec>,
    /// Skip the Kafka checks (a direct-mode deployment): only direct mode's slot is
    /// checked, and a route's topic must be taken by an inbox. Implied by a
    /// configuration file with `[direct]` and neither `[connector]` nor `[sink]`.
    #[arg(long)]
    pub no_kafka: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckLine {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

fn line(check: &str, result: Result<String, String>) -> CheckLine {
    match result {
        Ok(detail) => CheckLine {
            check: check.into(),
            ok: true,
            detail,
        },
        Err(detail) => CheckLine {
            check: check.into(),
            ok: false,
            detail,
        },
    }
}

/// Runs every check; each failure is a line, never an early return.
pub async fn run(args: &CheckArgs) -> Vec<CheckLine> {
    let mut lines = Vec::new();
    // Without Kafka, a route or inbox without a topic means the table's name, as in
    // direct mode.
    let default_topic = if args.no_kafka {
        &args.outbox.table
    } else {
        &args.kafka.topic
    };
    let routes = match args.route.resolve(&args.outbox.table, default_topic) {
        Ok(routes) => routes,
        Err(e) => {
            lines.push(line("config: routes", Err(e.to_string())));
            Vec::new()
        }
    };
    source_checks(args, &routes, &mut lines).await;
    target_checks(args, default_topic, &routes, &mut lines).await;
    if !args.no_kafka {
        let mut topics: Vec<String> = routes
            .iter()
            .filter_map(|r| r.topic.literal().map(str::to_string))
            .collect();
        topics.dedup();
        kafka_checks(args, &topics, &mut lines).await;
    }
    lines
}

/// Connects to `url` and reports it as the line `check` (the URL without its
/// password, or why not); `None` when the connection failed.
async fn connect(
    check: &str,
    url: &str,
    lines: &mut Vec<CheckLine>,
) -> Option<tokio_postgres::Client> {
    match pg::connect(url).await {
        Ok(c) => {
            lines.push(line(check, Ok(pg::redact_url(url))));
            Some(c)
        }
        Err(e) => {
            lines.push(line(
                check,
                Err(format!(
                    "{}: {}",
                    pg::redact_url(url),
                    crate::error::error_chain(&e)
                )),
            ));
            None
        }
    }
}

async fn source_checks(args: &CheckArgs, routes: &[Route], lines: &mut Vec<CheckLine>) {
    let url = &args.source.source_url;
    let Some(client) = connect("pg_start: connect", url, lines).await else {
        return;
    };
    let err = |e: source::SourceError| crate::error::error_chain(&e);
    lines.push(line(
        "pg_start: version",
        source::check_version(&client)
            .await
            .map(|v| format!("server_version_num {v}"))
            .map_err(err),
    ));
    lines.push(line(
        "pg_start: wal_level",
        source::check_wal_level(&client)
            .await
            .map(|()| "logical".into())
            .map_err(err),
    ));
    lines.push(line(
        "pg_start: primary",
        source::check_primary(&client)
            .await
            .map(|()| "not in recovery".into())
            .map_err(err),
    ));
    lines.push(line(
        "pg_start: replication role",
        source::check_replication_role(&client).await.map_err(err),
    ));
    let tables: Vec<TableName> = routes
        .iter()
        .filter_map(|r| match &r.source {
            RouteSource::Table(t) => Some(t.clone()),
            RouteSource::Message(_) => None,
        })
        .collect();
    for route in routes {
        route_checks(&client, route, lines).await;
    }
    let listed = tables
        .iter()
        .map(TableName::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let publication = &args.outbox.publication;
    let result = match publication_creatable(&client, publication, &tables).await {
        // Absent, and the connector's role may create it: as for the slot, the first
        // start does (unless the connector runs with --no-create-publication).
        Ok(Some(true)) => Ok(format!(
            "absent: created at the first start, with {}",
            if tables.is_empty() {
                "no table (messages only)"
            } else {
                &listed
            }
        )),
        Ok(Some(false)) if tables.is_empty() => Err(format!(
            "publication {publication} does not exist, and this role cannot create it (it \
             needs CREATE on the database): as the database's owner, run \
             CREATE PUBLICATION {publication} WITH (publish = 'insert')"
        )),
        Ok(Some(false)) => Err(format!(
            "publication {publication} does not exist, and this role cannot create it (it \
             needs ownership of {listed} and CREATE on the database): as their owner, run \
             CREATE PUBLICATION {publication} FOR TABLE {listed} WITH (publish = 'insert')"
        )),
        Ok(None) => source::check_publication(&client, &tables, publication, false)
            .await
            .map(|()| match tables.len() {
                0 => format!("{publication} exists (messages only)"),
                _ => format!("{publication} publishes inserts of {listed}"),
            })
            .map_err(err),
        Err(e) => Err(crate::error::error_chain(&e)),
    };
    lines.push(line("pg_start: publication", result));
    let database = source::database_of(url).unwrap_or_default();
    // Without Kafka, no connector runs: only direct mode's slot is the deployment's.
    let slots: Vec<&str> = if args.no_kafka {
        vec![&args.slots.direct_slot]
    } else {
        vec![&args.slots.slot, &args.slots.direct_slot]
    };
    for &slot in &slots {
        let result = match source::slot_state(&client, slot).await {
            Ok(None) => Ok("absent: created at the first start".to_string()),
            Ok(Some(state)) => source::check_slot(slot, &state, &database)
                .map(|()| {
                    format!(
                        "confirmed {}, wal_status {}, {}",
                        state
                            .confirmed_flush_lsn
                            .map(|l| l.to_string())
                            .unwrap_or_default(),
                        state.wal_status.unwrap_or_default(),
                        match state.active_pid {
                            Some(pid) => format!("held by pid {pid}"),
                            None => "inactive".into(),
                        }
                    )
                })
                .map_err(err),
            Err(e) => Err(err(e)),
        };
        lines.push(line(&format!("pg_start: slot {slot}"), result));
    }
    // Informational: what invalidates a slot, so the operator can size it against how
    // long a relay may be down.
    lines.push(CheckLine {
        check: "pg_start: slot retention".into(),
        ok: true,
        detail: source::slot_retention(&client)
            .await
            .unwrap_or_else(|e| format!("unknown: {}", err(e))),
    });
    // Informational: most deployments have no standby of pg_start, and the relay runs
    // the same either way (a lost slot is detected and stops it).
    let failover = source::failover_readiness(&client, &slots).await;
    lines.push(CheckLine {
        check: "pg_start: failover slots".into(),
        ok: true,
        detail: match failover {
            Ok(ready) => ready,
            Err(missing) => format!("not ready for a promotion: {missing}"),
        },
    });
}

/// One route: its table, whether the route fits the table's columns and types, and
/// what it would produce for one row of the table.
async fn route_checks(client: &tokio_postgres::Client, route: &Route, lines: &mut Vec<CheckLine>) {
    let name = format!("route {}", route.source);
    let table = match &route.source {
        RouteSource::Table(table) => table,
        RouteSource::Message(_) => {
            lines.push(line(
                &name,
                Ok(format!(
                    "transactional messages, routed by their JSON fields to {}",
                    route.topic
                )),
            ));
            return;
        }
    };
    let columns = match source::outbox_columns(client, table).await {
        Ok(columns) => columns,
        Err(e) => {
            lines.push(line(&name, Err(crate::error::error_chain(&e))));
            return;
        }
    };
    let bound = route.bind(&columns);
    let fits = match bound.unusable() {
        Some(problem) => Err(format!("{problem}: every row would be a dead letter")),
        None => payload_fits(route, &columns).map(|()| {
            format!(
                "{table} ({}) → {}",
                columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                route.topic
            )
        }),
    };
    let usable = fits.is_ok();
    lines.push(line(&name, fits));
    if !usable {
        return;
    }
    // One row, read as the replication session prints it.
    let select = format!(
        "SET datestyle = 'ISO, MDY'; SET extra_float_digits = 3; SET TimeZone = 'UTC'; \
         SELECT {} FROM {} LIMIT 1",
        columns
            .iter()
            .map(|c| format!("{}::text", source::quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", "),
        table.quoted()
    );
    let sample = match client.simple_query(&select).await {
        Err(e) => Err(crate::error::error_chain(&e)),
        Ok(messages) => {
            let row = messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            });
            Ok(match row {
                None => "the table is empty: no row to show".to_string(),
                Some(row) => {
                    let values: Vec<Option<&[u8]>> = (0..columns.len())
                        .map(|i| row.get(i).map(str::as_bytes))
                        .collect();
                    describe(bound.render(&values, None))
                }
            })
        }
    };
    lines.push(line(&format!("{name}: sample"), sample));
}

/// Whether the payload column's type fits the declared payload format.
fn payload_fits(route: &Route, columns: &[crate::source::ColumnDef]) -> Result<(), String> {
    use crate::route::{PayloadFormat, ValueKind};
    if route.value != ValueKind::Payload {
        return Ok(());
    }
    let Some(column) = columns.iter().find(|c| c.name == route.payload) else {
        return Ok(());
    };
    // json, jsonb, bytea, text, varchar, bpchar, name.
    let textual = [114, 3802, 17, 25, 1043, 1042, 19].contains(&column.type_oid);
    match route.payload_format {
        PayloadFormat::Json | PayloadFormat::Bytes if !textual => Err(format!(
            "the payload column {} (type oid {}) cannot hold {:?} content: use a json, jsonb, \
             bytea or text column, or payload_format = \"auto\"",
            column.name, column.type_oid, route.payload_format
        )),
        _ => Ok(()),
    }
}

/// What a rendered row would be, on one line.
fn describe(rendered: Rendered<'_>) -> String {
    let text = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        if s.chars().count() > 120 {
            format!("{}…", s.chars().take(120).collect::<String>())
        } else {
            s.into_owned()
        }
    };
    match rendered {
        Rendered::Dead { reason } => format!("this row would be a dead letter: {reason}"),
        Rendered::Record {
            topic,
            key,
            value,
            headers,
            ..
        } => {
            let mut out = format!(
                "topic {topic}, key {}, value {}",
                key.map_or("(none)".into(), text),
                value.as_deref().map_or("(null)".into(), text)
            );
            for (name, v) in headers {
                out.push_str(&format!(
                    ", header {name}={}",
                    v.map_or("(null)".into(), text)
                ));
            }
            out
        }
    }
}

/// `None` when `publication` exists; otherwise whether the session's role may create
/// it for `tables` (superuser, or owner of every table, and CREATE on the database).
/// The tables are looked up by name in the catalog, which needs no privilege on their
/// schemas; a table that does not exist makes it `false` (and its route's check says
/// why).
async fn publication_creatable(
    client: &tokio_postgres::Client,
    publication: &str,
    tables: &[TableName],
) -> Result<Option<bool>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await?
        .get(0);
    if exists {
        return Ok(None);
    }
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let creatable: bool = client
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 OR (has_database_privilege(current_database(), 'CREATE')
                     AND coalesce((SELECT bool_and(c.oid IS NOT NULL
                                                   AND pg_has_role(current_user, c.relowner, 'USAGE'))
                                   FROM unnest($1::text[], $2::text[]) AS t(schema, name)
                                   LEFT JOIN pg_namespace n ON n.nspname = t.schema
                                   LEFT JOIN pg_class c
                                          ON c.relnamespace = n.oid AND c.relname = t.name), true))",
            &[&schemas, &names],
        )
        .await?
        .get(0);
    Ok(Some(creatable))
}

async fn target_checks(
    args: &CheckArgs,
    default_topic: &str,
    routes: &[Route],
    lines: &mut Vec<CheckLine>,
) {
    let url = &args.target.target_url;
    let Some(mut client) = connect("pg_end: connect", url, lines).await else {
        return;
    };
    let ledger = args.inboxes.is_empty()
        || args
            .inboxes
            .iter()
            .any(|i| i.profile == Some(inbox::Profile::Ledger));
    let ledger_tables: &[&str] = if ledger {
        &["main.transactions", "main.balance"]
    } else {
        &[]
    };
    let relay_tables = [
        "outbox_relay.sink_offsets",
        "outbox_relay.direct_progress",
        "outbox_relay.dead_letters",
    ];
    for &table in ledger_tables.iter().chain(&relay_tables) {
        let exists = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map(|r| r.get::<_, bool>(0));
        let result = match exists {
            Ok(true) => Ok("present".into()),
            Ok(false) if ledger => Err("missing: run `outbox-relay migrate`".into()),
            Ok(false) => Err("missing: run `outbox-relay migrate --relay-only`".into()),
            Err(e) => Err(crate::error::error_chain(&e)),
        };
        lines.push(line(&format!("pg_end: table {table}"), result));
    }
    if args.inboxes.is_empty() {
        return;
    }
    match Inboxes::bind(&args.inboxes, &mut client, default_topic, Format::Auto).await {
        Ok(mut inboxes) => {
            for inbox in &inboxes.inboxes {
                lines.push(line(
                    &format!("pg_end: inbox {}", inbox.name),
                    Ok(format!("topics {}", inbox.topics.all().join(", "))),
                ));
            }
            // Which inbox takes each route's topic. Without Kafka (direct mode) a
            // topic no inbox takes is refused at start; with Kafka, the sink just
            // does not read it (another consumer may).
            for route in routes {
                let Some(topic) = route.topic.literal() else {
                    continue;
                };
                let source = route.source.to_string();
                let result = match inboxes.untaken(topic, &source) {
                    None => Ok(format!(
                        "{topic} → inbox {}",
                        inboxes.for_topic(topic).map_or("", |i| i.name.as_str())
                    )),
                    Some(problem) if args.no_kafka => Err(problem),
                    Some(_) => Ok(format!("{topic}: no inbox of this sink reads it")),
                };
                lines.push(line(&format!("route {source}: inbox"), result));
            }
        }
        Err(e) => lines.push(line("pg_end: inboxes", Err(crate::error::error_chain(&e)))),
    }
}

async fn kafka_checks(args: &CheckArgs, topics: &[String], lines: &mut Vec<CheckLine>) {
    let brokers = args.kafka.brokers.clone();
    let metadata = tokio::task::spawn_blocking({
        let (brokers, topics) = (brokers.clone(), topics.to_vec());
        move || {
            let consumer: BaseConsumer<kafka::LastClientError> = kafka::client_config(&brokers)
                .create_with_context(kafka::LastClientError::default())
                .map_err(|e| e.to_string())?;
            let all = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .map_err(|e| kafka::metadata_failure(&consumer, &e))?;
            let brokers: Vec<i32> = all.brokers().iter().map(|b| b.id()).collect();
            let partitions: Vec<Option<Vec<usize>>> = topics
                .iter()
                .map(|topic| {
                    all.topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .filter(|t| t.error().is_none())
                        .map(|t| t.partitions().iter().map(|p| p.replicas().len()).collect())
                })
                .collect();
            Ok::<_, String>((brokers, partitions))
        }
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let (broker_ids, partitions) = match metadata {
        Ok(m) => m,
        Err(e) => {
            lines.push(line("kafka: brokers", Err(format!("{brokers}: {e}"))));
            return;
        }
    };
    lines.push(line(
        "kafka: brokers",
        Ok(format!("{} brokers answer at {brokers}", broker_ids.len())),
    ));
    for (topic, replicas) in topics.iter().zip(partitions) {
        topic_checks(&brokers, topic, replicas, lines).await;
    }
    if let Some(&broker) = broker_ids.first() {
        lines.push(line(
            "kafka: transaction timeout",
            transaction_timeout(&brokers, broker, args.transaction_timeout.get()).await,
        ));
    }
}

/// The producers' `transaction.timeout.ms` against the brokers'
/// `transaction.max.timeout.ms`: the longest a source transaction larger than a batch
/// may take to stream into its one Kafka transaction (it is never split).
async fn transaction_timeout(brokers: &str, broker: i32, ours: Duration) -> Result<String, String> {
    let ours = ours.as_millis() as i64;
    let max: i64 = config_value(
        brokers,
        &ResourceSpecifier::Broker(broker),
        "transaction.max.timeout.ms",
    )
    .await?;
    if ours > max {
        return Err(format!(
            "the connector's --transaction-timeout-ms ({ours} ms) is above the brokers' \
             transaction.max.timeout.ms ({max} ms): its transactional producers cannot start. \
             Lower it, or raise the brokers' setting"
        ));
    }
    Ok(format!(
        "{ours} ms (the brokers allow up to {max} ms): a source transaction larger than a \
         batch must stream into its one Kafka transaction within it, or the brokers abort it \
         and the connector stops saying so; it is never split. Raise \
         --transaction-timeout-ms (up to {max}) for larger ones"
    ))
}

/// One topic's replication and `min.insync.replicas`.
async fn topic_checks(
    brokers: &str,
    topic: &str,
    replicas: Option<Vec<usize>>,
    lines: &mut Vec<CheckLine>,
) {
    let Some(replicas) = replicas else {
        lines.push(line(
            &format!("kafka: topic {topic}"),
            Ok("absent: the connector creates it (3 partitions, replication factor 3)".into()),
        ));
        return;
    };
    let min_rf = replicas.iter().copied().min().unwrap_or(0);
    lines.push(line(
        &format!("kafka: topic {topic}"),
        if min_rf >= 3 {
            Ok(format!("{} partitions, replication factor {min_rf}", replicas.len()))
        } else {
            Err(format!(
                "{} partitions, replication factor {min_rf}: use 3 or more replicas so that one broker can fail",
                replicas.len()
            ))
        },
    ));
    lines.push(line(
        &format!("kafka: topic {topic} min.insync.replicas"),
        min_insync_replicas(brokers, topic).await.and_then(|m| {
            if m >= 2 {
                Ok(format!("{m}"))
            } else {
                Err(format!(
                    "{m}: set min.insync.replicas=2 so that an acknowledged record survives a broker loss"
                ))
            }
        }),
    ));
}

async fn min_insync_replicas(brokers: &str, topic: &str) -> Result<i64, String> {
    config_value(
        brokers,
        &ResourceSpecifier::Topic(topic),
        "min.insync.replicas",
    )
    .await
}

/// A numeric setting of a topic or a broker, as the brokers report it.
async fn config_value(
    brokers: &str,
    resource: &ResourceSpecifier<'_>,
    key: &str,
) -> Result<i64, String> {
    let admin: AdminClient<DefaultClientContext> = kafka::client_config(brokers)
        .create()
        .map_err(|e| e.to_string())?;
    let results = admin
        .describe_configs(
            [resource],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| e.to_string())?;
    let resource = results
        .into_iter()
        .next()
        .ok_or("no answer")?
        .map_err(|e| e.to_string())?;
    resource
        .get(key)
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{key} not reported"))
}

/// Renders the report, one line per check.
pub fn render(lines: &[CheckLine]) -> String {
    lines
        .iter()
        .map(|l| {
            format!(
                "{:<5} {}: {}",
                if l.ok { "ok" } else { "FAIL" },
                l.check,
                l.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
