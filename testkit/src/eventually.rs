//! Waiting for something to become true without a fixed sleep: poll a check until it holds,
//! and fail with a message after a deadline that only bounds a hung test (it is never a timed
//! assertion). One implementation for every test in the workspace.
//!
//! A check answers `bool` (done or not) or `Option<T>` (the value, once it is there), and may
//! be a plain closure or one returning a future:
//!
//! ```no_run
//! # async fn demo(ready: &std::sync::atomic::AtomicBool, get: impl Fn() -> Option<u32>) {
//! use testkit::eventually;
//! eventually("ready", || ready.load(std::sync::atomic::Ordering::Relaxed)).await;
//! eventually("answered", || async { true }).await;
//! let n: u32 = eventually("a value", || get()).await;
//! # }
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

/// How long [`eventually`] waits: generous, since it only bounds a test that would hang.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The pause between two checks.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// What a check answers: `bool`, or `Option<T>` to hand back the value it waited for.
pub trait Outcome {
    type Value;
    /// `Some` once the condition holds.
    fn done(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn done(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn done(self) -> Option<T> {
        self
    }
}

/// Marks a check that answers at once (`FnMut() -> bool` or `-> Option<T>`).
pub struct Immediate;
/// Marks a check that answers through a future (`FnMut() -> impl Future<Output = bool>`).
pub struct Awaited;

/// A closure [`eventually`] can poll; implemented for plain and async-returning closures (the
/// marker `M` only keeps the two implementations apart; it is always inferred).
pub trait Check<M> {
    type Output: Outcome;
    fn check(&mut self) -> impl Future<Output = Self::Output>;
}

impl<F, O> Check<Immediate> for F
where
    F: FnMut() -> O,
    O: Outcome,
{
    type Output = O;
    fn check(&mut self) -> impl Future<Output = O> {
        std::future::ready(self())
    }
}

impl<F, Fut> Check<Awaited> for F
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Outcome,
{
    type Output = Fut::Output;
    fn check(&mut self) -> impl Future<Output = Fut::Output> {
        self()
    }
}

/// The condition did not hold in time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {after:?} waiting for {what}")]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

type ValueOf<M, C> = <<C as Check<M>>::Output as Outcome>::Value;

/// Poll `check` until it holds and return its value; panic naming `what` after [`DEADLINE`].
pub async fn eventually<M, C: Check<M>>(what: &str, check: C) -> ValueOf<M, C> {
    eventually_within(what, DEADLINE, check).await
}

/// [`eventually`] with its own deadline.
pub async fn eventually_within<M, C: Check<M>>(
    what: &str,
    within: Duration,
    check: C,
) -> ValueOf<M, C> {
    match poll_until(what, within, check).await {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Poll `check` until it holds; an error instead of a panic, for callers that add context
/// (a log tail, a dump) or are not tests.
pub async fn poll_until<M, C: Check<M>>(
    what: &str,
    within: Duration,
    mut check: C,
) -> Result<ValueOf<M, C>, TimedOut> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check.check().await.done() {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.into(),
                after: within,
            });
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// [`eventually_within`] for code without a runtime: the thread sleeps between checks.
pub fn eventually_blocking<O: Outcome>(
    what: &str,
    within: Duration,
    check: impl FnMut() -> O,
) -> O::Value {
    match poll_until_blocking(what, within, check) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// [`poll_until`] for code without a runtime: the thread sleeps between checks.
pub fn poll_until_blocking<O: Outcome>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> O,
) -> Result<O::Value, TimedOut> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().done() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.into(),
                after: within,
            });
        }
        std::thread::sleep(INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn plain_and_async_checks_return_their_value() {
        let n = Cell::new(0);
        eventually("the third check", || {
            n.set(n.get() + 1);
            n.get() == 3
        })
        .await;
        assert_eq!(n.get(), 3);
        let v = eventually("a value", || async { Some(7) }).await;
        assert_eq!(v, 7);
        let v = eventually("a value from a plain closure", || Some("x")).await;
        assert_eq!(v, "x");
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_never_holds_times_out_with_its_name() {
        let e = poll_until("never", Duration::from_secs(1), || async { false })
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "timed out after 1s waiting for never");
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 50ms waiting for the impossible")]
    async fn eventually_panics_with_the_message() {
        eventually_within("the impossible", Duration::from_millis(50), || false).await;
    }

    #[test]
    fn blocking_checks() {
        let mut n = 0;
        let got = eventually_blocking("the second check", Duration::from_secs(5), || {
            n += 1;
            (n == 2).then_some(n)
        });
        assert_eq!(got, 2);
        let e = poll_until_blocking("never", Duration::ZERO, || false).unwrap_err();
        assert_eq!(e.what, "never");
    }
}
