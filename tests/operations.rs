//! Operations: the configuration file, `check`, and the metrics and health endpoints.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{load, random_name, spawn_direct, stack, TestDbs, BROKERS};

/// The relay with none of the developer's `OUTBOX_RELAY_*` variables (from
/// `scripts/stack env`): these tests set the environment they mean to test.
fn relay(args: &[&str]) -> std::process::Output {
    relay_command(Command::new(env!("CARGO_BIN_EXE_outbox-relay")), args)
}

/// [`relay`], killed after `seconds` (`timeout`'s exit 124) if it has not exited by then.
fn relay_within(seconds: u32, args: &[&str]) -> std::process::Output {
    let mut command = Command::new("timeout");
    command.args([&seconds.to_string(), env!("CARGO_BIN_EXE_outbox-relay")]);
    relay_command(command, args)
}

fn relay_command(mut command: Command, args: &[&str]) -> std::process::Output {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OUTBOX_RELAY_") {
            command.env_remove(name);
        }
    }
    command.args(args).output().expect("run outbox-relay")
}

fn write_config(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", random_name("relay")));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn docs_configuration_md_is_current() {
    let output = relay(&["config-reference"]);
    assert!(output.status.success());
    let docs = std::fs::read_to_string(common::repo().join("docs/configuration.md")).unwrap();
    assert!(
        docs == String::from_utf8(output.stdout).unwrap(),
        "docs/configuration.md is stale: run `outbox-relay config-reference > docs/configuration.md`"
    );
}

#[test]
fn a_bad_configuration_file_gives_a_precise_error() {
    for (text, expected) in [
        (
            "[connector]\nbach_size = 10\n",
            "unknown key `connector.bach_size`",
        ),
        (
            "[connector]\nbatch_size = \"many\"\n",
            "key `connector.batch_size`",
        ),
        (
            "[connector]\nno_create_slot = 1\n",
            "key `connector.no_create_slot` must be a boolean",
        ),
        ("[connector]\nslot =\n", "not valid TOML"),
        ("[connectr]\nslot = \"x\"\n", "unknown key `connectr`"),
        (
            "[[connector.route]]\ntable = \"public.outbox\"\ntopik = \"x\"\n",
            "key `connector.route`: invalid value '{\"table\" = \"public.outbox\", \"topik\" = \"x\"}': invalid route: unknown field `topik`",
        ),
        (
            "[connector]\ndelivery = \"exactly\"\n",
            "key `connector.delivery`: invalid value 'exactly' (possible values: transactional",
        ),
    ] {
        let path = write_config(text);
        let output = relay(&["connector", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{text}: expected {expected:?} in {stderr}"
        );
        assert!(
            stderr.contains(path.to_str().unwrap()),
            "names the file: {stderr}"
        );
        assert!(
            !stderr.contains("--help") && !stderr.contains("--route <"),
            "a key in a file is not a flag: {stderr}"
        );
    }
}

/// A Kafka property librdkafka refuses stops every command that makes a Kafka client
/// at once (exit 2), naming the key and never the credential: librdkafka's own message
/// quotes the whole value (a pasted Java JAAS line with its password; a misspelt
/// `sasl.pasword` that the redaction of `*password*` keys misses).
#[test]
fn a_refused_kafka_property_is_named_without_its_secret() {
    let secret = "TopSecretJaas";
    let jaas = format!(
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule \
         required username=\"relay\" password=\"{secret}\""
    );
    let typo = format!("sasl.pasword={secret}");
    let missing = "ssl.ca.location=/nonexistent/kafka-ca.pem".to_string();
    for (property, expected) in [
        (
            &jaas,
            "kafka property sasl.jaas.config: librdkafka refuses it: Java JAAS",
        ),
        (
            &typo,
            "kafka property sasl.pasword: librdkafka refuses it: No such configuration property",
        ),
        (
            &missing,
            "kafka property ssl.ca.location: cannot read /nonexistent/kafka-ca.pem",
        ),
    ] {
        for command in ["check", "status", "connector", "sink"] {
            let output = relay_within(20, &[command, "--kafka-property", property]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command} {property}: {stderr}"
            );
            assert!(
                stderr.contains(expected),
                "{command}: expected {expected:?} in {stderr}"
            );
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "{command} shows the secret: {stdout}{stderr}"
            );
        }
    }
}

