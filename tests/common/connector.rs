//! Helpers for the connector's tests (`tests/connector.rs`, `tests/connector_faults.rs`):
//! a connector wired to a test's own databases, topics and slot; the exactly-once check
//! of its topic; and the sampler that checks that the slot never confirms past Kafka.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outbox_relay::cmd::chaos::check;
use outbox_relay::lsn::Lsn;
use tokio_postgres::Client;

use super::{random_name, read_topic, Relay, TestDbs, BROKERS};

/// A connector wired to a test's own databases, topic, progress topic and slot.
pub struct KafkaPipeline {
    pub dbs: TestDbs,
    pub topic: String,
    pub progress_topic: String,
    pub slot: String,
}

impl KafkaPipeline {
    pub async fn new() -> Self {
        Self {
            dbs: TestDbs::new().await,
            topic: random_name("outbox"),
            progress_topic: random_name("progress"),
            slot: random_name("slot"),
        }
    }

    /// Spawns the connector of this pipeline, in batches of 500, with `extra` arguments.
    pub fn spawn_connector(&self, extra: &[&str], envs: &[(&str, &str)]) -> Relay {
        let mut args = vec!["--batch-size", "500"];
        args.extend_from_slice(extra);
        spawn_connector(
            &self.dbs.source_url,
            &self.topic,
            &self.progress_topic,
            &self.slot,
            &args,
            envs,
        )
    }

    /// Waits until the topic holds every outbox row, then checks that each id is there
    /// exactly once with exactly the source's values, keyed by account_id.
    pub async fn assert_topic_exactly_once(&self) {
        let expected = expected_records(&self.dbs.source().await, "outbox.transactions").await;
        self.assert_topic_holds_exactly(&expected, Duration::from_secs(300))
            .await;
    }

    /// [`KafkaPipeline::assert_topic_exactly_once`] with a bound of `timeout`.
    pub async fn assert_topic_exactly_once_within(&self, timeout: Duration) {
        let expected = expected_records(&self.dbs.source().await, "outbox.transactions").await;
        self.assert_topic_holds_exactly(&expected, timeout).await;
    }

    /// The same check against the ledger (`main.transactions`), for when the outbox
    /// has been cleaned up.
    pub async fn assert_topic_exactly_once_per_ledger(&self) {
        let expected = expected_records(&self.dbs.source().await, "main.transactions").await;
        self.assert_topic_holds_exactly(&expected, Duration::from_secs(300))
            .await;
    }

