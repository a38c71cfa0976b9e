//! Per-worker state: built once in each worker process, read by every task it runs.

use std::any::type_name;
use std::fmt;
use std::sync::OnceLock;

/// A value built once in each worker process, typically by the executor's
/// [initializer](crate::Builder::initializer), and then read by every task that
/// worker runs: a loaded model, a connection pool, a warmed cache. Python's
/// `Pool(initializer=...)` plus the global it sets.
///
/// Declare it as a `static` next to the tasks. Each worker process has its own copy;
/// the parent's stays empty. In-process workers
/// ([`Builder::in_process`](crate::Builder::in_process)), being threads of the
/// parent, all share the parent's: set it once, before building the executor,
/// rather than in an initializer (which fails on the second worker thread).
///
/// # Examples
///
/// ```
/// use procexec::WorkerState;
///
/// struct Dictionary(Vec<String>);
///
/// static DICTIONARY: WorkerState<Dictionary> = WorkerState::new();
///
/// procexec::tasks! {
///     /// Runs once in every worker, before any call.
///     pub fn load(words: Vec<String>) { DICTIONARY.set(Dictionary(words)) }
///
///     pub fn is_word(word: String) -> bool { DICTIONARY.get().0.contains(&word) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let words = vec!["process".to_string(), "thread".to_string()];
/// let exec = procexec::Executor::builder().processes(2).initializer(load, words).build().await?;
/// assert_eq!(exec.map(is_word, ["thread".into(), "fiber".into()]).await?, [true, false]);
/// # Ok(()) }
/// ```
pub struct WorkerState<T> {
    value: OnceLock<T>,
}

impl<T> WorkerState<T> {
    /// An empty state.
    pub const fn new() -> Self {
        WorkerState { value: OnceLock::new() }
    }

    /// Stores the value.
    ///
    /// # Panics
    ///
    /// If it was set before in this process (which fails the initializer, with this
    /// message).
    pub fn set(&self, value: T) {
        if self.value.set(value).is_err() {
            panic!("the WorkerState<{}> was already set in this worker", type_name::<T>());
        }
    }

    /// The value.
    ///
    /// # Panics
    ///
    /// If it was never set in this process: the calling task then fails with
    /// [`Error::TaskPanicked`](crate::Error::TaskPanicked) saying so.
    pub fn get(&self) -> &T {
        match self.value.get() {
            Some(value) => value,
            None => panic!(
                "the WorkerState<{}> is not set in this worker: give the executor an initializer that sets it",
                type_name::<T>()
            ),
        }
    }

    /// The value, if it was set in this process.
    ///
    /// ```
    /// static COUNTER: procexec::WorkerState<u32> = procexec::WorkerState::new();
    /// assert_eq!(COUNTER.try_get(), None);
    /// COUNTER.set(7);
    /// assert_eq!(COUNTER.try_get(), Some(&7));
    /// ```
    pub fn try_get(&self) -> Option<&T> {
        self.value.get()
    }
}

impl<T> Default for WorkerState<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: fmt::Debug> fmt::Debug for WorkerState<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WorkerState").field(&self.value.get()).finish()
    }
}
