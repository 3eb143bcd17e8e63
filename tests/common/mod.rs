//! Helpers shared by the integration tests, which run against the real local stack
//! (`scripts/stack up`): two PostgreSQL clusters and three Kafka brokers.
//!
//! Each test gets its own pair of databases with random names, created from the
//! schemas in `sql/` and dropped when the [`TestDbs`] value is dropped, so tests in one
//! binary can run in parallel. Tests that stop or kill a shared component take
//! [`fault_lock`] so that they never overlap.

#![allow(dead_code)]

pub mod connector;
pub mod sink;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_postgres::Client;

pub const PG_START_ADMIN: &str = "postgres://postgres:postgres@127.0.0.1:8000/postgres";
pub const PG_END_ADMIN: &str = "postgres://postgres:postgres@127.0.0.1:8001/postgres";
pub const BROKERS: &str = outbox_relay::config::DEFAULT_BROKERS;

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/stack ARGS…`, panics with its output if it fails, returns its stdout.
pub fn stack(args: &[&str]) -> String {
    stack_with(&[], args)
}

/// [`stack`] with `envs` set, e.g. another instance's `OUTBOX_RELAY_STACK_DIR` and
/// `OUTBOX_RELAY_STACK_PORT_OFFSET`.
pub fn stack_with(envs: &[(&str, &str)], args: &[&str]) -> String {
    let output = Command::new(repo().join("scripts/stack"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("scripts/stack runs");
    assert!(
        output.status.success(),
        "scripts/stack {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The directory of both servers' Unix sockets (`PG_SOCKET_DIR` of `scripts/stack env`).
pub fn pg_socket_dir() -> String {
    stack(&["env"])
        .lines()
        .find_map(|line| line.strip_prefix("export PG_SOCKET_DIR="))
        .expect("scripts/stack env prints PG_SOCKET_DIR")
        .to_string()
}

/// `url` with its host replaced by the Unix socket directory `dir` (percent-encoded, as a
/// URL's host must be) and without a password: the stack trusts local connections.
pub fn over_unix_socket(url: &str, dir: &str) -> String {
    let rest = url.split_once('@').expect("a URL with user@host").1;
    let port_and_db = rest.split_once(':').expect("host:port").1;
    format!(
        "postgres://postgres@{}:{port_and_db}",
        dir.replace('/', "%2F")
    )
}

/// Held while a test stops, kills or pauses a shared component.
pub struct FaultGuard {
    _in_process: tokio::sync::MutexGuard<'static, ()>,
    /// An exclusive lock on a file next to the stack, so that test binaries run by
    /// different processes at once never inject faults at the same time either.
    _file: std::fs::File,
}

/// Serialises the tests that stop, kill or pause a shared component, within this
/// process and across processes.
pub async fn fault_lock() -> FaultGuard {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let in_process = LOCK.lock().await;
    let file = tokio::task::spawn_blocking(|| {
        let path = std::env::temp_dir().join("outbox-relay-fault-tests.lock");
        let file = std::fs::File::create(path).expect("create the fault lock file");
        file.lock().expect("lock the fault lock file");
        file
    })
    .await
    .expect("fault lock task");
    FaultGuard {
        _in_process: in_process,
        _file: file,
    }
}

/// A random lowercase name with a prefix, for databases, topics, slots and groups.
pub fn random_name(prefix: &str) -> String {
    let suffix: u64 = rand::rng().random();
    format!("{prefix}_{suffix:016x}")
}

/// Connects, retrying for up to 60 s (a cluster may be restarting).
pub async fn connect(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match outbox_relay::pg::connect(url).await {
            Ok(client) => return client,
            Err(error) if Instant::now() < deadline => {
                eprintln!("waiting for {url}: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("cannot connect to {url}: {error}"),
        }
    }
}

/// Polls `condition` every 100 ms until it holds, or panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `verify` on the databases at `source_url` and `target_url` until it passes;
/// panics with its report after `timeout`. A failure to read (a database restarting for
/// some fault test) is retried like a difference.
pub async fn wait_verified(source_url: &str, target_url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let source = outbox_relay::pg::connect(source_url)
                .await
                .map_err(|e| e.to_string())?;
            let target = outbox_relay::pg::connect(target_url)
                .await
                .map_err(|e| e.to_string())?;
            outbox_relay::cmd::verify::compare(&source, &target)
                .await
                .map_err(|e| e.to_string())
        };
        let outcome = match attempt.await {
            Ok(report) if report.ok => return,
            Ok(report) => report.render(),
            Err(error) => format!("cannot read: {error}"),
        };
        assert!(
            Instant::now() < deadline,
            "verify still fails after {timeout:?}:\n{outcome}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One number (`SELECT count(*) …`) from the database at `url`, retried for up to 60 s
/// while the server restarts.
pub async fn count(url: &str, sql: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match connect(url).await.query_one(sql, &[]).await {
            Ok(row) => return row.get(0),
            Err(error) if Instant::now() < deadline => {
                eprintln!("{sql}: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("{sql}: {error}"),
        }
    }
}

/// Writes `n` transactions into the pair's source with the load generator, and checks
/// that it committed every one.
pub async fn load(dbs: &TestDbs, n: u64) {
    let summary = outbox_relay::cmd::load::run(&outbox_relay::cmd::load::LoadArgs::count(
        &dbs.source_url,
        n,
    ))
    .await
    .unwrap();
    assert_eq!(summary.committed, n);
}

/// The environment `var=n` of one of the relay's fault hooks; a test that needs one
/// fails, not passes, when the relay was built without them.
fn fault_hook(var: &'static str, n: &'static str) -> (&'static str, &'static str) {
    if !cfg!(feature = "fault-injection") {
        panic!(
            "this test needs the relay's fault hooks: cargo test --features fault-injection \
             (scripts/test does)"
        );
    }
    (var, n)
}

/// The environment that makes a relay abort right after its `n`th destination commit,
/// before it confirms the slot: the test-only hook of the `fault-injection` feature.
/// A test that needs it fails, not passes, when the relay was built without it.
pub fn crash_after_commits(n: &'static str) -> (&'static str, &'static str) {
    fault_hook("OUTBOX_RELAY_TEST_CRASH_AFTER_COMMITS", n)
}

/// The environment that makes the relay abort right after its `n`th initial-snapshot
/// chunk is committed (the `fault-injection` feature's hook, as [`crash_after_commits`]).
pub fn crash_after_snapshot_chunks(n: &'static str) -> (&'static str, &'static str) {
    fault_hook("OUTBOX_RELAY_TEST_CRASH_AFTER_SNAPSHOT_CHUNKS", n)
}

/// The environment that makes the relay stop itself (SIGSTOP, as a host cut off) right
/// after its `n`th initial-snapshot chunk is committed; [`Relay::resume`] wakes it.
pub fn freeze_after_snapshot_chunks(n: &'static str) -> (&'static str, &'static str) {
    fault_hook("OUTBOX_RELAY_TEST_FREEZE_AFTER_SNAPSHOT_CHUNKS", n)
}

/// The environment that makes the relay abort right after its `n`th spill of a source
/// transaction larger than a batch, its destination transaction still open (the
/// `fault-injection` feature's hook, as [`crash_after_commits`]).
pub fn crash_after_spills(n: &'static str) -> (&'static str, &'static str) {
    fault_hook("OUTBOX_RELAY_TEST_CRASH_AFTER_SPILLS", n)
}

/// The environment that makes the relay abort right after its `n`th commit that carried
/// a backfill chunk (the `fault-injection` feature's hook, as [`crash_after_commits`]).
pub fn crash_after_backfill_chunks(n: &'static str) -> (&'static str, &'static str) {
    fault_hook("OUTBOX_RELAY_TEST_CRASH_AFTER_BACKFILL_CHUNKS", n)
}

/// Asks the relays streaming from `source_url` to send the outbox's rows again, with
/// `extra` arguments (`--where`, `--id`, …); panics unless the command succeeds.
pub fn request_backfill(source_url: &str, extra: &[&str]) -> String {
    let mut args = vec!["backfill", "--source-url", source_url];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run_binary(&args);
    assert_eq!(code, 0, "backfill {extra:?}: {stdout}{stderr}");
    stdout
}

/// Writes ONE pg_start transaction of `rows` ledger transactions, ids `first_id` on, as
/// a batch job would: the rows, their outbox copies and the balances.
pub async fn write_large_transaction(source_url: &str, first_id: i64, rows: i64) {
    let last_id = first_id + rows - 1;
    connect(source_url)
        .await
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO main.transactions (id, account_id, amount, created_at)
             SELECT g, g % 37, (g % 1000) * 0.01, timestamp '2026-12-04 12:00' + g * interval '1 ms'
             FROM generate_series({first_id}, {last_id}) g;
             INSERT INTO outbox.transactions (id, account_id, amount, created_at)
             SELECT id, account_id, amount, created_at FROM main.transactions
             WHERE id BETWEEN {first_id} AND {last_id} ORDER BY id;
             INSERT INTO main.balance AS b (account_id, current_balance, updated_at)
             SELECT account_id, sum(amount), max(created_at) FROM main.transactions
             WHERE id BETWEEN {first_id} AND {last_id} GROUP BY account_id
             ON CONFLICT (account_id) DO UPDATE
                 SET current_balance = b.current_balance + EXCLUDED.current_balance,
                     updated_at = EXCLUDED.updated_at;
             COMMIT;"
        ))
        .await
        .unwrap();
}

/// Runs the binary to completion; returns its exit code, stdout and stderr.
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .env("OUTBOX_RELAY_LOG", "warn")
        .output()
        .expect("run outbox-relay");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The balances of `client`'s database by account, as PostgreSQL prints them: with their
/// display scale, or without trailing fraction zeros if `trim_scale`.
pub async fn balances(
    client: &Client,
    trim_scale: bool,
) -> std::collections::BTreeMap<i64, String> {
    let balance = if trim_scale {
        "trim_scale(current_balance)"
    } else {
        "current_balance"
    };
    client
        .query(
            &format!("SELECT account_id, {balance}::text FROM main.balance"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Creates a topic with a random name, `partitions` partitions, replication factor 3 and
/// the topic `configs`; returns its name. Retried for up to 180 s: a broker may be down
/// for another test's fault, and RF 3 needs all three.
pub async fn create_topic(prefix: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    let name = random_name(prefix);
    let spec = outbox_relay::kafka::TopicSpec {
        name: &name,
        partitions,
        replication_factor: 3,
        configs,
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let Err(error) = outbox_relay::kafka::ensure_topic(BROKERS, &spec).await else {
            return name;
        };
        let error = outbox_relay::error::error_chain(&error);
        assert!(
            Instant::now() < deadline,
            "cannot create topic {name}: {error}"
        );
        eprintln!("creating topic {name}: {error}; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Spawns `outbox-relay direct` from `source_url` to `target_url` on `slot`, with
/// `extra` arguments.
pub fn spawn_direct_between(
    source_url: &str,
    target_url: &str,
    slot: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Relay {
    let mut args = vec![
        "direct",
        "--source-url",
        source_url,
        "--target-url",
        target_url,
        "--slot",
        slot,
    ];
    args.extend_from_slice(extra);
    Relay::spawn(&args, envs)
}

/// [`spawn_direct_between`] the pair's databases.
pub fn spawn_direct(dbs: &TestDbs, slot: &str, extra: &[&str], envs: &[(&str, &str)]) -> Relay {
    spawn_direct_between(&dbs.source_url, &dbs.target_url, slot, extra, envs)
}

/// A fresh source database on pg_start and target database on pg_end, with the
/// project's schemas, dropped on `Drop`.
pub struct TestDbs {
    pub name: String,
    pub source_url: String,
    pub target_url: String,
}

/// A `TestDbs::target_backends` condition: a ledger apply waiting, inside its
/// transaction (its rows inserted: it has a transaction id), at the credit of
/// `main.balance` for a lock (a test's `LOCK TABLE main.balance`). Without the
/// transaction id it could be the `Parse` of the credit on a new connection, which
/// takes the table's lock too, outside any transaction.
const CREDIT_WAITING: &str = "wait_event_type = 'Lock' AND backend_xid IS NOT NULL \
     AND query LIKE '%INSERT INTO main.balance%'";

impl TestDbs {
    pub async fn new() -> Self {
        let name = random_name("ort");
        for admin in [PG_START_ADMIN, PG_END_ADMIN] {
            connect(admin)
                .await
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
        }
        let dbs = Self {
            source_url: format!("postgres://postgres:postgres@127.0.0.1:8000/{name}"),
            target_url: format!("postgres://postgres:postgres@127.0.0.1:8001/{name}"),
            name,
        };
        // A cluster may be restarting (another test binary's fault): retry a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let migrated = match outbox_relay::cmd::migrate::source(&dbs.source_url).await {
                Ok(()) => outbox_relay::cmd::migrate::target(&dbs.target_url).await,
                Err(error) => Err(error),
            };
            match migrated {
                Ok(()) => break,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("migrate: {error}, retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => panic!("migrate: {error:?}"),
            }
        }
        dbs
    }

    pub async fn source(&self) -> Client {
        connect(&self.source_url).await
    }

    pub async fn target(&self) -> Client {
        connect(&self.target_url).await
    }

    /// Copies pg_start's transactions to pg_end and derives pg_end's balances from
    /// them: what a perfect pipeline would leave behind.
    pub async fn copy_source_to_target(&self) {
        let source = self.source().await;
        let target = self.target().await;
        let rows = source
            .query(
                "SELECT id, account_id, amount::text, created_at::text FROM main.transactions",
                &[],
            )
            .await
            .unwrap();
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let accounts: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
        let amounts: Vec<String> = rows.iter().map(|r| r.get(2)).collect();
        let times: Vec<String> = rows.iter().map(|r| r.get(3)).collect();
        target
            .execute(
                "INSERT INTO main.transactions (id, account_id, amount, created_at)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[]::numeric[], $4::text[]::timestamp[])",
                &[&ids, &accounts, &amounts, &times],
            )
            .await
            .unwrap();
        target
            .batch_execute(
                "INSERT INTO main.balance (account_id, current_balance, updated_at)
                 SELECT account_id, sum(amount), max(created_at) FROM main.transactions GROUP BY account_id",
            )
            .await
            .unwrap();
    }

    /// Creates a `test_decoding` slot that records every transaction from now on.
    pub async fn create_witness_slot(&self) -> String {
        let name = random_name("witness");
        self.source()
            .await
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&name],
            )
            .await
            .unwrap();
        name
    }

    /// The commit end LSN of every transaction that inserted into the outbox since the
    /// witness slot was created, ascending (test_decoding reports a COMMIT at its end).
    pub async fn outbox_commit_lsns(&self, witness: &str) -> Vec<outbox_relay::lsn::Lsn> {
        let rows = self
            .source()
            .await
            .query(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, NULL)",
                &[&witness],
            )
            .await
            .unwrap();
        let mut commits = Vec::new();
        let mut touches_outbox = false;
        for row in rows {
            let data: String = row.get(1);
            if data.starts_with("BEGIN") {
                touches_outbox = false;
            } else if data.starts_with("table outbox.transactions: INSERT") {
                touches_outbox = true;
            } else if data.starts_with("COMMIT") && touches_outbox {
                commits.push(row.get::<_, String>(0).parse().unwrap());
            }
        }
        commits.sort();
        commits
    }

    /// Runs `verify` on this pair once.
    pub async fn verify(&self) -> outbox_relay::cmd::verify::Report {
        outbox_relay::cmd::verify::compare(&self.source().await, &self.target().await)
            .await
            .expect("verify reads both databases")
    }

    /// Sets pg_start's `wal_sender_timeout` for this pair's source database (new
    /// sessions, the relay's included, take it).
    pub async fn set_wal_sender_timeout(&self, value: &str) {
        let name = self.source_url.rsplit('/').next().unwrap();
        connect(PG_START_ADMIN)
            .await
            .batch_execute(&format!(
                "ALTER DATABASE \"{name}\" SET wal_sender_timeout = '{value}'"
            ))
            .await
            .unwrap();
    }

    /// Counts pg_end's client backends of this database that `condition` (over
    /// pg_stat_activity) selects (autovacuum's workers, which wait on table locks too,
    /// are not counted).
    async fn target_backends(&self, condition: &str) -> i64 {
        self.target()
            .await
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND backend_type = 'client backend' AND {condition}"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Holds `main.balance` in pg_end (`LOCK TABLE … IN EXCLUSIVE MODE` in an open
    /// transaction) so that the next ledger apply stops inside its transaction, after
    /// the COPY of its ids, at the credit of the balances. Give the returned session to
    /// [`TestDbs::freeze_inside_transaction`].
    pub async fn hold_balances(&self) -> Client {
        let blocker = self.target().await;
        blocker
            .batch_execute("BEGIN; LOCK TABLE main.balance IN EXCLUSIVE MODE")
            .await
            .unwrap();
        blocker
    }

    /// Waits for `relay`'s apply to wait at the credit that `blocker` (from
    /// [`TestDbs::hold_balances`]) holds up, freezes `relay` (SIGSTOP), and lets the
    /// credit through: its backend is then idle inside the transaction, its locks held,
    /// and its client never sends the COMMIT. Returns when pg_end shows that.
    pub async fn freeze_inside_transaction(&self, blocker: Client, relay: &mut Relay) {
        wait_until(
            "the apply waits for main.balance",
            Duration::from_secs(60),
            || async { self.target_backends(CREDIT_WAITING).await > 0 },
        )
        .await;
        relay.pause();
        blocker.batch_execute("COMMIT").await.unwrap();
        wait_until(
            "the frozen relay's backend idles in its transaction",
            Duration::from_secs(10),
            || async { self.target_backends("state = 'idle in transaction'").await > 0 },
        )
        .await;
    }

    /// [`wait_verified`] on this pair.
    pub async fn wait_verified(&self, timeout: Duration) {
        wait_verified(&self.source_url, &self.target_url, timeout).await
    }
}

impl Drop for TestDbs {
    fn drop(&mut self) {
        drop_databases(
            vec![PG_START_ADMIN.to_string(), PG_END_ADMIN.to_string()],
            self.name.clone(),
        );
    }
}

/// Drops database `name` on each cluster given by an admin URL, with its replication
/// slots first (they pin a database; any walsender holding one is ended). For `Drop`
/// impls: it runs outside any async context, on a runtime of its own.
pub fn drop_databases(admin_urls: Vec<String>, name: String) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            for admin in &admin_urls {
                let Ok(client) = outbox_relay::pg::connect(admin).await else {
                    continue;
                };
                let _ = client
                    .execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                         WHERE database = $1 AND active",
                        &[&name],
                    )
                    .await;
                for _ in 0..50 {
                    let dropped = client
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                             WHERE database = $1",
                            &[&name],
                        )
                        .await;
                    if dropped.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    })
    .join();
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The value's bytes; empty for a null value too ([`ReadRecord::null_value`] tells).
    pub value: Vec<u8>,
    /// The record had no value at all (a tombstone), rather than an empty one.
    pub null_value: bool,
    /// The record's timestamp (ms since the epoch), whichever its type.
    pub timestamp: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads every committed record of `topic` (`isolation.level=read_committed`), from the
/// beginning to the current end of each partition.
pub fn read_topic(topic: &str) -> Vec<ReadRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::{Headers, Message};
    use rdkafka::ClientConfig;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", random_name("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in &partitions {
        assignment
            .add_partition_offset(topic, *p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut at_end = std::collections::HashSet::new();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while at_end.len() < partitions.len() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach its end"
        );
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => eprintln!("read_topic: {e}"),
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(ReadRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    null_value: m.payload().is_none(),
                    timestamp: m.timestamp().to_millis(),
                    headers,
                });
            }
        }
    }
    records
}

/// A child process of the `outbox-relay` binary, killed on drop.
pub struct Relay {
    pub child: std::process::Child,
    /// The file that receives its stdout and stderr.
    pub log: PathBuf,
}

impl Relay {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", random_name("relay")));
        let file = std::fs::File::create(&log).unwrap();
        eprintln!("relay {args:?} logs to {}", log.display());
        let child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(args)
            .env("OUTBOX_RELAY_LOG", "info,librdkafka=warn,rdkafka=warn")
            // Tests run several relays at once: each serves metrics on a port of its own.
            .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
            .envs(envs.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn outbox-relay");
        Self { child, log }
    }

    /// SIGSTOP: the process keeps its state and its connections but does nothing
    /// until [`Relay::resume`].
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}", self.child.id());
    }

    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address it serves /metrics on (it binds port 0 in tests), read from its log.
    pub async fn metrics_addr(&self) -> String {
        let mut addr = String::new();
        wait_until(
            "the relay to serve /metrics",
            Duration::from_secs(60),
            || {
                let found = self.log_text().lines().find_map(|line| {
                    let line = line.split("serving /metrics").nth(1)?;
                    let rest = line.split("addr=").nth(1)?;
                    Some(
                        rest.split(|c: char| c.is_whitespace() || c == '\u{1b}')
                            .next()?
                            .to_string(),
                    )
                });
                if let Some(found) = &found {
                    addr = found.clone();
                }
                std::future::ready(found.is_some())
            },
        )
        .await;
        addr
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

/// Waits for the relay to exit by itself, or panics after `timeout`.
pub async fn wait_for_exit(relay: &mut Relay, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}
