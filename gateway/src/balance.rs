//! Endpoint choice: power-of-two-choices on open connections, skipping endpoints that were
//! ejected after consecutive connect failures (with exponential backoff).
//!
//! Endpoint state outlives route-table rebuilds: a new table reuses the `Arc<EndpointState>`
//! of every address it keeps, so a config reload does not forget load or failures.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Passive health: when and for how long to eject an endpoint.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Ejection {
    /// Consecutive connect failures that eject an endpoint.
    pub after_failures: u32,
    /// First ejection time; doubles with each further ejection, up to `max`.
    #[serde(with = "process_shell::flags::duration_ms")]
    pub base: Duration,
    #[serde(with = "process_shell::flags::duration_ms")]
    pub max: Duration,
}

#[derive(Debug, Default)]
pub struct EndpointState {
    active: AtomicU32,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// On [`crate::clock::now_ms`]; 0 when not ejected.
    ejected_until: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `namespace/name` of the pod, for logs.
    pub pod: Option<Arc<str>>,
    pub state: Arc<EndpointState>,
}

impl EndpointState {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// A successful connect: the endpoint is healthy again.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        self.ejected_until.store(0, Ordering::Relaxed);
    }

    /// A failed connect. Returns the ejection time when this failure ejects the endpoint.
    pub fn record_failure(&self, policy: &Ejection, now_ms: u64) -> Option<Duration> {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < policy.after_failures.max(1) {
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let time = policy.base.saturating_mul(1 << n).min(policy.max);
        self.ejected_until
            .store(now_ms + time.as_millis() as u64, Ordering::Relaxed);
        Some(time)
    }

    /// Count an open connection until the guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Holds one open connection on an endpoint.
#[derive(Debug)]
pub struct ActiveGuard(Arc<EndpointState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Pick an endpoint not in `tried`: the less loaded of two chosen at random among those not
/// ejected. When every remaining endpoint is ejected, pick among them anyway (as Envoy's
/// panic threshold does): an ejected endpoint is a better bet than a certain failure.
pub fn pick<'a>(backends: &'a [Backend], tried: &[SocketAddr], now_ms: u64) -> Option<&'a Backend> {
    let untried = |b: &&Backend| !tried.contains(&b.addr);
    let healthy = backends
        .iter()
        .filter(untried)
        .filter(|b| !b.state.is_ejected(now_ms))
        .count();
    let any_healthy = healthy > 0;
    let eligible = |b: &&Backend| untried(b) && (!any_healthy || !b.state.is_ejected(now_ms));
    let n = if any_healthy {
        healthy
    } else {
        backends.iter().filter(untried).count()
    };
    match n {
        0 => None,
        1 => backends.iter().find(eligible),
        _ => {
            let i = random_below(n);
            let mut j = random_below(n - 1);
            if j >= i {
                j += 1;
            }
            let a = backends.iter().filter(eligible).nth(i)?;
            let b = backends.iter().filter(eligible).nth(j)?;
            Some(if b.state.active() < a.state.active() {
                b
            } else {
                a
            })
        }
    }
}

/// A fast per-thread xorshift; choice quality, not secrecy, is what matters here.
fn random_below(n: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            seed ^ (&seed as *const u64 as u64) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        ((x >> 11) % n as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<Backend> {
        (1..=n)
            .map(|i| Backend {
                addr: SocketAddr::from(([127, 0, 0, i], 80)),
                pod: None,
                state: Arc::default(),
            })
            .collect()
    }

    const POLICY: Ejection = Ejection {
        after_failures: 2,
        base: Duration::from_secs(10),
        max: Duration::from_secs(30),
    };

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let b = backends(2);
        let _g: Vec<_> = (0..5).map(|_| b[0].state.open()).collect();
        for _ in 0..50 {
            assert_eq!(pick(&b, &[], 1).unwrap().addr, b[1].addr);
        }
    }

    #[test]
    fn skips_tried_and_ejected_then_panics_to_ejected() {
        let b = backends(3);
        assert_eq!(
            pick(&b, &[b[0].addr, b[1].addr], 1).unwrap().addr,
            b[2].addr
        );
        assert!(pick(&b, &[b[0].addr, b[1].addr, b[2].addr], 1).is_none());
        assert_eq!(b[0].state.record_failure(&POLICY, 1000), None);
        assert_eq!(
            b[0].state.record_failure(&POLICY, 1000),
            Some(Duration::from_secs(10))
        );
        for _ in 0..50 {
            assert_ne!(pick(&b, &[], 1001).unwrap().addr, b[0].addr);
        }
        // Only the ejected one is left: it is still tried.
        assert_eq!(
            pick(&b, &[b[1].addr, b[2].addr], 1001).unwrap().addr,
            b[0].addr
        );
        // Backoff doubles and is capped; success clears it.
        b[0].state.record_failure(&POLICY, 1000);
        assert_eq!(
            b[0].state.record_failure(&POLICY, 1000),
            Some(Duration::from_secs(20))
        );
        b[0].state.record_failure(&POLICY, 1000);
        assert_eq!(
            b[0].state.record_failure(&POLICY, 1000),
            Some(Duration::from_secs(30))
        );
        assert!(!b[0].state.is_ejected(1000 + 30_001));
        b[0].state.record_success();
        assert!(!b[0].state.is_ejected(1001));
    }

    #[test]
    fn spreads_over_all() {
        let b = backends(4);
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            let p = pick(&b, &[], 1).unwrap();
            seen[b.iter().position(|x| x.addr == p.addr).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    }
}
