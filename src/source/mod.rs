//! The source side: checks of pg_start, the replication slot and publication, and the
//! replication session settings.
//!
//! Invariant: a slot is created only when it never existed for this relay. A slot that
//! is missing after the relay used it, or that PostgreSQL invalidated (`wal_status =
//! lost`: its WAL removed, or on 16 and newer a conflict with recovery, `wal_level`
//! lowered, or on 18 `idle_replication_slot_timeout`; see [`invalidation`]), is a
//! [`SourceError::Definite`] error that names the cause and says how to recover:
//! recreating it would silently skip every transaction written in between.

use std::time::Duration;

use pgwire_replication::ReplicationConfig;
use thiserror::Error;
use tokio_postgres::Client;

use crate::error::{self, ErrorClass};
use crate::lsn::Lsn;
use crate::pg;

/// Replication events buffered between the walsender's connection and the pipeline:
/// a whole default batch (5,000 one-row source transactions are ~15,000 events), so
/// that the walsender goes on decoding while the destination commits. ~10 MiB at most
/// with outbox rows.
const READ_AHEAD_EVENTS: usize = 16_384;

#[derive(Debug, Error)]
pub enum SourceError {
    /// A retry may cure it (the server restarting, the network).
    #[error("pg_start is unavailable: {context}")]
    Transient {
        context: String,
        #[source]
        source: Option<tokio_postgres::Error>,
    },
    /// Needs a person; the message says what to do.
    #[error("{0}")]
    Definite(String),
    #[error("{context}")]
    Query {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl SourceError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SourceError::Transient { .. } => ErrorClass::Transient,
            SourceError::Definite(_) => ErrorClass::Definite,
            SourceError::Query { source, .. } => error::pg::classify(source),
        }
    }

    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| SourceError::Query { context, source }
    }
}

/// A schema-qualified table name, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` (or `table`, meaning `public.table`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (schema, name) = match text.split_once('.') {
            Some((s, n)) => (s, n),
            None => ("public", text),
        };
        for part in [schema, name] {
            validate_identifier(part)?;
        }
        Ok(Self {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// The name quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Names from the configuration used in SQL: letters, digits, `_` and `$`, at most 63
/// bytes, not starting with a digit. Anything else is refused before it reaches SQL.
pub fn validate_identifier(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use letters, digits, '_' or '$' (at most 63, not starting with a digit)"
        ))
    }
}

/// Double-quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A published column of the outbox table, in table order: its name and type OID,
/// as the catalog lists it for the snapshot and as a Relation message sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    pub type_oid: u32,
    /// Part of the table's replica identity key (its primary key by default).
    pub key: bool,
}

impl From<&crate::pgoutput::Column> for ColumnDef {
    fn from(column: &crate::pgoutput::Column) -> Self {
        Self {
            name: column.name.clone(),
            type_oid: column.type_oid,
            key: column.is_key(),
        }
    }
}

/// What the relay needs to know about the source before streaming.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    pub server_version_num: i32,
    /// Each outbox table's columns, in the order the tables were given.
    pub columns: Vec<Vec<ColumnDef>>,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    /// `invalidation_reason` (PostgreSQL 17+; `None` before, and for a valid slot).
    pub invalidation_reason: Option<String>,
    pub active_pid: Option<i32>,
}

