//! Security: the pipeline over TLS (verify-full) to both databases, with the
//! least-privilege roles of `sql/roles.sql`, and to Kafka over each kind of listener the
//! relay supports (SASL_SSL with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512; SSL with a client
//! certificate); PostgreSQL logins by client certificate alone; every sslmode against a
//! TLS-only server; and the negative cases: a certificate for another host, a login
//! without its certificate, a Kafka client without its certificate or with a wrong
//! password, a wrong password, a role reaching for what it was not granted, an injection
//! through a configured name.
//!
//! The TLS tests run on a stack instance of their own, started with the TLS profile
//! (`scripts/stack up --tls`, state in /var/tmp/outbox-relay-tls, port offset 300:
//! PostgreSQL 8300/8301, SASL_SSL brokers 19440-19442, SSL brokers 19540-19542). `up` is
//! idempotent: when the instance already runs it only checks it (and brings an instance
//! of an older script up to date). The other tests use the default stack.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{random_name, repo, Relay, TestDbs};
use outbox_relay::cmd::load::{self, LoadArgs};
use outbox_relay::error::pg::classify;
use outbox_relay::error::{error_chain, ErrorClass};

const TLS_STATE: &str = "/var/tmp/outbox-relay-tls";
const TLS_OFFSET: u16 = 300;
/// The SASL user (PLAIN and SCRAM) of the TLS profile's brokers.
const SASL_USER: &str = "relay";
const SASL_PASSWORD: &str = "relay-secret";
/// The role that the TLS profile's client certificate (CN) authenticates, by pg_hba.conf's
/// `cert` rules only: it cannot log in with a password.
const CERT_ROLE: &str = "outbox_relay_cert";
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

/// The stack's client certificate (CN = [`CERT_ROLE`], signed by its CA) and key.
fn client_cert() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(TLS_STATE).join("tls");
    (dir.join("client.pem"), dir.join("client.key"))
}

/// [`CERT_ROLE`] on `port` with verify-full, no password, and `cert` (certificate, key) as
/// its client certificate if given.
fn cert_url(port: u16, db: &str, cert: Option<&(PathBuf, PathBuf)>) -> String {
    let mut url = format!(
        "postgres://{CERT_ROLE}@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={}",
        ca().display()
    );
    if let Some((cert, key)) = cert {
        url.push_str(&format!(
            "&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ));
    }
    url
}

/// Makes a key and a certificate for `subject` in the temp dir, signed by the stack's CA
/// or self-signed; returns (certificate, key).
fn make_cert(subject: &str, signed_by_the_stack_ca: bool) -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(random_name("cert"));
    let (cert, key, csr, ext) = (
        base.with_extension("pem"),
        base.with_extension("key"),
        base.with_extension("csr"),
        base.with_extension("ext"),
    );
    let run = |command: &mut Command| {
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let mut request = Command::new("openssl");
    request
        .args([
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout",
        ])
        .arg(&key);
    if signed_by_the_stack_ca {
        run(request.arg("-out").arg(&csr));
        // Extensions make it a version 3 certificate, the only version rustls accepts.
        std::fs::write(&ext, "extendedKeyUsage=clientAuth\n").unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "1", "-in"])
            .arg(&csr)
            .arg("-extfile")
            .arg(&ext)
            .arg("-CA")
            .arg(ca())
            .arg("-CAkey")
            .arg(PathBuf::from(TLS_STATE).join("tls/ca.key"))
            // A serial of its own: the CA's serial file belongs to the stack.
            .args(["-set_serial", &std::process::id().to_string(), "-out"])
            .arg(&cert));
        let _ = std::fs::remove_file(&csr);
        let _ = std::fs::remove_file(&ext);
    } else {
        run(request.args(["-x509", "-days", "1", "-out"]).arg(&cert));
    }
    (cert, key)
}

/// How the relay's Kafka clients reach the TLS profile's brokers: a listener and the
/// `--kafka-property` settings for it (the ones `scripts/stack env` prints).
struct KafkaAccess {
    brokers: String,
    /// `;`-separated, as `OUTBOX_RELAY_KAFKA_PROPERTIES` takes them.
    properties: String,
}

impl KafkaAccess {
    /// The SASL_SSL listener (19140+offset..), user relay, with `mechanism`.
    fn sasl_ssl(mechanism: &str) -> Self {
        Self {
            brokers: brokers(19139 + TLS_OFFSET),
            properties: format!(
                "security.protocol=SASL_SSL;sasl.mechanism={mechanism};sasl.username={SASL_USER};\
                 sasl.password={SASL_PASSWORD};ssl.ca.location={}",
                ca().display()
            ),
        }
    }

