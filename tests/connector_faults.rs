//! The connector through outages of the shared stack: a broker killed, two brokers
//! down at once (below `min.insync.replicas=2`), all three down three times or hung,
//! pg_start killed and stopped, and the connector itself killed. Every such test holds
//! [`common::fault_lock`], ends with "every id exactly once in read_committed", and
//! samples the slot's confirmed LSN against Kafka's progress all along: the slot never
//! confirms an outbox transaction that Kafka does not hold (see
//! [`common::connector::LsnSampler`]). One more test crashes all three brokers right
//! after a commit and checks that the progress record read back is the last one.

mod common;

use std::time::Duration;

use common::connector::{
    assert_never_confirmed_past_kafka, assert_running, KafkaPipeline, LsnSampler,
};
use common::{stack, Relay};
use outbox_relay::cmd::load::{self, LoadArgs, LoadError, LoadSummary};
use outbox_relay::lsn::Lsn;

/// A stack component taken down by a test; brought back on drop if the test did not
/// (a failing test must not leave the shared stack broken).
struct Down {
    name: &'static str,
    up: bool,
}

impl Down {
    fn kill(name: &'static str) -> Self {
        eprintln!("fault: kill {name}");
        stack(&["kill", name]);
        Self { name, up: false }
    }

    fn stop(name: &'static str) -> Self {
        eprintln!("fault: stop {name}");
        stack(&["stop", name]);
        Self { name, up: false }
    }

    /// SIGSTOP: the process hangs with its sockets open (requests in flight get no
    /// answer); `start` resumes it.
    fn pause(name: &'static str) -> Self {
        eprintln!("fault: pause {name}");
        stack(&["pause", name]);
        Self { name, up: false }
    }

    fn start(mut self) {
        eprintln!("fault: start {}", self.name);
        stack(&["start", self.name]);
        self.up = true;
    }
}

