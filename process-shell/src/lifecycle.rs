//! One lifecycle for SIGTERM, the same in every binary:
//!
//! 1. readiness turns 503 (for good) and serving goes on for `--drain-duration`, so load
//!    balancers and the Service's endpoints move away;
//! 2. the binary stops accepting ([`Work::stop_accepting`]);
//! 3. in-flight work ([`Work::in_flight`]: connections, TCP queries, xDS streams) has until
//!    `--termination-deadline` to finish;
//! 4. what is left is ended ([`Work::force`]), then the admin servers and sources stop.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::flags::{LifecycleDefaults, LifecycleFlags};
use crate::readiness::Readiness;

/// What a binary hands the lifecycle: how to stop accepting, what is in flight, and how to end
/// what is still running at the deadline.
#[derive(Clone, Debug, Default)]
pub struct Work {
    /// Cancelled after the drain: listeners close, no new work is taken.
    pub stop_accepting: CancellationToken,
    /// Every piece of in-flight work is spawned on it; closed after the drain.
    pub in_flight: TaskTracker,
    /// Cancelled at the deadline: whatever is still running ends now.
    pub force: CancellationToken,
}

/// A running lifecycle: [`Lifecycle::begin`] is SIGTERM.
pub struct Lifecycle {
    terminate: CancellationToken,
    /// Cancelled to skip what is left of the drain and the deadline (tests, a second signal).
    now: CancellationToken,
    done: JoinHandle<()>,
}

impl Lifecycle {
    /// Wait for [`Lifecycle::begin`], then terminate `work` as the module says and run `after`
    /// (stop the admin servers and the sources).
    pub fn spawn<D, A>(
        binary: &'static str,
        readiness: Readiness,
        flags: &LifecycleFlags<D>,
        work: Work,
        after: A,
    ) -> Lifecycle
    where
        D: LifecycleDefaults,
        A: Future<Output = ()> + Send + 'static,
    {
        let terminate = CancellationToken::new();
        let now = CancellationToken::new();
        let (drain, deadline) = (flags.drain_duration, flags.termination_deadline);
        let done = tokio::spawn({
            let (terminate, now) = (terminate.clone(), now.clone());
            async move {
                terminate.cancelled().await;
                terminate_work(binary, &readiness, drain, deadline, &work, &now).await;
                after.await;
                info!("{binary} stopped");
            }
        });
        Lifecycle {
            terminate,
            now,
            done,
        }
    }

    /// Start terminating, as SIGTERM does.
    pub fn begin(&self) {
        self.terminate.cancel();
    }

    pub fn has_begun(&self) -> bool {
        self.terminate.is_cancelled()
    }

    /// Wait until termination has finished.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Terminate at once: no drain, no deadline (in-flight work is ended), then wait.
    pub async fn stop_now(self) {
        self.now.cancel();
        self.terminate.cancel();
        self.wait().await;
    }
}

async fn terminate_work(
    binary: &str,
    readiness: &Readiness,
    drain: Duration,
    deadline: Duration,
    work: &Work,
    now: &CancellationToken,
) {
    readiness.begin_drain();
    info!(
        ?drain,
        "{binary} terminating: readiness is now 503; still serving while load balancers move away"
    );
    tokio::select! {
        _ = tokio::time::sleep(drain) => {}
        _ = now.cancelled() => {}
    }
    work.stop_accepting.cancel();
    work.in_flight.close();
    info!(
        in_flight = work.in_flight.len(),
        ?deadline,
        "{binary} stopped accepting; waiting for in-flight work"
    );
    let finished = tokio::select! {
        r = tokio::time::timeout(deadline, work.in_flight.wait()) => r.is_ok(),
        _ = now.cancelled() => work.in_flight.is_empty(),
    };
    if !finished {
        warn!(
            in_flight = work.in_flight.len(),
            "termination deadline passed; ending what is still in flight"
        );
        work.force.cancel();
        work.in_flight.wait().await;
    }
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C. Install it before starting anything: a SIGTERM
/// that arrives before the handler exists kills the process instead of draining it.
pub struct TerminationSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl TerminationSignal {
    pub fn install() -> std::io::Result<TerminationSignal> {
        Ok(TerminationSignal {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// Wait for the signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        info!("termination signal received");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug)]
    struct Short;
    impl LifecycleDefaults for Short {
        const DRAIN_DURATION: &'static str = "0s";
        const TERMINATION_DEADLINE: &'static str = "50ms";
    }

    #[tokio::test]
    async fn drains_then_stops_accepting_then_forces_at_the_deadline() {
        let readiness = Readiness::default();
        readiness.mark_ready();
        let work = Work::default();
        // One piece of work that ends only when stopped, one that only the deadline ends.
        let polite = work.stop_accepting.clone();
        work.in_flight
            .spawn(async move { polite.cancelled().await });
        let stubborn = work.force.clone();
        work.in_flight
            .spawn(async move { stubborn.cancelled().await });
        let (after_tx, after_rx) = tokio::sync::oneshot::channel();
        let flags = LifecycleFlags::<Short>::for_tests();
        let lifecycle = Lifecycle::spawn("test", readiness.clone(), &flags, work.clone(), async {
            let _ = after_tx.send(());
        });
        assert!(readiness.is_ready());
        lifecycle.begin();
        lifecycle.wait().await;
        assert!(readiness.is_draining());
        assert!(work.stop_accepting.is_cancelled() && work.force.is_cancelled());
        assert!(work.in_flight.is_empty());
        after_rx.await.unwrap();
    }

    #[tokio::test]
    async fn work_that_ends_in_time_is_not_forced() {
        let work = Work::default();
        let polite = work.stop_accepting.clone();
        work.in_flight
            .spawn(async move { polite.cancelled().await });
        let flags = LifecycleFlags::<Short>::new(Duration::ZERO, Duration::from_secs(30));
        let lifecycle =
            Lifecycle::spawn("test", Readiness::default(), &flags, work.clone(), async {});
        lifecycle.begin();
        lifecycle.wait().await;
        assert!(!work.force.is_cancelled());
    }
}
