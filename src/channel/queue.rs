//! `Queue` and `JoinableQueue`: many producers, many consumers, in any process.

use std::fmt;
use std::ops::Deref;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[cfg(feature = "executor")]
use super::StreamState;
use super::{ChannelError, Endpoint, TryPutError, Typed, deadline_after, link};

/// A bounded queue between processes, like Python's `multiprocessing.Queue`: any
/// number of producers and consumers, in the parent and in tasks.
///
/// Made by [`Executor::queue`](crate::Executor::queue). The handle is cheap to
/// clone, and is passed into tasks as (part of) their input. In the parent its
/// operations are async ([`put`](Queue::put), [`get`](Queue::get)) and it is a
/// [`Stream`](futures::Stream) and a [`Sink`](futures::Sink); inside a task (a plain
/// function) use the blocking ones ([`blocking_put`](Queue::blocking_put),
/// [`blocking_get`](Queue::blocking_get), [`get_timeout`](Queue::get_timeout),
/// [`try_get`](Queue::try_get), or iterate over `&queue`).
///
/// Async code must use the async methods: a blocking one would block its runtime's
/// thread, and with it, perhaps, the supervisor that brings the item; in the parent,
/// inside a runtime, the blocking ones panic rather than hang. Handles travel into
/// tasks as inputs: a task does not return one, nor send one through a channel.
///
/// The parent holds the items (it brokers every queue), at most `capacity` of them
/// plus a small window per producing worker, whose puts then need no round trip.
/// A `put` waits while the queue is full. An item put from a task is in the pipe
/// to the parent when `blocking_put` returns, so it survives the task's worker dying
/// right after. Items handed to a consumer that dies before it takes them are lost
/// (at most once): use a [`JoinableQueue`] where every item must be processed.
///
/// # Examples
///
/// The seed article's program: one task puts a message, a task in another worker
/// gets it.
///
/// ```
/// use procexec::Queue;
///
/// procexec::tasks! {
///     pub fn producer(q: Queue<String>) {
///         q.blocking_put("Hello from process!".to_string()).unwrap();
///     }
///     pub fn consumer(q: Queue<String>) -> String {
///         q.blocking_get().unwrap().expect("an item")
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(2).build().await?;
/// let q = exec.queue::<String>(10);
/// let got = exec.spawn(consumer, q.clone());
/// exec.spawn(producer, q.clone()).await?;
/// assert_eq!(got.await?, "Hello from process!");
///
/// // The parent is a producer and consumer like any other.
/// q.put("from the parent".to_string()).await?;
/// assert_eq!(q.get().await?.as_deref(), Some("from the parent"));
/// # Ok(()) }
/// ```
pub struct Queue<T> {
    inner: Typed<T>,
    #[cfg(feature = "executor")]
    stream: StreamState,
}

