//! The topics the connector writes to: which are known to exist, and the creation of
//! the others (routed topics come and go with the rows' values).
//!
//! Invariant: a record is sent only to a topic known to exist. A routed topic that does
//! not exist is created with the connector's partitions, replication factor and
//! `min.insync.replicas` (the brokers have auto-creation off); with
//! `--no-create-topics` it is reported missing and its records become dead letters.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use super::ConnectorArgs;
use crate::kafka::{self, TopicSpec};
use crate::pipeline::PipelineError;

/// What [`Topics::ensure`] found.
#[derive(Debug, Default)]
pub struct Ensured {
    /// Topics that do not exist and may not be created: their records become dead letters.
    pub missing: Vec<String>,
    /// Topics not known before this call that exist now.
    pub learned: Vec<String>,
}

pub struct Topics {
    brokers: String,
    create: bool,
    partitions: i32,
    replication_factor: i32,
    known: Mutex<HashSet<String>>,
}

impl Topics {
    pub fn new(args: &ConnectorArgs) -> Self {
        Self {
            brokers: args.kafka.brokers.clone(),
            create: !args.no_create_topics,
            partitions: args.partitions,
            replication_factor: args.replication_factor,
            known: Mutex::new(HashSet::new()),
        }
    }

    fn is_known(&self, topic: &str) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(topic)
    }

    fn learn(&self, topic: &str) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_string());
    }

    /// Makes sure each of `topics` exists, creating it if allowed. Returns the topics
    /// that do not exist and may not be created, and those learned by this call (for
    /// the producers to learn too: [`super::producer::BatchProducer::learn_topics`]).
    pub async fn ensure(&self, topics: &[String]) -> Result<Ensured, PipelineError> {
        let unknown: Vec<&String> = topics.iter().filter(|t| !self.is_known(t)).collect();
        let found = futures_util::future::try_join_all(unknown.iter().map(|topic| async move {
            if self.create {
                self.create(topic).await.map(|()| true)
            } else if self.exists(topic).await? {
                self.learn(topic);
                Ok(true)
            } else {
                tracing::error!(%topic, "a routed topic does not exist and --no-create-topics is set: its records go to the dead-letter topic");
                Ok(false)
            }
        }))
        .await?;
        let mut ensured = Ensured::default();
        for (topic, found) in unknown.into_iter().zip(found) {
            if found {
                ensured.learned.push(topic.clone());
            } else {
                ensured.missing.push(topic.clone());
            }
        }
        Ok(ensured)
    }

    /// Creates `topic` if it does not exist, whatever `--no-create-topics` says.
    pub async fn create(&self, topic: &str) -> Result<(), PipelineError> {
        // An acknowledged record must survive the loss of a broker.
        let configs: &[(&str, &str)] = if self.replication_factor >= 3 {
            &[("min.insync.replicas", "2")]
        } else {
            &[]
        };
        kafka::ensure_topic(
            &self.brokers,
            &TopicSpec {
                name: topic,
                partitions: self.partitions,
                replication_factor: self.replication_factor,
                configs,
            },
        )
        .await?;
        self.learn(topic);
        Ok(())
    }

    async fn exists(&self, topic: &str) -> Result<bool, PipelineError> {
        let (brokers, name) = (self.brokers.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            kafka::topic_exists(&brokers, &name, Duration::from_secs(30))
        })
        .await
        .map_err(|e| PipelineError::Definite(format!("topic lookup panicked: {e}")))?
        .map_err(|source| PipelineError::Destination {
            context: format!("looking up topic {topic}"),
            class: crate::error::ErrorClass::Transient,
            source: Box::new(source),
        })
    }
}
