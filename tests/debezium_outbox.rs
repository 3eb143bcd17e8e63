//! Debezium compatibility (issue #24): Debezium 3.6.1's Outbox Event Router and the relay's
//! `event-router` preset, run on the same Debezium-shaped outbox, write the same records.
//!
//! # The outbox and its events
//! `app.outboxevent (id uuid, aggregatetype, aggregateid, type varchar, payload jsonb)`, the
//! table of Debezium's outbox documentation, written by several source transactions: some
//! with one event, some with events of several aggregate types, some that also write a
//! business table; payloads with nested objects, unicode, numbers such as `12.30` and
//! `1e400`, escapes, top-level scalars, JSON `null` and SQL NULL. Also what applications do
//! to an outbox besides inserting: a row inserted and deleted in one transaction (the
//! pattern Debezium's documentation recommends), a later delete and an update; neither tool
//! may publish anything for those but the insert.
//!
//! # What is compared
//! Topic by topic: the same topics, the same number of records; for every event (matched by
//! the `id` header, which both sides must carry with the same value) the same topic, the same
//! key bytes, the same partition, and the same value: both null, or JSON that parses to the same
//! `serde_json::Value` (with `arbitrary_precision`, so numbers compare by their text: `12.30`
//! is not `12.3`); and for every key, the events in the same order. Each side is also checked
//! against the rows written (so a broken harness fails as such). What differs without
//! changing what a consumer of the payload reads (other headers, timestamps,
//! value bytes before normalisation) is printed as a report, not asserted:
//! `cargo test --test debezium_outbox -- --nocapture` shows it.
//!
//! # Why one tool after the other
//! Both tools at their defaults write `outbox.event.<aggregatetype>`. Renaming either's
//! topics (Debezium's `route.topic.replacement`, a topic in the relay's route) would move it
//! off the defaults this test is about, so the two run one after the other: the aggregate
//! types carry a nonce per run (`Order<nonce>`, …), so no other run's topic is ever read;
//! Debezium runs first, its records are read and kept, its topics deleted and waited gone;
//! then the relay runs and creates those topics afresh, as it would on a cluster where
//! Debezium never ran. Both slots and both publications exist before the first event is
//! written, so both tools decode the same WAL by streaming (Debezium `snapshot.mode=no_data`
//! on its pre-created slot, the relay `--no-create-slot`): neither reads the table by snapshot.
//!
//! # Debezium's configuration
//! Kafka Connect standalone (as `scripts/bench` runs it), with what a team running the Outbox
//! Event Router for raw JSON payloads and plain string keys sets: `StringConverter` for keys
//! and values, `transforms=outbox` of type `io.debezium.transforms.outbox.EventRouter` and
//! nothing else of the router's (all its defaults), pgoutput, `table.include.list`, its own
//! slot and publication, and `topic.creation.default.*` (3 partitions, RF 3,
//! min.insync.replicas 2, what the relay creates) since the brokers do not create topics.
//! See [`Debezium::start`].
//!
//! The jars come from `scripts/bench.d/fetch-debezium` (Maven Central; `scripts/test` runs
//! it and sets `OUTBOX_RELAY_DEBEZIUM_LIBS`). Without them the test fails and says how to
//! get them; it never skips.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use common::{random_name, read_topic, ReadRecord, Relay, TestDbs, BROKERS};

/// The outbox table, as Debezium's documentation names it.
const TABLE: &str = "app.outboxevent";

/// One event row to insert.
struct Event {
    /// Index into the run's aggregate types.
    aggregate: usize,
    aggregate_id: String,
    event_type: &'static str,
    /// The payload's JSON text as the application sends it; `None` is SQL NULL.
    payload: Option<String>,
}