/// Why PostgreSQL invalidated a slot, from what `pg_replication_slots` shows of it;
/// `None` for a slot still usable. Every invalidated slot shows `wal_status = lost`
/// (on 16 and newer whatever the cause: seen on 16 for removed WAL and on 18 for
/// `idle_timeout`); 17 and newer name the cause in `invalidation_reason`, which the
/// phrase then names, with the setting behind it. On 14 and 15 the only cause is
/// removed WAL. (16's `conflicting` is true for every invalidated logical slot, so it
/// tells nothing more.)
pub fn invalidation(wal_status: Option<&str>, invalidation_reason: Option<&str>) -> Option<String> {
    let cause = match invalidation_reason {
        Some("wal_removed") => "PostgreSQL removed WAL it still needed (it fell more than \
                               max_slot_wal_keep_size behind)"
            .to_string(),
        Some("rows_removed") => "a conflict with recovery: rows it still needed were removed \
                                (a slot synchronised to a standby without \
                                hot_standby_feedback)"
            .to_string(),
        Some("wal_level_insufficient") => {
            "wal_level on the primary was lowered below logical".to_string()
        }
        Some("idle_timeout") => "it stayed inactive longer than idle_replication_slot_timeout \
                                (raise it, or 0 to turn it off, for slots whose relay may \
                                be down that long)"
            .to_string(),
        Some(other) => format!("PostgreSQL invalidated it (invalidation_reason = {other})"),
        None if wal_status == Some("lost") => "wal_status = lost: PostgreSQL removed WAL it \
                                               still needed (most often: it fell more than \
                                               max_slot_wal_keep_size behind)"
            .to_string(),
        None => return None,
    };
    Some(cause)
}

/// Checks the server version, `wal_level`, the outbox table and the publication
/// (creating the publication if it is missing and `create_publication` is set).
pub async fn check_source(
    client: &Client,
    tables: &[TableName],
    publication: &str,
    create_publication: bool,
) -> Result<SourceInfo, SourceError> {
    let server_version_num = check_version(client).await?;
    check_wal_level(client).await?;
    check_primary(client).await?;
    let mut columns = Vec::with_capacity(tables.len());
    for table in tables {
        columns.push(outbox_columns(client, table).await?);
    }
    check_publication(client, tables, publication, create_publication).await?;
    Ok(SourceInfo {
        server_version_num,
        columns,
    })
}

/// PostgreSQL 14 or newer; returns `server_version_num`.
pub async fn check_version(client: &Client) -> Result<i32, SourceError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(SourceError::query("reading server_version_num"))?
        .get(0);
    if version < 140000 {
        return Err(SourceError::Definite(format!(
            "pg_start runs PostgreSQL {version}; outbox-relay needs PostgreSQL 14 or newer"
        )));
    }
    Ok(version)
}

/// `wal_level = logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), SourceError> {
    let wal_level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(SourceError::query("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::Definite(format!(
            "pg_start has wal_level = {wal_level}; set wal_level = logical in postgresql.conf and restart the server"
        )));
    }
    Ok(())
}

/// pg_start is a primary, not a standby in recovery: the relay's slot, its publication
/// and its writes (backfill, cleanup) live on the primary. Transient: a relay left on
/// one host of a pair after a failover waits there until it is the primary again (a
/// failback), saying what to change meanwhile.
pub async fn check_primary(client: &Client) -> Result<(), SourceError> {
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(SourceError::query("reading pg_is_in_recovery()"))?
        .get(0);
    if in_recovery {
        return Err(SourceError::Transient {
            context: STANDBY_HINT.to_string(),
            source: None,
        });
    }
    Ok(())
}

/// What a relay (or `check`, `status`) pointed at a standby says.
const STANDBY_HINT: &str = "it is a standby (in recovery), and the relay streams \
     from the primary: point --source-url at the primary, or name every host of the pair \
     with target_session_attrs=read-write (docs/operations.md, \"Failover slots\")";

/// The connecting role may open a replication session: it has `REPLICATION` (or is a
/// superuser), or is a member of Amazon RDS's `rds_replication`. Returns how.
pub async fn check_replication_role(client: &Client) -> Result<String, SourceError> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication,
                    coalesce((SELECT pg_has_role(current_user, oid, 'member')
                              FROM pg_roles WHERE rolname = 'rds_replication'), false)
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(SourceError::query("reading the role's attributes"))?;
    let (role, superuser, replication, rds): (String, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    match (superuser, replication, rds) {
        (true, _, _) => Ok(format!("{role} is a superuser")),
        (_, true, _) => Ok(format!("{role} has REPLICATION")),
        (_, _, true) => Ok(format!("{role} is a member of rds_replication")),
        _ => Err(SourceError::Definite(format!(
            "role {role} may not open a replication session: {}",
            REPLICATION_ROLE_HINT.replace("<role>", &role)
        ))),
    }
}