    /// Waits (up to `timeout`) until the topic holds as many records as `expected`,
    /// then checks that every id is there exactly once, with its exact value and key.
    pub async fn assert_topic_holds_exactly(
        &self,
        expected: &HashMap<i64, String>,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        let last = loop {
            let topic = self.topic.clone();
            let records = tokio::task::spawn_blocking(move || read_topic(&topic))
                .await
                .unwrap();
            if records.len() >= expected.len() {
                break records;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {} outbox rows reached Kafka",
                records.len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut seen: HashMap<i64, usize> = HashMap::new();
        for record in &last {
            let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
            let id = value["id"].as_i64().unwrap();
            *seen.entry(id).or_default() += 1;
            let text = std::str::from_utf8(&record.value).unwrap();
            assert_eq!(
                Some(text),
                expected.get(&id).map(String::as_str),
                "value of id {id}"
            );
            assert_eq!(
                record.key.as_deref(),
                Some(value["account_id"].to_string().as_bytes()),
                "key of id {id}"
            );
            assert!(record.headers.iter().any(|(k, _)| k == "outbox-relay.lsn"));
        }
        let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            duplicated.is_empty(),
            "{} ids duplicated, e.g. {:?}",
            duplicated.len(),
            &duplicated[..duplicated.len().min(5)]
        );
        assert_eq!(seen.len(), expected.len(), "ids in Kafka vs source rows");
    }

    pub async fn confirmed_flush_lsn(&self) -> Option<String> {
        self.dbs
            .source()
            .await
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0))
    }

    /// Rows left in the outbox table.
    pub async fn outbox_rows(&self) -> i64 {
        self.dbs
            .source()
            .await
            .query_one("SELECT count(*) FROM outbox.transactions", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Starts sampling the slot's confirmed LSN and then Kafka's progress LSN.
    pub fn start_sampler(&self) -> LsnSampler {
        LsnSampler::start(
            self.dbs.source_url.clone(),
            outbox_relay::kafka::progress_topic_of(&self.progress_topic, &self.slot),
            self.slot.clone(),
        )
    }
}

/// Spawns `outbox-relay connector` from the database at `source_url` into `topic`,
/// with its progress records in `progress_topic`, on slot `slot`, with `extra`
/// arguments.
pub fn spawn_connector(
    source_url: &str,
    topic: &str,
    progress_topic: &str,
    slot: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Relay {
    let mut args = vec![
        "connector",
        "--source-url",
        source_url,
        "--brokers",
        BROKERS,
        "--topic",
        topic,
        "--progress-topic",
        progress_topic,
        "--slot",
        slot,
    ];
    args.extend_from_slice(extra);
    Relay::spawn(&args, envs)
}

/// The rows of `table` in the source database, as the connector must render them:
/// `{"id":…,"account_id":…,"amount":…,"created_at":"…"}`, keyed by id.
pub async fn expected_records(source: &Client, table: &str) -> HashMap<i64, String> {
    source
        .query(
            &format!("SELECT id, account_id::text, amount::text, created_at::text FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let value = format!(
                "{{\"id\":{id},\"account_id\":{},\"amount\":{},\"created_at\":\"{}\"}}",
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3)
            );
            (id, value)
        })
        .collect()
}

/// One sample resolved: the slot's `confirmed_flush_lsn` (C), and the LSN of the
/// slot's last committed progress record in Kafka below the progress partition's high
/// watermark read after C (K); see `outbox_relay::cmd::chaos::check::Held` for why the
/// watermark is read during the run and the records only after it.
#[derive(Debug, Clone, Copy)]
pub struct LsnSample {
    pub confirmed: Lsn,
    pub in_kafka: Lsn,
}

/// Samples (C, high watermark) in the background until [`LsnSampler::finish`].
///
/// Kafka's progress only moves forward, so K read after C is at least what Kafka held
/// when C was read: an outbox transaction whose commit end LSN lies in (K, C] was
/// confirmed to the slot while Kafka did not hold it. That is what
/// [`assert_never_confirmed_past_kafka`] looks for, with the commit LSNs of a witness
/// slot created before the load.
pub struct LsnSampler {
    stop: tokio::sync::watch::Sender<bool>,
    /// Samples taken so far past the first record of the progress topic.
    checkable: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<check::Sample>>,
    progress_topic: String,
    slot: String,
}

