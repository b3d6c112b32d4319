//! Prometheus metrics at `/metrics` (prometheus-client; names and labels in Prometheus
//! conventions). Request metrics are recorded where requests complete; state (damaged
//! pages, unrecoverable LBAs, leases) is sampled at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::time::Duration;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes];

    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub volume: String,
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub volume: String,
    /// live, dead, block, unrecoverable
    pub source: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<OpLabels, Counter>,
    pub request_errors: Family<OpLabels, Counter>,
    pub bytes: Family<OpLabels, Counter>,
    pub latency: Family<OpLabels, Histogram>,
    /// Summed request time in nanoseconds, for the dashboard's mean latency (not
    /// exported: `request_duration_seconds` carries it for Prometheus).
    pub latency_ns: Family<OpLabels, Counter>,
    pub replication_rtt: Histogram,
    pub resync_bytes: Family<VolumeLabels, Counter>,
    pub resync_pages: Family<VolumeLabels, Counter>,
    pub repair_bytes: Family<VolumeLabels, Counter>,
    pub repairs: Family<SourceLabels, Counter>,
    pub damaged_pages: Family<VolumeLabels, Gauge>,
    pub unrecoverable_lbas: Family<VolumeLabels, Gauge>,
    pub volume_size: Family<VolumeLabels, Gauge>,
    pub primary_leases: Gauge,
    pub jeopardy_volumes: Gauge,
    pub recovery_log_bytes: Family<VolumeLabels, Gauge>,
    pub recovery_appends: Family<VolumeLabels, Counter>,
    pub recovery_unlogged_writes: Counter,
    pub recovery_restore_bytes: Counter,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~5 s
    Histogram::new(exponential_buckets(1e-5, 2.5, 15))
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("lazarus");
    let requests = Family::<OpLabels, Counter>::default();
    registry.register("requests", "NBD requests completed", requests.clone());
    let request_errors = Family::<OpLabels, Counter>::default();
    registry.register(
        "request_errors",
        "NBD requests answered with an error",
        request_errors.clone(),
    );
    let bytes = Family::<OpLabels, Counter>::default();
    registry.register(
        "request_bytes",
        "Bytes read or written by NBD requests",
        bytes.clone(),
    );
    let latency = Family::<OpLabels, Histogram>::new_with_constructor(latency_histogram);
    registry.register(
        "request_duration_seconds",
        "NBD request latency, from receipt to reply",
        latency.clone(),
    );
    let replication_rtt = latency_histogram();
    registry.register(
        "replication_round_trip_seconds",
        "Time for a primary's update to be acknowledged by every replica",
        replication_rtt.clone(),
    );
    let resync_bytes = Family::<VolumeLabels, Counter>::default();
    registry.register(
        "resync_bytes",
        "Bytes fetched by resyncs (tree, pages, blocks)",
        resync_bytes.clone(),
    );
    let resync_pages = Family::<VolumeLabels, Counter>::default();
    registry.register(
        "resync_pages",
        "Slice pages copied by resyncs",
        resync_pages.clone(),
    );
    let repair_bytes = Family::<VolumeLabels, Counter>::default();
    registry.register(
        "repair_bytes",
        "Bytes fetched by repairs",
        repair_bytes.clone(),
    );
    let repairs = Family::<SourceLabels, Counter>::default();
    registry.register(
        "repairs",
        "Damaged pages and blocks handled, by where the good copy came from",
        repairs.clone(),
    );
    let damaged_pages = Family::<VolumeLabels, Gauge>::default();
    registry.register(
        "damaged_pages",
        "Slice pages with unknown mappings now",
        damaged_pages.clone(),
    );
    let unrecoverable_lbas = Family::<VolumeLabels, Gauge>::default();
    registry.register(
        "unrecoverable_lbas",
        "LBAs that answer EIO now (damaged, not repaired)",
        unrecoverable_lbas.clone(),
    );
    let volume_size = Family::<VolumeLabels, Gauge>::default();
    registry.register(
        "volume_size_bytes",
        "Size of each volume held here",
        volume_size.clone(),
    );
    let primary_leases = Gauge::default();
    registry.register(
        "primary_leases",
        "Volumes this node serves as primary under a lease",
        primary_leases.clone(),
    );
    let jeopardy_volumes: Gauge = Gauge::default();
    registry.register(
        "jeopardy_volumes",
        "Volumes in jeopardy (writes go through the recovery server), as this node sees them",
        jeopardy_volumes.clone(),
    );
    let recovery_log_bytes = Family::<VolumeLabels, Gauge>::default();
    registry.register(
        "recovery_log_bytes",
        "Size of each volume's changed-block log on the recovery server",
        recovery_log_bytes.clone(),
    );
    let recovery_appends = Family::<VolumeLabels, Counter>::default();
    registry.register(
        "recovery_appends",
        "Changes made durable on the recovery server by this node",
        recovery_appends.clone(),
    );
    let recovery_unlogged_writes = Counter::default();
    registry.register(
        "recovery_unlogged_writes",
        "Blocks acknowledged in jeopardy without the recovery server (policy accept)",
        recovery_unlogged_writes.clone(),
    );
    let recovery_restore_bytes = Counter::default();
    registry.register(
        "recovery_restore_bytes",
        "Bytes read from the recovery server's logs by restores",
        recovery_restore_bytes.clone(),
    );
    Metrics {
        registry,
        requests,
        request_errors,
        bytes,
        latency,
        latency_ns: Family::default(),
        replication_rtt,
        resync_bytes,
        resync_pages,
        repair_bytes,
        repairs,
        damaged_pages,
        unrecoverable_lbas,
        volume_size,
        primary_leases,
        jeopardy_volumes,
        recovery_log_bytes,
        recovery_appends,
        recovery_unlogged_writes,
        recovery_restore_bytes,
    }
});

pub fn record_request(volume: &str, op: Op, bytes: u64, took: Duration, ok: bool) {
    let l = OpLabels {
        volume: volume.to_string(),
        op: op.label(),
    };
    let m = &*METRICS;
    m.requests.get_or_create(&l).inc();
    if !ok {
        m.request_errors.get_or_create(&l).inc();
    }
    if bytes > 0 {
        m.bytes.get_or_create(&l).inc_by(bytes);
    }
    m.latency.get_or_create(&l).observe(took.as_secs_f64());
    m.latency_ns
        .get_or_create(&l)
        .inc_by(took.as_nanos() as u64);
}

/// This node's request totals for one volume and op: (requests, errors, bytes,
/// summed nanoseconds).
pub fn totals(volume: &str, op: Op) -> (u64, u64, u64, u64) {
    let l = OpLabels {
        volume: volume.to_string(),
        op: op.label(),
    };
    let m = &*METRICS;
    let get = |f: &Family<OpLabels, Counter>| f.get(&l).map_or(0, |c| c.get());
    (
        get(&m.requests),
        get(&m.request_errors),
        get(&m.bytes),
        get(&m.latency_ns),
    )
}

pub fn vol(volume: &str) -> VolumeLabels {
    VolumeLabels {
        volume: volume.to_string(),
    }
}

/// The exposition text of every metric, as sampled last (`set` the gauges first).
pub fn encode() -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry);
    out
}
