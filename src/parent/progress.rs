//! How far a map has come, as data the caller can watch.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A snapshot of a map's progress (see [`Map::progress`](crate::Map::progress)).
///
/// ```
/// procexec::tasks! {
///     pub fn square(x: u64) -> u64 { x * x }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(2).build().await?;
/// let mut map = exec.map(square, 0..1_000);
/// let progress = map.progress();
/// let squares = map.await?;
/// let last = *progress.borrow();
/// assert_eq!((last.done, last.total, last.failed), (1_000, Some(1_000), 0));
/// assert_eq!(last.fraction(), Some(1.0));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Progress {
    /// Inputs finished, with an output or an error.
    pub done: u64,
    /// Of those, inputs that ended in an error.
    pub failed: u64,
    /// Inputs run again after a crash or a timeout.
    pub retried: u64,
    /// All inputs, when the input stream said exactly how many (its size hint).
    pub total: Option<u64>,
    /// Time since the map started.
    pub elapsed: Duration,
}

impl Progress {
    /// Inputs finished per second so far.
    pub fn rate(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 { self.done as f64 / seconds } else { 0.0 }
    }

    /// The part done, from 0 to 1, when the total is known.
    pub fn fraction(&self) -> Option<f64> {
        self.total.map(|total| if total == 0 { 1.0 } else { self.done as f64 / total as f64 })
    }
}

/// A map's side: publishes snapshots once somebody watches.
pub(crate) struct Tracker {
    sender: Option<watch::Sender<Progress>>,
    started: Instant,
    total: Option<u64>,
}

impl Tracker {
    pub(crate) fn new(total: Option<u64>) -> Self {
        Tracker { sender: None, started: Instant::now(), total }
    }

    pub(crate) fn watch(&mut self) -> watch::Receiver<Progress> {
        let (started, total) = (self.started, self.total);
        self.sender
            .get_or_insert_with(|| {
                let empty = Progress { done: 0, failed: 0, retried: 0, total, elapsed: started.elapsed() };
                watch::channel(empty).0
            })
            .subscribe()
    }

    /// Whether anybody watches (so counting is worth it).
    pub(crate) fn watched(&self) -> bool {
        self.sender.is_some()
    }

    /// `done` more inputs finished, `failed` of them in error; `retried` more run again.
    pub(crate) fn add(&self, done: u64, failed: u64, retried: u64) {
        if let Some(sender) = &self.sender {
            let elapsed = self.started.elapsed();
            sender.send_modify(|progress| {
                progress.done += done;
                progress.failed += failed;
                progress.retried += retried;
                progress.elapsed = elapsed;
            });
        }
    }
}