impl LsnSampler {
    fn start(source_url: String, progress_topic: String, slot: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let checkable = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = checkable.clone();
        let (topic, slot_name) = (progress_topic.clone(), slot.clone());
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let (started, mut misses) = (Instant::now(), 0);
            let new_reader = || {
                std::sync::Arc::new(
                    check::WatermarkReader::new(BROKERS, &topic).expect("watermark reader"),
                )
            };
            let mut reader = new_reader();
            while !*stopped.borrow() {
                let t = Instant::now();
                match sample(&source_url, &reader, &slot_name).await {
                    Ok(sample) => {
                        // The snapshot marker is the first record; only samples past
                        // it and its commit marker can hold a streaming position.
                        if matches!(sample.held, check::Held::TopicBelow(high) if high > 2) {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        samples.push(sample);
                    }
                    Err(why) => {
                        // A fresh client next time: after broker restarts, an idle
                        // client's cached metadata can stay "unknown partition".
                        reader = new_reader();
                        misses += 1;
                        eprintln!("lsn sampler: no sample ({why}) after {:?}", t.elapsed());
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            }
            eprintln!(
                "lsn sampler: {} samples, {misses} misses in {:?}",
                samples.len(),
                started.elapsed()
            );
            samples
        });
        Self {
            stop,
            checkable,
            task,
            progress_topic,
            slot,
        }
    }

    /// Keeps sampling until at least `n` samples past the progress topic's first
    /// record are taken (components that were down leave gaps), or `timeout` passes.
    pub async fn wait_for_samples(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.checkable.load(std::sync::atomic::Ordering::SeqCst) < n
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops sampling and returns the samples, resolved against the progress topic's
    /// committed records. Call it once the connector has caught up: a moment later
    /// every transaction it committed is readable.
    pub async fn finish(self) -> Vec<LsnSample> {
        let _ = self.stop.send(true);
        let samples = self.task.await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (topic, slot) = (self.progress_topic, self.slot);
        let history = tokio::task::spawn_blocking(move || {
            check::progress_history(BROKERS, &topic, &slot, Duration::from_secs(60))
        })
        .await
        .unwrap()
        .unwrap();
        check::resolve_samples(&samples, &history)
            .into_iter()
            .map(|s| LsnSample {
                confirmed: s.confirmed,
                in_kafka: s.held,
            })
            .collect()
    }
}

/// Reads C, then the progress partition's high watermark; an error says why there is
/// no sample (a component is down, the slot does not exist yet).
async fn sample(
    source_url: &str,
    reader: &std::sync::Arc<check::WatermarkReader>,
    slot: &str,
) -> Result<check::Sample, String> {
    let source = tokio::time::timeout(
        Duration::from_secs(5),
        outbox_relay::pg::connect(source_url),
    )
    .await
    .map_err(|_| "pg_start connect timed out".to_string())?
    .map_err(|e| format!("pg_start: {e}"))?;
    let confirmed =
        tokio::time::timeout(Duration::from_secs(5), check::slot_confirmed(&source, slot))
            .await
            .map_err(|_| "pg_start query timed out".to_string())?
            .map_err(|e| format!("pg_start: {e}"))?
            .ok_or("no slot yet")?;
    drop(source);
    let reader = reader.clone();
    let high = tokio::task::spawn_blocking(move || reader.high(Duration::from_secs(10)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("progress topic watermark: {e}"))?;
    Ok(check::Sample {
        confirmed,
        held: check::Held::TopicBelow(high),
    })
}

/// Asserts that no sample confirmed an outbox transaction that Kafka did not hold: no
/// commit end LSN of `commits` (from the witness slot) lies in (K, C]. Samples taken
/// while Kafka holds the snapshot marker 0/0 are skipped: the new slot then starts at
/// its consistent point, which is no confirmation by the relay, and a crash in that
/// state drops and recreates the slot (see `pipeline::snapshot`).
pub fn assert_never_confirmed_past_kafka(samples: &[LsnSample], commits: &[Lsn]) {
    let checked: Vec<&LsnSample> = samples.iter().filter(|s| !s.in_kafka.is_zero()).collect();
    assert!(
        checked.len() >= 10,
        "too few (C, K) samples to check: {} of {}",
        checked.len(),
        samples.len()
    );
    let mut violations = Vec::new();
    for s in &checked {
        let passed = commits
            .iter()
            .filter(|c| **c > s.in_kafka && **c <= s.confirmed)
            .count();
        if passed > 0 {
            violations.push((s.confirmed, s.in_kafka, passed));
        }
    }
    assert!(
        violations.is_empty(),
        "the slot confirmed outbox transactions that Kafka did not hold, in {} of {} samples; \
         (confirmed C, Kafka K, transactions in (K, C]), first ones: {:?}",
        violations.len(),
        checked.len(),
        &violations[..violations.len().min(5)]
    );
    eprintln!(
        "lsn check: {} samples, {} checked, none confirmed past Kafka",
        samples.len(),
        checked.len()
    );
}

/// Panics if the relay has exited.
pub fn assert_running(relay: &mut Relay, when: &str) {
    if let Some(status) = relay.child.try_wait().unwrap() {
        panic!("the connector exited ({status}) {when}");
    }
}
