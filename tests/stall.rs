//! Connections that stop answering without closing (a black-holed host, a proxy that
//! accepts and never answers): every wait on them is bounded, and the relay recovers
//! on its own once the server answers again, losing and repeating nothing.
//!
//! The stall lasts `OUTBOX_RELAY_TEST_STALL_SECS` (default 20 s; the long run
//! uses 600).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDbs;
use outbox_relay::apply::driver::{self, Attempt, Driver, Ended};
use outbox_relay::apply::{ApplyError, Target};
use outbox_relay::cmd::load::{self, LoadArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy that can stall: from [`StallProxy::stall`] on, the connections it holds
/// forward nothing more (they stay open), and new ones are accepted and never answered.
/// After [`StallProxy::heal`], new connections work; the stalled ones never do.
struct StallProxy {
    port: u16,
    stalled: Arc<AtomicBool>,
    /// Bumped at each stall and heal: a connection forwards only while it is the one of
    /// the generation it was accepted in, and nothing is stalled.
    generation: Arc<AtomicU64>,
}

impl StallProxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (s, g) = (stalled.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (stalled, generation) = (s.clone(), g.clone());
                tokio::spawn(async move {
                    let born = generation.load(Ordering::SeqCst);
                    let live = move || {
                        !stalled.load(Ordering::SeqCst) && generation.load(Ordering::SeqCst) == born
                    };
                    if !live() {
                        // Accepted, never answered.
                        let _hold = client;
                        return std::future::pending::<()>().await;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let live2 = live.clone();
                    tokio::join!(forward(cr, sw, live), forward(sr, cw, live2));
                });
            }
        });
        Self {
            port,
            stalled,
            generation,
        }
    }

    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while `live`; then holds both open and silent for good.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    live: impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = async {
                while live() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } => 0,
        };
        if !live() {
            let _hold = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn stall_time() -> Duration {
    Duration::from_secs(
        std::env::var("OUTBOX_RELAY_TEST_STALL_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    )
}

/// Direct mode reads pg_start through the proxy, whose `wal_sender_timeout` is 3 s for
/// this database: the stalled replication session is given up within about that, the
/// relay keeps trying, and after the heal it streams again and pg_end is exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_pg_start_that_stops_answering_is_left_and_found_again() {
    let dbs = TestDbs::new().await;
    dbs.set_wal_sender_timeout("3s").await;
    let proxy = StallProxy::start(8000).await;
    let via_proxy = dbs
        .source_url
        .replace("127.0.0.1:8000/", &format!("127.0.0.1:{}/", proxy.port));
    let slot = common::random_name("slot");
    let mut relay = common::spawn_direct_between(
        &via_proxy,
        &dbs.target_url,
        &slot,
        &["--batch-size", "500"],
        &[],
    );
    load::run(&LoadArgs::count(&dbs.source_url, 500))
        .await
        .unwrap();
    dbs.wait_verified(Duration::from_secs(120)).await;

    proxy.stall();
    let stalled = Instant::now();
    load::run(&LoadArgs::count(&dbs.source_url, 500))
        .await
        .unwrap();
    let stall = stall_time();
    let deadline = stalled + stall;
    let mut noticed = None;
    while Instant::now() < deadline {
        if noticed.is_none() && relay.log_text().contains("pg_start sent nothing") {
            noticed = Some(stalled.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    common::connector::assert_running(&mut relay, "during the stall");
    let noticed = noticed.unwrap_or_else(|| {
        panic!(
            "the stalled session was never given up:\n{}",
            relay.log_text()
        )
    });
    proxy.heal();
    let healed = Instant::now();
    dbs.wait_verified(Duration::from_secs(120)).await;
    eprintln!(
        "stall of {stall:?}: session given up after {noticed:?}; pg_end exact {:?} after the heal",
        healed.elapsed()
    );
    // Twice wal_sender_timeout, and a margin for a loaded machine.
    assert!(
        noticed < Duration::from_secs(10),
        "given up after {noticed:?}"
    );
    assert!(relay.terminate().success());
}

/// Direct mode writes pg_end through the proxy: a batch stalled in the middle is given
/// up within the apply timeout (60 s), and after the heal pg_end is exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_pg_end_that_stops_answering_is_left_and_found_again() {
    let dbs = TestDbs::new().await;
    let proxy = StallProxy::start(8001).await;
    let via_proxy = dbs
        .target_url
        .replace("127.0.0.1:8001/", &format!("127.0.0.1:{}/", proxy.port));
    let slot = common::random_name("slot");
    let mut relay = common::spawn_direct_between(
        &dbs.source_url,
        &via_proxy,
        &slot,
        &["--batch-size", "500"],
        &[],
    );
    load::run(&LoadArgs::count(&dbs.source_url, 500))
        .await
        .unwrap();
    dbs.wait_verified(Duration::from_secs(120)).await;

    proxy.stall();
    let mut args = LoadArgs::count(&dbs.source_url, 1000);
    args.rate = 100.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    tokio::time::sleep(stall_time()).await;
    common::connector::assert_running(&mut relay, "during the stall");
    proxy.heal();
    let healed = Instant::now();
    load.await.unwrap().unwrap();
    dbs.wait_verified(Duration::from_secs(180)).await;
    eprintln!(
        "pg_end stall of {:?}: pg_end exact {:?} after the heal",
        stall_time(),
        healed.elapsed()
    );
    assert!(relay.terminate().success());
}

/// The driver's session: never stopped, no log.
struct Quiet;

impl driver::Session for Quiet {
    fn stopped(&self) -> bool {
        false
    }
    fn retrying(&mut self, _: &str, _: u32) {}
}

/// Adds one to the row; with a proxy to stall, stalls it before the COMMIT (which is
/// then never delivered: pg_end holds the transaction open, and the row locked).
struct Increment<'p> {
    stall_before_commit: Option<&'p StallProxy>,
}

impl Attempt for Increment<'_> {
    type Output = ();
    async fn run(&mut self, target: &mut Target) -> Result<(), ApplyError> {
        let tx = target
            .transaction()
            .await
            .map_err(|e| ApplyError::new("begin", e))?;
        tx.execute("UPDATE stall_lock SET n = n + 1 WHERE id = 1", &[])
            .await
            .map_err(|e| ApplyError::new("update", e))?;
        if let Some(proxy) = self.stall_before_commit {
            proxy.stall();
        }
        tx.commit().await.map_err(|e| ApplyError::new("commit", e))
    }
}

/// A connection the driver gives up while its transaction is open on pg_end (its
/// COMMIT stalled on the way, the socket held open) does not block the next one: pg_end
/// ends the abandoned transaction within the driver's timeout, and its locks with it.
/// Without that, the next connection's write of the same row (direct mode's progress
/// row, a sink's offsets) waited for as long as the proxy held the socket.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_abandoned_on_a_stalled_connection_does_not_block_the_next() {
    let dbs = TestDbs::new().await;
    dbs.target()
        .await
        .batch_execute(
            "CREATE TABLE stall_lock (id int PRIMARY KEY, n int NOT NULL); \
             INSERT INTO stall_lock VALUES (1, 0)",
        )
        .await
        .unwrap();
    let proxy = StallProxy::start(8001).await;
    let via_proxy = dbs
        .target_url
        .replace("127.0.0.1:8001/", &format!("127.0.0.1:{}/", proxy.port));
    let timeout = Duration::from_secs(3);
    let mut abandoning = Driver::new(via_proxy.clone())
        .with_timeout(timeout)
        .with_attempts(1);
    let stalled = abandoning
        .run(
            &mut Quiet,
            &mut Increment {
                stall_before_commit: Some(&proxy),
            },
        )
        .await;
    assert!(
        matches!(stalled, Err(Ended::Failed(_))),
        "the stalled COMMIT times out: {stalled:?}"
    );
    proxy.heal();

    // The next connection (a driver of its own, waiting far longer than the abandoned
    // one's timeout) writes the same row.
    let started = Instant::now();
    let mut next = Driver::new(via_proxy)
        .with_timeout(Duration::from_secs(60))
        .with_attempts(1);
    let result = next
        .run(
            &mut Quiet,
            &mut Increment {
                stall_before_commit: None,
            },
        )
        .await;
    assert!(result.is_ok(), "the next write failed: {result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the next write waited {:?} for the abandoned transaction",
        started.elapsed()
    );
    let n: i32 = dbs
        .target()
        .await
        .query_one("SELECT n FROM stall_lock WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 1,
        "the abandoned transaction is rolled back, the next committed"
    );
}

/// A SIGTERM while every broker is unreachable (the connector's brokers are a port
/// nothing answers on, so every Kafka call waits out its timeout): the connector exits
/// within 10 s.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_kafka_is_unreachable_exits_within_ten_seconds() {
    let dbs = TestDbs::new().await;
    let proxy = StallProxy::start(19090).await;
    proxy.stall();
    let brokers = format!("127.0.0.1:{}", proxy.port);
    let mut relay = common::Relay::spawn(
        &[
            "connector",
            "--source-url",
            &dbs.source_url,
            "--brokers",
            &brokers,
            "--slot",
            &common::random_name("slot"),
        ],
        &[],
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    common::connector::assert_running(&mut relay, "while Kafka is unreachable");
    let sent = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status();
    let status = common::wait_for_exit(&mut relay, Duration::from_secs(10)).await;
    eprintln!("exited {status} {:?} after SIGTERM", sent.elapsed());
}