#[tokio::test]
async fn configuration_file_environment_and_flags_take_effect_in_that_order() {
    let dbs = TestDbs::new().await;
    // The file points at a database that does not exist; the flag fixes it.
    let path = write_config(&format!(
        "source_url = \"postgres://postgres:postgres@127.0.0.1:8000/nope\"\ntarget_url = \"{}\"\n[check]\nno_kafka = true\n",
        dbs.target_url
    ));
    let output = relay(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "the file's source is wrong");
    let output = relay(&[
        "check",
        "--config",
        path.to_str().unwrap(),
        "--source-url",
        &dbs.source_url,
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        !stdout.contains("kafka:"),
        "no_kafka = true from the file: {stdout}"
    );
    // Only this variable: the developer's others (`scripts/stack env`) would name
    // databases the test did not make.
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OUTBOX_RELAY_") {
            command.env_remove(name);
        }
    }
    let output = command
        .env("OUTBOX_RELAY_SOURCE_URL", &dbs.source_url)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the environment overrides the file"
    );
}

#[tokio::test]
async fn check_passes_on_the_stack_and_says_who_creates_a_missing_publication() {
    // `check` connects once, without retrying: not while another test stops pg_start.
    let _lock = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    let check = |last: &[&str]| {
        let args: [&str; 5] = [
            "check",
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
        ];
        relay(&[&args, last].concat())
    };
    let output = check(&["--brokers", BROKERS]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.lines().all(|l| l.starts_with("ok")), "{stdout}");
    assert!(
        stdout
            .contains("kafka: transaction timeout: 300000 ms (the brokers allow up to 900000 ms)"),
        "{stdout}"
    );
    // A timeout the brokers would refuse: named, with what to change.
    let output = check(&["--brokers", BROKERS, "--transaction-timeout-ms", "1000000"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "--transaction-timeout-ms (1000000 ms) is above the brokers' \
             transaction.max.timeout.ms (900000 ms)"
        ),
        "{stdout}"
    );

    dbs.source()
        .await
        .batch_execute("DROP PUBLICATION outbox_relay")
        .await
        .unwrap();
    // The tables' owner: the connector creates it at its first start, as the slot.
    let output = check(&["--no-kafka"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "ok    pg_start: publication: absent: created at the first start, with outbox.transactions"
        ),
        "{stdout}"
    );
    // A role that may not create it: named, with what the owner must run.
    let role = random_name("ort_role");
    dbs.source()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw'; GRANT USAGE ON SCHEMA outbox TO {role}"
        ))
        .await
        .unwrap();
    let as_role = dbs
        .source_url
        .replace("postgres:postgres@", &format!("{role}:pw@"));
    let check_as_role = || {
        relay(&[
            "check",
            "--no-kafka",
            "--source-url",
            &as_role,
            "--target-url",
            &dbs.target_url,
        ])
    };
    let output = check_as_role();
    // The tables' owner with CREATE on the database, not a superuser, and without
    // USAGE on the outbox's schema (the catalog lookup needs none): it may create it.
    dbs.source()
        .await
        .batch_execute(&format!(
            "ALTER TABLE outbox.transactions OWNER TO {role};
             GRANT CREATE ON DATABASE {db} TO {role};
             REVOKE USAGE ON SCHEMA outbox FROM {role}",
            db = dbs.name
        ))
        .await
        .unwrap();
    let owner = check_as_role();
    dbs.source()
        .await
        .batch_execute(&format!(
            "ALTER TABLE outbox.transactions OWNER TO postgres;
             REVOKE CREATE ON DATABASE {db} FROM {role}; DROP ROLE {role}",
            db = dbs.name
        ))
        .await
        .unwrap();
    let owner = String::from_utf8_lossy(&owner.stdout);
    assert!(
        owner.contains(
            "ok    pg_start: publication: absent: created at the first start, with outbox.transactions"
        ),
        "{owner}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "FAIL  pg_start: publication: publication outbox_relay does not exist, and this role cannot create it"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("CREATE PUBLICATION outbox_relay FOR TABLE outbox.transactions"),
        "says what to do: {stdout}"
    );
    // The sample row needs SELECT on the outbox: the server's reason, not "db error".
    assert!(
        stdout.contains("sample: db error: ERROR: permission denied for table transactions"),
        "{stdout}"
    );
}

