//! The executor's channels: queues, channel ends and pipes it brokers, and tasks
//! that stream their outputs.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::channel::broker::Kind;
use crate::channel::{Endpoint, JoinableQueue, Pipe, Queue, Receiver, Sender};
use crate::parent::error::{Error, Result};
use crate::parent::executor::{Executor, TaskHandle};
use crate::task::IntoTask;
use crate::wire::protocol::Role;

/// How many items a streaming task may be ahead of its consumer.
const STREAM_CAPACITY: usize = 256;
/// How many items a pipe holds each way.
const PIPE_CAPACITY: usize = 32;

impl Executor {
    /// A new [`Queue`] holding at most `capacity` items (at least 1).
    ///
    /// ```
    /// # procexec::tasks! { pub fn noop() {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let q = exec.queue::<String>(4);
    /// q.put("one".to_string()).await?;
    /// assert_eq!(q.get().await?.as_deref(), Some("one"));
    /// # Ok(()) }
    /// ```
    pub fn queue<T>(&self, capacity: usize) -> Queue<T> {
        let broker = self.shared().hub.open(Kind::Queue, capacity);
        Queue::from_endpoint(Endpoint::parent(broker, Role::Queue))
    }

    /// A new [`JoinableQueue`] holding at most `capacity` items (at least 1): every
    /// item must be acknowledged, and one whose consumer dies first is delivered
    /// again.
    pub fn joinable_queue<T>(&self, capacity: usize) -> JoinableQueue<T> {
        let broker = self.shared().hub.open(Kind::Acked, capacity);
        JoinableQueue::from_endpoint(Endpoint::parent(broker, Role::Queue))
    }

    /// A new channel holding at most `capacity` items (at least 1): a [`Sender`]
    /// (clone it for more) and a [`Receiver`], each of which can go to a task or
    /// stay in the parent. When every sender is gone the receiver gets the rest, then
    /// `None`; when the receiver is gone, sends fail. A task's handles are gone when
    /// its call ends or its worker dies.
    ///
    /// ```
    /// use procexec::Receiver;
    ///
    /// procexec::tasks! {
    ///     /// Consumes a stream the parent feeds it.
    ///     pub fn total(numbers: Receiver<u64>) -> u64 {
    ///         numbers.iter().map(Result::unwrap).sum()
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let (tx, rx) = exec.channel::<u64>(8);
    /// let sum = exec.spawn(total, rx);
    /// for i in 1..=100 {
    ///     tx.send(i).await?;
    /// }
    /// drop(tx); // the end of the stream
    /// assert_eq!(sum.await?, 5050);
    /// # Ok(()) }
    /// ```
    pub fn channel<T>(&self, capacity: usize) -> (Sender<T>, Receiver<T>) {
        let broker = self.shared().hub.open(Kind::Ends, capacity);
        let sender = Sender::from_endpoint(Endpoint::parent(broker.clone(), Role::Sender));
        (sender, Receiver::from_endpoint(Endpoint::parent(broker, Role::Receiver)))
    }

    /// A duplex [`Pipe`], like Python's `multiprocessing.Pipe()`: two ends, each
    /// sending what the other receives. Give one to a task and keep the other, or
    /// give them to two tasks.
    pub fn pipe<A, B>(&self) -> (Pipe<A, B>, Pipe<B, A>) {
        let (a_to_b, b_from_a) = self.channel::<A>(PIPE_CAPACITY);
        let (b_to_a, a_from_b) = self.channel::<B>(PIPE_CAPACITY);
        (Pipe::new(a_to_b, a_from_b), Pipe::new(b_to_a, b_from_a))
    }

    /// Runs a streaming task and streams what it sends: a task whose last argument
    /// is a [`Sender`], filled in here. The stream yields each item as the task
    /// sends it, then, if the call failed (a panic, a crash), that error, then ends.
    ///
    /// The task is at most a few dozen items ahead of the stream's consumer: its
    /// `blocking_send` waits while the consumer lags, so memory stays bounded however
    /// fast it produces. Items delivered are never repeated: a streaming call is not
    /// retried. Dropping the stream cancels the call, and the task's next send fails.
    ///
    /// ```
    /// use futures::TryStreamExt;
    /// use procexec::Sender;
    ///
    /// procexec::tasks! {
    ///     /// Sends the first `n` squares, one by one.
    ///     pub fn squares(n: u64, out: Sender<u64>) {
    ///         for i in 0..n {
    ///             if out.blocking_send(i * i).is_err() {
    ///                 return; // nobody listens any more
    ///             }
    ///         }
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let squares: Vec<u64> = exec.stream(squares, 5).try_collect().await?;
    /// assert_eq!(squares, [0, 1, 4, 9, 16]);
    /// # Ok(()) }
    /// ```
    pub fn stream<T>(
        &self,
        task: T,
        args: <T::Input as StreamInput>::Args,
    ) -> TaskStream<<T::Input as StreamInput>::Item>
    where
        T: IntoTask,
        T::Input: StreamInput + Serialize,
        T::Output: DeserializeOwned + Send + 'static,
        <T::Input as StreamInput>::Item: Serialize + DeserializeOwned,
    {
        let (sender, receiver) = self.channel(STREAM_CAPACITY);
        let handle = self.with_retries(0).spawn(task, T::Input::with_sender(args, sender));
        let call = Box::pin(async move { handle.await.map(drop) });
        TaskStream { receiver, call: Some(call) }
    }
}

