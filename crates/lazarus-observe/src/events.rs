//! The node's event timeline: faults, state changes, repairs, jeopardy. Kept in memory
//! (the last `EVENTS_MAX`), served at `/api/v1/events`, and logged.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::LazyLock;

const EVENTS_MAX: usize = 500;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub seq: u64,
    pub kind: String,
    pub volume: String,
    pub message: String,
}

static EVENTS: LazyLock<parking_lot::Mutex<(u64, VecDeque<Event>)>> =
    LazyLock::new(Default::default);

pub fn record(kind: &str, volume: &str, message: impl Into<String>) {
    let message = message.into();
    tracing::info!(kind, volume, %message, "event");
    let mut e = EVENTS.lock();
    e.0 += 1;
    let ev = Event {
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        seq: e.0,
        kind: kind.to_string(),
        volume: volume.to_string(),
        message,
    };
    e.1.push_back(ev);
    while e.1.len() > EVENTS_MAX {
        e.1.pop_front();
    }
}

/// Events with a sequence number above `after`, oldest first.
pub fn since(after: u64) -> Vec<Event> {
    EVENTS
        .lock()
        .1
        .iter()
        .filter(|e| e.seq > after)
        .cloned()
        .collect()
}