/// What to do when pg_start refuses a replication session to the role.
const REPLICATION_ROLE_HINT: &str = "as a superuser, run ALTER ROLE <role> REPLICATION \
    (sql/roles.sql makes such a role; on Amazon RDS, GRANT rds_replication TO <role>)";

/// Why pg_start refused a replication session for good, as a parenthesis to append
/// (what to do), or `None` for a refusal a retry may cure (too many connections, a
/// server starting or stopping, a slot in use). By the SQLSTATE the server's message
/// ends with: 42501 (the role lacks `REPLICATION`), 28000 (no pg_hba.conf line admits
/// it), 28P01 (wrong password), 3D000 (no such database).
pub fn replication_refused(error: &pgwire_replication::PgWireError) -> Option<String> {
    let pgwire_replication::PgWireError::Server(m) = error else {
        return None;
    };
    let hint = if m.contains("SQLSTATE 42501") {
        format!("the role of --source-url lacks REPLICATION: {REPLICATION_ROLE_HINT}")
    } else if m.contains("SQLSTATE 28000") {
        "pg_start's pg_hba.conf has no line that admits this role, database and host: add \
         one and reload"
            .into()
    } else if m.contains("SQLSTATE 28P01") {
        "check the user and password of --source-url".into()
    } else if m.contains("SQLSTATE 3D000") {
        "the database of --source-url does not exist on pg_start".into()
    } else {
        return None;
    };
    Some(format!(" ({hint})"))
}

/// The outbox table's columns, in table order; an error if it does not exist.
pub async fn outbox_columns(
    client: &Client,
    table: &TableName,
) -> Result<Vec<ColumnDef>, SourceError> {
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8,
                    COALESCE(a.attnum = ANY (i.indkey), false)
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&table.quoted()],
        )
        .await
        .map_err(SourceError::query("reading the outbox table's columns"))?;
    if columns.is_empty() {
        return Err(SourceError::Definite(format!(
            "the outbox table {table} does not exist in pg_start (run `outbox-relay migrate` or set --table)"
        )));
    }
    Ok(columns
        .iter()
        .map(|r| ColumnDef {
            name: r.get(0),
            type_oid: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            key: r.get(2),
        })
        .collect())
}

/// The publication exists, publishes inserts and holds every outbox table (it is
/// created if missing and `create` is set; with no table, for the logical messages
/// alone, it is created empty).
pub async fn check_publication(
    client: &Client,
    tables: &[TableName],
    publication: &str,
    create: bool,
) -> Result<(), SourceError> {
    let listed = tables
        .iter()
        .map(TableName::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    validate_identifier(publication).map_err(SourceError::Definite)?;
    let publishes: Option<bool> = client
        .query_opt(
            "SELECT pubinsert FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(SourceError::query("reading pg_publication"))?
        .map(|r| r.get(0));
    match publishes {
        None if create => {
            let for_tables = if tables.is_empty() {
                String::new()
            } else {
                let quoted: Vec<String> = tables.iter().map(TableName::quoted).collect();
                format!("FOR TABLE {}", quoted.join(", "))
            };
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} {for_tables} WITH (publish = 'insert')",
                    quote_ident(publication),
                ))
                .await
                .map_err(SourceError::query(format!(
                    "creating publication {publication}"
                )))?;
            tracing::info!(publication, tables = %listed, "created publication");
        }
        None => {
            return Err(SourceError::Definite(format!(
                "publication {publication} does not exist in pg_start; create it with \
                 CREATE PUBLICATION {publication} FOR TABLE {listed} WITH (publish = 'insert')"
            )))
        }
        Some(false) => {
            return Err(SourceError::Definite(format!(
                "publication {publication} does not publish inserts; \
                 ALTER PUBLICATION {publication} SET (publish = 'insert')"
            )))
        }
        Some(true) => {}
    }
    for table in tables {
        let in_publication: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                                WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                &[&publication, &table.schema, &table.name],
            )
            .await
            .map_err(SourceError::query("reading pg_publication_tables"))?
            .get(0);
        if !in_publication {
            return Err(SourceError::Definite(format!(
                "the outbox table {table} is not in publication {publication}; \
                 ALTER PUBLICATION {publication} ADD TABLE {table}"
            )));
        }
    }
    Ok(())
}

