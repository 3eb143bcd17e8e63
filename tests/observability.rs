//! The shipped Prometheus rules (`deploy/prometheus/outbox-relay.rules.yml`) and Grafana
//! dashboard (`deploy/grafana/outbox-relay.json`) name only series that a running relay
//! exports: every metric name in their PromQL is looked up in the `/metrics` of a connector
//! (active and standing by) and a sink that have carried traffic and seen a retry.
//! The other way round is not checked: a series may be exported and not used.
//! `promtool check rules` / `promtool test rules` are `scripts/check-observability`'s job.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::connector::KafkaPipeline;
use common::sink::spawn_sink;
use common::{load, random_name};

/// Series that Prometheus makes itself for each scrape, not the relay.
const SCRAPER_SERIES: &[&str] = &["up"];

const RULES: &str = "deploy/prometheus/outbox-relay.rules.yml";
const DASHBOARD: &str = "deploy/grafana/outbox-relay.json";

/// PromQL words that are not metric names (operators, modifiers, literals, and the
/// aggregations, which `by (…)` may separate from their parenthesis).
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// The metric names in a PromQL expression: its identifiers, less function names (followed
/// by `(`), keywords, label names (in `{…}` and in the lists after `by`, `on` and the
/// like), string literals, range durations (`[…]`), numbers and Grafana's `$variables`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Set after a keyword whose parenthesised list holds label names.
    let mut labels_follow = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if labels_follow => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                labels_follow = false;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let lower = word.to_ascii_lowercase();
                if KEYWORDS.contains(&lower.as_str()) {
                    labels_follow = matches!(
                        lower.as_str(),
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    );
                } else if chars.get(next) != Some(&'(') {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The `expr:` values of a rules file (plain or folded `>-` / `|` blocks), without a YAML
/// parser: the rules file is ours and keeps to these two forms.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        i += 1;
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with('>') && !value.starts_with('|') {
            exprs.push(value.trim_matches(|c| c == '\'' || c == '"').to_string());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = String::new();
        while i < lines.len()
            && (lines[i].trim().is_empty() || lines[i].len() - lines[i].trim_start().len() > indent)
        {
            block.push_str(lines[i].trim());
            block.push(' ');
            i += 1;
        }
        exprs.push(block);
    }
    exprs
}

/// The `expr` of every target of every panel (rows' nested panels too).
fn dashboard_exprs(json: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut panels: Vec<&serde_json::Value> = json["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

/// Every metric name the rules and the dashboard use, with where it is used.
fn referenced_names() -> Vec<(String, String)> {
    let repo = common::repo();
    let rules = std::fs::read_to_string(repo.join(RULES)).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join(DASHBOARD)).unwrap())
            .expect("the dashboard is valid JSON");
    let mut named = Vec::new();
    let rule_exprs = rule_exprs(&rules);
    assert!(rule_exprs.len() >= 8, "too few rules found: {rule_exprs:?}");
    let panel_exprs = dashboard_exprs(&dashboard);
    assert!(panel_exprs.len() >= 10, "too few panels: {panel_exprs:?}");
    for (source, exprs) in [(RULES, rule_exprs), (DASHBOARD, panel_exprs)] {
        for expr in exprs {
            let names = metric_names(&expr);
            assert!(!names.is_empty(), "{source}: no metric in {expr:?}");
            named.extend(names.into_iter().map(|n| (n, format!("{source}: {expr}"))));
        }
    }
    named
}

/// The sample names of a Prometheus text exposition, and the base name of each histogram
/// and summary (so that both `x` and `x_bucket`/`x_sum`/`x_count` count as exported).
fn exported_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// `GET http://addr/metrics`, or an empty string while it does not answer.
async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_string(),
        _ => String::new(),
    }
}

/// The address a relay serves its metrics on (it binds port 0 in tests), from its log line
/// `serving /metrics, /healthz, /readyz addr=…`.
#[test]
fn the_rules_and_the_dashboard_name_only_metrics_of_src_metrics_rs() {
    // Without a stack: each name is a constant of src/metrics.rs, a histogram series of one,
    // or a series Prometheus makes. The stack test below checks them against /metrics.
    let source = std::fs::read_to_string(common::repo().join("src/metrics.rs")).unwrap();
    let declared: BTreeSet<String> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_string)
        .collect();
    for (name, place) in referenced_names() {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            declared.contains(&name)
                || declared.contains(base)
                || SCRAPER_SERIES.contains(&name.as_str()),
            "{name} (in {place}) is not a metric of src/metrics.rs"
        );
    }
}

