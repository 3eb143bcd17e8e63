//! The fault schedule: a pure function of the seed, the enabled fault kinds and the
//! planned duration, so that the same command line always injects the same faults in
//! the same order, at the same planned moments, for the same lengths.
//!
//! Faults run in two lanes at once: lane `db` (the databases, the network paths to
//! them, and the direct relay) and lane `kafka` (the brokers, the network path to
//! them, the connector and the sink). Within a lane faults never overlap; across lanes
//! they do, as real outages do. Each lane first injects one fault of each of its kinds
//! (in a seeded order), then kinds drawn at random, until its planned time is used up.
//!
//! The random numbers come from SplitMix64, written out here rather than taken from
//! `rand`: `rand` does not promise the same stream across versions, and a schedule
//! must stay reproducible from a seed printed in an old report.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// SplitMix64 (Steele, Lea, Flood 2014): a small, fully specified generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is irrelevant at these sizes.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[lo, hi]` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

/// Where a fault belongs; faults of one lane never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    Db,
    Kafka,
}

/// Every kind of fault the runner injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL of pg_start's postmaster, restart after the hold.
    PgStartKill,
    /// `pg_ctl stop -m immediate` of pg_start, restart after the hold.
    PgStartCrash,
    /// A failover of the source (`scripts/stack failover`, standby profile, PostgreSQL
    /// 17+): once the relay's failover slots are synced to pg_standby, the primary is
    /// stopped hard (fenced), the standby promoted, and the old primary rebuilt as the
    /// new primary's standby. The next one fails back.
    PgStartFailover,
    /// `pg_terminate_backend` of the walsenders serving the relay's slots.
    WalsenderKill,
    /// SIGKILL of pg_end's postmaster, restart after the hold.
    PgEndKill,
    /// `pg_ctl stop -m immediate` of pg_end, restart after the hold: WAL not yet
    /// written out (direct mode's asynchronous commits) is lost.
    PgEndCrash,
    /// SIGSTOP of every pg_end process, SIGCONT after the hold.
    PgEndHang,
    /// The relay's connections to pg_start closed and refused (toxiproxy disabled).
    NetPgStartCut,
    /// The relay's connections to pg_start stall: nothing passes until the hold ends.
    NetPgStartBlackhole,
    NetPgEndCut,
    NetPgEndBlackhole,
    /// The direct relay: SIGKILL, restart after the hold.
    DirectKill,
    /// The direct relay: SIGTERM, wait for its exit, restart after the hold.
    DirectTerm,
    /// A second direct relay started on the same slot (it stands by), kept beside the
    /// active one for the hold, then the active one SIGKILLed: the standby takes over.
    DirectTakeover,
    /// A rolling upgrade of the direct relay: a second one started (it stands by), the
    /// active one SIGTERMed after the hold: the new one takes over.
    DirectUpgrade,
    /// A long stall: every byte between the relay and pg_start (target 0) or pg_end
    /// (target 1) held for longer than twice pg_start's `wal_sender_timeout`, so that
    /// the relay's own silence and apply timeouts end its sessions while it lasts.
    LongStall,
    /// One broker SIGKILLed, restarted after the hold.
    BrokerKill,
    /// One broker SIGSTOPped longer than the broker session timeout (fenced), then SIGCONT.
    BrokerHang,
    /// Two brokers SIGKILLed at once: below min.insync.replicas, producers must wait.
    BrokersTwoDown,
    /// All three brokers SIGKILLed.
    BrokersAllDown,
    /// The broker leading a partition of the topic (found in the metadata) SIGKILLed.
    LeaderKill,
    /// The relay's connections to every broker closed and refused.
    NetKafkaCut,
    /// The relay's connections to every broker stall until the hold ends.
    NetKafkaBlackhole,
    ConnectorKill,
    ConnectorTerm,
    /// [`FaultKind::DirectTakeover`] for the connector.
    ConnectorTakeover,
    /// [`FaultKind::DirectUpgrade`] for the connector.
    ConnectorUpgrade,
    SinkKill,
    SinkTerm,
}

