//! Channels between processes while tasks run: queues, channel ends and pipes.
//!
//! The parent brokers every channel ([`broker`]); a worker reaches them through its
//! link, the same pipes its calls use ([`link`]). A handle is the same type in both
//! places: passed into a task as (part of) its input, it is encoded as the
//! channel's id and bound to the worker's link when the task decodes it.

#[cfg(feature = "executor")]
#[macro_use]
mod macros;

#[cfg(feature = "executor")]
pub(crate) mod broker;
mod ends;
pub(crate) mod link;
mod queue;

use std::fmt;
use std::marker::PhantomData;
#[cfg(feature = "executor")]
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use ends::{Pipe, Receiver, RecvIter, Sender};
pub use queue::{Delivery, JoinableQueue, Queue, QueueIter};

use crate::wire::blob;
use crate::wire::codec;
use crate::wire::protocol::{self, Ended, Role};

/// Why a channel operation failed.
///
/// Returned by both sides: the parent's async operations and a task's blocking
/// ones. It converts into [`Error::Channel`](crate::Error::Channel), so `?` works in
/// functions returning [`procexec::Result`](crate::Result). It is serde
/// serializable, so a task can return it.
/// ```
/// # procexec::tasks! { pub fn noop() {} }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let q = exec.queue::<u32>(4);
/// q.close();
/// assert_eq!(q.put(1).await, Err(procexec::ChannelError::Closed));
/// let err: procexec::Error = q.put(2).await.unwrap_err().into();
/// assert!(err.is_channel());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChannelError {
    /// The channel was closed ([`Queue::close`]), or, for a channel's ends, every
    /// handle on the other side is gone (dropped, or its process died).
    #[error("the channel is closed")]
    Closed,
    /// Its executor shut down (or was dropped).
    #[error("the channel's executor shut down")]
    Shutdown,
    /// An item could not be encoded or decoded; the message says why, naming the
    /// type and, when known, the field.
    #[error("{0}")]
    Codec(String),
    /// An item is larger than the executor's frame limit allows.
    #[error("an item of {size} bytes, above the limit of {limit} bytes")]
    TooLarge {
        /// Its encoded size.
        size: u64,
        /// The largest item the executor's `max_frame_len` allows.
        limit: u64,
    },
    /// The link to the parent broke: the worker is about to exit.
    #[error("the worker's link to its parent broke")]
    Disconnected,
}

impl ChannelError {
    fn ended(why: Ended) -> Self {
        match why {
            Ended::Shutdown => ChannelError::Shutdown,
            Ended::Closed | Ended::Unknown => ChannelError::Closed,
        }
    }
}

/// A handle's wire form: which channel of which executor, and what the handle may do.
#[derive(Serialize, Deserialize)]
struct Wire {
    executor: u64,
    channel: u64,
    /// Credit a worker starts with, in items.
    window: u32,
    role: Role,
}

/// One handle to a channel, untyped: what every typed handle holds.
pub(crate) struct Endpoint {
    channel: u64,
    executor: u64,
    window: u32,
    role: Role,
    /// The largest item, encoded.
    max_item: usize,
    route: Route,
}

enum Route {
    /// In the parent, straight to the broker.
    #[cfg(feature = "executor")]
    Parent(Arc<broker::Broker>),
    /// In a worker, through its link.
    Worker(link::LinkRef),
}

impl Endpoint {
    #[cfg(feature = "executor")]
    pub(crate) fn parent(broker: Arc<broker::Broker>, role: Role) -> Self {
        broker.hold(role);
        Endpoint {
            channel: broker.id,
            executor: broker.executor,
            window: broker.window,
            role,
            max_item: broker.max_item,
            route: Route::Parent(broker),
        }
    }

    /// The same channel in another role (a channel's other end).
    #[cfg(feature = "executor")]
    pub(crate) fn broker(&self) -> Option<&Arc<broker::Broker>> {
        match &self.route {
            Route::Parent(broker) => Some(broker),
            Route::Worker(_) => None,
        }
    }

    /// Whether a worker's puts may wait a moment to share a write: a channel's
    /// sends may (their receiver learns of a crash anyway), a queue's may not (an
    /// item put must survive its producer).
    fn lingers(&self) -> bool {
        self.role == Role::Sender
    }

    fn check_size(&self, item: &Bytes) -> Result<(), ChannelError> {
        if item.len() > self.max_item {
            return Err(ChannelError::TooLarge { size: item.len() as u64, limit: self.max_item as u64 });
        }
        Ok(())
    }