/// Reads the slot's state; `None` if it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, SourceError> {
    let row = client
        .query_opt(
            // Through to_jsonb, the columns newer servers added read as NULL on older
            // ones: one statement for PostgreSQL 14 to 18.
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, wal_status, active_pid,
                    to_jsonb(s) ->> 'invalidation_reason'
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::query("reading pg_replication_slots"))?;
    Ok(row.map(|r| SlotState {
        plugin: r.get(0),
        database: r.get(1),
        confirmed_flush_lsn: r.get::<_, Option<String>>(2).and_then(|s| s.parse().ok()),
        wal_status: r.get(3),
        active_pid: r.get(4),
        invalidation_reason: r.get(5),
    }))
}

/// What makes pg_start invalidate a slot whose relay is behind or down, in words:
/// `max_slot_wal_keep_size` (WAL a slot may hold back) and, on PostgreSQL 18,
/// `idle_replication_slot_timeout` (how long a slot may go unused).
pub async fn slot_retention(client: &Client) -> Result<String, SourceError> {
    let rows = client
        .query(
            "SELECT name, setting, current_setting(name) FROM pg_settings
             WHERE name IN ('max_slot_wal_keep_size', 'idle_replication_slot_timeout')
             ORDER BY name DESC",
            &[],
        )
        .await
        .map_err(SourceError::query("reading pg_settings"))?;
    let mut parts = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let setting: String = row.get(1);
        let shown: String = row.get(2);
        parts.push(match (name.as_str(), setting.as_str()) {
            ("max_slot_wal_keep_size", "-1") => {
                "max_slot_wal_keep_size unlimited (a relay down long enough fills pg_start's disk)"
                    .to_string()
            }
            ("max_slot_wal_keep_size", _) => {
                format!("max_slot_wal_keep_size {shown} (a slot further behind is invalidated)")
            }
            (_, "0") => "idle_replication_slot_timeout off".to_string(),
            _ => format!(
                "idle_replication_slot_timeout {shown} (a relay down longer loses its slot)"
            ),
        });
    }
    Ok(parts.join("; "))
}

/// The `application_name` of an instance standing by for `slot`: `status` lists the
/// sessions that carry it.
pub fn standby_application_name(slot: &str) -> String {
    format!("outbox-relay standby:{slot}")
}

/// The pid of the session holding `slot` (`None`: free, or missing).
pub async fn slot_holder(client: &Client, slot: &str) -> Result<Option<i32>, SourceError> {
    Ok(client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::query("reading pg_replication_slots"))?
        .and_then(|r| r.get(0)))
}