impl<T> Queue<T> {
    pub(crate) fn from_endpoint(end: Endpoint) -> Self {
        Queue {
            inner: Typed::new(end),
            #[cfg(feature = "executor")]
            stream: StreamState::default(),
        }
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// Puts `item`, waiting while the queue is full. Fails if the queue is closed,
    /// or the item cannot be encoded or is above the frame limit.
    pub async fn put(&self, item: T) -> Result<(), ChannelError> {
        self.inner.put(item).await
    }

    /// Puts `item`, blocking the thread while the queue is full: for tasks.
    ///
    /// # Panics
    ///
    /// In the parent, inside a Tokio runtime, where it would block the runtime
    /// (use [`put`](Queue::put)).
    pub fn blocking_put(&self, item: T) -> Result<(), ChannelError> {
        self.inner.blocking_put(item)
    }

    /// Puts `item` if that needs no wait; gives it back in
    /// [`TryPutError::Full`] otherwise.
    pub fn try_put(&self, item: T) -> Result<(), TryPutError<T>> {
        self.inner.try_put(item)
    }

    /// The next item, waiting while the queue is empty; `None` once it is closed
    /// and empty.
    pub async fn get(&self) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.get().await?.map(|(value, _)| value))
    }

    /// The next item, blocking the thread while the queue is empty: for tasks.
    /// `None` once it is closed and empty.
    ///
    /// # Panics
    ///
    /// In the parent, inside a Tokio runtime, where it would block the runtime
    /// (use [`get`](Queue::get)).
    pub fn blocking_get(&self) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.blocking_get(link::Wait::Forever)?.map(|(value, _)| value))
    }

    /// The next item, blocking for at most `timeout`; `None` if none came (or the
    /// queue is closed and empty). For tasks; in async code use
    /// `tokio::time::timeout(duration, queue.get())`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use procexec::Queue;
    ///
    /// procexec::tasks! {
    ///     /// Waits up to `ms` for an item.
    ///     pub fn patient(q: Queue<u32>, ms: u64) -> Option<u32> {
    ///         q.get_timeout(Duration::from_millis(ms)).unwrap()
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let q = exec.queue::<u32>(1);
    /// assert_eq!(exec.spawn(patient, (q.clone(), 10)).await?, None);
    /// q.put(7).await?;
    /// assert_eq!(exec.spawn(patient, (q, 10_000)).await?, Some(7));
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    ///
    /// In the parent, inside a Tokio runtime, where it would block the runtime.
    pub fn get_timeout(&self, timeout: Duration) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.blocking_get(deadline_after(timeout))?.map(|(value, _)| value))
    }

    /// The next item if there is one now.
    pub fn try_get(&self) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.blocking_get(link::Wait::No)?.map(|(value, _)| value))
    }

    /// Closes the queue, for every handle in every process: puts fail from now on
    /// with [`ChannelError::Closed`], and gets return what is left, then `None`.
    pub fn close(&self) {
        self.inner.end.close()
    }

    /// Blocking iteration over the items until the queue is closed and empty: for
    /// tasks (`for item in &queue`).
    pub fn iter(&self) -> QueueIter<'_, T> {
        QueueIter { queue: self }
    }
}

/// Blocking iteration over a [`Queue`]'s items, for tasks; see [`Queue::iter`].
/// ```
/// procexec::tasks! {
///     /// Counts the items until the queue is closed and empty.
///     pub fn count(q: procexec::Queue<String>) -> usize {
///         let items: procexec::QueueIter<'_, String> = q.iter();
///         items.count()
///     }
/// }
/// ```
pub struct QueueIter<'a, T> {
    queue: &'a Queue<T>,
}

impl<T: Serialize + DeserializeOwned> Iterator for QueueIter<'_, T> {
    type Item = Result<T, ChannelError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.queue.blocking_get().transpose()
    }
}

impl<'a, T: Serialize + DeserializeOwned> IntoIterator for &'a Queue<T> {
    type Item = Result<T, ChannelError>;
    type IntoIter = QueueIter<'a, T>;

    fn into_iter(self) -> QueueIter<'a, T> {
        self.iter()
    }
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue::from_endpoint(self.inner.end.clone())
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue").field("channel", &self.inner.end.channel).finish()
    }
}

impl<T> PartialEq for Queue<T> {
    /// Handles of the same queue are equal.
    fn eq(&self, other: &Self) -> bool {
        self.inner.end.same_channel(&other.inner.end)
    }
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.inner.end.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Endpoint::deserialize(deserializer).map(Queue::from_endpoint)
    }
}

/// A [`Queue`] whose items must be acknowledged, like Python's
/// `multiprocessing.JoinableQueue`, but nothing is lost: an item taken by a task
/// whose worker dies before acknowledging it goes back to the front of the queue
/// and is delivered again.
///
/// [`get`](JoinableQueue::get) returns a [`Delivery`]: acknowledge it with
/// [`Delivery::ack`]; dropped without an acknowledgement (a panic, an early return)
/// it goes back too. [`join`](JoinableQueue::join) waits until every item put was
/// acknowledged. Delivery is at least once: an item whose processing was cut short
/// may be processed again, so make processing idempotent, and use
/// [`Delivery::attempts`] to give up on an item that keeps failing. Close it after
/// `join` returns: an item that comes back after its consumers saw the queue closed
/// and empty would wait for a consumer that is gone.
///
/// # Examples
///
/// ```
/// use procexec::JoinableQueue;
///
/// procexec::tasks! {
///     pub fn consume(q: JoinableQueue<u64>) -> u64 {
///         let mut sum = 0;
///         while let Some(item) = q.blocking_get().unwrap() {
///             sum += *item;
///             item.ack();
///         }
///         sum
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(1).build().await?;
/// let q = exec.joinable_queue::<u64>(100);
/// let sum = exec.spawn(consume, q.clone());
/// for i in 1..=10 {
///     q.put(i).await?;
/// }
/// q.join().await; // every item acknowledged
/// q.close();
/// assert_eq!(sum.await?, 55);
/// # Ok(()) }
/// ```
pub struct JoinableQueue<T> {
    inner: Typed<T>,
}

