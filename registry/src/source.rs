//! Sources fill the snapshot. Each is the single writer of its `watch` channel; readers hold a
//! cheap [`SnapshotHandle`] and never lock.

pub mod dir;
pub mod kube;

use std::sync::Arc;

use tokio::sync::watch;

use crate::snapshot::Snapshot;

/// A reader's view of a source: the current snapshot, change notification, and whether the
/// first full sync is done (readiness).
#[derive(Clone, Debug)]
pub struct SnapshotHandle {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    synced: watch::Receiver<bool>,
    healthy: watch::Receiver<bool>,
}

/// The writer's side, held by exactly one source task.
#[derive(Debug)]
pub struct SnapshotWriter {
    snapshot: watch::Sender<Arc<Snapshot>>,
    synced: watch::Sender<bool>,
    healthy: watch::Sender<bool>,
}

/// A writer and its first reader, starting from an empty, unsynced snapshot.
pub fn channel() -> (SnapshotWriter, SnapshotHandle) {
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (synced_tx, synced_rx) = watch::channel(false);
    let (healthy_tx, healthy_rx) = watch::channel(true);
    (
        SnapshotWriter {
            snapshot: snapshot_tx,
            synced: synced_tx,
            healthy: healthy_tx,
        },
        SnapshotHandle {
            snapshot: snapshot_rx,
            synced: synced_rx,
            healthy: healthy_rx,
        },
    )
}

impl SnapshotWriter {
    /// Swap in a complete new snapshot (its `status.version` is set here) and mark the source
    /// synced.
    pub fn publish(&self, mut snapshot: Snapshot) {
        snapshot.status.version = self.snapshot.borrow().status.version + 1;
        self.snapshot.send_replace(Arc::new(snapshot));
        self.synced.send_replace(true);
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Say whether the source currently reaches what it reads. An unhealthy source keeps its
    /// last snapshot serving; readers may mark it stale.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// Resolves once every reader (every [`SnapshotHandle`] clone) is gone: the source can stop.
    pub async fn closed(&self) {
        self.snapshot.closed().await
    }
}

impl SnapshotHandle {
    /// The current snapshot. Cheap: one `Arc` clone under a short read lock.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// `true` while the source reaches what it reads (a directory source always does).
    pub fn health(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    /// Wait until the first full sync is done (returns at once if it is).
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        // An error means the writer is gone; there is nothing more to wait for.
        let _ = rx.wait_for(|s| *s).await;
    }
}