/// pg_start's `wal_sender_timeout`; `None` when it is off (0).
pub async fn wal_sender_timeout(client: &Client) -> Result<Option<Duration>, SourceError> {
    let millis: i64 = client
        .query_one(
            "SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(SourceError::query("reading wal_sender_timeout"))?
        .get(0);
    Ok((millis > 0).then(|| Duration::from_millis(millis as u64)))
}

/// Whether a replication error is the server refusing a slot that another session
/// holds (SQLSTATE 55006, object_in_use: "replication slot … is active for PID …").
pub fn slot_in_use(error: &pgwire_replication::PgWireError) -> bool {
    matches!(error, pgwire_replication::PgWireError::Server(m) if m.contains("SQLSTATE 55006"))
}

/// Whether the relay's slots would survive a promotion of a pg_start standby
/// (PostgreSQL 17's failover slots): `Ok` says what is set up, `Err` lists exactly what
/// is missing. Only the primary's side can be read from here; the standby's settings
/// are named in the message.
pub async fn failover_readiness(client: &Client, slots: &[&str]) -> Result<String, String> {
    let query = |e: tokio_postgres::Error| crate::error::error_chain(&e);
    let version = check_version(client)
        .await
        .map_err(|e| crate::error::error_chain(&e))?;
    if version < 170000 {
        return Err(format!(
            "PostgreSQL {} has no failover slots: a promotion of a standby loses the \
             slot, and the relay then stops and asks for `reconcile` (PostgreSQL 17 or newer \
             keeps it)",
            version / 10000
        ));
    }
    let mut missing = Vec::new();
    for slot in slots {
        let failover: Option<bool> = client
            .query_opt(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await
            .map_err(query)?
            .map(|r| r.get(0));
        if failover == Some(false) {
            missing.push(format!(
                "slot {slot} was created without FAILOVER (ALTER_REPLICATION_SLOT {slot} \
                 (FAILOVER true) on a replication connection while no relay streams from it)"
            ));
        }
    }
    let standby_slots: String = client
        .query_one(
            "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await
        .map_err(query)?
        .get(0);
    let names: Vec<&str> = standby_slots
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        missing.push(
            "synchronized_standby_slots is empty on pg_start: set it to the standby's physical \
             slot, so that the relay never receives a change the standby has not"
                .into(),
        );
    }
    for name in &names {
        let active: Option<bool> = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'",
                &[name],
            )
            .await
            .map_err(query)?
            .map(|r| r.get(0));
        match active {
            None => missing.push(format!(
                "the physical slot {name} named in synchronized_standby_slots does not exist \
                 (SELECT pg_create_physical_replication_slot('{name}'))"
            )),
            Some(false) => {
                missing.push(format!("no standby streams from the physical slot {name}"))
            }
            Some(true) => {}
        }
    }
    if missing.is_empty() {
        Ok(format!(
            "ready on pg_start (failover slots, synchronized_standby_slots = {standby_slots}); \
             the standby needs sync_replication_slots = on, hot_standby_feedback = on, \
             primary_slot_name and a dbname in primary_conninfo"
        ))
    } else {
        Err(missing.join("; "))
    }
}

/// Checks that an existing slot can be streamed from.
pub fn check_slot(slot: &str, state: &SlotState, database: &str) -> Result<(), SourceError> {
    if state.plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::Definite(format!(
            "slot {slot} uses plugin {:?}, not pgoutput; choose another --slot",
            state.plugin
        )));
    }
    if state.database.as_deref() != Some(database) {
        return Err(SourceError::Definite(format!(
            "slot {slot} belongs to database {:?}, not {database}; choose another --slot",
            state.database
        )));
    }
    if let Some(cause) = invalidation(
        state.wal_status.as_deref(),
        state.invalidation_reason.as_deref(),
    ) {
        return Err(invalidated(slot, &cause));
    }
    Ok(())
}

/// The error for a slot PostgreSQL invalidated (`cause` says why): it needs a person,
/// and says what to do.
pub fn invalidated(slot: &str, cause: &str) -> SourceError {
    SourceError::Definite(format!(
        "slot {slot} is invalidated: {cause}. Transactions it had not yet delivered may \
         never reach the destination (Kafka, or pg_end in direct mode). Recover \
         (docs/operations.md, \"Slot lost or invalidated\"): drop the slot \
         (SELECT pg_drop_replication_slot('{slot}')), start this relay with a new --slot, \
         then run `outbox-relay reconcile` to copy what pg_end lacks"
    ))
}

/// Whether starting the stream failed because the slot is invalidated (SQLSTATE 55000):
/// PostgreSQL 14 and 15 say "cannot read from logical replication slot", 16 and 17
/// "can no longer get changes from replication slot", 18 "can no longer access
/// replication slot". [`check_slot`] sees most such slots before the stream starts;
/// this covers one invalidated in between.
pub fn slot_invalidated(error: &pgwire_replication::PgWireError) -> bool {
    let pgwire_replication::PgWireError::Server(m) = error else {
        return false;
    };
    m.contains("SQLSTATE 55000")
        && (m.contains("can no longer") || m.contains("cannot read from logical replication"))
}

