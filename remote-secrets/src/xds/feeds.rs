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

    /// The latest snapshot of `network`, if streams keep its feed running.
    pub fn current(&self, network: &str) -> Option<Arc<NetworkSnapshot>> {
        let feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        feeds.get(network).and_then(|tx| tx.borrow().clone())
    }

    /// The current generation for `network` with nothing computed yet: `get` computes each
    /// asked name on demand. For one-off requests naming their resources, which should not
    /// pay for (or start) a whole network's feed.
    pub fn on_demand(&self, network: &str) -> NetworkSnapshot {
        NetworkSnapshot {
            generation: self.generations.borrow().clone(),
            network: network.to_string(),
            resources: Default::default(),
            previous: None,
            changed: Vec::new(),
            recomputed: 0,
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::xds::snapshot::tests::{base_view, generation, httpbin_changed_view};

    async fn next(rx: &mut Feed) -> Arc<NetworkSnapshot> {
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(Option::is_some))
            .await
            .expect("a snapshot within 30 s")
            .expect("the feed is open")
            .clone()
            .unwrap()
    }

    #[tokio::test]
    async fn one_feed_per_network_shared_by_its_streams_and_ended_by_the_last() {
        let (gen_tx, gen_rx) = watch::channel(generation(1, base_view()));
        let feeds = Feeds::new(gen_rx, Arc::default(), CancellationToken::new());
        let mut a = feeds.subscribe("network1");
        let mut b = feeds.subscribe("network1");
        let mut other = feeds.subscribe("network2");
        assert_eq!(feeds.networks(), 2);
        let (sa, sb) = (next(&mut a).await, next(&mut b).await);
        assert!(
            Arc::ptr_eq(&sa, &sb),
            "one snapshot for the network's streams"
        );
        assert!(!sa.resources.is_empty());
        assert_eq!(next(&mut other).await.network, "network2");

        a.mark_unchanged();
        gen_tx.send_replace(generation(2, httpbin_changed_view()));
        tokio::time::timeout(Duration::from_secs(30), a.changed())
            .await
            .expect("a snapshot for the new generation")
            .unwrap();
        let s2 = a.borrow_and_update().clone().unwrap();
        assert_eq!((s2.version(), s2.previous), (2, Some(1)));
        assert!(!s2.changed.is_empty());
        assert!(s2.recomputed < sa.recomputed);

        drop((a, b));
        let ended = async {
            while feeds.networks() != 1 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), ended)
            .await
            .expect("network1's feed ends with its last stream");
        // A new stream starts it again.
        let mut again = feeds.subscribe("network1");
        assert_eq!(next(&mut again).await.version(), 2);
    }
}