use FaultKind::*;

impl FaultKind {
    pub const ALL: [FaultKind; 29] = [
        PgStartKill,
        PgStartCrash,
        PgStartFailover,
        WalsenderKill,
        PgEndKill,
        PgEndCrash,
        PgEndHang,
        NetPgStartCut,
        NetPgStartBlackhole,
        NetPgEndCut,
        NetPgEndBlackhole,
        DirectKill,
        DirectTerm,
        DirectTakeover,
        DirectUpgrade,
        LongStall,
        BrokerKill,
        BrokerHang,
        BrokersTwoDown,
        BrokersAllDown,
        LeaderKill,
        NetKafkaCut,
        NetKafkaBlackhole,
        ConnectorKill,
        ConnectorTerm,
        ConnectorTakeover,
        ConnectorUpgrade,
        SinkKill,
        SinkTerm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PgStartKill => "pg-start-kill",
            PgStartCrash => "pg-start-crash",
            PgStartFailover => "pg-start-failover",
            WalsenderKill => "walsender-kill",
            PgEndKill => "pg-end-kill",
            PgEndCrash => "pg-end-crash",
            PgEndHang => "pg-end-hang",
            NetPgStartCut => "net-pg-start-cut",
            NetPgStartBlackhole => "net-pg-start-blackhole",
            NetPgEndCut => "net-pg-end-cut",
            NetPgEndBlackhole => "net-pg-end-blackhole",
            DirectKill => "direct-kill",
            DirectTerm => "direct-term",
            DirectTakeover => "direct-takeover",
            DirectUpgrade => "direct-upgrade",
            LongStall => "long-stall",
            BrokerKill => "broker-kill",
            BrokerHang => "broker-hang",
            BrokersTwoDown => "brokers-two-down",
            BrokersAllDown => "brokers-all-down",
            LeaderKill => "leader-kill",
            NetKafkaCut => "net-kafka-cut",
            NetKafkaBlackhole => "net-kafka-blackhole",
            ConnectorKill => "connector-kill",
            ConnectorTerm => "connector-term",
            ConnectorTakeover => "connector-takeover",
            ConnectorUpgrade => "connector-upgrade",
            SinkKill => "sink-kill",
            SinkTerm => "sink-term",
        }
    }

    pub fn lane(self) -> Lane {
        match self {
            PgStartKill | PgStartCrash | PgStartFailover | WalsenderKill | PgEndKill
            | PgEndCrash | PgEndHang | NetPgStartCut | NetPgStartBlackhole | NetPgEndCut
            | NetPgEndBlackhole | DirectKill | DirectTerm | DirectTakeover | DirectUpgrade
            | LongStall => Lane::Db,
            _ => Lane::Kafka,
        }
    }

    /// Whether the fault touches the Kafka scenario (connector + sink).
    pub fn affects_kafka_path(self) -> bool {
        !matches!(
            self,
            DirectKill | DirectTerm | DirectTakeover | DirectUpgrade
        )
    }

    /// Whether the fault touches the direct scenario.
    pub fn affects_direct_path(self) -> bool {
        self.lane() == Lane::Db
    }

    /// How long the fault lasts before it is healed, in milliseconds (inclusive).
    fn hold_range(self) -> (u64, u64) {
        match self {
            WalsenderKill | PgStartFailover => (0, 0),
            PgStartKill | PgStartCrash | PgEndKill | PgEndCrash => (500, 6_000),
            PgEndHang => (1_000, 15_000),
            NetPgStartCut | NetPgEndCut | NetKafkaCut => (1_000, 12_000),
            NetPgStartBlackhole | NetPgEndBlackhole | NetKafkaBlackhole => (1_000, 20_000),
            DirectKill | DirectTerm | ConnectorKill | ConnectorTerm | SinkKill | SinkTerm => {
                (0, 4_000)
            }
            // How long the two instances run side by side before the active one goes.
            DirectTakeover | DirectUpgrade | ConnectorTakeover | ConnectorUpgrade => (0, 5_000),
            // The runner sets pg_start's wal_sender_timeout to 15 s (`LONG_STALL_WAL_SENDER_TIMEOUT`).
            LongStall => (35_000, 60_000),
            BrokerKill | LeaderKill | BrokersTwoDown | BrokersAllDown => (1_000, 10_000),
            // The KRaft broker session timeout is 9 s: a longer stop gets the broker fenced.
            BrokerHang => (10_000, 16_000),
        }
    }

    /// A rough cost of healing, used only to plan the schedule's moments.
    fn heal_estimate_ms(self) -> u64 {
        match self {
            BrokerKill | LeaderKill => 8_000,
            BrokersTwoDown => 12_000,
            BrokersAllDown => 15_000,
            PgStartKill | PgStartCrash | PgEndKill | PgEndCrash => 1_500,
            // Waiting for the slots to be synced, the promotion, the rebuilt standby.
            PgStartFailover => 15_000,
            // The new instance starting and standing by, then taking over.
            DirectTakeover | DirectUpgrade | ConnectorTakeover | ConnectorUpgrade => 3_000,
            _ => 300,
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FaultKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault kind {s:?} (one of: {})", names.join(", "))
            })
    }
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// Position in its lane, from 0.
    pub seq: usize,
    pub kind: FaultKind,
    pub lane: Lane,
    /// Planned start, in milliseconds after the load starts (a fault starts late when
    /// the previous one of its lane took longer to heal than planned).
    pub at_ms: u64,
    /// How long the fault lasts before it is healed.
    pub hold_ms: u64,
    /// Which brokers (node ids 1..=3) a broker fault takes down; empty otherwise. For
    /// `leader-kill` this is the partition whose leader is killed, as `[partition]`; for
    /// `long-stall`, 0 for pg_start and 1 for pg_end ([`long_stall_target`]).
    pub targets: Vec<u8>,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>5} {:<5} #{:<3} t+{:>7.1}s {:<22} hold {:>5.1}s",
            "",
            match self.lane {
                Lane::Db => "db",
                Lane::Kafka => "kafka",
            },
            self.seq,
            self.at_ms as f64 / 1000.0,
            self.kind.name(),
            self.hold_ms as f64 / 1000.0
        )?;
        if self.kind == LongStall {
            write!(f, " on {}", long_stall_target(&self.targets))?;
        } else if !self.targets.is_empty() {
            let what = if self.kind == LeaderKill {
                "partition"
            } else {
                "brokers"
            };
            write!(f, " {what} {:?}", self.targets)?;
        }
        Ok(())
    }
}