/// Replication session settings for `url`, `slot` and `publication`.
///
/// `wal_sender_timeout` is pg_start's: when it is on, an idle session sends its own
/// status only that often, so that the walsender, hearing nothing for half of it,
/// sends a keepalive that asks for a reply. An idle but healthy stream thus carries a
/// message at least every half `wal_sender_timeout`, and the pipeline takes a silence
/// of a whole one for a dead connection (see `Pipeline::wait`).
pub fn replication_config(
    target: &pg::PgTarget,
    slot: &str,
    publication: &str,
    start: Lsn,
    wal_sender_timeout: Option<Duration>,
) -> ReplicationConfig {
    let config = &target.config;
    let host = target.host().1;
    let password = target
        .password()
        .map(|p| p.expose().to_string())
        .unwrap_or_default();
    let mut replication = ReplicationConfig::new(
        host,
        config.get_user().unwrap_or("postgres"),
        password,
        config.get_dbname().unwrap_or("postgres"),
        slot,
        publication,
    )
    .with_port(target.port())
    .with_start_lsn(pgwire_replication::Lsn::from_u64(start.as_u64()))
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(wal_sender_timeout.unwrap_or(Duration::from_secs(5)))
    .with_buffer_size(READ_AHEAD_EVENTS)
    .with_options("-c datestyle=ISO,MDY -c extra_float_digits=3 -c TimeZone=UTC -c bytea_output=hex -c IntervalStyle=postgres")
    .with_application_name(format!("outbox-relay:{slot}"));
    replication.tls = target.replication_tls();
    replication
}

/// The one server of the source URL the replication stream is to use, read from the
/// URL as the regular connections read it (same password, URL or password_file, and
/// TLS settings). The replication client takes one host; of a multi-host URL
/// (`postgres://a:5432,b:5432/db?target_session_attrs=read-write`) this picks the
/// host as libpq would, in order: the first that accepts a connection, or, with
/// `target_session_attrs=read-write`, the first that accepts writes. So after a
/// failover the next session finds the promoted standby (and, on PostgreSQL 17+, the
/// failover slot synchronised to it). No host qualifying is transient: a promotion
/// may be under way.
pub async fn replication_target(url: &str) -> Result<pg::PgTarget, SourceError> {
    let target = pg::PgTarget::from_url(url)
        .map_err(|e| SourceError::Definite(format!("the source URL cannot be used: {e}")))?;
    if target.host_count() <= 1 {
        return Ok(target);
    }
    let mut refused = Vec::new();
    for i in 0..target.host_count() {
        let one = target.only_host(i);
        let (name, _) = one.host();
        let at = format!("{name}:{}", one.port());
        let answer = async {
            let client = pg::connect_target(&one).await?;
            if !target.wants_read_write() {
                return Ok(true);
            }
            let row = client.query_one("SHOW transaction_read_only", &[]).await?;
            Ok::<_, tokio_postgres::Error>(row.get::<_, String>(0) == "off")
        };
        match tokio::time::timeout(pg::CONNECT_TIMEOUT + Duration::from_secs(5), answer).await {
            Ok(Ok(true)) => {
                tracing::debug!(host = %at, "replication host of the source URL");
                return Ok(one);
            }
            Ok(Ok(false)) => refused.push(format!("{at} is read-only (a standby)")),
            Ok(Err(error)) => refused.push(format!("{at}: {}", crate::error::error_chain(&error))),
            Err(_) => refused.push(format!("{at} did not answer in time")),
        }
    }
    Err(SourceError::Transient {
        context: format!(
            "no host of the source URL {}: {}",
            if target.wants_read_write() {
                "accepts writes"
            } else {
                "accepts a connection"
            },
            refused.join("; ")
        ),
        source: None,
    })
}