    async fn put(&self, item: Bytes) -> Result<(), ChannelError> {
        self.check_size(&item)?;
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => {
                let mut item = Some(item);
                std::future::poll_fn(|cx| broker.poll_put(cx, &mut item)).await.map_err(ChannelError::ended)
            }
            Route::Worker(owner) => link::put(owner, self.channel, item, self.lingers()),
        }
    }

    fn blocking_put(&self, item: Bytes) -> Result<(), ChannelError> {
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(_) => {
                not_in_a_runtime("blocking_put", "put(item).await");
                futures::executor::block_on(self.put(item))
            }
            Route::Worker(owner) => {
                self.check_size(&item)?;
                link::put(owner, self.channel, item, self.lingers())
            }
        }
    }

    /// Puts `item` if that needs no wait; gives it back otherwise (`None` error).
    fn try_put(&self, item: Bytes) -> Result<(), (Bytes, Option<ChannelError>)> {
        if let Err(err) = self.check_size(&item) {
            return Err((item, Some(err)));
        }
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => {
                broker.try_put(item).map_err(|(item, why)| (item, why.map(ChannelError::ended)))
            }
            Route::Worker(owner) => link::try_put(owner, self.channel, item, self.lingers()),
        }
    }

    /// The next item; `None` once closed and empty.
    async fn get(&self) -> Result<Option<link::Item>, ChannelError> {
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => std::future::poll_fn(|cx| broker.poll_get(cx))
                .await
                .map(|taken| taken.map(link::Item::from))
                .map_err(ChannelError::ended),
            Route::Worker(owner) => link::get(owner, self.channel, link::Wait::Forever),
        }
    }

    fn blocking_get(&self, wait: link::Wait) -> Result<Option<link::Item>, ChannelError> {
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => match wait {
                link::Wait::Forever => {
                    not_in_a_runtime("blocking_get", "get().await");
                    futures::executor::block_on(self.get())
                }
                link::Wait::No => match broker.try_get() {
                    Ok(taken) => Ok(taken.map(link::Item::from)),
                    Err(Ended::Closed) => Ok(None),
                    Err(why) => Err(ChannelError::ended(why)),
                },
                link::Wait::Until(deadline) => {
                    not_in_a_runtime("get_timeout", "tokio::time::timeout(duration, queue.get()).await");
                    block_on_until(self.get(), deadline).unwrap_or(Ok(None))
                }
            },
            Route::Worker(owner) => link::get(owner, self.channel, wait),
        }
    }

    fn ack(&self, delivery: u64) {
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => broker.ack(delivery),
            Route::Worker(owner) => link::ack(owner, self.channel, delivery),
        }
    }

    fn requeue(&self, delivery: u64) {
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => broker.requeue(delivery),
            Route::Worker(owner) => link::requeue(owner, self.channel, delivery),
        }
    }

    fn close(&self) {
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => broker.close(Ended::Closed),
            Route::Worker(owner) => link::close(owner, self.channel),
        }
    }

    fn same_channel(&self, other: &Endpoint) -> bool {
        self.executor == other.executor && self.channel == other.channel
    }
}

/// A blocking channel operation in the parent, inside a Tokio runtime, would block
/// the runtime's thread, and with it, perhaps, the supervisor bringing the item:
/// refused, as Tokio refuses `blocking_recv` there.
#[cfg(feature = "executor")]
pub(crate) fn not_in_a_runtime(operation: &str, instead: &str) {
    if tokio::runtime::Handle::try_current().is_ok() {
        panic!("`{operation}` would block a Tokio runtime's thread: in async code use `{instead}`");
    }
}

/// Runs `future` on this thread until it is done or `deadline` passes: the
/// parent's blocking gets with a timeout, which may run outside any runtime.
#[cfg(feature = "executor")]
fn block_on_until<F: std::future::Future>(future: F, deadline: Instant) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark()
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Some(output);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::park_timeout(left);
    }
}