/// The input of a task whose last argument is a [`Sender`], which
/// [`Executor::stream`] fills in: `Sender<T>` alone, or a tuple ending with one
/// (up to three other arguments).
///
/// ```
/// use procexec::{Sender, StreamInput};
///
/// procexec::tasks! {
///     pub fn countdown(from: u32, out: Sender<u32>) {
///         for i in (0..from).rev() {
///             let _ = out.blocking_send(i);
///         }
///     }
/// }
///
/// // `exec.stream(countdown, 3)`: the other arguments, then the sender it makes.
/// fn args_of<I: StreamInput>(_: procexec::Task<I, ()>) -> std::marker::PhantomData<I::Args> {
///     std::marker::PhantomData
/// }
/// let _: std::marker::PhantomData<u32> = args_of(countdown());
/// ```
pub trait StreamInput: Sized {
    /// The other arguments.
    type Args;
    /// What the task sends.
    type Item;
    /// The input of `args` and `sender`.
    fn with_sender(args: Self::Args, sender: Sender<Self::Item>) -> Self;
}

impl<T> StreamInput for Sender<T> {
    type Args = ();
    type Item = T;
    fn with_sender((): (), sender: Sender<T>) -> Self {
        sender
    }
}

impl<A, T> StreamInput for (A, Sender<T>) {
    type Args = A;
    type Item = T;
    fn with_sender(a: A, sender: Sender<T>) -> Self {
        (a, sender)
    }
}

impl<A, B, T> StreamInput for (A, B, Sender<T>) {
    type Args = (A, B);
    type Item = T;
    fn with_sender((a, b): (A, B), sender: Sender<T>) -> Self {
        (a, b, sender)
    }
}

impl<A, B, C, T> StreamInput for (A, B, C, Sender<T>) {
    type Args = (A, B, C);
    type Item = T;
    fn with_sender((a, b, c): (A, B, C), sender: Sender<T>) -> Self {
        (a, b, c, sender)
    }
}

/// The items a streaming task sends, then its error if it failed; see
/// [`Executor::stream`]. Dropping it cancels the call.
///
/// ```
/// use futures::StreamExt;
/// use procexec::Sender;
///
/// procexec::tasks! {
///     /// Sends one item, then fails.
///     pub fn one_then_panic(out: Sender<u32>) {
///         out.blocking_send(1).unwrap();
///         panic!("no more");
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(1).build().await?;
/// let items: Vec<_> = exec.stream(one_then_panic, ()).collect().await;
/// assert_eq!(items[0].as_ref().ok(), Some(&1));
/// assert!(items[1].as_ref().is_err_and(|err| err.is_panic()));
/// assert_eq!(items.len(), 2);
/// # Ok(()) }
/// ```
#[must_use = "streams do nothing unless polled"]
pub struct TaskStream<T> {
    receiver: Receiver<T>,
    /// The call, until its outcome is known.
    call: Option<Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>>,
}

impl<T: Serialize + DeserializeOwned> Stream for TaskStream<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        if self.call.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.receiver).poll_next(cx) {
            Poll::Ready(Some(item)) => return Poll::Ready(Some(item.map_err(Error::from))),
            Poll::Pending => return Poll::Pending,
            // Every sender is gone: the call ended (its items come before its reply).
            Poll::Ready(None) => {}
        }
        let Some(call) = self.call.as_mut() else { return Poll::Ready(None) };
        let outcome = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(outcome.err().map(Err))
    }
}

impl<T> fmt::Debug for TaskStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskStream")
            .field("receiver", &self.receiver)
            .field("running", &self.call.is_some())
            .finish()
    }
}

// A handle in the parent is a future's worth of state: keep the types honest.
#[allow(dead_code)]
fn assert_send<T: Send>() {}
#[allow(dead_code)]
fn handles_are_send() {
    assert_send::<Queue<u8>>();
    assert_send::<TaskStream<u8>>();
    assert_send::<TaskHandle<u8>>();
}