/// An event as written: what both tools must publish for it.
#[derive(Debug, Clone)]
struct Written {
    id: String,
    topic: String,
    key: String,
    /// `payload::text` as PostgreSQL prints it; `None` for SQL NULL.
    payload: Option<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_outbox_event_router_and_the_event_router_preset_write_the_same_records() {
    let libs = debezium_libs();
    let dbs = TestDbs::new().await;
    let nonce = &random_name("n")[2..10];
    let aggregates: Vec<String> = ["Order", "Customer", "Shipment", "Invoice"]
        .iter()
        .map(|a| format!("{a}{nonce}"))
        .collect();
    let topics: BTreeSet<String> = aggregates
        .iter()
        .map(|a| format!("outbox.event.{a}"))
        .collect();
    let (dbz_slot, relay_slot) = (random_name("dbz"), random_name("relay"));
    let (dbz_publication, relay_publication) = ("dbz_outbox", "relay_outbox");

    let source = dbs.source().await;
    source
        .batch_execute(&format!(
            "CREATE SCHEMA app;
             CREATE TABLE {TABLE} (
                 id uuid PRIMARY KEY,
                 aggregatetype varchar(255) NOT NULL,
                 aggregateid varchar(255) NOT NULL,
                 type varchar(255) NOT NULL,
                 payload jsonb);
             -- A business table written in the same transactions, in no publication.
             CREATE TABLE app.orders (id bigserial PRIMARY KEY, note text);
             CREATE PUBLICATION {dbz_publication} FOR TABLE {TABLE};
             CREATE PUBLICATION {relay_publication} FOR TABLE {TABLE};"
        ))
        .await
        .unwrap();
    // Each slot in a statement of its own: not in a transaction that has written.
    for slot in [&dbz_slot, &relay_slot] {
        source
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await
            .unwrap();
    }
    let written = write_events(&source, &aggregates).await;
    let last_commit_ms: f64 = source
        .query_one(
            "SELECT extract(epoch FROM clock_timestamp())::float8 * 1000",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "{} events in {} topics written; Debezium first",
        written.len(),
        topics.len()
    );

    // Debezium, then its topics out of the way.
    let started = Instant::now();
    let mut debezium = Debezium::start(&libs, &dbs, &dbz_slot, dbz_publication);
    debezium.wait_for(&topics, written.len(), Duration::from_secs(150));
    debezium.stop();
    let dbz = read_topics(&topics, nonce).await;
    eprintln!("debezium: done in {:?}", started.elapsed());
    assert_holds_the_events("Debezium", &dbz, &written);
    delete_topics_and_wait(topics.iter().cloned().collect()).await;

    // The relay, on its own slot and publication, with the preset's defaults.
    let started = Instant::now();
    let progress_topic = random_name("progress");
    let dead_letter_topic = random_name("dead_letters");
    let mut relay = Relay::spawn(
        &[
            "connector",
            "--source-url",
            &dbs.source_url,
            "--brokers",
            BROKERS,
            "--table",
            TABLE,
            "--preset",
            "event-router",
            "--slot",
            &relay_slot,
            "--publication",
            relay_publication,
            "--progress-topic",
            &progress_topic,
            "--dead-letter-topic",
            &dead_letter_topic,
            "--no-create-slot",
            "--no-create-publication",
        ],
        &[],
    );
    loop {
        let written_so_far: usize = read_topics(&topics, nonce)
            .await
            .values()
            .map(Vec::len)
            .sum();
        if written_so_far >= written.len() {
            break;
        }
        if let Some(status) = relay.child.try_wait().unwrap() {
            panic!("the relay exited ({status}):\n{}", tail(&relay.log, 40));
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the relay wrote {written_so_far} of {} records in 120 s; its log:\n{}",
            written.len(),
            tail(&relay.log, 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(relay.terminate().success(), "the relay's graceful stop");
    // Read after the stop: whatever it published besides the events (an update, a delete,
    // a duplicate) is in the topics by then.
    let relayed = read_topics(&topics, nonce).await;
    let dead_letters = {
        let topic = dead_letter_topic.clone();
        tokio::task::spawn_blocking(move || read_topic(&topic))
            .await
            .unwrap()
    };
    assert!(
        dead_letters.is_empty(),
        "the relay dead-lettered {} events, e.g. {:?} ({:?})",
        dead_letters.len(),
        String::from_utf8_lossy(&dead_letters[0].value),
        header_names(&dead_letters[0])
    );
    eprintln!("relay: done in {:?}", started.elapsed());
    let mut cleanup: Vec<String> = topics.iter().cloned().collect();
    cleanup.extend([
        outbox_relay::kafka::progress_topic_of(&progress_topic, &relay_slot),
        dead_letter_topic,
    ]);

    let report = compare(&written, &dbz, &relayed, last_commit_ms);
    eprintln!("{report}");
    delete_topics_and_wait(cleanup).await;
    debezium.remove_dir();
}

/// Inserts the events, in transactions of one or more, plus the deletes and the update
/// that neither tool may publish; returns the inserted events in commit order.
async fn write_events(source: &tokio_postgres::Client, aggregates: &[String]) -> Vec<Written> {
    let (order, customer, shipment, invoice) = (0, 1, 2, 3);
    let event = |aggregate, id: &str, event_type, payload: Option<&str>| Event {
        aggregate,
        aggregate_id: id.to_string(),
        event_type,
        payload: payload.map(str::to_string),
    };
    // Hand-written payloads first: each a case where two JSON printers could differ.
    let mut transactions: Vec<Vec<Event>> = vec![
        vec![event(
            order,
            "order-1",
            "OrderCreated",
            Some(
                r#"{"order": {"id": 1, "lines": [{"sku": "A-1", "qty": 2, "price": 12.30},
                   {"sku": "B-2", "qty": 1, "price": 0.5}], "customer": {"name": "Zoë",
                   "tags": ["vip", null, true, false], "address": {"city": "Zürich"}}}}"#,
            ),
        )],
        vec![
            event(
                order,
                "order-2",
                "OrderCreated",
                Some(
                    r#"{"a": 12.30, "b": 1e400, "c": -0.0, "d": 1E-7, "e": 123456789012345678901234567890,
                       "f": 0.1, "g": -17, "h": 2.50e3, "i": 100.000}"#,
                ),
            ),
            event(
                customer,
                "客户-7",
                "CustomerCreated",
                Some(
                    r#"{"name": "日本語テキスト", "emoji": "🎉🚀", "rtl": "שלום", "combining": "é",
                       "escaped": "\u00e9\ud83d\ude00"}"#,
                ),
            ),
            event(
                shipment,
                "ship 1/with spaces",
                "ShipmentPlanned",
                Some(
                    r#"{"quote": "say \"hi\"", "backslash": "C:\\path\\to", "newline": "a\nb",
                       "tab": "\t", "control": "\u0001\u001f", "slash": "\/", "html": "<a href='x'>&amp;</a>"}"#,
                ),
            ),
        ],
        vec![
            event(
                invoice,
                "inv-1",
                "InvoiceIssued",
                Some(r#"[1, "two", {"three": 3.0}, []]"#),
            ),
            event(
                invoice,
                "inv-2",
                "InvoiceIssued",
                Some(r#""just a string""#),
            ),
            event(invoice, "inv-3", "InvoiceIssued", Some("42.4200")),
            event(invoice, "inv-4", "InvoiceIssued", Some("true")),
        ],
        vec![
            // JSON null, SQL NULL, an empty object, and keys jsonb reorders and dedupes.
            event(customer, "cust-null", "CustomerForgotten", Some("null")),
            event(customer, "cust-sqlnull", "CustomerForgotten", None),
            event(order, "order-3", "OrderCancelled", Some("{}")),
            event(
                order,
                "order-3",
                "OrderCancelled",
                Some(r#"{"b": 1, "a": 2, "a": 3, "aa": {}}"#),
            ),
        ],
    ];
    // Then a volume of ordinary events: several per key, several aggregate types per
    // transaction in every third one.
    let notes = ["", "ünïcödé", "line\nbreak", "ταχύ", "\"quoted\""];
    for t in 0..45usize {
        let size = if t % 3 == 0 { 4 } else { 1 + t % 2 };
        let mut txn = Vec::new();
        for j in 0..size {
            let seq = t * 10 + j;
            let aggregate = if t % 3 == 0 { j % 4 } else { t % 4 };
            let payload = serde_json::json!({
                "seq": seq,
                "note": notes[seq % notes.len()],
                "customer": {"id": seq % 7, "name": format!("Customer {}", seq % 7)},
                "lines": (0..seq % 3).map(|l| serde_json::json!({"line": l, "qty": l + 1})).collect::<Vec<_>>(),
            });
            // A decimal amount with its trailing zero, which serde_json's printer would drop.
            let payload = payload.to_string().replacen(
                '{',
                &format!("{{\"amount\": {}.{:02}0, ", seq, seq % 100),
                1,
            );
            txn.push(event(
                aggregate,
                &format!("agg-{}", seq % 7),
                ["Created", "Updated", "Closed"][seq % 3],
                Some(&payload),
            ));
        }
        transactions.push(txn);
    }

    let mut written = Vec::new();
    for (t, txn) in transactions.iter().enumerate() {
        source.batch_execute("BEGIN").await.unwrap();
        if t % 2 == 0 {
            source
                .execute(
                    "INSERT INTO app.orders (note) VALUES ($1)",
                    &[&format!("txn {t}")],
                )
                .await
                .unwrap();
        }
        for e in txn {
            written.push(insert(source, aggregates, e).await);
        }
        source.batch_execute("COMMIT").await.unwrap();
    }
    // Inserted and deleted in one transaction: the insert is an event all the same.
    source.batch_execute("BEGIN").await.unwrap();
    let gone = insert(
        source,
        aggregates,
        &event(
            order,
            "order-4",
            "OrderPlaced",
            Some(r#"{"deleted": "in the same transaction"}"#),
        ),
    )
    .await;
    source
        .execute(
            &format!("DELETE FROM {TABLE} WHERE id = $1::text::uuid"),
            &[&gone.id],
        )
        .await
        .unwrap();
    source.batch_execute("COMMIT").await.unwrap();
    written.push(gone);
    // A later delete and an update: no event.
    source
        .execute(
            &format!("DELETE FROM {TABLE} WHERE id = $1::text::uuid"),
            &[&written[0].id],
        )
        .await
        .unwrap();
    source
        .execute(
            &format!(
                "UPDATE {TABLE} SET payload = '{{\"updated\": true}}' WHERE id = $1::text::uuid"
            ),
            &[&written[1].id],
        )
        .await
        .unwrap();
    // A last event after them, so that waiting for every insert also waits past them.
    written.push(
        insert(
            source,
            aggregates,
            &event(
                shipment,
                "ship-last",
                "ShipmentDelivered",
                Some(r#"{"last": true}"#),
            ),
        )
        .await,
    );
    written
}

async fn insert(source: &tokio_postgres::Client, aggregates: &[String], e: &Event) -> Written {
    let aggregate = &aggregates[e.aggregate];
    let row = source
        .query_one(
            &format!(
                "INSERT INTO {TABLE} (id, aggregatetype, aggregateid, type, payload)
                 VALUES (gen_random_uuid(), $1, $2, $3, $4::text::jsonb)
                 RETURNING id::text, payload::text"
            ),
            &[aggregate, &e.aggregate_id, &e.event_type, &e.payload],
        )
        .await
        .unwrap_or_else(|error| panic!("insert {:?}: {error}", e.payload));
    Written {
        id: row.get(0),
        topic: format!("outbox.event.{aggregate}"),
        key: e.aggregate_id.clone(),
        payload: row.get(1),
    }
}

/// Where the Kafka Connect and Debezium jars are: `$OUTBOX_RELAY_DEBEZIUM_LIBS`, else
/// where `scripts/bench.d/fetch-debezium` puts them by default. Panics, saying how to get
/// them, when they are not there.
fn debezium_libs() -> PathBuf {
    let dir = std::env::var_os("OUTBOX_RELAY_DEBEZIUM_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let state = std::env::var_os("BENCH_STACK_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp/outbox-relay-bench/stack"));
            state.join("debezium-libs")
        });
    let has = |prefix: &str| {
        std::fs::read_dir(&dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(prefix) && name.ends_with(".jar")
            })
        })
    };
    assert!(
        dir.join(".complete").exists()
            && has("connect-runtime-")
            && has("debezium-connector-postgres-")
            && has("debezium-connect-plugins-"),
        "no complete Kafka Connect + Debezium in {} (the Outbox Event Router is in \
         debezium-connect-plugins): fetch them with `scripts/bench.d/fetch-debezium` \
         (scripts/test does), or point OUTBOX_RELAY_DEBEZIUM_LIBS at such a directory",
        dir.display()
    );
    dir
}