/// The component a `long-stall` fault with `targets` cuts off: pg_start or pg_end.
pub fn long_stall_target(targets: &[u8]) -> &'static str {
    match targets.first() {
        Some(1) => "pg_end",
        _ => "pg_start",
    }
}

/// The gap between a fault's heal and the next fault of its lane, in ms (inclusive).
const GAP_MS: (u64, u64) = (500, 4_000);

/// The faults of both lanes, each lane ordered by `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub seed: u64,
    pub duration_ms: u64,
    pub db: Vec<Fault>,
    pub kafka: Vec<Fault>,
}

impl Schedule {
    /// Plans faults of `kinds` over `duration_ms`. Every kind occurs at least once,
    /// even if that needs more than `duration_ms`.
    pub fn plan(seed: u64, duration_ms: u64, kinds: &[FaultKind]) -> Self {
        let lane = |lane: Lane, stream: u64| {
            let mut kinds: Vec<FaultKind> =
                kinds.iter().copied().filter(|k| k.lane() == lane).collect();
            kinds.sort();
            kinds.dedup();
            plan_lane(
                &mut SplitMix64::new(seed ^ stream),
                lane,
                duration_ms,
                &kinds,
            )
        };
        Self {
            seed,
            duration_ms,
            db: lane(Lane::Db, 0x6462_6462),
            kafka: lane(Lane::Kafka, 0x6b61_666b),
        }
    }