impl Clone for Endpoint {
    fn clone(&self) -> Self {
        let route = match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => {
                broker.hold(self.role);
                Route::Parent(broker.clone())
            }
            Route::Worker(owner) => {
                link::hold(owner, self.channel, self.role);
                Route::Worker(owner.clone())
            }
        };
        Endpoint {
            route,
            channel: self.channel,
            executor: self.executor,
            window: self.window,
            role: self.role,
            max_item: self.max_item,
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        match &self.route {
            #[cfg(feature = "executor")]
            Route::Parent(broker) => broker.release(self.role),
            Route::Worker(owner) => link::release(owner, self.channel, self.role),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint").field("channel", &self.channel).field("role", &self.role).finish()
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[cfg(feature = "executor")]
        if let Route::Parent(broker) = &self.route {
            // On its way in a call: the channel stays open for it until the call ends.
            transit::hold(broker, self.role);
        }
        Wire { executor: self.executor, channel: self.channel, window: self.window, role: self.role }
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        if let Some(link) = link::attach(wire.executor, wire.channel, wire.role, wire.window) {
            let (max_item, owner) = link.map_err(serde::de::Error::custom)?;
            return Ok(Endpoint {
                channel: wire.channel,
                executor: wire.executor,
                window: wire.window,
                role: wire.role,
                max_item,
                route: Route::Worker(owner),
            });
        }
        #[cfg(feature = "executor")]
        if let Some(broker) = broker::Hub::of_executor(wire.executor).and_then(|hub| hub.find(wire.channel)) {
            return Ok(Endpoint::parent(broker, wire.role));
        }
        Err(serde::de::Error::custom(format!(
            "a channel handle of an executor that is gone (channel {} of executor {:#x})",
            wire.channel, wire.executor
        )))
    }
}

/// Handles encoded into a call hold their channel open until the call ends (the
/// worker has bound them by then, or never will).
#[cfg(feature = "executor")]
pub(crate) mod transit {
    use std::cell::RefCell;
    use std::sync::Arc;

    use super::broker::Broker;
    use crate::wire::protocol::Role;

    thread_local! {
        static COLLECTING: RefCell<Option<Vec<Hold>>> = const { RefCell::new(None) };
    }

    /// One handle on its way to a worker.
    pub(crate) enum Hold {
        /// A channel's end: the channel counts it as held until the call ends.
        Channel(Arc<Broker>, Role),
        /// Something else that must live until the call ends (shared memory), and
        /// whether the call may wait on it for other calls (a lock).
        Keep(#[allow(dead_code)] Arc<dyn std::any::Any + Send + Sync>, bool),
    }

    impl Hold {
        /// Whether a call holding it may wait for other calls: it must not be queued
        /// behind one in a worker.
        fn talks(&self) -> bool {
            matches!(self, Hold::Channel(..) | Hold::Keep(_, true))
        }
    }

    impl Drop for Hold {
        fn drop(&mut self) {
            if let Hold::Channel(broker, role) = self {
                broker.release(*role);
            }
        }
    }

    /// The handles a call's inputs carry; released when dropped.
    #[derive(Default)]
    pub(crate) struct Holds(Vec<Hold>);

    impl Holds {
        pub(crate) fn extend(&mut self, other: Holds) {
            self.0.extend(other.0)
        }

        /// Whether the call may talk, and wait for other calls.
        pub(crate) fn talk(&self) -> bool {
            self.0.iter().any(Hold::talks)
        }
    }

    pub(super) fn hold(broker: &Arc<Broker>, role: Role) {
        COLLECTING.with(|collecting| {
            if let Some(holds) = collecting.borrow_mut().as_mut() {
                broker.hold(role);
                holds.push(Hold::Channel(broker.clone(), role));
            }
        })
    }

    /// Keeps `thing` alive until the call whose input is being encoded ends; `talks`
    /// when the call may wait on it for other calls.
    pub(crate) fn keep(thing: Arc<dyn std::any::Any + Send + Sync>, talks: bool) {
        COLLECTING.with(|collecting| {
            if let Some(holds) = collecting.borrow_mut().as_mut() {
                holds.push(Hold::Keep(thing, talks));
            }
        })
    }

    /// Whether the collection under way has collected a handle that may make its
    /// call wait for other calls.
    pub(crate) fn collecting_any() -> bool {
        COLLECTING.with(|collecting| {
            collecting.borrow().as_ref().is_some_and(|holds| holds.iter().any(Hold::talks))
        })
    }

    /// Runs `encode`, collecting the handles it encodes.
    pub(crate) fn collect<R>(encode: impl FnOnce() -> R) -> (R, Holds) {
        let outer = COLLECTING.with(|collecting| collecting.borrow_mut().replace(Vec::new()));
        let result = encode();
        let holds = COLLECTING.with(|collecting| std::mem::replace(&mut *collecting.borrow_mut(), outer));
        (result, Holds(holds.unwrap_or_default()))
    }
}

/// Encodes an item for a channel.
fn encode_item<T: Serialize>(item: &T) -> Result<Bytes, ChannelError> {
    let mut buf = BytesMut::new();
    protocol::encode_into(&mut buf, item)
        .map_err(|err| ChannelError::Codec(codec::encode_error_message(item, &err)))?;
    Ok(buf.freeze())
}

/// Decodes an item taken from a channel; a large `Blob` in it shares its bytes.
fn decode_item<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ChannelError> {
    let _shared = blob::register(bytes);
    codec::decode_exactly::<T>(bytes).map_err(ChannelError::Codec)
}

/// Typed items over an untyped endpoint: what every handle type shares.
struct Typed<T> {
    end: Endpoint,
    _items: PhantomData<fn(T) -> T>,
}

impl<T> Typed<T> {
    fn new(end: Endpoint) -> Self {
        Typed { end, _items: PhantomData }
    }
}

impl<T> Clone for Typed<T> {
    fn clone(&self) -> Self {
        Typed::new(self.end.clone())
    }
}

impl<T: Serialize + DeserializeOwned> Typed<T> {
    async fn put(&self, item: T) -> Result<(), ChannelError> {
        self.end.put(encode_item(&item)?).await
    }

