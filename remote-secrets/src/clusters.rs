//! The multi-cluster registry: every cluster's latest snapshot, merged into one immutable
//! [`MeshView`] that EDS reads.
//!
//! One task (the aggregator) is the single writer. Cluster sources are attached and detached at
//! run time ([`Clusters::attach`], [`Clusters::detach`]); each attached source gets a small
//! forwarding task that sends its snapshots to the aggregator. A remote that stops answering
//! keeps its last snapshot and is marked stale; readiness never waits on a remote.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use registry::{Snapshot, SnapshotHandle};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::eds::EdsOptions;
use crate::gateways;
use crate::mesh_networks::MeshNetworks;
use crate::view::{ClusterEntry, ClusterSource, MeshView};

enum Update {
    Attach {
        id: String,
        source: ClusterSource,
        network: Option<String>,
        handle: SnapshotHandle,
        health: Option<watch::Receiver<bool>>,
    },
    Detach {
        id: String,
    },
    Snapshot {
        id: String,
        generation: u64,
        snapshot: Arc<Snapshot>,
        synced: bool,
    },
    Stale {
        id: String,
        generation: u64,
        stale: bool,
    },
    Networks(Arc<MeshNetworks>),
    Dns(Arc<BTreeMap<String, Vec<IpAddr>>>),
}

/// The writer side of the multi-cluster registry; cheap to clone.
#[derive(Clone, Debug)]
pub struct Clusters {
    tx: mpsc::UnboundedSender<Update>,
    view: watch::Receiver<Arc<MeshView>>,
}

impl std::fmt::Debug for Update {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Update")
    }
}

impl Clusters {
    /// Start the aggregator. It runs until `stop` is cancelled.
    pub fn start(
        local_cluster: String,
        networks: Arc<MeshNetworks>,
        options: EdsOptions,
        stop: CancellationToken,
    ) -> Clusters {
        let view = MeshView {
            local_cluster,
            networks,
            ..Default::default()
        };
        let (view_tx, view_rx) = watch::channel(Arc::new(view.clone()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(aggregate(view, rx, view_tx, tx.clone(), options, stop));
        Clusters { tx, view: view_rx }
    }

    /// Add (or replace) a cluster. `health`, when given, is `false` while the source is not
    /// answering: its endpoints are kept and marked stale.
    pub fn attach(
        &self,
        id: &str,
        source: ClusterSource,
        network: Option<String>,
        handle: SnapshotHandle,
        health: Option<watch::Receiver<bool>>,
    ) {
        let _ = self.tx.send(Update::Attach {
            id: id.to_string(),
            source,
            network,
            handle,
            health,
        });
    }

    pub fn detach(&self, id: &str) {
        let _ = self.tx.send(Update::Detach { id: id.to_string() });
    }

    pub fn set_networks(&self, networks: Arc<MeshNetworks>) {
        let _ = self.tx.send(Update::Networks(networks));
    }

    pub fn set_dns(&self, dns: Arc<BTreeMap<String, Vec<IpAddr>>>) {
        let _ = self.tx.send(Update::Dns(dns));
    }

    pub fn current(&self) -> Arc<MeshView> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshView>> {
        self.view.clone()
    }
}

async fn aggregate(
    mut view: MeshView,
    mut rx: mpsc::UnboundedReceiver<Update>,
    out: watch::Sender<Arc<MeshView>>,
    tx: mpsc::UnboundedSender<Update>,
    options: EdsOptions,
    stop: CancellationToken,
) {
    // Each attachment has a generation, so updates from a replaced source are ignored.
    let mut generations: BTreeMap<String, (u64, CancellationToken)> = BTreeMap::new();
    let mut next_generation = 0u64;
    loop {
        let update = tokio::select! {
            _ = stop.cancelled() => return,
            u = rx.recv() => match u { Some(u) => u, None => return },
        };
        let current = |id: &str, g: u64, gens: &BTreeMap<String, (u64, CancellationToken)>| {
            gens.get(id).is_some_and(|(cur, _)| *cur == g)
        };
        match update {
            Update::Attach {
                id,
                source,
                network,
                handle,
                health,
            } => {
                next_generation += 1;
                let token = stop.child_token();
                if let Some((_, old)) =
                    generations.insert(id.clone(), (next_generation, token.clone()))
                {
                    old.cancel();
                }
                view.clusters.insert(
                    id.clone(),
                    ClusterEntry {
                        id: id.clone(),
                        source,
                        snapshot: handle.current(),
                        synced: handle.is_synced(),
                        stale: health.as_ref().is_some_and(|h| !*h.borrow()),
                        network,
                    },
                );
                tokio::spawn(forward(
                    id,
                    next_generation,
                    handle,
                    health,
                    tx.clone(),
                    token,
                ));
            }
            Update::Detach { id } => {
                if let Some((_, token)) = generations.remove(&id) {
                    token.cancel();
                }
                if view.clusters.remove(&id).is_none() {
                    continue;
                }
            }
            Update::Snapshot {
                id,
                generation,
                snapshot,
                synced,
            } => {
                if !current(&id, generation, &generations) {
                    continue;
                }
                let Some(c) = view.clusters.get_mut(&id) else {
                    continue;
                };
                c.snapshot = snapshot;
                c.synced = synced;
            }
            Update::Stale {
                id,
                generation,
                stale,
            } => {
                if !current(&id, generation, &generations) {
                    continue;
                }
                let Some(c) = view.clusters.get_mut(&id) else {
                    continue;
                };
                if c.stale == stale {
                    continue;
                }
                c.stale = stale;
            }
            Update::Networks(n) => view.networks = n,
            Update::Dns(d) => view.dns = d,
        }
        view.version += 1;
        view.gateways = gateways::resolve(&view, &options.domain_suffix);
        out.send_replace(Arc::new(view.clone()));
    }
}

async fn forward(
    id: String,
    generation: u64,
    handle: SnapshotHandle,
    health: Option<watch::Receiver<bool>>,
    tx: mpsc::UnboundedSender<Update>,
    stop: CancellationToken,
) {
    let mut snapshots = handle.subscribe();
    snapshots.mark_changed();
    let mut health = health;
    let synced = handle.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = snapshots.changed() => {
                if r.is_err() {
                    // The source is gone for good: keep the last snapshot, marked stale.
                    let _ = tx.send(Update::Stale { id: id.clone(), generation, stale: true });
                    stop.cancelled().await;
                    return;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                let _ = tx.send(Update::Snapshot {
                    id: id.clone(),
                    generation,
                    snapshot,
                    synced: synced.is_synced(),
                });
            }
            _ = synced.wait_synced(), if !synced.is_synced() => {
                snapshots.mark_changed();
            }
            r = async { health.as_mut().expect("guarded").changed().await }, if health.is_some() => {
                match r {
                    Ok(()) => {
                        let up = *health.as_mut().expect("guarded").borrow_and_update();
                        let _ = tx.send(Update::Stale { id: id.clone(), generation, stale: !up });
                    }
                    Err(_) => health = None,
                }
            }
        }
    }
}