/// The database name in a connection URL.
pub fn database_of(url: &str) -> Option<String> {
    pg::PgTarget::parse(url)
        .ok()
        .and_then(|t| t.config.get_dbname().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(wal_status: &str, reason: Option<&str>) -> SlotState {
        SlotState {
            plugin: Some("pgoutput".into()),
            database: Some("db_start".into()),
            confirmed_flush_lsn: None,
            wal_status: Some(wal_status.into()),
            invalidation_reason: reason.map(Into::into),
            active_pid: None,
        }
    }

    #[test]
    fn an_invalidated_slot_is_refused_with_its_cause_on_every_version() {
        let definite = |state: &SlotState| match check_slot("s", state, "db_start") {
            Err(SourceError::Definite(m)) => m,
            other => panic!("{other:?}"),
        };
        // 14 to 16: wal_status alone.
        assert!(check_slot("s", &slot("reserved", None), "db_start").is_ok());
        assert!(check_slot("s", &slot("unreserved", None), "db_start").is_ok());
        let m = definite(&slot("lost", None));
        assert!(
            m.starts_with("slot s is invalidated: wal_status = lost"),
            "{m}"
        );
        assert!(m.contains("pg_drop_replication_slot('s')") && m.contains("reconcile"));
        // 17 and 18: the reason by name.
        for (reason, says) in [
            ("wal_removed", "max_slot_wal_keep_size"),
            ("rows_removed", "hot_standby_feedback"),
            ("wal_level_insufficient", "wal_level"),
            ("idle_timeout", "idle_replication_slot_timeout"),
            ("something_new", "invalidation_reason = something_new"),
        ] {
            let m = definite(&slot("lost", Some(reason)));
            assert!(m.contains(says), "{reason}: {m}");
        }
    }

    #[test]
    fn a_stream_refused_for_an_invalidated_slot_is_recognised() {
        use pgwire_replication::PgWireError;
        for message in [
            "can no longer get changes from replication slot \"s\" (SQLSTATE 55000)",
            "can no longer access replication slot \"s\" (SQLSTATE 55000)",
            "cannot read from logical replication slot \"s\" (SQLSTATE 55000)",
        ] {
            assert!(slot_invalidated(&PgWireError::Server(message.into())));
        }
        let in_use = "replication slot \"s\" is active for PID 7 (SQLSTATE 55006)";
        assert!(!slot_invalidated(&PgWireError::Server(in_use.into())));
        assert!(!slot_invalidated(&PgWireError::Protocol(
            "can no longer".into()
        )));
    }

    #[test]
    fn a_replication_session_refused_for_good_says_what_to_do() {
        use pgwire_replication::PgWireError;
        let refused = |m: &str| replication_refused(&PgWireError::Server(m.into()));
        let role =
            refused("must be superuser or replication role to start walsender (SQLSTATE 42501)");
        assert!(role.is_some_and(|h| h.contains("REPLICATION")));
        let hba = refused("no pg_hba.conf entry for replication connection (SQLSTATE 28000)");
        assert!(hba.is_some_and(|h| h.contains("pg_hba.conf")));
        for transient in [
            "sorry, too many clients already (SQLSTATE 53300)",
            "the database system is starting up (SQLSTATE 57P03)",
            "replication slot \"s\" is active for PID 7 (SQLSTATE 55006)",
        ] {
            assert_eq!(refused(transient), None, "{transient}");
        }
        assert_eq!(
            replication_refused(&PgWireError::Protocol("SQLSTATE 42501".into())),
            None
        );
    }

    #[test]
    fn table_names_are_validated_and_quoted() {
        let t = TableName::parse("outbox.transactions").unwrap();
        assert_eq!(t.quoted(), "\"outbox\".\"transactions\"");
        assert_eq!(TableName::parse("plain").unwrap().schema, "public");
        for bad in [
            "outbox.t; DROP TABLE main.balance",
            "a.b\"c",
            "a.",
            "1abc.x",
            "x.y z",
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
