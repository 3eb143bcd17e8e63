//! Hot standby on the real stack: two instances on one slot, one active. The standby
//! neither takes the slot nor fences the active instance; when the active one dies it
//! takes over, and nothing is lost or repeated.

mod common;

use std::time::{Duration, Instant};

use common::connector::KafkaPipeline as Pipeline;
use common::{Relay, TestDbs};
use outbox_relay::cmd::load::{self, LoadArgs};

/// The pid of the walsender holding `slot`; `None` when it is free (or missing).
async fn holder(dbs: &TestDbs, slot: &str) -> Option<i32> {
    dbs.source()
        .await
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

/// Waits until a walsender other than `previous` holds `slot`; returns its pid.
async fn wait_held(dbs: &TestDbs, slot: &str, previous: Option<i32>, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = holder(dbs, slot).await.filter(|p| Some(*p) != previous) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no instance took slot {slot} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `rows` outbox rows straight into pg_start's outbox (ids 1..=rows), for an
/// initial snapshot to deliver.
async fn fill_outbox(dbs: &TestDbs, rows: i64) {
    dbs.source()
        .await
        .execute(
            "INSERT INTO outbox.transactions (id, account_id, amount, created_at)
             SELECT g, g % 100 + 1, g % 1000, now() FROM generate_series(1, $1::int8) g",
            &[&rows],
        )
        .await
        .unwrap();
}

async fn wait_log(relay: &Relay, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !relay.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "{} never logged {text:?}:\n{}",
            relay.log.display(),
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The active instance is killed three times under load; each time the standby takes
/// over (and a new standby is started). Returns the takeover times, and the active
/// and the standby instance (killed when dropped).
async fn kill_the_active_one_three_times(
    dbs: &TestDbs,
    slot: &str,
    spawn: &dyn Fn() -> Relay,
) -> (Vec<Duration>, [Relay; 2]) {
    let mut active = spawn();
    let mut pid = wait_held(dbs, slot, None, Duration::from_secs(120)).await;
    let mut standby = spawn();
    wait_log(&standby, "standing by", Duration::from_secs(60)).await;
    // Standing by fences no one: the active instance goes on undisturbed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    common::connector::assert_running(&mut active, "while another instance stands by");
    let log = active.log_text();
    assert!(
        !log.contains("fenced") && !log.contains("must be recreated"),
        "the standby disturbed the active instance:\n{log}"
    );
    assert_eq!(
        holder(dbs, slot).await,
        Some(pid),
        "the standby took the slot"
    );

    let mut takeovers = Vec::new();
    for round in 0..3 {
        active.kill9();
        let killed = Instant::now();
        pid = wait_held(dbs, slot, Some(pid), Duration::from_secs(30)).await;
        let took = killed.elapsed();
        eprintln!("round {round}: the standby held the slot {took:?} after the SIGKILL");
        takeovers.push(took);
        active = std::mem::replace(&mut standby, spawn());
        wait_log(&standby, "standing by", Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    common::connector::assert_running(&mut active, "after the last takeover");
    (takeovers, [active, standby])
}

#[tokio::test(flavor = "multi_thread")]
async fn two_connectors_on_one_slot_the_standby_takes_over_each_time_the_active_one_is_killed() {
    let p = Pipeline::new().await;
    let mut args = LoadArgs::count(&p.dbs.source_url, 6000);
    args.rate = 300.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    let (takeovers, _relays) =
        kill_the_active_one_three_times(&p.dbs, &p.slot, &|| p.spawn_connector(&[], &[])).await;
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 6000);
    p.assert_topic_exactly_once().await;
    let _sink = common::sink::spawn_sink(&p.dbs, &p.topic, &common::random_name("g"), &[]);
    p.dbs.wait_verified(Duration::from_secs(180)).await;
    eprintln!("connector takeovers: {takeovers:?}");
    for took in takeovers {
        assert!(took < Duration::from_secs(10), "a takeover took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_direct_instances_on_one_slot_the_standby_takes_over_each_time_the_active_one_is_killed(
) {
    let dbs = TestDbs::new().await;
    let slot = common::random_name("slot");
    let mut args = LoadArgs::count(&dbs.source_url, 6000);
    args.rate = 300.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    let (takeovers, _relays) = kill_the_active_one_three_times(&dbs, &slot, &|| {
        common::spawn_direct(&dbs, &slot, &["--batch-size", "500"], &[])
    })
    .await;
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 6000);
    dbs.wait_verified(Duration::from_secs(180)).await;
    eprintln!("direct takeovers: {takeovers:?}");
    for took in takeovers {
        assert!(took < Duration::from_secs(10), "a takeover took {took:?}");
    }
}

/// An active connector that goes silent (SIGSTOP: as a host cut off) loses the slot
/// once pg_start's `wal_sender_timeout` (3 s for this database) ends its walsender; the
/// standby takes over within that and 5 s, and fences it in Kafka. Resumed, the old
/// instance finds the slot taken, or meets the fence and ends its session, and either
/// way stands by: it neither exits nor fences its successor back.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_active_connector_loses_the_slot_and_never_fences_its_successor() {
    let p = Pipeline::new().await;
    p.dbs.set_wal_sender_timeout("3s").await;
    let mut args = LoadArgs::count(&p.dbs.source_url, 3000);
    args.rate = 300.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    let mut old = p.spawn_connector(&[], &[]);
    // Past the initial snapshot (a creator frozen during it is the test below).
    wait_log(&old, "streaming", Duration::from_secs(120)).await;
    let pid = wait_held(&p.dbs, &p.slot, None, Duration::from_secs(120)).await;
    let mut new = p.spawn_connector(&[], &[]);
    wait_log(&new, "standing by", Duration::from_secs(60)).await;
    old.pause();
    let silent = Instant::now();
    wait_held(&p.dbs, &p.slot, Some(pid), Duration::from_secs(30)).await;
    let took = silent.elapsed();
    eprintln!("the standby held the slot {took:?} after the active one went silent");
    assert!(
        took < Duration::from_secs(3 + 5),
        "takeover after {took:?}, wal_sender_timeout 3 s"
    );
    wait_log(&new, "streaming", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    old.resume();
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(status) = old.child.try_wait().unwrap() {
                return Some(status);
            }
            if old.log_text().contains("standing by") {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the old instance neither stood by nor exited");
    if let Some(status) = outcome {
        panic!(
            "the old instance exited ({status}) instead of standing by:\n{}",
            old.log_text()
        );
    }
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 3000);
    p.assert_topic_exactly_once().await;
    common::connector::assert_running(&mut new, "after the old instance came back");
    let log = new.log_text();
    assert!(
        !log.contains("fenced") && !log.contains("must be recreated"),
        "the old instance fenced its successor:\n{log}"
    );
}

/// An active direct instance frozen (SIGSTOP) inside a pg_end transaction leaves its
/// backend idle in that transaction, the batch's ids and balances locked. The standby
/// takes the slot once pg_start's `wal_sender_timeout` (3 s here) ends the frozen one's
/// walsender, and applies the same batch, which waits for those locks: pg_end ends the
/// abandoned transaction within the relay's apply timeout (60 s), so pg_end is exact
/// while the old instance is still frozen. Resumed, the old one repeats nothing and
/// stands by.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_instance_frozen_inside_a_pg_end_transaction_does_not_hold_up_its_successor() {
    let dbs = TestDbs::new().await;
    dbs.set_wal_sender_timeout("3s").await;
    let slot = common::random_name("slot");
    let mut old = common::spawn_direct(&dbs, &slot, &[], &[]);
    common::load(&dbs, 200).await;
    dbs.wait_verified(Duration::from_secs(120)).await;
    wait_log(&old, "streaming", Duration::from_secs(60)).await;
    let mut new = common::spawn_direct(&dbs, &slot, &[], &[]);
    wait_log(&new, "standing by", Duration::from_secs(60)).await;

    let blocker = dbs.hold_balances().await;
    let mut args = LoadArgs::count(&dbs.source_url, 300);
    args.rate = 100.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    dbs.freeze_inside_transaction(blocker, &mut old).await;
    let frozen = Instant::now();
    assert_eq!(load.await.unwrap().unwrap().committed, 300);
    dbs.wait_verified(Duration::from_secs(150)).await;
    eprintln!(
        "pg_end exact {:?} after the old instance froze inside its transaction",
        frozen.elapsed()
    );
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old instance is frozen, not gone"
    );

    old.resume();
    common::load(&dbs, 100).await;
    dbs.wait_verified(Duration::from_secs(120)).await;
    common::connector::assert_running(&mut new, "after the old instance came back");
    // Back, the old one finds its pg_end session ended (a failure it retries, not one
    // that stops it) and the slot held: it stands by.
    wait_log(&old, "standing by", Duration::from_secs(60)).await;
    common::connector::assert_running(&mut old, "after it was resumed");
    assert!(new.terminate().success());
    assert!(old.terminate().success(), "{}", old.log_text());
}

/// Between its creation and the start of its stream a slot is free while its creator
/// delivers the initial snapshot. A second instance started then stands by: it neither
/// takes the slot (which would fence the creator and start the snapshot over) nor
/// touches the destination; the creator streams on, and every row is in the topic once.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_waits_for_the_initial_snapshot_and_never_starts_it_over() {
    let p = Pipeline::new().await;
    fill_outbox(&p.dbs, 300000).await;
    let mut creator = p.spawn_connector(&[], &[]);
    wait_log(
        &creator,
        "created replication slot",
        Duration::from_secs(120),
    )
    .await;
    let mut second = p.spawn_connector(&[], &[]);
    wait_log(&second, "standing by", Duration::from_secs(60)).await;
    let snapshot_done = creator
        .log_text()
        .contains("delivered the outbox rows present at slot creation");
    assert!(
        second
            .log_text()
            .contains("creating the slot or delivering its initial snapshot")
            || snapshot_done,
        "{}",
        second.log_text()
    );
    wait_log(&creator, "streaming", Duration::from_secs(300)).await;
    let mut args = LoadArgs::count(&p.dbs.source_url, 500);
    args.rate = 500.0;
    load::run(&args).await.unwrap();
    p.assert_topic_exactly_once().await;
    common::connector::assert_running(&mut creator, "after the snapshot");
    common::connector::assert_running(&mut second, "standing by");
    let (creator_log, second_log) = (creator.log_text(), second.log_text());
    assert_eq!(
        creator_log.matches("created replication slot").count(),
        1,
        "{creator_log}"
    );
    assert!(!creator_log.contains("fenced"), "{creator_log}");
    assert!(
        !second_log.contains("never completed") && !second_log.contains("created replication slot"),
        "the second instance took the slot during the snapshot:\n{second_log}"
    );
    eprintln!(
        "the second instance stood by during the snapshot: {}",
        !snapshot_done
    );
}

/// Starts an instance with these environment variables.
type SpawnWith<'a> = dyn Fn(&[(&str, &str)]) -> Relay + 'a;

/// The creator of a slot is frozen (SIGSTOP, as a host cut off) right after the third
/// chunk of its initial snapshot is committed. Its pg_start session, which holds the
/// slot creation lock, outlives it (the kernel still answers for it), but the lock is a
/// lease: pg_start ends that session once `wal_sender_timeout` (3 s here) passes
/// without a ping. The standby then takes the slot, resumes the snapshot after the last
/// committed chunk and streams, while the creator is still frozen. Woken, the creator
/// finds its lease run out before it commits its next chunk (or its lock's session
/// gone), ends its session and stands by: it neither exits nor takes anything back.
/// Returns the creator and the instance that took over.
async fn the_standby_takes_over_a_frozen_snapshot(spawn: &SpawnWith<'_>) -> (Relay, Relay) {
    let mut creator = spawn(&[common::freeze_after_snapshot_chunks("3")]);
    wait_log(
        &creator,
        "freezing after a snapshot chunk",
        Duration::from_secs(120),
    )
    .await;
    let frozen = Instant::now();
    let mut successor = spawn(&[]);
    wait_log(
        &successor,
        "resuming the slot's initial snapshot",
        Duration::from_secs(60),
    )
    .await;
    let took = frozen.elapsed();
    eprintln!("the standby resumed the snapshot {took:?} after its creator froze");
    assert!(
        took < Duration::from_secs(3 + 10),
        "took {took:?}, wal_sender_timeout 3 s"
    );
    wait_log(&successor, "streaming", Duration::from_secs(120)).await;
    assert!(
        creator.child.try_wait().unwrap().is_none(),
        "the creator is frozen, not gone"
    );
    assert!(
        !creator
            .log_text()
            .contains("delivered the outbox rows present"),
        "the creator finished its snapshot before it froze:\n{}",
        creator.log_text()
    );

    let woken = creator.log_text().len();
    creator.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !creator.log_text()[woken..].contains("standing by") {
        if let Some(status) = creator.child.try_wait().unwrap() {
            panic!(
                "the creator exited ({status}) instead of standing by:\n{}",
                creator.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the woken creator never stood by:\n{}",
            creator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It learns that before it commits anything: its next chunk finds the lease run
    // out, or its ping finds the lock's session gone.
    let log = creator.log_text();
    assert!(
        log[woken..].contains("lease may have run out")
            || log[woken..].contains("lost the slot creation lock"),
        "{log}"
    );
    common::connector::assert_running(&mut successor, "after the creator woke");
    (creator, successor)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connector_frozen_during_its_initial_snapshot_loses_it_to_the_standby() {
    let p = Pipeline::new().await;
    p.dbs.set_wal_sender_timeout("3s").await;
    fill_outbox(&p.dbs, 50000).await;
    let (mut creator, mut successor) =
        the_standby_takes_over_a_frozen_snapshot(&|envs| p.spawn_connector(&[], envs)).await;
    let mut args = LoadArgs::count(&p.dbs.source_url, 500);
    args.rate = 500.0;
    load::run(&args).await.unwrap();
    p.assert_topic_exactly_once().await;
    common::connector::assert_running(&mut successor, "at the end");
    common::connector::assert_running(&mut creator, "standing by");
    let log = successor.log_text();
    assert!(
        !log.contains("fenced"),
        "the creator fenced its successor:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_direct_instance_frozen_during_its_initial_snapshot_loses_it_to_the_standby() {
    let dbs = TestDbs::new().await;
    dbs.set_wal_sender_timeout("3s").await;
    common::load(&dbs, 20_000).await;
    let slot = common::random_name("slot");
    let (mut creator, mut successor) = the_standby_takes_over_a_frozen_snapshot(&|envs| {
        common::spawn_direct(&dbs, &slot, &["--batch-size", "500"], envs)
    })
    .await;
    common::load(&dbs, 500).await;
    dbs.wait_verified(Duration::from_secs(120)).await;
    common::connector::assert_running(&mut successor, "at the end");
    common::connector::assert_running(&mut creator, "standing by");
    assert!(successor.terminate().success());
    assert!(creator.terminate().success(), "{}", creator.log_text());
}