/// The three brokers, each taken down by `fault`.
fn all_brokers(fault: fn(&'static str) -> Down) -> Vec<Down> {
    ["kafka1", "kafka2", "kafka3"]
        .into_iter()
        .map(fault)
        .collect()
}

/// Starts the components together, each in its own thread: with two or three brokers
/// down, none finishes booting without another (a controller quorum is two of three).
fn start_together(downs: Vec<Down>) {
    let threads: Vec<_> = downs
        .into_iter()
        .map(|down| std::thread::spawn(move || down.start()))
        .collect();
    for thread in threads {
        thread.join().expect("a start panicked");
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        if !self.up {
            let _ = std::process::Command::new(common::repo().join("scripts/stack"))
                .args(["start", self.name])
                .status();
        }
    }
}

/// Spaces fault injections (not a synchronisation: every check below polls).
async fn pause_for(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

/// A test's run: its pipeline, a witness slot created before any load, the sampler
/// and the load in the background.
struct Run {
    p: KafkaPipeline,
    witness: String,
    sampler: Option<LsnSampler>,
    load: Option<tokio::task::JoinHandle<Result<LoadSummary, LoadError>>>,
    count: u64,
}

impl Run {
    async fn start(count: u64, rate: f64) -> Self {
        let p = KafkaPipeline::new().await;
        let witness = p.dbs.create_witness_slot().await;
        let sampler = p.start_sampler();
        let mut args = LoadArgs::count(&p.dbs.source_url, count);
        args.rate = rate;
        let load = tokio::spawn(async move { load::run(&args).await });
        Self {
            p,
            witness,
            sampler: Some(sampler),
            load: Some(load),
            count,
        }
    }

    /// Waits for the load, then checks every id exactly once in read_committed and
    /// that the slot never confirmed past Kafka.
    async fn check(&mut self) {
        let load = self.load.take().expect("checked once");
        let summary = load.await.unwrap().unwrap();
        assert_eq!(summary.failed, 0, "the load gave up on transactions");
        assert_eq!(summary.committed, self.count);
        let commits = self.p.dbs.outbox_commit_lsns(&self.witness).await;
        assert!(
            commits.len() as u64 >= self.count,
            "the witness saw {} outbox transactions",
            commits.len()
        );
        // Keep sampling until the slot is confirmed past the last outbox transaction
        // (the connector caught up), then check the samples before the topic, so that
        // a confirmation past Kafka is reported as such even when it also lost rows.
        let last = commits.last().copied().unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while std::time::Instant::now() < deadline {
            let confirmed = self.p.confirmed_flush_lsn().await;
            if confirmed.and_then(|c| c.parse::<Lsn>().ok()) >= Some(last) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let sampler = self.sampler.take().expect("checked once");
        sampler.wait_for_samples(30, Duration::from_secs(120)).await;
        let samples = sampler.finish().await;
        assert_never_confirmed_past_kafka(&samples, &commits);
        self.p.assert_topic_exactly_once().await;
    }
}

/// Polls until the connector has delivered something to Kafka (its slot is confirmed
/// past its creation), so that the faults below hit a streaming connector.
async fn wait_streaming(p: &KafkaPipeline, connector: &mut Relay) {
    common::wait_until(
        "the connector to stream",
        Duration::from_secs(120),
        || async { p.confirmed_flush_lsn().await.is_some() },
    )
    .await;
    assert_running(connector, "before the faults");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_sigkilled_during_load_loses_and_duplicates_nothing() {
    let _lock = common::fault_lock().await;
    let mut run = Run::start(5000, 250.0).await;
    let mut connector = run.p.spawn_connector(&[], &[]);
    wait_streaming(&run.p, &mut connector).await;
    pause_for(3.0).await;
    let down = Down::kill("kafka2");
    pause_for(8.0).await;
    assert_running(&mut connector, "while kafka2 was down");
    down.start();
    run.check().await;
    assert_running(&mut connector, "after kafka2 came back");
    assert!(connector.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_brokers_down_below_min_isr_the_connector_waits_and_loses_nothing() {
    let _lock = common::fault_lock().await;
    let mut run = Run::start(5000, 250.0).await;
    let mut connector = run.p.spawn_connector(&[], &[]);
    wait_streaming(&run.p, &mut connector).await;
    pause_for(3.0).await;
    // One broker left: below min.insync.replicas=2 (and the KRaft quorum is lost), so
    // no Kafka transaction can commit; the connector must wait, neither exit nor lose.
    let down2 = Down::kill("kafka2");
    let down3 = Down::kill("kafka3");
    pause_for(15.0).await;
    assert_running(&mut connector, "while two brokers were down");
    down2.start();
    down3.start();
    run.check().await;
    assert_running(&mut connector, "after the brokers came back");
    assert!(connector.terminate().success());
}

/// Chaos run 4 lost 55 transactions around two outages of all three brokers in a row
/// (finding 6 of docs/reliability.md). Each outage here outlasts the producer's two 30 s
/// waits (delivery reports, then the flush of `commit_transaction`), so that the batch
/// in flight goes through the whole retry path: its flush times out, the Kafka
/// transaction is aborted once the coordinator answers, and the batch is sent again. The next outage comes while the connector sends its first
/// attempt after the brokers are back, so that records in flight may be written but
/// not acknowledged: retried on the same producer, such records were lost.
#[tokio::test(flavor = "multi_thread")]
async fn all_brokers_down_again_and_again_the_connector_waits_and_loses_nothing() {
    let _lock = common::fault_lock().await;
    // Load all along the three outages.
    let mut run = Run::start(75000, 250.0).await;
    let mut connector = run.p.spawn_connector(&[], &[]);
    wait_streaming(&run.p, &mut connector).await;
    pause_for(2.0).await;
    for (round, back_for) in [1.0, 0.3, 2.0].into_iter().enumerate() {
        let downs = all_brokers(Down::kill);
        pause_for(65.0).await;
        assert_running(
            &mut connector,
            &format!("while all brokers were down ({round})"),
        );
        start_together(downs);
        pause_for(back_for).await;
    }
    run.check().await;
    assert_running(&mut connector, "after the brokers came back");
    assert!(connector.terminate().success());
}

/// Finding 6's mechanism head on: all three brokers hung (SIGSTOP) during load for
/// longer than the producer's two 30 s waits (delivery reports, then the flush of
/// `commit_transaction`). A produce request in flight at that instant may be written
/// by its partition leader while its acknowledgement never reaches the connector; the
/// attempt then times out, is aborted once the brokers answer, and the batch is sent
/// again. Retried on the same producer, such records were acknowledged as duplicates
/// of the aborted ones and never written again.
#[tokio::test(flavor = "multi_thread")]
async fn all_brokers_hung_past_the_commit_timeouts_the_connector_loses_nothing() {
    let _lock = common::fault_lock().await;
    let mut run = Run::start(25000, 250.0).await;
    let mut connector = run.p.spawn_connector(&[], &[]);
    wait_streaming(&run.p, &mut connector).await;
    pause_for(3.0).await;
    let hung = all_brokers(Down::pause);
    pause_for(70.0).await;
    assert_running(&mut connector, "while all brokers hung");
    start_together(hung);
    run.check().await;
    assert_running(&mut connector, "after the brokers came back");
    assert!(connector.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_start_killed_and_stopped_during_load_loses_and_duplicates_nothing() {
    let _lock = common::fault_lock().await;
    let mut run = Run::start(8000, 250.0).await;
    let mut connector = run.p.spawn_connector(&[], &[]);
    wait_streaming(&run.p, &mut connector).await;
    pause_for(3.0).await;
    // A crash (SIGKILL of the postmaster), then a clean shutdown.
    let down = Down::kill("pg_start");
    pause_for(3.0).await;
    down.start();
    pause_for(5.0).await;
    assert_running(&mut connector, "after pg_start crashed");
    let down = Down::stop("pg_start");
    pause_for(3.0).await;
    down.start();
    run.check().await;
    assert_running(&mut connector, "after pg_start came back");
    assert!(connector.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn confirmed_flush_lsn_never_passes_what_kafka_holds_through_connector_and_broker_kills() {
    let _lock = common::fault_lock().await;
    let mut run = Run::start(6000, 250.0).await;
    // Killed right after a Kafka commit, before the slot is confirmed.
    let mut connector = run
        .p
        .spawn_connector(&[], &[common::crash_after_commits("3")]);
    let status = common::wait_for_exit(&mut connector, Duration::from_secs(120)).await;
    assert!(!status.success(), "the test hook aborts the process");
    // Killed at random moments, one of them while a broker is down.
    let mut down = None;
    for round in 0..4 {
        let mut connector = run.p.spawn_connector(&[], &[]);
        let wait_ms = 1500 + rand::random::<u64>() % 2500;
        pause_for(wait_ms as f64 / 1000.0).await;
        if round == 1 {
            down = Some(Down::kill("kafka1"));
            pause_for(2.0).await;
        }
        eprintln!("round {round}: SIGKILL of the connector after {wait_ms} ms");
        connector.kill9();
        if round == 2 {
            if let Some(down) = down.take() {
                down.start();
            }
        }
    }
    let mut connector = run.p.spawn_connector(&[], &[]);
    run.check().await;
    assert_running(&mut connector, "at the end");
    assert!(connector.terminate().success());
}

/// Finding 7 of docs/reliability.md: the progress record read back right after the
/// brokers restart must be the last committed one. A restarted broker takes its high
/// watermark from a checkpoint written every few seconds; elected leader, it serves
/// fetches up to that watermark until its followers fetch again, below records that
/// were acknowledged before the crash. A read that trusted the fetch's end of partition
/// then returned an older record, and the connector sent that batch again. Here the
/// connector stops right after a commit, all three brokers are killed at once, and the
/// progress record is read back over and over while they come back.
#[tokio::test(flavor = "multi_thread")]
async fn the_progress_record_read_back_after_all_brokers_crash_is_the_last_committed() {
    let _lock = common::fault_lock().await;
    let mut run = Run::start(200_000, 1000.0).await;
    let (topic, slot) = (run.p.progress_topic.clone(), run.p.slot.clone());
    let read = move || {
        outbox_relay::kafka::read_progress(common::BROKERS, &topic, &slot, Duration::from_secs(20))
    };
    for round in 0..2 {
        let mut connector = run.p.spawn_connector(&[], &[]);
        wait_streaming(&run.p, &mut connector).await;
        pause_for(3.0).await;
        // Committing under load until the SIGTERM; then the crash, at once.
        assert!(connector.terminate().success());
        let last = tokio::task::spawn_blocking(read.clone())
            .await
            .unwrap()
            .unwrap();
        assert!(last.is_some(), "the connector committed progress");
        let downs = all_brokers(Down::kill);
        let up = std::thread::spawn(move || start_together(downs));
        let mut reads = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !up.is_finished() || reads < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the progress record could not be read back ({reads} reads)"
            );
            if let Ok(found) = tokio::task::spawn_blocking(read.clone()).await.unwrap() {
                reads += 1;
                assert_eq!(
                    found, last,
                    "round {round}, read {reads}: a stale progress record"
                );
            }
        }
        up.join().expect("brokers started");
        eprintln!("round {round}: {reads} reads while the brokers came back");
    }
    run.load.take().expect("started").abort();
}