/// Kafka Connect standalone running Debezium's PostgreSQL connector with the Outbox Event
/// Router; killed on drop.
struct Debezium {
    child: Child,
    /// Its properties files, offsets file and logs.
    dir: PathBuf,
    rest_port: u16,
    name: String,
}

impl Debezium {
    fn start(libs: &Path, dbs: &TestDbs, slot: &str, publication: &str) -> Self {
        let name = random_name("debezium");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        // A free port for Connect's REST API (its status is how a failed task shows).
        let rest_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let worker = format!(
            "bootstrap.servers={BROKERS}
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
offset.storage.file.filename={dir}/offsets
offset.flush.interval.ms=1000
plugin.discovery=service_load
listeners=http://127.0.0.1:{rest_port}
",
            dir = dir.display()
        );
        let connector = format!(
            "name={name}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname=127.0.0.1
database.port=8000
database.user=postgres
database.password=postgres
database.dbname={db}
topic.prefix={db}
plugin.name=pgoutput
slot.name={slot}
publication.name={publication}
publication.autocreate.mode=disabled
table.include.list={TABLE}
snapshot.mode=no_data
topic.creation.default.partitions=3
topic.creation.default.replication.factor=3
topic.creation.default.min.insync.replicas=2
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
",
            db = dbs.name
        );
        std::fs::write(dir.join("worker.properties"), worker).unwrap();
        std::fs::write(dir.join("connector.properties"), &connector).unwrap();
        eprintln!("debezium: connector.properties:\n{connector}");
        let log = std::fs::File::create(dir.join("stdout.log")).unwrap();
        let child = Command::new("java")
            .args([
                "-Xms128m",
                "-Xmx768m",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                common::repo()
                    .join("scripts/bench.d/log4j2-connect.xml")
                    .display()
            ))
            .arg(format!(
                "-Dbench.connect.log={}",
                dir.join("connect.log").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(dir.join("worker.properties"))
            .arg(dir.join("connector.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("java runs (scripts/stack up installs it)");
        eprintln!("debezium: Kafka Connect logs to {}", dir.display());
        Self {
            child,
            dir,
            rest_port,
            name,
        }
    }

    /// Waits until the topics hold `expected` records in all (Connect writes without
    /// transactions, so the high watermarks count them); panics if Connect exits, its
    /// connector or task fails, or `timeout` passes.
    fn wait_for(&mut self, topics: &BTreeSet<String>, expected: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("group.id", random_name("watch"))
            .create()
            .unwrap();
        let mut checked = Instant::now();
        loop {
            let total: i64 = topics.iter().map(|t| high_watermarks(&consumer, t)).sum();
            if total >= expected as i64 {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("Kafka Connect exited ({status}):\n{}", self.logs());
            }
            if checked.elapsed() > Duration::from_secs(2) {
                checked = Instant::now();
                if let Some(status) = self.status() {
                    assert!(
                        !status.contains("\"FAILED\""),
                        "Debezium failed: {status}\n{}",
                        self.logs()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "Debezium wrote {total} of {expected} records in {timeout:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The connector's status from Connect's REST API, if it answers.
    fn status(&self) -> Option<String> {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.rest_port));
        let mut stream =
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            stream,
            "GET /connectors/{}/status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
            self.name
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
    }

    fn logs(&self) -> String {
        format!(
            "--- connect.log ---\n{}\n--- stdout ---\n{}",
            tail(&self.dir.join("connect.log"), 40),
            tail(&self.dir.join("stdout.log"), 20)
        )
    }

    /// SIGTERM (Connect's graceful stop), SIGKILL after 30 s.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes its directory (kept when the test fails, for the logs).
    fn remove_dir(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of a topic's high watermarks; 0 while it does not exist.
fn high_watermarks(consumer: &BaseConsumer, topic: &str) -> i64 {
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return 0;
    };
    let Some(t) = metadata.topics().first() else {
        return 0;
    };
    t.partitions()
        .iter()
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                .map(|(_, high)| high)
                .unwrap_or(0)
        })
        .sum()
}

/// Every committed record of every topic whose name holds `nonce` (so a topic neither
/// expected nor asked for shows up too), by topic.
async fn read_topics(expected: &BTreeSet<String>, nonce: &str) -> Topics {
    let (expected, nonce) = (expected.clone(), nonce.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("group.id", random_name("list"))
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(30))
            .unwrap();
        let mut names: BTreeSet<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| n.contains(&nonce))
            .collect();
        names.retain(|n| expected.contains(n) || !n.starts_with("__"));
        names
            .into_iter()
            .map(|t| {
                let records = read_topic(&t);
                (t, records)
            })
            .collect()
    })
    .await
    .unwrap()
}

/// Deletes the topics and waits until the brokers no longer list them (3 answers in a
/// row), so that the next tool creates them afresh.
async fn delete_topics_and_wait(names: Vec<String>) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for result in admin
        .delete_topics(
            &refs,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap()
    {
        if let Err((topic, code)) = result {
            if code != rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition {
                panic!("deleting {topic}: {code}");
            }
        }
    }
    let names2 = names.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut absent_in_a_row = 0;
        while absent_in_a_row < 3 {
            assert!(
                Instant::now() < deadline,
                "topics {names2:?} still listed after 60 s"
            );
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", BROKERS)
                .create()
                .unwrap();
            let listed = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|m| {
                    m.topics()
                        .iter()
                        .any(|t| names2.iter().any(|n| n == t.name()))
                })
                .unwrap_or(true);
            absent_in_a_row = if listed { 0 } else { absent_in_a_row + 1 };
            std::thread::sleep(Duration::from_millis(300));
        }
    })
    .await
    .unwrap();
}