    pub fn len(&self) -> usize {
        self.db.len() + self.kafka.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All faults, by planned moment.
    pub fn all(&self) -> Vec<&Fault> {
        let mut all: Vec<&Fault> = self.db.iter().chain(&self.kafka).collect();
        all.sort_by_key(|f| (f.at_ms, f.lane == Lane::Kafka));
        all
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "schedule: seed {} duration {:.0}s, {} faults ({} db lane, {} kafka lane)\n",
            self.seed,
            self.duration_ms as f64 / 1000.0,
            self.len(),
            self.db.len(),
            self.kafka.len()
        );
        for fault in self.all() {
            out.push_str(&fault.to_string());
            out.push('\n');
        }
        out
    }
}

fn plan_lane(
    rng: &mut SplitMix64,
    lane: Lane,
    duration_ms: u64,
    kinds: &[FaultKind],
) -> Vec<Fault> {
    let mut faults = Vec::new();
    if kinds.is_empty() {
        return faults;
    }
    // One of each kind first, in a seeded order (Fisher-Yates).
    let mut first: Vec<FaultKind> = kinds.to_vec();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut at = rng.millis(1_000, 3_000);
    let mut next = first.into_iter();
    loop {
        let kind = match next.next() {
            Some(kind) => kind,
            None if at < duration_ms => kinds[rng.below(kinds.len() as u64) as usize],
            None => break,
        };
        let (lo, hi) = kind.hold_range();
        let hold_ms = rng.millis(lo, hi);
        let targets = match kind {
            BrokerKill | BrokerHang => vec![1 + rng.below(3) as u8],
            BrokersTwoDown => {
                let spared = 1 + rng.below(3) as u8;
                (1..=3).filter(|n| *n != spared).collect()
            }
            BrokersAllDown => vec![1, 2, 3],
            LeaderKill => vec![rng.below(3) as u8],
            LongStall => vec![rng.below(2) as u8],
            _ => Vec::new(),
        };
        faults.push(Fault {
            seq: faults.len(),
            kind,
            lane,
            at_ms: at,
            hold_ms,
            targets,
        });
        at += hold_ms + kind.heal_estimate_ms() + rng.millis(GAP_MS.0, GAP_MS.1);
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_and_other_seed_another() {
        let a = Schedule::plan(42, 600_000, &FaultKind::ALL);
        let b = Schedule::plan(42, 600_000, &FaultKind::ALL);
        let c = Schedule::plan(43, 600_000, &FaultKind::ALL);
        assert_eq!(a, b);
        assert_eq!(a.render(), b.render());
        assert_ne!(a, c);
    }

    #[test]
    fn every_kind_occurs_even_in_a_short_run() {
        let s = Schedule::plan(7, 1_000, &FaultKind::ALL);
        for kind in FaultKind::ALL {
            assert!(s.all().iter().any(|f| f.kind == kind), "{kind} missing");
        }
        for lane in [&s.db, &s.kafka] {
            assert!(lane.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
        }
    }

    #[test]
    fn only_enabled_kinds_and_sane_targets() {
        let s = Schedule::plan(1, 300_000, &[BrokersTwoDown, PgEndHang]);
        assert!(s
            .all()
            .iter()
            .all(|f| f.kind == BrokersTwoDown || f.kind == PgEndHang));
        for f in &s.kafka {
            assert_eq!(f.targets.len(), 2);
            assert!(f.targets.iter().all(|n| (1..=3).contains(n)));
            assert_ne!(f.targets[0], f.targets[1]);
        }
        assert!(s.db.iter().all(|f| (1_000..=15_000).contains(&f.hold_ms)));
    }

    #[test]
    fn names_round_trip() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>(), Ok(kind));
        }
        assert!("nope".parse::<FaultKind>().is_err());
    }
}
