//! Trace context end to end: a service writes its W3C `traceparent` into an outbox
//! column; the connector (`--trace-column`) sends it as the record header `traceparent`;
//! the sink, given an OTLP endpoint, exports one apply span per applied record, in the
//! producer's trace and under the producer's span. The endpoint here is an in-process
//! OTLP/HTTP receiver that decodes what the sink posts.
//!
//! What must hold: every sampled trace context gives exactly one span with the
//! producer's trace id and its span id as parent; unsampled, malformed and NULL ones
//! give none; and whatever the trace column holds, pg_end is exact.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;

use common::connector::KafkaPipeline;
use common::{random_name, read_topic, wait_until, Relay, BROKERS};

/// A span as received: (service name, span).
type Received = Arc<Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>;

/// An OTLP/HTTP (protobuf) receiver on 127.0.0.1: its base URL and what it received.
async fn otlp_receiver() -> (String, Received) {
    let received = Received::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(
                |State(received): State<Received>, body: axum::body::Bytes| async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut received = received.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|a| a.key == "service.name")
                            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                                Value::StringValue(s) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                received.push((service.clone(), span));
                            }
                        }
                    }
                    // An empty ExportTraceServiceResponse: everything accepted.
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sinks_apply_span_continues_the_producers_trace() {
    let pipeline = KafkaPipeline::new().await;
    let source = pipeline.dbs.source().await;
    source
        .batch_execute("ALTER TABLE outbox.transactions ADD COLUMN traceparent text")
        .await
        .unwrap();

    // 40 business transactions, each written as a service would, with its trace context
    // in the outbox row: 20 sampled, 8 unsampled, 6 malformed, 6 without one.
    let mut sampled: BTreeMap<String, String> = BTreeMap::new(); // trace id -> parent span id
    let mut contexts: BTreeMap<i64, Option<String>> = BTreeMap::new();
    for id in 1..=40i64 {
        let trace_id = hex(&rand::random::<[u8; 16]>());
        let span_id = hex(&rand::random::<[u8; 8]>());
        let context = match id % 20 {
            0..=9 => {
                sampled.insert(trace_id.clone(), span_id.clone());
                Some(format!("00-{trace_id}-{span_id}-01"))
            }
            10..=13 => Some(format!("00-{trace_id}-{span_id}-00")),
            14..=16 => Some(format!("00-{}-{span_id}-01", trace_id.to_uppercase())),
            _ => None,
        };
        source
            .execute(
                "WITH t AS (
                     INSERT INTO main.transactions (id, account_id, amount, created_at)
                     VALUES ($1::int8, $1::int8 % 7, $1::int8 * 3, now()::timestamp)
                     RETURNING id, account_id, amount, created_at
                 ), o AS (
                     INSERT INTO outbox.transactions (id, account_id, amount, created_at, traceparent)
                     SELECT id, account_id, amount, created_at, $2 FROM t
                 )
                 INSERT INTO main.balance AS b (account_id, current_balance, updated_at)
                 SELECT account_id, amount, created_at FROM t
                 ON CONFLICT (account_id) DO UPDATE
                     SET current_balance = b.current_balance + EXCLUDED.current_balance,
                         updated_at = EXCLUDED.updated_at",
                &[&id, &context],
            )
            .await
            .unwrap();
        contexts.insert(id, context);
    }
    assert_eq!(sampled.len(), 20);

    // The ledger's row shape on the topic, the trace context beside it as a header.
    let route = r#"{table = "outbox.transactions", key = "account_id", columns = ["id", "account_id", "amount", "created_at"]}"#;
    let mut connector =
        pipeline.spawn_connector(&["--route", route, "--trace-column", "traceparent"], &[]);
    let topic = pipeline.topic.clone();
    wait_until(
        "every outbox row in the topic",
        Duration::from_secs(120),
        || {
            let topic = topic.clone();
            async move {
                tokio::task::spawn_blocking(move || read_topic(&topic).len() >= 40)
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    let records = tokio::task::spawn_blocking(move || read_topic(&topic))
        .await
        .unwrap();
    assert_eq!(records.len(), 40);
    for record in &records {
        let row: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        let id = row["id"].as_i64().unwrap();
        assert!(row.get("traceparent").is_none(), "{row}");
        let header = record
            .headers
            .iter()
            .find(|(name, _)| name == "traceparent")
            .map(|(_, value)| String::from_utf8(value.clone()).unwrap());
        assert_eq!(header, contexts[&id], "record of id {id}");
    }

    // The sink, exporting to the receiver (batches every 100 ms).
    let (endpoint, received) = otlp_receiver().await;
    let group = random_name("group");
    let mut sink = Relay::spawn(
        &[
            "sink",
            "--target-url",
            &pipeline.dbs.target_url,
            "--brokers",
            BROKERS,
            "--topic",
            &pipeline.topic,
            "--group",
            &group,
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    pipeline.dbs.wait_verified(Duration::from_secs(120)).await;
    let want = sampled.len();
    wait_until("the sink's spans", Duration::from_secs(60), || {
        let received = received.clone();
        async move { received.lock().unwrap().len() >= want }
    })
    .await;
    // A stop flushes what is queued; nothing more may come.
    assert!(sink.terminate().success(), "{}", sink.log_text());
    connector.terminate();

    let spans = received.lock().unwrap().clone();
    let mut seen = BTreeSet::new();
    for (service, span) in &spans {
        assert_eq!(service, "outbox-relay-sink");
        assert_eq!(span.name, "outbox-relay apply");
        assert_eq!(span.kind, SpanKind::Consumer as i32);
        let trace_id = hex(&span.trace_id);
        let parent = sampled
            .get(&trace_id)
            .unwrap_or_else(|| panic!("a span in a trace no sampled row started: {trace_id}"));
        assert_eq!(
            &hex(&span.parent_span_id),
            parent,
            "the parent is the producer's span"
        );
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        let outcome = span
            .attributes
            .iter()
            .find(|a| a.key == "outbox_relay.outcome")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.as_str()),
                _ => None,
            });
        assert_eq!(outcome, Some("applied"));
        assert!(seen.insert(trace_id), "two spans for one record");
    }
    assert_eq!(seen.len(), sampled.len(), "one span per sampled record");
}