/// Records read back, by topic.
type Topics = BTreeMap<String, Vec<ReadRecord>>;

/// For each (topic, key), its event ids in the order of its partition; panics if a key's
/// records are spread over partitions.
fn order_per_key(side: &Topics) -> BTreeMap<(String, Vec<u8>), Vec<String>> {
    let mut out: BTreeMap<_, Vec<(i32, i64, String)>> = BTreeMap::new();
    for (topic, records) in side {
        for r in records {
            let id = String::from_utf8_lossy(header(r, "id")[0]).into_owned();
            out.entry((topic.clone(), r.key.clone().unwrap_or_default()))
                .or_default()
                .push((r.partition, r.offset, id));
        }
    }
    out.into_iter()
        .map(|(k, mut v)| {
            let partitions: BTreeSet<i32> = v.iter().map(|x| x.0).collect();
            assert_eq!(
                partitions.len(),
                1,
                "key {k:?} spread over partitions {partitions:?}"
            );
            v.sort();
            (k, v.into_iter().map(|x| x.2).collect())
        })
        .collect()
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The values of the headers named `name`.
fn header<'a>(record: &'a ReadRecord, name: &str) -> Vec<&'a [u8]> {
    record
        .headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
        .collect()
}

/// A record found by its event id.
struct Found<'a> {
    topic: &'a str,
    record: &'a ReadRecord,
}

