//! `status` against the real stack: slots, watermarks, progress, sink offsets, and an
//! unreachable component.
//!
//! The test uses its own databases, topics, slots and consumer group; it stops no
//! shared component.

mod common;

use std::time::{Duration, Instant};

use common::connector::spawn_connector;
use common::sink::spawn_sink;
use common::{load, random_name, run_binary, spawn_direct, TestDbs, BROKERS};
use outbox_relay::lsn::Lsn;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_slots_progress_offsets_and_an_unreachable_component() {
    let dbs = TestDbs::new().await;
    let (topic, progress_topic) = (random_name("status"), random_name("progress"));
    let (slot, direct_slot) = (random_name("slot"), random_name("direct"));
    load(&dbs, 300).await;
    let _connector = spawn_connector(&dbs.source_url, &topic, &progress_topic, &slot, &[], &[]);
    let mut sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    // Direct mode into the same pg_end, from a slot of its own: apply is idempotent,
    // so the two paths together still count every transaction once.
    let mut direct = spawn_direct(&dbs, &direct_slot, &[], &[]);
    load(&dbs, 200).await;
    dbs.wait_verified(Duration::from_secs(180)).await;

    let status_args = |target_url: &str, brokers: &str| -> Vec<String> {
        [
            "status",
            "--json",
            "--timeout",
            "5",
            "--source-url",
            &dbs.source_url,
            "--target-url",
            target_url,
            "--brokers",
            brokers,
            "--topic",
            &topic,
            "--progress-topic",
            &progress_topic,
            "--slot",
            &slot,
            "--direct-slot",
            &direct_slot,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let status = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = run_binary(&args);
        let json: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}):\n{stdout}\n{stderr}"));
        (code, json)
    };

    // Everything applied (verify may pass through direct mode alone): wait until the
    // topic holds every transaction, the sink's offsets have caught up with the high
    // watermarks (lag 0: status reads past the trailing commit markers of the Kafka
    // transactions, which offsets alone count) and both slots are streaming.
    let deadline = Instant::now() + Duration::from_secs(120);
    let json = loop {
        let (code, json) = status(status_args(&dbs.target_url, BROKERS));
        assert_eq!(code, 0, "status failed: {json:#}");
        let sink = json["pg_end"]["sink"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let caught_up = sink.len() == 3 && sink.iter().all(|p| p["lag"].as_i64() == Some(0));
        let active = json["pg_start"]["slots"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["active"] == true));
        let in_kafka: i64 = json["kafka"]["partitions"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        p["high_watermark"].as_i64().unwrap_or(0)
                            - p["low_watermark"].as_i64().unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0);
        if in_kafka >= 500 && caught_up && active && json["pg_end"]["direct"].is_object() {
            break json;
        }
        assert!(
            Instant::now() < deadline,
            "status never caught up: {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(json["ok"], true, "{json:#}");

    let source = &json["pg_start"];
    assert_eq!(source["state"], "reachable");
    let slots = source["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 2);
    for (s, name, role) in [
        (&slots[0], &slot, "connector"),
        (&slots[1], &direct_slot, "direct"),
    ] {
        assert_eq!(s["name"], name.as_str());
        assert_eq!(s["role"], role);
        assert_eq!(s["exists"], true);
        assert!(s["active_pid"].as_i64().is_some(), "{s:#}");
        let confirmed: Lsn = s["confirmed_flush_lsn"].as_str().unwrap().parse().unwrap();
        assert!(confirmed > Lsn::ZERO);
        assert!(s["lag_bytes"].as_i64().unwrap() >= 0);
        // `extended` only if the shared stack's WAL outgrew max_wal_size meanwhile.
        assert!(
            ["reserved", "extended"].contains(&s["wal_status"].as_str().unwrap_or("")),
            "{s:#}"
        );
    }

    let kafka = &json["kafka"];
    assert_eq!(kafka["state"], "reachable");
    assert_eq!(kafka["topic"], topic.as_str());
    let partitions = kafka["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    let records: i64 = partitions
        .iter()
        .map(|p| p["high_watermark"].as_i64().unwrap() - p["low_watermark"].as_i64().unwrap())
        .sum();
    assert!(records >= 500, "at least one offset per record: {kafka:#}");
    assert_eq!(kafka["progress"]["state"], "streaming", "{kafka:#}");
    let progress: Lsn = kafka["progress"]["lsn"].as_str().unwrap().parse().unwrap();
    assert!(progress > Lsn::ZERO);

    let target = &json["pg_end"];
    assert_eq!(target["state"], "reachable");
    for p in target["sink"].as_array().unwrap() {
        let last = p["last_offset"]
            .as_i64()
            .expect("an offset stored per partition");
        assert_eq!(p["lag"].as_i64(), Some(0), "{p:#}");
        // Commit markers follow the last record the sink applied.
        assert!(
            p["high_watermark"].as_i64().unwrap() - 1 - last >= 1,
            "{p:#}"
        );
    }
    let direct_lsn: Lsn = target["direct"]["commit_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(direct_lsn > Lsn::ZERO);
    assert_eq!(target["dead_letters"], 0);

    // A routed deployment's view: --topic is a default the sink never reads (it reads
    // the routes' topics): no warning that it does not exist, and each topic the
    // sink stores offsets for has its own lag, 0 here.
    let absent = random_name("unused_default");
    let routed: Vec<String> = status_args(&dbs.target_url, BROKERS)
        .into_iter()
        .map(|a| if a == topic { absent.clone() } else { a })
        .collect();
    let (code, json) = status(routed.clone());
    assert_eq!(code, 0, "{json:#}");
    assert_eq!(json["warnings"], serde_json::json!([]), "{json:#}");
    let others = json["pg_end"]["other_sinks"].as_array().unwrap();
    let ours = others
        .iter()
        .find(|o| o["topic"] == topic.as_str())
        .unwrap_or_else(|| panic!("{json:#}"));
    let lags: Vec<Option<i64>> = ours["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_i64())
        .collect();
    assert_eq!(lags, [Some(0); 3], "{json:#}");
    let text: Vec<&str> = routed
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    let (_, stdout, _) = run_binary(&text);
    assert!(
        stdout.contains(&format!("  sink on topic {topic}:")),
        "{stdout}"
    );
    assert!(!stdout.contains("sink: no stored offsets"), "{stdout}");

    // The sink stopped and more transactions in Kafka: the lag of a partition with
    // records the sink has not applied is the offset difference again.
    sink.terminate();
    load(&dbs, 60).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, json) = status(status_args(&dbs.target_url, BROKERS));
        let sink = json["pg_end"]["sink"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let behind: Vec<&Value> = sink
            .iter()
            .filter(|p| p["lag"].as_i64().is_some_and(|l| l > 0))
            .collect();
        if !behind.is_empty() {
            for p in behind {
                assert_eq!(
                    p["lag"].as_i64().unwrap(),
                    p["high_watermark"].as_i64().unwrap() - 1 - p["last_offset"].as_i64().unwrap(),
                    "{p:#}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lag with the sink stopped: {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // pg_end and Kafka unreachable: their parts say so, pg_start is still reported,
    // and the exit code is 1.
    let (code, json) = status(status_args(
        "postgres://postgres:postgres@127.0.0.1:1/nowhere",
        "127.0.0.1:1",
    ));
    assert_eq!(code, 1, "{json:#}");
    assert_eq!(json["ok"], false);
    assert_eq!(json["pg_end"]["state"], "unreachable");
    assert!(json["pg_end"]["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert_eq!(json["kafka"]["state"], "unreachable");
    assert_eq!(json["pg_start"]["state"], "reachable");
    assert_eq!(json["pg_start"]["slots"][0]["exists"], true);
    assert_eq!(json["problems"].as_array().unwrap().len(), 2, "{json:#}");

    // The human form says the same.
    let args = status_args("postgres://postgres:postgres@127.0.0.1:1/nowhere", BROKERS);
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    let (code, stdout, _) = run_binary(&args);
    assert_eq!(code, 1);
    assert!(stdout.contains("pg_end    unreachable: "), "{stdout}");
    assert!(stdout.contains(&format!("slot {slot}")), "{stdout}");

    // Direct mode's slot dropped (as a promotion without failover slots loses it):
    // pg_end's progress says direct mode streamed from it, so it is a problem (direct
    // mode would refuse to start), not just an absent slot.
    direct.terminate();
    dbs.source()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&direct_slot])
        .await
        .unwrap();
    let (code, json) = status(status_args(&dbs.target_url, BROKERS));
    assert_eq!(code, 1, "{json:#}");
    let problems = json["problems"].as_array().unwrap();
    let lost = format!(
        "slot {direct_slot} is missing on pg_start, but direct mode's progress says it \
         streamed from it (through "
    );
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.starts_with(&lost))),
        "{json:#}"
    );
}