#[test]
fn metric_names_skips_functions_labels_and_literals() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{job=~"$job", x="y z"}[$__rate_interval])))
           / on (instance) group_left (stage) b_total offset 5m > 1e9 and c unless d{e="f"}[1h:1m]"#,
    );
    let expected: BTreeSet<String> = ["a_seconds_bucket", "b_total", "c", "d"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported_by_a_running_relay() {
    let pipeline = KafkaPipeline::new().await;
    // Two connectors on one slot: the second stands by (outbox_relay_standby).
    let active = pipeline.spawn_connector(&[], &[]);
    let active_addr = active.metrics_addr().await;
    common::wait_until(
        "the first connector to stream",
        Duration::from_secs(120),
        || async {
            scrape(&active_addr)
                .await
                .contains("outbox_relay_confirmed_lsn")
                || pipeline.confirmed_flush_lsn().await.is_some()
        },
    )
    .await;
    let standby = pipeline.spawn_connector(&[], &[]);
    let sink = spawn_sink(&pipeline.dbs, &pipeline.topic, &random_name("group"), &[]);
    let relays = [
        active_addr,
        standby.metrics_addr().await,
        sink.metrics_addr().await,
    ];
    load(&pipeline.dbs, 200).await;
    pipeline.dbs.wait_verified(Duration::from_secs(180)).await;

    let referenced = referenced_names();
    let wanted: BTreeSet<&str> = referenced
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !SCRAPER_SERIES.contains(n))
        .collect();
    // Retries appear once a retry happened: end the connector's replication session (this
    // test's own slot), which it retries (cause "session"; the standby may take over, and
    // the connector that lost the slot stands by). The slot lag appears with a keepalive,
    // the consumer lag with librdkafka's statistics (every 5 s).
    let mut exported = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        exported.clear();
        for addr in &relays {
            exported.extend(exported_names(&scrape(addr).await));
        }
        let missing: Vec<&&str> = wanted.iter().filter(|n| !exported.contains(**n)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "named by the rules or the dashboard but not exported by the connector, its \
             standby or the sink: {missing:?}\nexported: {exported:?}"
        );
        if missing.iter().any(|n| **n == "outbox_relay_retries_total") {
            common::connect(common::PG_START_ADMIN)
                .await
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&pipeline.slot],
                )
                .await
                .unwrap();
            load(&pipeline.dbs, 10).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop((active, standby, sink));
}

/// The count of the connector's latency histogram at or below `le` seconds.
fn latency_bucket(body: &str, le: f64) -> Option<u64> {
    let prefix = "outbox_relay_end_to_end_latency_seconds_bucket{";
    body.lines()
        .filter(|l| l.starts_with(prefix) && l.contains("stage=\"connector\""))
        .find(|l| {
            l.split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v == le)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The connector's latency histogram (source commit → Kafka commit) against a known
/// delay: a transaction written while the connector is stopped (SIGSTOP) for 3 s is
/// counted in the bucket that holds 3 s, (2.5, 5], and in none below it.
#[tokio::test(flavor = "multi_thread")]
async fn the_connector_s_latency_histogram_counts_a_known_delay_in_its_bucket() {
    let pipeline = KafkaPipeline::new().await;
    let mut connector = pipeline.spawn_connector(&[], &[]);
    let addr = connector.metrics_addr().await;
    common::wait_until("streaming", Duration::from_secs(120), || {
        let log = connector.log_text();
        async move { log.contains("streaming") }
    })
    .await;
    connector.pause();
    load(&pipeline.dbs, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    connector.resume();
    pipeline.assert_topic_exactly_once().await;
    common::wait_until(
        "the latency to be recorded",
        Duration::from_secs(30),
        || {
            let addr = addr.clone();
            async move { latency_bucket(&scrape(&addr).await, f64::INFINITY) == Some(1) }
        },
    )
    .await;
    let body = scrape(&addr).await;
    assert_eq!(latency_bucket(&body, 2.5), Some(0), "{body}");
    assert_eq!(latency_bucket(&body, 5.0), Some(1), "{body}");
    assert!(connector.terminate().success());
}