impl<T> JoinableQueue<T> {
    pub(crate) fn from_endpoint(end: Endpoint) -> Self {
        JoinableQueue { inner: Typed::new(end) }
    }
}

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// Puts `item`, waiting while the queue is full.
    pub async fn put(&self, item: T) -> Result<(), ChannelError> {
        self.inner.put(item).await
    }

    /// Puts `item`, blocking the thread while the queue is full: for tasks.
    pub fn blocking_put(&self, item: T) -> Result<(), ChannelError> {
        self.inner.blocking_put(item)
    }

    /// The next item, to acknowledge; `None` once the queue is closed and empty.
    pub async fn get(&self) -> Result<Option<Delivery<T>>, ChannelError> {
        let got = self.inner.get().await?;
        Ok(got.map(|(value, item)| self.delivery(value, item)))
    }

    /// The next item, blocking the thread while the queue is empty: for tasks.
    pub fn blocking_get(&self) -> Result<Option<Delivery<T>>, ChannelError> {
        let got = self.inner.blocking_get(link::Wait::Forever)?;
        Ok(got.map(|(value, item)| self.delivery(value, item)))
    }

    /// The next item, blocking for at most `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<Option<Delivery<T>>, ChannelError> {
        let got = self.inner.blocking_get(deadline_after(timeout))?;
        Ok(got.map(|(value, item)| self.delivery(value, item)))
    }

    fn delivery(&self, value: T, item: link::Item) -> Delivery<T> {
        Delivery {
            value: Some(value),
            end: self.inner.end.clone(),
            delivery: item.delivery,
            attempts: item.attempts,
        }
    }

    /// Waits until every item put so far was acknowledged. Only the parent can
    /// wait for that; in a task it returns at once.
    pub async fn join(&self) {
        #[cfg(feature = "executor")]
        if let Some(broker) = self.inner.end.broker() {
            std::future::poll_fn(|cx| broker.poll_join(cx)).await;
        }
    }

    /// Closes the queue: puts fail from now on, gets return what is left, then `None`.
    pub fn close(&self) {
        self.inner.end.close()
    }
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue::from_endpoint(self.inner.end.clone())
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue").field("channel", &self.inner.end.channel).finish()
    }
}

impl<T> Serialize for JoinableQueue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.inner.end.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for JoinableQueue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Endpoint::deserialize(deserializer).map(JoinableQueue::from_endpoint)
    }
}

/// An item taken from a [`JoinableQueue`], until acknowledged.
///
/// Dereferences to the item. [`ack`](Delivery::ack) it once processed; dropped
/// without that, it goes back to the front of its queue.
/// ```
/// # procexec::tasks! { pub fn noop() {} }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let q = exec.joinable_queue::<String>(4);
/// q.put("job".to_string()).await?;
/// let first = q.get().await?.expect("an item");
/// assert_eq!(first.attempts(), 0);
/// drop(first); // not acknowledged: it goes back
/// let again = q.get().await?.expect("the same item");
/// assert_eq!((again.as_str(), again.attempts()), ("job", 1));
/// assert_eq!(again.ack(), "job");
/// q.join().await;
/// # Ok(()) }
/// ```
pub struct Delivery<T> {
    value: Option<T>,
    end: Endpoint,
    delivery: u64,
    attempts: u32,
}

impl<T> Delivery<T> {
    /// Acknowledges the item, and hands it over.
    pub fn ack(mut self) -> T {
        self.end.ack(self.delivery);
        self.value.take().expect("a delivery holds its item until acknowledged")
    }

    /// How many times before this one the item was delivered and not acknowledged
    /// (its consumer died, or dropped it).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl<T> Deref for Delivery<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.value.as_ref().expect("a delivery holds its item until acknowledged")
    }
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if self.value.is_some() {
            self.end.requeue(self.delivery);
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Delivery<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery").field("item", &self.value).field("attempts", &self.attempts).finish()
    }
}

#[cfg(feature = "executor")]
impl_stream!(Queue);
#[cfg(feature = "executor")]
impl_sink!(Queue);