/// A team with its own outbox and inbox: `migrate --relay-only` creates the relay's
/// bookkeeping in pg_end and nothing else (it does not even connect to pg_start), and
/// `check` with the team's routes and inbox passes without the demo's tables, while it
/// names what is missing without the inbox or with a wrong one.
#[tokio::test]
async fn own_outbox_and_inbox_need_only_the_relay_s_schema() {
    // `check` connects once, without retrying: not while another test stops pg_start.
    let _lock = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    dbs.target()
        .await
        .batch_execute("DROP SCHEMA main CASCADE; DROP SCHEMA outbox_relay CASCADE")
        .await
        .unwrap();
    dbs.source()
        .await
        .batch_execute(
            "DROP PUBLICATION outbox_relay;
             CREATE TABLE public.outbox (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
                 aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb);
             CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert')",
        )
        .await
        .unwrap();

    // pg_start's URL points nowhere: --relay-only must not need it.
    let output = relay(&[
        "migrate",
        "--relay-only",
        "--source-url",
        "postgres://postgres:postgres@127.0.0.1:1/nowhere",
        "--target-url",
        &dbs.target_url,
    ]);
    assert!(output.status.success(), "{output:?}");
    let tables =
        |schema: &str| format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}'");
    assert_eq!(
        common::count(&dbs.target_url, &tables("outbox_relay")).await,
        3,
        "the relay's bookkeeping"
    );
    assert_eq!(
        common::count(&dbs.target_url, &tables("main")).await,
        0,
        "none of the demo's tables"
    );
    dbs.target()
        .await
        .batch_execute(
            "CREATE SCHEMA inbox;
             CREATE TABLE inbox.events (id uuid PRIMARY KEY, aggregateid text NOT NULL, payload jsonb)",
        )
        .await
        .unwrap();

    let check = |inbox: Option<&str>| {
        let mut args = vec![
            "check",
            "--no-kafka",
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
            "--table",
            "public.outbox",
            "--preset",
            "event-router",
        ];
        if let Some(inbox) = inbox {
            args.extend(["--inbox", inbox]);
        }
        let output = relay(&args);
        let stdout = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), stdout)
    };
    let inbox = r#"{table = "inbox.events", topics = ['^outbox\.event\..*'], columns = {id = "$header.id", aggregateid = "$key", payload = "$body"}}"#;
    let (code, stdout) = check(Some(inbox));
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("ok    pg_end: inbox inbox.events: topics ^outbox\\.event\\..*"),
        "{stdout}"
    );
    assert!(!stdout.contains("main.transactions"), "{stdout}");

    // Without the inbox, the ledger is the inbox, and its tables are missing.
    let (code, stdout) = check(None);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout
            .contains("FAIL  pg_end: table main.transactions: missing: run `outbox-relay migrate`"),
        "{stdout}"
    );

    // An inbox the sink would refuse at start is refused here, by name.
    let wrong = r#"{table = "inbox.evnts", topics = ["orders"]}"#;
    let (code, stdout) = check(Some(wrong));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  pg_end: inboxes:") && stdout.contains("inbox.evnts"),
        "{stdout}"
    );
}

/// The newest installed PostgreSQL's `bin` directory.
fn pg_bin() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .max()
        .unwrap()
}

/// A throw-away PostgreSQL cluster with the given settings (`-c` options), stopped on
/// drop: for what the stack's servers must not be put through.
struct ScratchCluster {
    dir: std::path::PathBuf,
    port: u16,
}

