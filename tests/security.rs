//! Security: the pipeline over TLS (verify-full) to both databases and SASL_SSL to
//! Kafka with the least-privilege roles of `sql/roles.sql`, and the negative cases: a
//! certificate for another host, a wrong password, a role reaching for what it was not
//! granted, an injection through a configured name.
//!
//! The TLS tests run on a stack instance of their own, started with the TLS profile
//! (`scripts/stack up --tls`, state in /var/tmp/outbox-relay-tls, port offset 300:
//! PostgreSQL 8300/8301, SASL_SSL brokers 19440-19442). `up` is idempotent: when the
//! instance already runs it only checks it. The other tests use the default stack.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{random_name, repo, Relay, TestDbs};
use outbox_relay::load::{self, LoadArgs};

const TLS_STATE: &str = "/var/tmp/outbox-relay-tls";
const TLS_OFFSET: u16 = 300;
/// The SCRAM user that `scripts/stack` creates on the TLS profile's brokers.
const SASL_USER: &str = "relay";
const SASL_PASSWORD: &str = "relay-secret";
/// Passwords the tests give the roles of sql/roles.sql (the roles are cluster-wide, so
/// every test sets the same ones).
const SOURCE_ROLE_PASSWORD: &str = "src-Pw-7c1e0d";
const SINK_ROLE_PASSWORD: &str = "snk-Pw-93ab51";

fn ca() -> PathBuf {
    PathBuf::from(TLS_STATE).join("tls/ca.pem")
}

fn tls_url(user: &str, password: &str, port: u16, db: &str) -> String {
    format!(
        "postgres://{user}:{password}@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={}",
        ca().display()
    )
}

fn sasl_brokers() -> String {
    (1..=3)
        .map(|n| format!("127.0.0.1:{}", 19139 + TLS_OFFSET + n))
        .collect::<Vec<_>>()
        .join(",")
}

fn sasl_properties() -> String {
    format!(
        "security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;sasl.username={SASL_USER};\
         sasl.password={SASL_PASSWORD};ssl.ca.location={}",
        ca().display()
    )
}

/// Starts the TLS instance once per test binary (idempotent, fast when it runs).
async fn tls_stack() {
    static STARTED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    STARTED
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let output = Command::new(repo().join("scripts/stack"))
                    .args(["up", "--tls"])
                    .env("OUTBOX_RELAY_STACK_DIR", TLS_STATE)
                    .env("OUTBOX_RELAY_STACK_PORT_OFFSET", TLS_OFFSET.to_string())
                    .output()
                    .expect("scripts/stack runs");
                assert!(
                    output.status.success(),
                    "scripts/stack up --tls failed:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            })
            .await
            .unwrap();
        })
        .await;
}

/// A database pair on the TLS instance with the schemas and the roles of sql/roles.sql.
struct TlsDbs {
    name: String,
}

impl TlsDbs {
    async fn new() -> Self {
        tls_stack().await;
        let name = random_name("sec");
        for port in [8000 + TLS_OFFSET, 8001 + TLS_OFFSET] {
            common::connect(&tls_url("postgres", "postgres", port, "postgres"))
                .await
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
        }
        let dbs = Self { name };
        outbox_relay::migrate::source(&dbs.admin_source())
            .await
            .expect("migrate source");
        outbox_relay::migrate::target(&dbs.admin_target())
            .await
            .expect("migrate target");
        apply_roles(
            &dbs.admin_source(),
            "outbox_relay_source",
            SOURCE_ROLE_PASSWORD,
        )
        .await;
        apply_roles(&dbs.admin_target(), "outbox_relay_sink", SINK_ROLE_PASSWORD).await;
        dbs
    }

    fn admin_source(&self) -> String {
        tls_url("postgres", "postgres", 8000 + TLS_OFFSET, &self.name)
    }
    fn admin_target(&self) -> String {
        tls_url("postgres", "postgres", 8001 + TLS_OFFSET, &self.name)
    }
    fn source_role(&self) -> String {
        tls_url(
            "outbox_relay_source",
            SOURCE_ROLE_PASSWORD,
            8000 + TLS_OFFSET,
            &self.name,
        )
    }
    fn sink_role(&self) -> String {
        tls_url(
            "outbox_relay_sink",
            SINK_ROLE_PASSWORD,
            8001 + TLS_OFFSET,
            &self.name,
        )
    }
}

