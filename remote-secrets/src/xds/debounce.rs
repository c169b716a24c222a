//! Debounce: a burst of mesh changes becomes one push. A generation is published once the view
//! has been quiet for `quiet`, or at the latest `max` after the first change of the burst.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::view::MeshView;

/// What xDS streams compute from: a numbered view.
#[derive(Clone, Debug)]
pub struct Generation {
    pub version: u64,
    pub view: Arc<MeshView>,
    /// When the generation was published (push latency is measured from here).
    pub published: Instant,
}

/// A channel holding generation 1 (the current view) and the task that feeds it.
pub fn start(
    mut views: watch::Receiver<Arc<MeshView>>,
    quiet: Duration,
    max: Duration,
    stop: CancellationToken,
) -> watch::Receiver<Arc<Generation>> {
    let first = Generation {
        version: 1,
        // Mark what the first generation holds as seen here, not in the task: a change that
        // lands before the task runs must still produce a generation.
        view: views.borrow_and_update().clone(),
        published: Instant::now(),
    };
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = run(views, tx, quiet, max) => {}
        }
    });
    rx
}

async fn run(
    mut views: watch::Receiver<Arc<MeshView>>,
    out: watch::Sender<Arc<Generation>>,
    quiet: Duration,
    max: Duration,
) {
    loop {
        if views.changed().await.is_err() {
            return;
        }
        let deadline = Instant::now() + max;
        loop {
            let until = (Instant::now() + quiet).min(deadline);
            match tokio::time::timeout_at(until, views.changed()).await {
                Ok(Ok(())) if Instant::now() < deadline => continue,
                Ok(Ok(())) | Err(_) => break,
                Ok(Err(_)) => return,
            }
        }
        let view = views.borrow_and_update().clone();
        let version = out.borrow().version + 1;
        out.send_replace(Arc::new(Generation {
            version,
            view,
            published: Instant::now(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(v: u64) -> Arc<MeshView> {
        Arc::new(MeshView {
            version: v,
            ..Default::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_generation() {
        let (tx, rx) = watch::channel(view(0));
        let mut gens = start(
            rx,
            Duration::from_millis(100),
            Duration::from_secs(1),
            CancellationToken::new(),
        );
        gens.borrow_and_update();
        for v in 1..=5 {
            tx.send_replace(view(v));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gens.changed().await.unwrap();
        let g = gens.borrow_and_update().clone();
        assert_eq!((g.version, g.view.version), (2, 5));
        // Nothing more was published for the burst.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!gens.has_changed().unwrap());
    }

    /// A change sent right after `start`, before its task first runs, is not lost (seen in
    /// the network-namespace test as a remote cluster's first sync never reaching clients).
    #[tokio::test(start_paused = true)]
    async fn a_change_before_the_task_runs_is_published() {
        let (tx, rx) = watch::channel(view(0));
        let mut gens = start(
            rx,
            Duration::from_millis(100),
            Duration::from_secs(1),
            CancellationToken::new(),
        );
        tx.send_replace(view(1));
        gens.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(5), gens.changed())
            .await
            .expect("a generation for the change")
            .unwrap();
        assert_eq!(gens.borrow().view.version, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_never_ending_burst_still_publishes_by_max() {
        let (tx, rx) = watch::channel(view(0));
        let mut gens = start(
            rx,
            Duration::from_millis(100),
            Duration::from_secs(1),
            CancellationToken::new(),
        );
        gens.borrow_and_update();
        let start = Instant::now();
        let mut v = 0;
        while !gens.has_changed().unwrap() {
            v += 1;
            tx.send_replace(view(v));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Paused time: the published generation came by the 1 s bound, not after the burst.
        assert!(Instant::now() - start <= Duration::from_millis(1100));
        assert!(gens.borrow().view.version < v + 1);
    }
}
