//! Admission budgets, so slow or hostile clients cannot hold what good ones need:
//!
//! - the **peek budget**: connections still reading their ClientHello, in all (`--max-peeking`)
//!   and per source address (`--max-peeking-per-source`). Checked first thing in the
//!   connection's task, before a byte is read; a slot is given back as soon as the connection
//!   is routed or refused, so a client that dribbles its hello holds one slot for at most
//!   `--peek-timeout`;
//! - the **connection budget** (`--max-connections`): routed connections, taken only once the
//!   ClientHello has been read and routed, and held until the connection ends.
//!
//! The decision is [`PeekBudget::admits`], pure; the counters around it are atomics and one
//! short-held map of per-source counts (touched twice per connection, never across an await).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection is closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    /// `--max-peeking` connections are reading their ClientHello.
    Peeking,
    /// This source already has `--max-peeking-per-source` of them.
    SourcePeeking,
}

impl Exhausted {
    /// The metric label (`gateway_rejected_connections_total{reason}`).
    pub fn reason(self) -> &'static str {
        match self {
            Exhausted::Peeking => "peek_budget",
            Exhausted::SourcePeeking => "source_peek_budget",
        }
    }
}

#[derive(Debug)]
pub struct PeekBudget {
    max: usize,
    max_per_source: u32,
    /// How many peek now: the `gateway_peeking_connections` gauge itself, so the metric costs
    /// nothing more.
    total: Gauge,
    by_source: Mutex<HashMap<IpAddr, u32>>,
}

impl PeekBudget {
    /// `total` counts the connections peeking (pass the metric's gauge).
    pub fn new(max: usize, max_per_source: u32, total: Gauge) -> Arc<PeekBudget> {
        Arc::new(PeekBudget {
            max,
            max_per_source,
            total,
            by_source: Mutex::new(HashMap::new()),
        })
    }

    /// The decision: may one more connection start peeking, given how many already do?
    pub fn admits(&self, total: usize, from_source: u32) -> Result<(), Exhausted> {
        if total >= self.max {
            Err(Exhausted::Peeking)
        } else if from_source >= self.max_per_source {
            Err(Exhausted::SourcePeeking)
        } else {
            Ok(())
        }
    }

    /// A slot for a connection from `source`, given back when the slot is dropped.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Result<PeekSlot, Exhausted> {
        let mut by_source = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        let count = by_source.entry(source).or_insert(0);
        self.admits(self.peeking(), *count)?;
        *count += 1;
        self.total.inc();
        Ok(PeekSlot {
            budget: self.clone(),
            source,
        })
    }

    /// Connections reading their ClientHello now.
    pub fn peeking(&self) -> usize {
        usize::try_from(self.total.get()).unwrap_or(0)
    }
}

/// One connection's place in the peek budget.
#[derive(Debug)]
pub struct PeekSlot {
    budget: Arc<PeekBudget>,
    source: IpAddr,
}

impl Drop for PeekSlot {
    fn drop(&mut self) {
        let mut by_source = self
            .budget
            .by_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
        self.budget.total.dec();
    }
}

/// A routed connection's place under `--max-connections`, held for its life. It borrows the
/// semaphore rather than owning a permit (an `Arc` and a count) so that every open connection's
/// state stays within its size class.
#[derive(Debug)]
pub struct ConnectionSlot<'a>(Option<&'a Semaphore>);

impl<'a> ConnectionSlot<'a> {
    /// Take over `permit`, acquired from `limit`; given back when the slot is dropped.
    pub fn hold(permit: Option<OwnedSemaphorePermit>, limit: Option<&'a Semaphore>) -> Self {
        match (permit, limit) {
            (Some(permit), Some(limit)) => {
                permit.forget();
                ConnectionSlot(Some(limit))
            }
            _ => ConnectionSlot(None),
        }
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        if let Some(limit) = self.0 {
            limit.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_and_total_limits_and_slots_come_back() {
        let budget = PeekBudget::new(3, 2, Gauge::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = budget.enter(a).unwrap();
        let a2 = budget.enter(a).unwrap();
        assert_eq!(budget.enter(a).unwrap_err(), Exhausted::SourcePeeking);
        let b1 = budget.enter(b).unwrap();
        assert_eq!(budget.enter(b).unwrap_err(), Exhausted::Peeking);
        drop(a1);
        assert_eq!(budget.peeking(), 2);
        let a3 = budget.enter(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!(budget.peeking(), 0);
        assert!(budget.by_source.lock().unwrap().is_empty());
    }

    #[test]
    fn a_connection_slot_gives_its_permit_back_once() {
        let limit = Arc::new(Semaphore::new(2));
        let permit = limit.clone().try_acquire_owned().unwrap();
        let slot = ConnectionSlot::hold(Some(permit), Some(&limit));
        assert_eq!(limit.available_permits(), 1);
        drop(slot);
        assert_eq!(limit.available_permits(), 2);
        drop(ConnectionSlot::hold(None, None));
        assert_eq!(limit.available_permits(), 2);
    }
}