    fn blocking_put(&self, item: T) -> Result<(), ChannelError> {
        self.end.blocking_put(encode_item(&item)?)
    }

    fn try_put(&self, item: T) -> Result<(), TryPutError<T>> {
        let bytes = match encode_item(&item) {
            Ok(bytes) => bytes,
            Err(err) => return Err(TryPutError::Failed(err)),
        };
        self.end.try_put(bytes).map_err(|(_, why)| match why {
            Some(err) => TryPutError::Failed(err),
            None => TryPutError::Full(item),
        })
    }

    async fn get(&self) -> Result<Option<(T, link::Item)>, ChannelError> {
        Self::decode(self.end.get().await?)
    }

    fn blocking_get(&self, wait: link::Wait) -> Result<Option<(T, link::Item)>, ChannelError> {
        Self::decode(self.end.blocking_get(wait)?)
    }

    fn decode(item: Option<link::Item>) -> Result<Option<(T, link::Item)>, ChannelError> {
        item.map(|item| decode_item(&item.bytes).map(|value| (value, item))).transpose()
    }
}

/// Why a `try_put` or `try_send` did not put its item.
/// ```
/// # procexec::tasks! { pub fn noop() {} }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let q = exec.queue::<u32>(1);
/// q.try_put(1).unwrap();
/// match q.try_put(2) {
///     Err(procexec::TryPutError::Full(item)) => assert_eq!(item, 2), // handed back
///     other => panic!("{other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TryPutError<T> {
    /// The channel is full: the item is given back.
    #[error("the channel is full")]
    Full(T),
    /// The put failed.
    #[error(transparent)]
    Failed(ChannelError),
}

fn deadline_after(timeout: std::time::Duration) -> link::Wait {
    match Instant::now().checked_add(timeout) {
        Some(deadline) => link::Wait::Until(deadline),
        None => link::Wait::Forever,
    }
}

/// What a handle's `Sink` impl keeps between polls: the item being put.
#[cfg(feature = "executor")]
#[derive(Default)]
pub(crate) struct StreamState {
    pending: Option<Bytes>,
}

#[cfg(feature = "executor")]
fn poll_next<T: DeserializeOwned>(
    end: &Endpoint,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Option<Result<T, ChannelError>>> {
    use std::task::Poll;
    let Route::Parent(broker) = &end.route else {
        // In a worker a stream blocks, as everything there does.
        return Poll::Ready(
            end.blocking_get(link::Wait::Forever)
                .map(|item| item.map(|item| item.bytes))
                .transpose()
                .map(|got| got.and_then(|bytes| decode_item(&bytes))),
        );
    };
    match broker.poll_get(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(None)) => Poll::Ready(None),
        Poll::Ready(Ok(Some(taken))) => Poll::Ready(Some(decode_item(&taken.bytes))),
        Poll::Ready(Err(why)) => Poll::Ready(Some(Err(ChannelError::ended(why)))),
    }
}

#[cfg(feature = "executor")]
fn start_send<T: Serialize>(end: &Endpoint, state: &mut StreamState, item: &T) -> Result<(), ChannelError> {
    let bytes = encode_item(item)?;
    end.check_size(&bytes)?;
    match &end.route {
        Route::Parent(_) => state.pending = Some(bytes),
        Route::Worker(owner) => link::put(owner, end.channel, bytes, end.lingers())?,
    }
    Ok(())
}

#[cfg(feature = "executor")]
fn poll_flush(
    end: &Endpoint,
    state: &mut StreamState,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Result<(), ChannelError>> {
    match (&end.route, state.pending.is_some()) {
        (Route::Parent(broker), true) => broker.poll_put(cx, &mut state.pending).map_err(ChannelError::ended),
        _ => std::task::Poll::Ready(Ok(())),
    }
}