impl ScratchCluster {
    fn start(settings: &[&str]) -> Self {
        let dir =
            std::path::PathBuf::from(format!("/var/tmp/{}", random_name("outbox-relay-replica")));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = pg_bin();
        let runs = |args: &[&str]| {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .status()
                .unwrap()
                .success()
        };
        let run = |args: &[&str]| assert!(runs(args), "{args:?}");
        Command::new("chown")
            .args(["postgres:postgres", dir.to_str().unwrap()])
            .status()
            .unwrap();
        let data = dir.join("data");
        run(&[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]);
        // Ports 8090-8098, from a random one on: the tests of this binary run at once,
        // and one whose port is taken takes the next.
        let first = rand::random::<u16>() % 9;
        for port in (0..9).map(|i| 8090 + (first + i) % 9) {
            let mut options = format!(
                "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
                dir.display()
            );
            for setting in settings {
                options.push_str(" -c ");
                options.push_str(setting);
            }
            if runs(&[
                bin.join("pg_ctl").to_str().unwrap(),
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                dir.join("log").to_str().unwrap(),
                "-w",
                "start",
            ]) {
                return Self { dir, port };
            }
        }
        panic!("no port of 8090-8098 was free for a scratch cluster");
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        let bin = pg_bin();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn check_fails_on_wal_level_replica() {
    let cluster = ScratchCluster::start(&["wal_level=replica"]);
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let output = relay(&["check", "--source-url", &url, "--no-kafka"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "FAIL  pg_start: wal_level: pg_start has wal_level = replica; set wal_level = logical"
        ),
        "{stdout}"
    );
}

/// A slot PostgreSQL invalidated (here: it fell more than `max_slot_wal_keep_size`
/// behind) stops the relay with exit 2 and the cause and runbook, instead of a retry
/// loop or a new slot that would skip what it held; `status` reports it as a problem.
#[tokio::test]
async fn an_invalidated_slot_stops_the_relay_with_its_cause_and_status_reports_it() {
    let cluster = ScratchCluster::start(&[
        "wal_level=logical",
        "max_slot_wal_keep_size=1MB",
        "max_wal_size=32MB",
        "min_wal_size=32MB",
    ]);
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE SCHEMA outbox;
             CREATE TABLE outbox.transactions (id bigint PRIMARY KEY, account_id bigint,
                 amount numeric, created_at timestamptz DEFAULT now());
             CREATE PUBLICATION p FOR TABLE outbox.transactions;",
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('lost_slot', 'pgoutput')")
        .await
        .unwrap();
    // WAL past the cap, segment by segment, each followed by a checkpoint, which is
    // when PostgreSQL invalidates the slots holding too much.
    let mut lost = false;
    for round in 0..20_i64 {
        for statement in [
            format!(
                "INSERT INTO outbox.transactions
                 SELECT g, 1, 1 FROM generate_series({0}, {0} + 49999) g",
                round * 50_000
            ),
            "SELECT pg_switch_wal()".into(),
            "CHECKPOINT".into(),
        ] {
            client.batch_execute(&statement).await.unwrap();
        }
        let status: Option<String> = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'lost_slot'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            lost = true;
            break;
        }
    }
    assert!(lost, "the slot was never invalidated");
    let output = relay_within(
        60,
        &[
            "direct",
            "--source-url",
            &url,
            "--target-url",
            &url,
            "--slot",
            "lost_slot",
            "--publication",
            "p",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("slot lost_slot is invalidated: wal_status = lost")
            && stderr.contains("max_slot_wal_keep_size")
            && stderr.contains("pg_drop_replication_slot('lost_slot')")
            && stderr.contains("outbox-relay reconcile"),
        "{stderr}"
    );
    let output = relay(&[
        "status",
        "--json",
        "--source-url",
        &url,
        "--target-url",
        &url,
        "--slot",
        "lost_slot",
        "--timeout",
        "5",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("slot lost_slot is invalidated"),
        "{problems}"
    );
    assert_eq!(report["pg_start"]["slots"][0]["wal_status"], "lost");
    // The slot is still there: the relay neither dropped nor recreated it.
    let kept: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'lost_slot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);
}

/// A sink whose pg_end refuses it for good (no relay schema; a wrong password) stops
/// with exit 2 at once. Such an error is met in the partition-assignment callback,
/// which then takes no partition: nothing would wake the poll loop to see it, and the
/// sink sat there for ever looking healthy.
#[tokio::test]
async fn the_sink_exits_2_at_once_when_pg_end_lacks_its_schema_or_refuses_its_password() {
    let topic = common::create_topic("sink-refused", 1, &[]).await;
    let name = random_name("sink_refused");
    let admin = common::connect(common::PG_END_ADMIN).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let empty = format!("postgres://postgres:postgres@127.0.0.1:8001/{name}");
    let wrong_password = format!("postgres://postgres:wrong@127.0.0.1:8001/{name}");
    // Also on a topic that does not exist yet (the sink started before the
    // connector): it says so at its start, not once the topic appears.
    let absent = random_name("sink-refused-absent");
    for (target, says, topic) in [
        (&empty, "run `outbox-relay migrate`", &topic),
        (&empty, "run `outbox-relay migrate`", &absent),
        (
            &wrong_password,
            "check the user and password of --target-url",
            &topic,
        ),
    ] {
        let started = std::time::Instant::now();
        let output = relay_within(
            90,
            &[
                "sink",
                "--target-url",
                target,
                "--brokers",
                BROKERS,
                "--topic",
                topic,
                "--group",
                &random_name("sink-refused"),
                "--metrics-addr",
                "127.0.0.1:0",
            ],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{says}: {stderr}");
        assert!(stderr.contains(says), "{stderr}");
        eprintln!("{says}: exit 2 after {:?}", started.elapsed());
    }
    common::drop_databases(vec![common::PG_END_ADMIN.into()], name);
}

/// `load` into a pg_start database without the seed's tables stops at once and says
/// which tables it writes and how to make them.
#[tokio::test]
async fn load_into_a_database_without_the_seed_s_tables_says_to_migrate() {
    let name = random_name("load_empty");
    let admin = common::connect(common::PG_START_ADMIN).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let empty = format!("postgres://postgres:postgres@127.0.0.1:8000/{name}");
    let output = relay_within(60, &["load", "--source-url", &empty, "--count", "3"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("main.balance: run `outbox-relay migrate` to create them"),
        "{stderr}"
    );
    common::drop_databases(vec![common::PG_START_ADMIN.into()], name);
}

/// Whether `topic` exists on the stack's brokers.
fn topic_exists(topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(30))
        .expect("metadata");
    metadata.topics().iter().any(|t| t.name() == topic)
}

/// What the client refuses before the server has a say is as definite as a refused
/// password: a URL without the password its role needs stops each relay at once
/// (they retried it for ever, as "pg_end unavailable"), and so does an X.509 v1 client
/// certificate (which libpq takes and rustls does not), with what to do.
#[tokio::test]
async fn a_missing_password_and_a_v1_client_certificate_stop_the_relays_at_once() {
    let dbs = TestDbs::new().await;
    let no_password = |url: &str| url.replacen(":postgres@", "@", 1);
    let (source, target) = (no_password(&dbs.source_url), no_password(&dbs.target_url));
    assert_ne!(source, dbs.source_url, "the test's URL carries a password");
    let slot = random_name("nopassword");
    let topic = random_name("nopassword");
    for args in [
        vec![
            "direct",
            "--source-url",
            &source,
            "--target-url",
            &dbs.target_url,
            "--slot",
            &slot,
        ],
        vec![
            "sink",
            "--target-url",
            &target,
            "--topic",
            &topic,
            "--group",
            &topic,
        ],
        vec![
            "connector",
            "--source-url",
            &source,
            "--slot",
            &slot,
            "--topic",
            &topic,
        ],
    ] {
        let mut args = args.clone();
        args.extend(["--metrics-addr", "off"]);
        let output = relay_within(30, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}: {stderr}", args[0]);
        assert!(stderr.contains("password missing"), "{}: {stderr}", args[0]);
    }

    let dir = std::env::temp_dir().join(random_name("v1cert"));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "c.key",
        "-out",
        "c.csr",
        "-subj",
        "/CN=relay",
    ]);
    // No -extfile: version 1.
    openssl(&[
        "x509",
        "-req",
        "-in",
        "c.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "c.pem",
        "-days",
        "2",
    ]);
    let d = dir.display();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={d}/ca.pem&sslcert={d}/c.pem&sslkey={d}/c.key",
        dbs.source_url
    );
    let output = relay_within(30, &["check", "--no-kafka", "--source-url", &url]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("sslcert={d}/c.pem"))
            && stderr.contains("X.509 version 1")
            && stderr.contains("version 3"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A role without REPLICATION: pg_start refuses its replication session for good, so
/// direct mode and the connector exit 2 at once with what to grant (they retried
/// for ever), and `check` fails its role line. A connector that pg_start refuses
/// creates no topic first.
#[tokio::test]
async fn a_role_pg_start_refuses_stops_the_relays_at_once_and_creates_no_topic() {
    let dbs = TestDbs::new().await;
    let role = random_name("norepl");
    let admin = common::connect(common::PG_START_ADMIN).await;
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    dbs.source()
        .await
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA outbox TO {role}; GRANT SELECT ON outbox.transactions TO {role}"
        ))
        .await
        .unwrap();
    let as_role = dbs
        .source_url
        .replace("postgres:postgres@", &format!("{role}:pw@"));
    let wrong_password = dbs
        .source_url
        .replace("postgres:postgres@", "postgres:wrong@");
    let topic = random_name("refused");
    let progress = random_name("refused_progress");
    let slot = random_name("refused");
    let connector = |source_url: &str| {
        relay_within(
            90,
            &[
                "connector",
                "--source-url",
                source_url,
                "--brokers",
                BROKERS,
                "--slot",
                &slot,
                "--topic",
                &topic,
                "--progress-topic",
                &progress,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
        )
    };
    let output = connector(&wrong_password);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(!topic_exists(&topic), "a refused connector created {topic}");

    let output = connector(&as_role);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("lacks REPLICATION"), "{stderr}");
    let output = relay_within(
        90,
        &[
            "direct",
            "--source-url",
            &as_role,
            "--target-url",
            &dbs.target_url,
            "--slot",
            &slot,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ALTER ROLE <role> REPLICATION"), "{stderr}");

    let output = relay(&[
        "check",
        "--no-kafka",
        "--source-url",
        &as_role,
        "--target-url",
        &dbs.target_url,
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "FAIL  pg_start: replication role: role {role} may not open a replication \
             session: as a superuser, run ALTER ROLE {role} REPLICATION"
        )),
        "{stdout}"
    );
    let output = relay(&["check", "--no-kafka", "--source-url", &dbs.source_url]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ok    pg_start: replication role: postgres is a superuser"),
        "{stdout}"
    );
    drop(dbs);
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}

/// Brokers that refuse connections: the connector's retry says why (its topic request
/// only times out), and the sink logs each distinct Kafka error once a minute, not on
/// every reconnect attempt (it wrote ~15 lines a second).
#[tokio::test]
async fn unreachable_brokers_are_named_once_not_flooded() {
    let dbs = TestDbs::new().await;
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let sink = {
        let (target, closed) = (dbs.target_url.clone(), closed.clone());
        std::thread::spawn(move || {
            relay_within(
                12,
                &[
                    "sink",
                    "--target-url",
                    &target,
                    "--brokers",
                    &closed,
                    "--topic",
                    "t",
                    "--group",
                    "g",
                    "--metrics-addr",
                    "off",
                ],
            )
        })
    };
    // Named at once (a metadata request of 5 s), not when the first topic request times
    // out, 30 s later.
    let connector = relay_within(
        15,
        &[
            "connector",
            "--source-url",
            &dbs.source_url,
            "--brokers",
            &closed,
            "--slot",
            &random_name("unreachable"),
            "--metrics-addr",
            "off",
        ],
    );
    let stderr = String::from_utf8_lossy(&connector.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("kafka not ready, retrying")
                && l.contains(&format!("{closed}/bootstrap: Connect to"))
                && l.contains("Connection refused")),
        "{stderr}"
    );
    let sink = sink.join().unwrap();
    let stderr = String::from_utf8_lossy(&sink.stderr);
    let kafka_lines = stderr
        .lines()
        .filter(|l| l.contains("kafka") || l.contains("librdkafka"))
        .count();
    assert!(
        (1..=12).contains(&kafka_lines),
        "{kafka_lines} lines about Kafka in 12 s:\n{stderr}"
    );
}

/// A report read by a reader that stops early (`status --json | head`) ends the
/// command quietly with its own exit code, not a panic on the broken pipe.
#[test]
fn a_report_piped_into_a_reader_that_stops_early_does_not_panic() {
    let output = Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; \"$0\" config-reference | true",
            env!("CARGO_BIN_EXE_outbox-relay"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

async fn scrape(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

/// A sink on a quiet topic is ready once the group has taken it, with nothing to apply,
/// and so is a member left without a partition (more sinks than partitions): a
/// rollout that waits for `/readyz` must not wait for traffic.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_sink_and_one_without_a_partition_are_ready() {
    let dbs = TestDbs::new().await;
    let topic = common::create_topic("idle", 1, &[]).await;
    let group = random_name("idle");
    let extra = ["--metrics-addr", "127.0.0.1:0"];
    let first = common::sink::spawn_sink(&dbs, &topic, &group, &extra);
    let first_addr = first.metrics_addr().await;
    common::wait_until(
        "the idle sink to be ready",
        Duration::from_secs(90),
        || async { scrape(&first_addr, "/readyz").await.0 == 200 },
    )
    .await;
    let second = common::sink::spawn_sink(&dbs, &topic, &group, &extra);
    let second_addr = second.metrics_addr().await;
    common::wait_until(
        "the sink without a partition to be ready",
        Duration::from_secs(90),
        || async { scrape(&second_addr, "/readyz").await.0 == 200 },
    )
    .await;
    assert_eq!(scrape(&first_addr, "/readyz").await.0, 200);
    drop((first, second));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_during_a_run_and_readyz_turns_unready_when_pg_start_is_down() {
    let _lock = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    let slot = random_name("metrics");
    let direct = spawn_direct(&dbs, &slot, &["--metrics-addr", "127.0.0.1:0"], &[]);
    let addr = direct.metrics_addr().await;
    common::wait_until("/readyz to turn ready", Duration::from_secs(60), || async {
        scrape(&addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(scrape(&addr, "/healthz").await.0, 200);
    load(&dbs, 500).await;
    common::wait_until(
        "the transactions to be counted",
        Duration::from_secs(60),
        || async {
            let body = scrape(&addr, "/metrics").await.1;
            metric(&body, "outbox_relay_transactions_total").unwrap_or(0.0) >= 500.0
        },
    )
    .await;
    let body = scrape(&addr, "/metrics").await.1;
    for series in [
        "outbox_relay_records_total",
        "outbox_relay_confirmed_lsn",
        "outbox_relay_in_flight_records",
        "outbox_relay_apply_duration_seconds_bucket",
        "outbox_relay_apply_batch_size_bucket",
        "outbox_relay_end_to_end_latency_seconds_bucket",
        "outbox_relay_slot_lag_bytes",
    ] {
        assert!(body.contains(series), "{series} missing from:\n{body}");
    }
    let confirmed = metric(&body, "outbox_relay_confirmed_lsn").unwrap();
    load(&dbs, 100).await;
    common::wait_until(
        "the confirmed LSN to move",
        Duration::from_secs(60),
        || async {
            metric(
                &scrape(&addr, "/metrics").await.1,
                "outbox_relay_confirmed_lsn",
            )
            .unwrap_or(0.0)
                > confirmed
        },
    )
    .await;

    stack(&["stop", "pg_start"]);
    let unready = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if scrape(&addr, "/readyz").await.0 == 503 {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    stack(&["start", "pg_start"]);
    assert!(unready, "/readyz stayed ready with pg_start down");
    common::wait_until(
        "/readyz to turn ready again",
        Duration::from_secs(90),
        || async { scrape(&addr, "/readyz").await.0 == 200 },
    )
    .await;
}
