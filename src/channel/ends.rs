//! A channel's two ends, and pipes made of two channels.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[cfg(feature = "executor")]
use super::StreamState;
use super::{ChannelError, Endpoint, TryPutError, Typed, deadline_after, link};

/// The sending end of a channel between processes; see
/// [`Executor::channel`](crate::Executor::channel).
///
/// Clone it for more senders. When every sender is gone (dropped in the parent,
/// or in a task whose call ended, or whose worker died), the receiver gets what was
/// sent, then `None`. Sending fails with [`ChannelError::Closed`] once the receiver
/// is gone.
/// ```
/// # procexec::tasks! { pub fn noop() {} }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let (tx, rx) = exec.channel::<u32>(4);
/// tx.send(1).await?;
/// drop(tx);
/// assert_eq!(rx.recv().await?, Some(1));
/// assert_eq!(rx.recv().await?, None, "every sender is gone");
/// # Ok(()) }
/// ```
pub struct Sender<T> {
    inner: Typed<T>,
    #[cfg(feature = "executor")]
    stream: StreamState,
}

/// The receiving end of a channel between processes; see
/// [`Executor::channel`](crate::Executor::channel).
///
/// In the parent it is a [`Stream`](futures::Stream); in a task, iterate over it
/// (`for item in &receiver`) or call [`blocking_recv`](Receiver::blocking_recv).
/// ```
/// use futures::TryStreamExt;
///
/// # procexec::tasks! { pub fn noop() {} }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let (tx, rx) = exec.channel::<u32>(4);
/// tx.send(7).await?;
/// drop(tx);
/// assert_eq!(rx.try_collect::<Vec<_>>().await?, [7]);
/// # Ok(()) }
/// ```
pub struct Receiver<T> {
    inner: Typed<T>,
}

impl<T> Sender<T> {
    pub(crate) fn from_endpoint(end: Endpoint) -> Self {
        Sender {
            inner: Typed::new(end),
            #[cfg(feature = "executor")]
            stream: StreamState::default(),
        }
    }
}

impl<T> Receiver<T> {
    pub(crate) fn from_endpoint(end: Endpoint) -> Self {
        Receiver { inner: Typed::new(end) }
    }
}

impl<T: Serialize + DeserializeOwned> Sender<T> {
    /// Sends `item`, waiting while the channel is full.
    pub async fn send(&self, item: T) -> Result<(), ChannelError> {
        self.inner.put(item).await
    }

    /// Sends `item`, blocking the thread while the channel is full: for tasks.
    pub fn blocking_send(&self, item: T) -> Result<(), ChannelError> {
        self.inner.blocking_put(item)
    }

    /// Sends `item` if that needs no wait; gives it back otherwise.
    pub fn try_send(&self, item: T) -> Result<(), TryPutError<T>> {
        self.inner.try_put(item)
    }
}

impl<T: Serialize + DeserializeOwned> Receiver<T> {
    /// The next item, waiting while the channel is empty; `None` once every sender
    /// is gone and everything sent was received.
    pub async fn recv(&self) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.get().await?.map(|(value, _)| value))
    }

    /// The next item, blocking the thread while the channel is empty: for tasks.
    pub fn blocking_recv(&self) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.blocking_get(link::Wait::Forever)?.map(|(value, _)| value))
    }

    /// The next item, blocking for at most `timeout`; `None` if none came in time
    /// (or the channel ended).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.blocking_get(deadline_after(timeout))?.map(|(value, _)| value))
    }

    /// The next item if there is one now.
    pub fn try_recv(&self) -> Result<Option<T>, ChannelError> {
        Ok(self.inner.blocking_get(link::Wait::No)?.map(|(value, _)| value))
    }

    /// Blocking iteration until the channel ends: for tasks.
    pub fn iter(&self) -> RecvIter<'_, T> {
        RecvIter { receiver: self }
    }
}

/// Blocking iteration over a [`Receiver`], for tasks; see [`Receiver::iter`].
/// ```
/// procexec::tasks! {
///     /// The sum of what the parent sends, once it stops sending.
///     pub fn sum(numbers: procexec::Receiver<u64>) -> u64 {
///         let items: procexec::RecvIter<'_, u64> = numbers.iter();
///         items.map(Result::unwrap).sum()
///     }
/// }
/// ```
pub struct RecvIter<'a, T> {
    receiver: &'a Receiver<T>,
}