/// Each side's records by their `id` header; panics on a record without exactly one, or an
/// id seen twice.
fn by_id<'a>(side: &str, topics: &'a Topics) -> BTreeMap<String, Found<'a>> {
    let mut out = BTreeMap::new();
    for (topic, records) in topics {
        for record in records {
            let ids = header(record, "id");
            assert_eq!(
                ids.len(),
                1,
                "{side}: a record of {topic} (partition {}, offset {}) has {} `id` headers; headers {:?}",
                record.partition,
                record.offset,
                ids.len(),
                header_names(record)
            );
            let id = String::from_utf8(ids[0].to_vec())
                .unwrap_or_else(|_| panic!("{side}: `id` header is not UTF-8: {:?}", ids[0]));
            let previous = out.insert(id.clone(), Found { topic, record });
            assert!(previous.is_none(), "{side}: event {id} published twice");
        }
    }
    out
}

fn header_names(record: &ReadRecord) -> Vec<&str> {
    record.headers.iter().map(|(k, _)| k.as_str()).collect()
}

/// A value as the comparison sees it: null, JSON (numbers by their text), or bytes that
/// are not JSON.
#[derive(Debug, PartialEq)]
enum Value {
    Null,
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

fn value_of(record: &ReadRecord) -> Value {
    if record.null_value {
        return Value::Null;
    }
    serde_json::from_slice(&record.value)
        .map(Value::Json)
        .unwrap_or_else(|_| Value::Bytes(record.value.clone()))
}

/// Asserts what both sides must agree on; returns the report of what they may differ in.
/// Asserts that `side` holds one record per event written, in the event's topic, with its
/// key: Debezium is checked so, before the relay runs, so that a fault of the harness (or
/// of Debezium's configuration) fails as such and not as a difference of the relay.
fn assert_holds_the_events(side_name: &str, side: &Topics, written: &[Written]) {
    let counts: BTreeMap<&str, usize> = side.iter().map(|(t, r)| (t.as_str(), r.len())).collect();
    let mut expected: BTreeMap<&str, usize> = BTreeMap::new();
    for w in written {
        *expected.entry(w.topic.as_str()).or_default() += 1;
    }
    assert_eq!(
        counts, expected,
        "{side_name}: records per topic vs events written"
    );
    let ids = by_id(side_name, side);
    for w in written {
        let found = ids
            .get(&w.id)
            .unwrap_or_else(|| panic!("{side_name}: no record for {w:?}"));
        assert_eq!(found.topic, w.topic, "{side_name}: topic of {w:?}");
        assert_eq!(
            found.record.key.as_deref(),
            Some(w.key.as_bytes()),
            "{side_name}: key of {w:?}"
        );
    }
}

/// Asserts what the relay and Debezium must agree on; returns the report of what they
/// may differ in.
fn compare(written: &[Written], dbz: &Topics, relay: &Topics, last_commit_ms: f64) -> String {
    let counts = |side: &Topics| -> BTreeMap<String, usize> {
        side.iter().map(|(t, r)| (t.clone(), r.len())).collect()
    };
    let dbz_ids = by_id("debezium", dbz);
    // The relay against Debezium.
    assert_eq!(
        relay.keys().collect::<Vec<_>>(),
        dbz.keys().collect::<Vec<_>>(),
        "the same topics"
    );
    assert_eq!(
        counts(relay),
        counts(dbz),
        "the same number of records per topic"
    );
    let relay_ids = by_id("relay", relay);
    let mut report = vec!["debezium_outbox report:".to_string()];
    let mut raw_equal = 0;
    let mut dbz_headers = BTreeSet::new();
    let mut relay_headers = BTreeSet::new();
    let mut byte_differences = Vec::new();
    for w in written {
        let d = &dbz_ids[&w.id];
        let r = relay_ids
            .get(&w.id)
            .unwrap_or_else(|| panic!("the relay published no record for event {w:?}"));
        assert_eq!(r.topic, d.topic, "topic of event {}", w.id);
        assert_eq!(
            r.record.key.as_deref(),
            d.record.key.as_deref(),
            "key of event {} (relay {:?}, Debezium {:?})",
            w.id,
            r.record.key.as_deref().map(String::from_utf8_lossy),
            d.record.key.as_deref().map(String::from_utf8_lossy)
        );
        assert_eq!(
            value_of(r.record),
            value_of(d.record),
            "value of event {} (payload {:?}): relay {:?}, Debezium {:?}",
            w.id,
            w.payload,
            String::from_utf8_lossy(&r.record.value),
            String::from_utf8_lossy(&d.record.value)
        );
        if r.record.null_value == d.record.null_value && r.record.value == d.record.value {
            raw_equal += 1;
        } else if byte_differences.len() < 3 {
            byte_differences.push(format!(
                "      relay {:?}\n      dbz   {:?}",
                String::from_utf8_lossy(&r.record.value),
                String::from_utf8_lossy(&d.record.value)
            ));
        }
        // The preset places keys as Debezium's Java producer does (murmur2).
        assert_eq!(
            r.record.partition,
            d.record.partition,
            "partition of event {} (key {:?})",
            w.id,
            r.record.key.as_deref().map(String::from_utf8_lossy)
        );
        dbz_headers.extend(header_names(d.record).into_iter().map(str::to_string));
        relay_headers.extend(header_names(r.record).into_iter().map(str::to_string));
    }
    // Per key, the events in the same order (a key lives in one partition on each side).
    assert_eq!(
        order_per_key(relay),
        order_per_key(dbz),
        "per key, the events in the same order"
    );
    // Both tools ran after the last commit: a timestamp before it is a commit time, one
    // after it the time the tool handled the event.
    let before_last_commit = |side: &Topics| {
        side.values()
            .flatten()
            .filter(|r| r.timestamp.is_some_and(|t| (t as f64) <= last_commit_ms))
            .count()
    };
    report.push(format!(
        "  {} events in {} topics: same topics, counts, ids, keys, partitions, JSON values, per-key order",
        written.len(),
        dbz.len()
    ));
    report.push(format!(
        "  value bytes identical before normalisation: {raw_equal} of {}",
        written.len()
    ));
    report.extend(byte_differences);
    report.push(format!(
        "  null values (SQL NULL payload): relay {}, Debezium {}",
        relay.values().flatten().filter(|r| r.null_value).count(),
        dbz.values().flatten().filter(|r| r.null_value).count()
    ));
    report.push(format!("  headers, Debezium: {dbz_headers:?}"));
    report.push(format!("  headers, relay:    {relay_headers:?}"));
    report.push(format!(
        "  record timestamps at or before the last source commit (a commit time, not the time \
         the tool ran): relay {} of {n}, Debezium {} of {n}",
        before_last_commit(relay),
        before_last_commit(dbz),
        n = written.len()
    ));
    let sample = |side: &Topics| {
        side.values()
            .flatten()
            .next()
            .map(|r| {
                r.headers
                    .iter()
                    .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    report.push(format!("  a Debezium record's headers: {}", sample(dbz)));
    report.push(format!("  a relay record's headers:    {}", sample(relay)));
    report.join("\n")
}