    /// The SSL listener (19240+offset..), which requires a client certificate signed by
    /// the stack's CA; with the stack's client certificate if `with_cert`.
    fn ssl(with_cert: bool) -> Self {
        let mut properties = format!("security.protocol=SSL;ssl.ca.location={}", ca().display());
        if with_cert {
            let (cert, key) = client_cert();
            properties.push_str(&format!(
                ";ssl.certificate.location={};ssl.key.location={}",
                cert.display(),
                key.display()
            ));
        }
        Self {
            brokers: brokers(19239 + TLS_OFFSET),
            properties,
        }
    }
}

/// The three brokers' addresses on a listener whose first port is `first + 1`.
fn brokers(first: u16) -> String {
    (1..=3)
        .map(|n| format!("127.0.0.1:{}", first + n))
        .collect::<Vec<_>>()
        .join(",")
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
        outbox_relay::cmd::migrate::source(&dbs.admin_source())
            .await
            .expect("migrate source");
        outbox_relay::cmd::migrate::target(&dbs.admin_target())
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

    /// Writes `count` transactions into pg_start (as the administrator).
    async fn load(&self, count: u64) {
        load::run(&LoadArgs::count(&self.admin_source(), count))
            .await
            .unwrap();
    }

    /// Polls `verify` (as the administrator) until it passes, or panics with its report
    /// after two minutes.
    async fn wait_verified(&self) {
        common::wait_verified(
            &self.admin_source(),
            &self.admin_target(),
            Duration::from_secs(120),
        )
        .await
    }

    /// Lets [`CERT_ROLE`] act as the source role on pg_start and as the sink role on
    /// pg_end.
    async fn enable_cert_role(&self) {
        apply_cert_role(
            &self.admin_source(),
            "outbox_relay_source",
            "LOGIN REPLICATION",
        )
        .await;
        apply_cert_role(&self.admin_target(), "outbox_relay_sink", "LOGIN").await;
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
        let admin = |port| tls_url("postgres", "postgres", port, "postgres");
        common::drop_databases(
            vec![admin(8000 + TLS_OFFSET), admin(8001 + TLS_OFFSET)],
            self.name.clone(),
        );
    }
}