impl<T: Serialize + DeserializeOwned> Iterator for RecvIter<'_, T> {
    type Item = Result<T, ChannelError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.receiver.blocking_recv().transpose()
    }
}

impl<'a, T: Serialize + DeserializeOwned> IntoIterator for &'a Receiver<T> {
    type Item = Result<T, ChannelError>;
    type IntoIter = RecvIter<'a, T>;

    fn into_iter(self) -> RecvIter<'a, T> {
        self.iter()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender::from_endpoint(self.inner.end.clone())
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").field("channel", &self.inner.end.channel).finish()
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver").field("channel", &self.inner.end.channel).finish()
    }
}

macro_rules! serde_as_endpoint {
    ($handle:ident) => {
        impl<T> Serialize for $handle<T> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.inner.end.serialize(serializer)
            }
        }

        impl<'de, T> Deserialize<'de> for $handle<T> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                Endpoint::deserialize(deserializer).map($handle::from_endpoint)
            }
        }
    };
}

serde_as_endpoint!(Sender);
serde_as_endpoint!(Receiver);

/// One end of a duplex pipe between processes, like Python's
/// `multiprocessing.Pipe()`: it sends `S` and receives `R`; see
/// [`Executor::pipe`](crate::Executor::pipe).
///
/// Each end goes to one task (or stays in the parent). `recv` returns `None` once
/// the other end is gone: dropped, its call ended, or its worker died.
///
/// # Examples
///
/// ```
/// use procexec::Pipe;
///
/// procexec::tasks! {
///     /// Answers every number it is sent with its square.
///     pub fn squarer(pipe: Pipe<u64, u64>) {
///         while let Some(x) = pipe.blocking_recv().unwrap() {
///             pipe.blocking_send(x * x).unwrap();
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(1).build().await?;
/// let (ours, theirs) = exec.pipe::<u64, u64>();
/// let task = exec.spawn(squarer, theirs);
/// ours.send(7).await?;
/// assert_eq!(ours.recv().await?, Some(49));
/// drop(ours); // the task's recv returns None, and it ends
/// task.await?;
/// # Ok(()) }
/// ```
pub struct Pipe<S, R> {
    sender: Sender<S>,
    receiver: Receiver<R>,
}

impl<S, R> Pipe<S, R> {
    pub(crate) fn new(sender: Sender<S>, receiver: Receiver<R>) -> Self {
        Pipe { sender, receiver }
    }

    /// Splits the end into its sender and its receiver.
    pub fn split(self) -> (Sender<S>, Receiver<R>) {
        (self.sender, self.receiver)
    }
}

impl<S: Serialize + DeserializeOwned, R: Serialize + DeserializeOwned> Pipe<S, R> {
    /// Sends `item` to the other end, waiting while the pipe is full.
    pub async fn send(&self, item: S) -> Result<(), ChannelError> {
        self.sender.send(item).await
    }

    /// Sends `item`, blocking the thread while the pipe is full: for tasks.
    pub fn blocking_send(&self, item: S) -> Result<(), ChannelError> {
        self.sender.blocking_send(item)
    }

    /// The next item from the other end; `None` once it is gone.
    pub async fn recv(&self) -> Result<Option<R>, ChannelError> {
        self.receiver.recv().await
    }

    /// The next item, blocking the thread: for tasks.
    pub fn blocking_recv(&self) -> Result<Option<R>, ChannelError> {
        self.receiver.blocking_recv()
    }

    /// The next item, blocking for at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<R>, ChannelError> {
        self.receiver.recv_timeout(timeout)
    }
}

impl<S, R> fmt::Debug for Pipe<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe").field("sender", &self.sender).field("receiver", &self.receiver).finish()
    }
}

impl<S, R> Serialize for Pipe<S, R> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        (&self.sender, &self.receiver).serialize(serializer)
    }
}

impl<'de, S, R> Deserialize<'de> for Pipe<S, R> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (sender, receiver) = <(Sender<S>, Receiver<R>)>::deserialize(deserializer)?;
        Ok(Pipe { sender, receiver })
    }
}

#[cfg(feature = "executor")]
impl_stream!(Receiver);
#[cfg(feature = "executor")]
impl_sink!(Sender);
