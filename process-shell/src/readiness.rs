//! Readiness as `/healthz/ready` serves it: not ready at start, ready once every source has
//! done its first full sync and the binary's own table is built from it, and never ready again
//! once draining has begun (a sync that lands during the drain must not undo the 503).

use std::future::Future;
use std::sync::Arc;

use registry::SnapshotHandle;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Draining,
}

/// Cheap to clone; every clone sees the same state.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<watch::Sender<State>>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(watch::channel(State::Starting).0))
    }
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        *self.0.borrow() == State::Ready
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow() == State::Draining
    }

    /// Turn ready, unless draining has begun: then this does nothing and returns `false`.
    pub fn mark_ready(&self) -> bool {
        self.0.send_if_modified(|s| {
            if *s == State::Starting {
                *s = State::Ready;
                true
            } else {
                false
            }
        });
        self.is_ready()
    }

    /// Not ready from now on, for good.
    pub fn begin_drain(&self) {
        self.0.send_replace(State::Draining);
    }

    /// Resolves once draining has begun.
    pub async fn draining(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|s| *s == State::Draining).await;
    }

    /// Become ready when `condition` completes, unless draining begins first; `announce` runs
    /// (to log "ready" with the binary's addresses) only if it did become ready. Returns at once
    /// when `source` has not synced yet (the wait goes on in a task); when it has (a directory
    /// source), the condition is awaited here, so start-up returns ready.
    pub async fn become_ready_when<F, A>(&self, source: &SnapshotHandle, condition: F, announce: A)
    where
        F: Future<Output = ()> + Send + 'static,
        A: FnOnce() + Send + 'static,
    {
        let synced = source.is_synced();
        let readiness = self.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = readiness.draining() => {}
                _ = condition => if readiness.mark_ready() { announce() },
            }
        });
        if synced {
            let _ = task.await;
        }
    }
}

/// The usual readiness condition: `source`'s first full sync, then the binary's table built
/// from (at least) the snapshot that sync published. `built_from` reads a table's snapshot
/// version.
pub async fn synced_and_built<T, V>(
    source: SnapshotHandle,
    mut tables: watch::Receiver<T>,
    built_from: V,
) where
    V: Fn(&T) -> u64,
{
    source.wait_synced().await;
    let synced = source.current().status.version;
    let _ = tables.wait_for(|t| built_from(t) >= synced).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_ready_once_draining() {
        let r = Readiness::default();
        assert!(!r.is_ready());
        r.begin_drain();
        assert!(!r.mark_ready());
        assert!(!r.is_ready() && r.is_draining());

        let r = Readiness::default();
        assert!(r.mark_ready());
        r.begin_drain();
        assert!(!r.is_ready());
        assert!(!r.mark_ready());
    }

    #[tokio::test]
    async fn a_sync_after_the_drain_began_does_not_make_it_ready() {
        let (writer, handle) = registry::source::channel();
        let r = Readiness::default();
        let (tx, rx) = watch::channel(0u64);
        let condition = synced_and_built(handle.clone(), rx, |v| *v);
        r.become_ready_when(&handle, condition, || {}).await;
        r.begin_drain();
        writer.publish(registry::Snapshot::default());
        tx.send_replace(1);
        tokio::task::yield_now().await;
        assert!(!r.is_ready());
    }

    #[tokio::test]
    async fn ready_only_once_the_table_is_built_from_the_sync() {
        let (writer, handle) = registry::source::channel();
        let r = Readiness::default();
        let (tx, rx) = watch::channel(0u64);
        let condition = synced_and_built(handle.clone(), rx, |v| *v);
        r.become_ready_when(&handle, condition, || {}).await;
        writer.publish(registry::Snapshot::default());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!r.is_ready(), "synced, but no table built from it yet");
        tx.send_replace(1);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !r.is_ready() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(r.is_ready());
    }
}
