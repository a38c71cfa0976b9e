//! Shared memory, made through the executor.

use bytemuck::Pod;

use super::error::{Error, Result};
use super::executor::Executor;
use crate::shared::{Poisoned, SharedArray, SharedBytes, SharedError, SharedLock, SharedValue};

impl<G> From<Poisoned<G>> for Error {
    fn from(poisoned: Poisoned<G>) -> Self {
        Error::Shared(SharedError::from(poisoned))
    }
}

/// # Shared memory
///
/// Values, arrays, buffers and locks that the parent and its workers map at once:
/// pass a handle into a task and the task uses the same memory, without copying it
/// through the pipe. The memory is anonymous (`memfd_create`): it has no name in
/// `/dev/shm` or anywhere else, only the executor's process and the workers that
/// receive a handle can map it, and it is gone when the last of them lets go, even
/// when they are killed. Linux only; a handle used on another machine fails with
/// [`SharedError::NotLocal`].
impl Executor {
    /// A value of plain old data in shared memory, starting as `value`.
    ///
    /// # Examples
    ///
    /// ```
    /// # procexec::tasks! { pub fn noop() {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let counter = exec.shared_value(0u64)?;
    /// counter.fetch_add(2);
    /// *counter.lock().await? += 1;
    /// assert_eq!(counter.load(), 3);
    /// # Ok(()) }
    /// ```
    pub fn shared_value<T: Pod>(&self, value: T) -> Result<SharedValue<T>> {
        Ok(SharedValue::create(value)?)
    }

    /// An array of `len` zeroed elements in shared memory. Pages are allocated as
    /// they are first written: a large array costs nothing until used.
    ///
    /// # Examples
    ///
    /// ```
    /// # procexec::tasks! { pub fn noop() {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let array = exec.shared_array::<f64>(1_000_000)?;
    /// array.set(7, 0.5)?;
    /// assert_eq!(array.get(7), Some(0.5));
    /// assert!(array.set(1_000_000, 1.0).is_err()); // out of bounds
    /// # Ok(()) }
    /// ```
    pub fn shared_array<T: Pod>(&self, len: usize) -> Result<SharedArray<T>> {
        Ok(SharedArray::create(len, None)?)
    }

    /// An array in shared memory holding a copy of `data`.
    ///
    /// ```
    /// # procexec::tasks! { pub fn noop() {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let array = exec.shared_array_from(&[1u32, 2, 3])?;
    /// assert_eq!(array.to_vec(), [1, 2, 3]);
    /// # Ok(()) }
    /// ```
    pub fn shared_array_from<T: Pod>(&self, data: &[T]) -> Result<SharedArray<T>> {
        Ok(SharedArray::create(data.len(), Some(data))?)
    }

    /// A read-only buffer in shared memory holding a copy of `data`.
    ///
    /// ```
    /// # procexec::tasks! { pub fn noop() {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let bytes = exec.shared_bytes(b"hello")?;
    /// assert_eq!(&bytes[..], b"hello");
    /// # Ok(()) }
    /// ```
    pub fn shared_bytes(&self, data: &[u8]) -> Result<SharedBytes> {
        self.shared_bytes_with(data.len(), |buf| buf.copy_from_slice(data))
    }

    /// A read-only buffer of `len` bytes in shared memory, filled in place by `fill`
    /// (which gets it zeroed) and then sealed: read a file straight into it, say,
    /// without a copy in between.
    ///
    /// ```
    /// # procexec::tasks! { pub fn noop() {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let bytes = exec.shared_bytes_with(4, |buf| buf.copy_from_slice(&[1, 2, 3, 4]))?;
    /// assert_eq!(bytes.len(), 4);
    /// # Ok(()) }
    /// ```
    pub fn shared_bytes_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<SharedBytes> {
        Ok(SharedBytes::create(len, fill)?)
    }

    /// A cross-process lock of its own (Python's `multiprocessing.Lock`). Every
    /// value and array has one already.
    ///
    /// ```
    /// # procexec::tasks! { pub fn noop() {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let lock = exec.shared_lock()?;
    /// let held = lock.lock().await?;
    /// assert!(lock.try_lock().is_none());
    /// drop(held);
    /// # Ok(()) }
    /// ```
    pub fn shared_lock(&self) -> Result<SharedLock> {
        Ok(SharedLock::create()?)
    }
}