/// Serialises the changes to the roles: they are cluster-wide, and concurrent GRANTs on
/// them can collide.
static ROLES_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs sql/roles.sql in a database as the administrator and sets `role`'s password.
async fn apply_roles(admin_url: &str, role: &str, password: &str) {
    let _guard = ROLES_LOCK.lock().await;
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

/// Creates [`CERT_ROLE`] if it is missing, with `attributes` and no password, as a member
/// of `relay_role`, whose grants it inherits (REPLICATION is an attribute: not inherited).
async fn apply_cert_role(admin_url: &str, relay_role: &str, attributes: &str) {
    let _guard = ROLES_LOCK.lock().await;
    common::connect(admin_url)
        .await
        .batch_execute(&format!(
            "DO $$ BEGIN
                 CREATE ROLE {CERT_ROLE};
             EXCEPTION WHEN duplicate_object THEN NULL;
             END $$;
             ALTER ROLE {CERT_ROLE} {attributes} PASSWORD NULL;
             GRANT {relay_role} TO {CERT_ROLE};"
        ))
        .await
        .expect("create the client certificate's role");
}

/// A replication session's settings for `url`; the tests stop before its slot is used.
fn replication_config(url: &str) -> pgwire_replication::ReplicationConfig {
    outbox_relay::source::replication_config(
        &outbox_relay::pg::PgTarget::from_url(url).unwrap(),
        "unused_slot",
        "outbox_relay",
        outbox_relay::lsn::Lsn::ZERO,
        None,
    )
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

/// The relays that `start` spawns carry pg_start's outbox to pg_end: `verify` passes for
/// the transactions written before they started, then for those written while they run.
/// Relays that cannot log in or reach Kafka leave pg_end behind, and the wait fails.
async fn relays_deliver(dbs: &TlsDbs, start: impl FnOnce() -> Vec<Relay>) {
    dbs.load(300).await;
    let _relays = start();
    dbs.wait_verified().await;
    dbs.load(200).await;
    dbs.wait_verified().await;
}

/// The connector streams pg_start's outbox into Kafka and the sink applies it to pg_end,
/// both reaching Kafka through `kafka`, and the databases over verify-full with the
/// least-privilege roles.
async fn connector_and_sink_over(kafka: KafkaAccess) {
    let dbs = TlsDbs::new().await;
    let topic = random_name("sec_outbox");
    let progress = random_name("sec_progress");
    let slot = random_name("sec_slot");
    let group = random_name("sec_group");
    let source_role = dbs.source_role();
    let sink_role = dbs.sink_role();
    // Secrets through the environment, not the command line.
    let properties = ("OUTBOX_RELAY_KAFKA_PROPERTIES", kafka.properties.as_str());
    relays_deliver(&dbs, || {
        vec![
            Relay::spawn(
                &[
                    "connector",
                    "--brokers",
                    &kafka.brokers,
                    "--topic",
                    &topic,
                    "--progress-topic",
                    &progress,
                    "--slot",
                    &slot,
                ],
                &[
                    properties,
                    ("OUTBOX_RELAY_SOURCE_URL", source_role.as_str()),
                ],
            ),
            Relay::spawn(
                &[
                    "sink",
                    "--brokers",
                    &kafka.brokers,
                    "--topic",
                    &topic,
                    "--group",
                    &group,
                ],
                &[properties, ("OUTBOX_RELAY_TARGET_URL", sink_role.as_str())],
            ),
        ]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connector_and_sink_over_sasl_ssl_scram_sha_512() {
    connector_and_sink_over(KafkaAccess::sasl_ssl("SCRAM-SHA-512")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connector_and_sink_over_sasl_ssl_scram_sha_256() {
    connector_and_sink_over(KafkaAccess::sasl_ssl("SCRAM-SHA-256")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connector_and_sink_over_sasl_ssl_plain() {
    connector_and_sink_over(KafkaAccess::sasl_ssl("PLAIN")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connector_and_sink_over_ssl_with_a_client_certificate() {
    connector_and_sink_over(KafkaAccess::ssl(true)).await;
}

/// Direct mode from `source_url` to `target_url` (logins of `dbs`'s databases).
async fn direct_mode_delivers(dbs: &TlsDbs, source_url: &str, target_url: &str) {
    let slot = random_name("sec_direct");
    relays_deliver(dbs, || {
        vec![Relay::spawn(
            &["direct", "--slot", &slot],
            &[
                ("OUTBOX_RELAY_SOURCE_URL", source_url),
                ("OUTBOX_RELAY_TARGET_URL", target_url),
            ],
        )]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_over_tls_with_least_privilege_roles() {
    let dbs = TlsDbs::new().await;
    direct_mode_delivers(&dbs, &dbs.source_role(), &dbs.sink_role()).await;
}

/// Client certificates: [`CERT_ROLE`] has no password and pg_hba.conf lets it in by its
/// certificate only, so the regular connections to both databases and the replication
/// connection to pg_start all authenticate with `sslcert`/`sslkey`.
#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_logs_in_with_client_certificates_and_no_password() {
    let dbs = TlsDbs::new().await;
    dbs.enable_cert_role().await;
    let cert = client_cert();
    let source = cert_url(8000 + TLS_OFFSET, &dbs.name, Some(&cert));
    let target = cert_url(8001 + TLS_OFFSET, &dbs.name, Some(&cert));
    direct_mode_delivers(&dbs, &source, &target).await;
}

/// Why `url` cannot connect (it must not). A refusal is definite: the relays stop
/// with it (exit 2) instead of retrying what would be refused again.
async fn refusal(url: &str) -> String {
    let error = outbox_relay::pg::connect(url)
        .await
        .map(|_| ())
        .expect_err("the connection must be refused");
    assert_eq!(
        classify(&error),
        ErrorClass::Definite,
        "retried: {}",
        error_chain(&error)
    );
    error_chain(&error)
}

/// Why a replication session with `url` cannot start (it must not).
async fn replication_refusal(url: &str) -> String {
    replication_error(replication_config(url))
        .await
        .expect("the replication session must be refused")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_role_is_refused_without_its_certificate() {
    let dbs = TlsDbs::new().await;
    dbs.enable_cert_role().await;
    let port = 8000 + TLS_OFFSET;

    // The control: with the stack's certificate both kinds of connection get in, as the
    // role, so what is refused below is refused for the certificate.
    let with_cert = cert_url(port, &dbs.name, Some(&client_cert()));
    let user: String = common::connect(&with_cert)
        .await
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, CERT_ROLE);
    if let Some(error) = replication_error(replication_config(&with_cert)).await {
        panic!("the replication connection with the certificate failed: {error}");
    }

    // No certificate, with or without a password: the role's rule is `cert` only.
    let without = cert_url(port, &dbs.name, None);
    let with_password = without.replace(&format!("{CERT_ROLE}@"), &format!("{CERT_ROLE}:guess@"));
    for url in [&without, &with_password] {
        let text = refusal(url).await;
        assert!(
            text.contains("connection requires a valid client certificate"),
            "{text}"
        );
        let text = replication_refusal(url).await;
        assert!(
            text.contains("connection requires a valid client certificate"),
            "{text}"
        );
    }

    // A certificate with the role's name that the stack's CA did not sign: the server
    // refuses it in the handshake.
    let forged = make_cert(&format!("/CN={CERT_ROLE}"), false);
    let text = refusal(&cert_url(port, &dbs.name, Some(&forged))).await;
    assert!(text.contains("UnknownCA"), "{text}");

    // A certificate from the stack's CA for another name: not this role's.
    let other = make_cert("/CN=outbox_relay_source", true);
    let text = refusal(&cert_url(port, &dbs.name, Some(&other))).await;
    assert!(
        text.contains(&format!(
            "certificate authentication failed for user \"{CERT_ROLE}\""
        )),
        "{text}"
    );
    for file in [forged.0, forged.1, other.0, other.1] {
        let _ = std::fs::remove_file(file);
    }
}

/// Runs `outbox-relay check` against the TLS instance's Kafka through `kafka`, within a
/// minute; its report line on the brokers.
async fn kafka_check(kafka: &KafkaAccess) -> serde_json::Value {
    let admin_start = tls_url("postgres", "postgres", 8000 + TLS_OFFSET, "db_start");
    let admin_end = tls_url("postgres", "postgres", 8001 + TLS_OFFSET, "db_end");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["check", "--json", "--brokers", &kafka.brokers])
            .env("OUTBOX_RELAY_KAFKA_PROPERTIES", &kafka.properties)
            .env("OUTBOX_RELAY_SOURCE_URL", admin_start)
            .env("OUTBOX_RELAY_TARGET_URL", admin_end)
            .output(),
    )
    .await
    .expect("check answers within a minute")
    .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    report
        .as_array()
        .and_then(|lines| lines.iter().find(|l| l["check"] == "kafka: brokers"))
        .cloned()
        .unwrap_or_else(|| panic!("no kafka: brokers line in {report}"))
}

/// The listeners let in only clients with their credential, and `check` says why it
/// cannot reach them, within its bounded wait.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_listeners_refuse_clients_without_their_credential() {
    tls_stack().await;
    // The controls: with the credential, the same listeners answer.
    for kafka in [
        KafkaAccess::ssl(true),
        KafkaAccess::sasl_ssl("SCRAM-SHA-256"),
    ] {
        let line = kafka_check(&kafka).await;
        assert_eq!(line["ok"], true, "{line}");
    }

    // SSL without a client certificate: the broker fails the handshake.
    let started = Instant::now();
    let line = kafka_check(&KafkaAccess::ssl(false)).await;
    assert_eq!(line["ok"], false, "{line}");
    assert!(
        line["detail"]
            .as_str()
            .is_some_and(|d| d.contains("alert bad certificate")),
        "{line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    // SASL_SSL with a wrong password: the login fails, and the password is not shown.
    let mut wrong = KafkaAccess::sasl_ssl("SCRAM-SHA-256");
    wrong.properties = wrong
        .properties
        .replace(SASL_PASSWORD, "Wr0ng-kafka-pw-8d2c");
    let line = kafka_check(&wrong).await;
    assert_eq!(line["ok"], false, "{line}");
    let detail = line["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("Authentication failed"), "{line}");
    assert!(!detail.contains("Wr0ng-kafka-pw-8d2c"), "{line}");
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
    let text = refusal(&wrong_name).await;
    assert!(
        text.contains("certificate") && text.contains("not valid for"),
        "{text}"
    );

    // The replication connection refuses it too.
    let config = replication_config(&wrong_name);
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
    let (other_ca, other_key) = make_cert("/CN=other", false);
    let untrusted = tls_url("postgres", "postgres", 8000 + TLS_OFFSET, "postgres")
        .replace(&ca.display().to_string(), &other_ca.display().to_string())
        .replace("verify-full", "verify-ca");
    let text = refusal(&untrusted).await;
    assert!(text.contains("certificate"), "{text}");
    let _ = std::fs::remove_file(other_ca);
    let _ = std::fs::remove_file(other_key);
}

/// The TLS instance refuses plain text: prefer and require (which verify nothing) get in
/// over TLS, on both kinds of connection; disable is refused.
#[tokio::test(flavor = "multi_thread")]
async fn prefer_and_require_use_tls_and_disable_is_refused_by_a_tls_only_server() {
    tls_stack().await;
    let port = 8000 + TLS_OFFSET;
    for mode in ["prefer", "require"] {
        let url = format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres?sslmode={mode}");
        let ssl: bool = common::connect(&url)
            .await
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "sslmode={mode}");
        if let Some(error) = replication_error(replication_config(&url)).await {
            panic!("sslmode={mode}: the replication connection failed: {error}");
        }
    }
    let plain = format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres?sslmode=disable");
    let text = refusal(&plain).await;
    assert!(text.contains("no encryption"), "{text}");
    let text = replication_refusal(&plain).await;
    assert!(text.contains("no encryption"), "{text}");
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

    let config = replication_config(&url);
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
