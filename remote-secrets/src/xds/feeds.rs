//! Per-network snapshot feeds: one task per client network that has streams is the single
//! writer of that network's [`NetworkSnapshot`]s; streams read them through a `watch` channel.
//!
//! The first stream of a network starts its task; the task builds a snapshot for every
//! generation (off the async runtime: the first one computes every resource) and ends once no
//! stream of the network is left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Generation;
use super::snapshot::{self, NetworkSnapshot};
use crate::eds::EdsOptions;

/// A network's latest snapshot; `None` until the first one is built.
pub type Feed = watch::Receiver<Option<Arc<NetworkSnapshot>>>;
type FeedSender = watch::Sender<Option<Arc<NetworkSnapshot>>>;

#[derive(Debug)]
pub struct Feeds {
    generations: watch::Receiver<Arc<Generation>>,
    options: Arc<EdsOptions>,
    feeds: Mutex<HashMap<String, FeedSender>>,
    stop: CancellationToken,
}

impl Feeds {
    pub fn new(
        generations: watch::Receiver<Arc<Generation>>,
        options: Arc<EdsOptions>,
        stop: CancellationToken,
    ) -> Arc<Feeds> {
        Arc::new(Feeds {
            generations,
            options,
            feeds: Mutex::new(HashMap::new()),
            stop,
        })
    }

    pub fn options(&self) -> &Arc<EdsOptions> {
        &self.options
    }

    /// The feed of `network`, started if no stream of that network is connected.
    pub fn subscribe(self: &Arc<Self>, network: &str) -> Feed {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = feeds.get(network) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        feeds.insert(network.to_string(), tx.clone());
        debug!(network, "starting the network's snapshot feed");
        tokio::spawn(self.clone().run(network.to_string(), tx));
        rx
    }

    /// How many networks have a feed.
    pub fn networks(&self) -> usize {
        self.feeds.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn run(self: Arc<Self>, network: String, tx: FeedSender) {
        let mut generations = self.generations.clone();
        let mut previous: Option<Arc<NetworkSnapshot>> = None;
        loop {
            let generation = generations.borrow_and_update().clone();
            let (opts, net, prev) = (self.options.clone(), network.clone(), previous.clone());
            let built = tokio::task::spawn_blocking(move || {
                snapshot::build(prev.as_deref(), generation, &net, &opts)
            });
            let snap = tokio::select! {
                _ = self.stop.cancelled() => break,
                r = built => match r {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        warn!(%network, error = %e, "building the EDS snapshot failed; keeping the previous one");
                        match previous.clone() { Some(p) => p, None => break }
                    }
                },
            };
            debug!(
                %network,
                generation = snap.version(),
                recomputed = snap.recomputed,
                changed = snap.changed.len(),
                "snapshot built"
            );
            previous = Some(snap.clone());
            tx.send_replace(Some(snap));
            if !self.wait_for_change(&network, &tx, &mut generations).await {
                break;
            }
        }
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if feeds.get(&network).is_some_and(|t| t.same_channel(&tx)) {
            feeds.remove(&network);
        }
    }

    /// Wait for a new generation; `false` when the feed should end (stopped, or no stream of
    /// the network is left).
    async fn wait_for_change(
        &self,
        network: &str,
        tx: &FeedSender,
        generations: &mut watch::Receiver<Arc<Generation>>,
    ) -> bool {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                r = generations.changed() => return r.is_ok(),
                _ = tx.closed() => {
                    // Subscribing takes the same lock, so nobody can join once we decide.
                    let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
                    if tx.receiver_count() == 0 {
                        feeds.remove(network);
                        debug!(network, "no stream left; feed ended");
                        return false;
                    }
                }
            }
        }
    }
}
