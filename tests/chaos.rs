//! The short chaos run of CI: `outbox-relay chaos` with its four scenarios (Kafka path,
//! direct mode, routes into a generic inbox, the event-router preset on a table and on
//! logical messages) at once and every fault kind at least once, at 30 transactions/s
//! each (the source's load of three scenarios at 40), on a stack instance of its own (its own state dir and port offset, brokers with
//! the proxied listener), which is stopped afterwards. It must report nothing lost,
//! nothing duplicated, and pass.
//!
//! It holds `common::fault_lock()` all along: it does not touch the shared stack, but
//! it loads the machine, and the other fault tests have timing of their own.

mod common;

use std::process::Command;

/// Offset 2000: pg 10000/10001, brokers 21090.., controllers 21190.., proxies 21390..
const PORT_OFFSET: &str = "2000";

fn stack_dir() -> String {
    std::env::var("OUTBOX_RELAY_CHAOS_CI_STACK_DIR")
        .unwrap_or_else(|_| "/var/tmp/outbox-relay-chaos-ci".to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn short_chaos_run_loses_and_duplicates_nothing() {
    let _lock = common::fault_lock().await;
    let dir = stack_dir();
    let seed = std::env::var("OUTBOX_RELAY_CHAOS_SEED").unwrap_or_else(|_| "20261126".into());
    let output = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
                .args([
                    "chaos",
                    "--seed",
                    &seed,
                    "--duration",
                    "60",
                    "--scenarios",
                    "kafka,direct,routes,events",
                    "--faults",
                    "all",
                    "--rate",
                    "30",
                    "--stack-dir",
                    &dir,
                    "--port-offset",
                    PORT_OFFSET,
                    "--drain-timeout",
                    "240",
                    "--json",
                ])
                .env("OUTBOX_RELAY_LOG", "warn,librdkafka=off,rdkafka=off")
                .output()
                .expect("run outbox-relay chaos")
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");

    // The instance is stopped whatever the outcome, so that the rest of CI has the
    // machine back.
    let down = Command::new(common::repo().join("scripts/stack"))
        .arg("down")
        .env("OUTBOX_RELAY_STACK_DIR", &dir)
        .env("OUTBOX_RELAY_STACK_PORT_OFFSET", PORT_OFFSET)
        .output()
        .expect("scripts/stack down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );

    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); exit {}", output.status));
    for kind in [
        "pg-start-kill",
        "pg-start-crash",
        "walsender-kill",
        "pg-end-kill",
        "pg-end-crash",
        "pg-end-hang",
        "net-pg-start-cut",
        "net-pg-start-blackhole",
        "net-pg-end-cut",
        "net-pg-end-blackhole",
        "direct-kill",
        "direct-term",
        "direct-takeover",
        "direct-upgrade",
        "long-stall",
        "broker-kill",
        "broker-hang",
        "brokers-two-down",
        "brokers-all-down",
        "leader-kill",
        "net-kafka-cut",
        "net-kafka-blackhole",
        "connector-kill",
        "connector-term",
        "connector-takeover",
        "connector-upgrade",
        "sink-kill",
        "sink-term",
    ] {
        assert!(
            report["faults_by_kind"][kind].as_u64().unwrap_or(0) >= 1,
            "fault kind {kind} was not injected"
        );
    }
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 4);
    for s in scenarios {
        assert!(s["committed_at_source"].as_u64().unwrap_or(0) > 1000, "{s}");
        assert_eq!(s["lost"], 0, "{s}");
        assert_eq!(s["duplicated"], 0, "{s}");
        assert_eq!(s["dead_letters"], 0, "{s}");
        assert_eq!(s["lsn"]["violations"], 0, "{s}");
    }
    assert_eq!(
        report["pass"], true,
        "chaos run failed; see the report above"
    );
    assert!(output.status.success());
}

/// The heal of runs 9 and 10 failed for good once toxiproxy's API stopped answering:
/// a failed call must restart the server, with every proxy back and clean. Here the
/// server is killed (its API gone) while a proxy holds a blackhole.
#[test]
fn a_toxiproxy_that_stops_answering_is_restarted_with_clean_proxies() {
    use outbox_relay::cmd::chaos::stack::{toxiproxy_binary, Stack, Toxiproxy};
    use std::net::TcpStream;

    let dir = std::path::PathBuf::from(stack_dir());
    std::fs::create_dir_all(&dir).unwrap();
    // Offset 2050: API 10524, proxies 10052/10053 and 21440..21442; nothing else there.
    let stack = Stack {
        script: common::repo().join("scripts/stack"),
        dir: dir.clone(),
        offset: 2050,
        standby: false,
        pg: 15,
    };
    let binary = toxiproxy_binary(&dir).expect("toxiproxy-server");
    let mut toxi = Toxiproxy::start(&binary, &stack, &dir.join("toxiproxy-restart-test.log"))
        .expect("start toxiproxy");
    toxi.blackhole("pg_start").expect("blackhole");

    let killed = Command::new("kill")
        .args(["-9", &toxi.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let failed = toxi.call(|t| t.heal_all());
    assert!(failed.is_err(), "a call to a dead toxiproxy must fail");
    assert_eq!(toxi.restarts, 1);

    // Restarted: every call works, and the proxies listen again without the blackhole.
    toxi.call(|t| t.heal_all()).expect("heal after the restart");
    toxi.call(|t| t.blackhole("pg_start"))
        .expect("a fresh blackhole (the old one is gone)");
    toxi.call(|t| t.heal_all()).expect("heal");
    assert_eq!(toxi.restarts, 1);
    TcpStream::connect(("127.0.0.1", stack.pg_start_proxy_port()))
        .expect("the pg_start proxy listens again");

    // A runner that did not end cleanly leaves its server behind (chaos run 19's first
    // attempt talked to such a one, which had wedged, and restarting its own never
    // replaced it): the next start kills it and runs its own.
    let leftover = toxi.pid();
    std::mem::forget(toxi);
    let toxi = Toxiproxy::start(&binary, &stack, &dir.join("toxiproxy-restart-test.log"))
        .expect("start toxiproxy beside a leftover one");
    assert_ne!(toxi.pid(), leftover);
    // Gone, or (this test being its parent, which never waits for it) a zombie.
    let state = std::fs::read_to_string(format!("/proc/{leftover}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z "),
        "the leftover server {leftover} is still running: {state}"
    );
    toxi.heal_all().expect("the new server answers");
}