impl Drop for TlsDbs {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                for port in [8000 + TLS_OFFSET, 8001 + TLS_OFFSET] {
                    let url = tls_url("postgres", "postgres", port, "postgres");
                    if let Ok(client) = outbox_relay::pg::connect(&url).await {
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
                }
            });
        })
        .join();
    }
}

/// Runs sql/roles.sql in a database as the administrator and sets `role`'s password.
/// Serialised: the roles are cluster-wide and concurrent GRANTs on them can collide.
async fn apply_roles(admin_url: &str, role: &str, password: &str) {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = LOCK.lock().await;
    let script = std::fs::read_to_string(repo().join("sql/roles.sql")).unwrap();
    let client = common::connect(admin_url).await;
    client
        .batch_execute(&script)
        .await
        .expect("sql/roles.sql applies");
    // Twice: the script is idempotent.
    client
        .batch_execute(&script)
        .await
        .expect("sql/roles.sql applies again");
    client
        .batch_execute(&format!("ALTER ROLE {role} PASSWORD '{password}'"))
        .await
        .unwrap();
}

/// Polls `verify` (as the administrator) until it passes, or panics with its report.
async fn wait_verified(source_url: &str, target_url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let source = common::connect(source_url).await;
        let target = common::connect(target_url).await;
        let report = outbox_relay::verify::compare(&source, &target)
            .await
            .expect("verify reads both databases");
        if report.ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "verify never passed:\n{}",
            report.render()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Opens a replication session and asks IDENTIFY_SYSTEM (pgwire-replication connects
/// on a background task: its errors surface at the first request); the error, if any.
async fn replication_error(
    config: pgwire_replication::ReplicationConfig,
) -> Option<pgwire_replication::PgWireError> {
    let attempt = async {
        let mut client = pgwire_replication::ReplicationClient::connect_gated(config).await?;
        client.identify_system().await.map(|_| ())
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .expect("the replication session answers or fails within 30 s")
        .err()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn connector_and_sink_over_tls_and_sasl_ssl_with_least_privilege_roles() {
    let dbs = TlsDbs::new().await;
    load::run(&LoadArgs::count(&dbs.admin_source(), 300))
        .await
        .unwrap();
    let topic = random_name("sec_outbox");
    let progress = random_name("sec_progress");
    let slot = random_name("sec_slot");
    let group = random_name("sec_group");
    let brokers = sasl_brokers();
    let properties = sasl_properties();
    let source_role = dbs.source_role();
    let sink_role = dbs.sink_role();
    // Secrets through the environment, not the command line.
    let envs = [("OUTBOX_RELAY_KAFKA_PROPERTIES", properties.as_str())];
    let _connector = Relay::spawn(
        &[
            "connector",
            "--brokers",
            &brokers,
            "--topic",
            &topic,
            "--progress-topic",
            &progress,
            "--slot",
            &slot,
        ],
        &[envs[0], ("OUTBOX_RELAY_SOURCE_URL", source_role.as_str())],
    );
    let _sink = Relay::spawn(
        &[
            "sink",
            "--brokers",
            &brokers,
            "--topic",
            &topic,
            "--group",
            &group,
        ],
        &[envs[0], ("OUTBOX_RELAY_TARGET_URL", sink_role.as_str())],
    );
    wait_verified(
        &dbs.admin_source(),
        &dbs.admin_target(),
        Duration::from_secs(120),
    )
    .await;
    // And what is written while both run.
    load::run(&LoadArgs::count(&dbs.admin_source(), 200))
        .await
        .unwrap();
    wait_verified(
        &dbs.admin_source(),
        &dbs.admin_target(),
        Duration::from_secs(120),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_over_tls_with_least_privilege_roles() {
    let dbs = TlsDbs::new().await;
    load::run(&LoadArgs::count(&dbs.admin_source(), 300))
        .await
        .unwrap();
    let slot = random_name("sec_direct");
    let source_role = dbs.source_role();
    let sink_role = dbs.sink_role();
    let _relay = Relay::spawn(
        &["direct", "--slot", &slot],
        &[
            ("OUTBOX_RELAY_SOURCE_URL", source_role.as_str()),
            ("OUTBOX_RELAY_TARGET_URL", sink_role.as_str()),
        ],
    );
    wait_verified(
        &dbs.admin_source(),
        &dbs.admin_target(),
        Duration::from_secs(120),
    )
    .await;
    load::run(&LoadArgs::count(&dbs.admin_source(), 200))
        .await
        .unwrap();
    wait_verified(
        &dbs.admin_source(),
        &dbs.admin_target(),
        Duration::from_secs(120),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_roles_reach_only_what_they_were_granted() {
    let dbs = TlsDbs::new().await;
    // The sink role has no business on pg_start: it cannot even log in there.
    let sink_on_start = tls_url(
        "outbox_relay_sink",
        SINK_ROLE_PASSWORD,
        8000 + TLS_OFFSET,
        &dbs.name,
    );
    let error = outbox_relay::pg::connect(&sink_on_start)
        .await
        .map(|_| ())
        .expect_err("the sink role must not connect to pg_start");
    let text = error_chain(&error);
    assert!(text.contains("password authentication failed"), "{text}");

    // The source role reads the outbox and nothing else of pg_start.
    let source = common::connect(&dbs.source_role()).await;
    source
        .query("SELECT count(*) FROM outbox.transactions", &[])
        .await
        .unwrap();
    for denied in [
        "SELECT count(*) FROM main.transactions",
        "SELECT count(*) FROM main.balance",
        "INSERT INTO outbox.transactions VALUES (1, 1, 1, now())",
        "DROP PUBLICATION outbox_relay",
    ] {
        let error = source.batch_execute(denied).await.expect_err(denied);
        let text = error_chain(&error);
        assert!(
            text.contains("permission denied") || text.contains("must be owner"),
            "{denied}: {text}"
        );
    }

    // The sink role writes the ledger and its bookkeeping, and cannot delete or alter.
    let sink = common::connect(&dbs.sink_role()).await;
    sink.query("SELECT count(*) FROM outbox_relay.sink_offsets", &[])
        .await
        .unwrap();
    for denied in [
        "DELETE FROM main.transactions",
        "TRUNCATE main.balance",
        "DELETE FROM outbox_relay.dead_letters",
        "CREATE TABLE main.x (id int)",
    ] {
        let error = sink.batch_execute(denied).await.expect_err(denied);
        assert!(
            error_chain(&error).contains("permission denied"),
            "{denied}: {}",
            error_chain(&error)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_certificate_for_another_host() {
    tls_stack().await;
    // Connect to the right address, but expect a name the certificate does not carry.
    let ca = ca();
    let wrong_name = format!(
        "postgres://postgres:postgres@db.other-host.invalid:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
        8000 + TLS_OFFSET,
        ca.display()
    );
    let error = outbox_relay::pg::connect(&wrong_name)
        .await
        .map(|_| ())
        .expect_err("verify-full must refuse a certificate for another host");
    let text = error_chain(&error);
    assert!(
        text.contains("certificate") && text.contains("not valid for"),
        "{text}"
    );

    // The replication connection refuses it too.
    let config = outbox_relay::source::replication_config(
        &wrong_name,
        "unused_slot",
        "outbox_relay",
        outbox_relay::lsn::Lsn::ZERO,
    )
    .unwrap();
    let error = replication_error(config)
        .await
        .expect("pgwire-replication must refuse it as well");
    let text = error.to_string();
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // verify-ca checks the chain only: the same connection is accepted.
    let chain_only = wrong_name.replace("verify-full", "verify-ca");
    outbox_relay::pg::connect(&chain_only)
        .await
        .expect("verify-ca accepts a name mismatch");

    // A CA that did not sign the server's certificate is refused by verify-ca too.
    let other_ca = std::env::temp_dir().join(format!("{}.pem", random_name("other_ca")));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ])
        .args(["-keyout", "/dev/null", "-out"])
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(made.status.success());
    let untrusted = tls_url("postgres", "postgres", 8000 + TLS_OFFSET, "postgres")
        .replace(&ca.display().to_string(), &other_ca.display().to_string())
        .replace("verify-full", "verify-ca");
    let error = outbox_relay::pg::connect(&untrusted)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        error_chain(&error).contains("certificate"),
        "{}",
        error_chain(&error)
    );
    let _ = std::fs::remove_file(other_ca);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_gives_a_clear_error_without_the_password() {
    let password = "Wr0ng-pass-5e1f2a";
    let url = format!("postgres://postgres:{password}@127.0.0.1:8000/postgres?sslmode=disable");

    let error = outbox_relay::pg::connect(&url)
        .await
        .map(|_| ())
        .unwrap_err();
    let text = format!("{} | {:?}", error_chain(&error), error);
    assert!(
        text.contains("password authentication failed for user \"postgres\""),
        "{text}"
    );
    assert!(!text.contains(password), "{text}");

    let config =
        outbox_relay::source::replication_config(&url, "s", "p", outbox_relay::lsn::Lsn::ZERO)
            .unwrap();
    assert!(
        !format!("{:?}", outbox_relay::pg::PgTarget::from_url(&url).unwrap()).contains(password)
    );
    let error = replication_error(config)
        .await
        .expect("pgwire-replication must refuse a wrong password");
    let text = format!("{error} | {error:?}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains(password), "{text}");

    // The command: its output and logs do not hold the password either, whether the
    // URL comes from a flag or from the environment.
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["check", "--source-url", &url, "--target-url", &url])
        .env("OUTBOX_RELAY_LOG", "debug")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success());
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains(password), "{text}");

    // A URL the relay refuses is not echoed back either (clap would print the value).
    let bad = format!("postgres://postgres:{password}@127.0.0.1:8000/postgres?sslmode=verify-full");
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["check", "--source-url", &bad])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("needs sslrootcert"), "{text}");
    assert!(!text.contains(password), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_file_is_read_and_its_content_never_shown() {
    let dbs = TestDbs::new().await;
    let file = std::env::temp_dir().join(random_name("pgpass"));
    std::fs::write(&file, "postgres\n").unwrap();
    let url = dbs.source_url.replace("postgres:postgres@", "postgres@")
        + &format!("?password_file={}", file.display());
    let client = outbox_relay::pg::connect(&url)
        .await
        .expect("the file's password works");
    client.query_one("SELECT 1", &[]).await.unwrap();
    std::fs::remove_file(&file).unwrap();
    let error = outbox_relay::pg::connect(&url)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        error_chain(&error).contains("cannot read the password file"),
        "{}",
        error_chain(&error)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injection_through_a_configured_name_fails_safely() {
    let dbs = TestDbs::new().await;
    let attempts: [&[&str]; 4] = [
        &["--table", "outbox.transactions; DROP TABLE main.balance"],
        &["--slot", "s'; DROP TABLE main.balance; --"],
        &["--slot", "s\"x"],
        &[
            "--publication",
            "outbox_relay\" FOR ALL TABLES; DROP TABLE main.balance; --",
        ],
    ];
    for extra in attempts {
        let mut args = vec![
            "direct",
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
        ];
        args.extend_from_slice(extra);
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
                .args(&args)
                .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
                .output(),
        )
        .await
        .expect("the relay stops at once on a bad name")
        .unwrap();
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} was accepted:\n{text}");
        assert!(text.contains("is not a valid name"), "{extra:?}: {text}");
    }
    // Nothing was dropped or created.
    for client in [dbs.source().await, dbs.target().await] {
        client
            .query("SELECT count(*) FROM main.balance", &[])
            .await
            .unwrap();
    }
    let slots: i64 = dbs
        .source()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
            &[&dbs.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
}
