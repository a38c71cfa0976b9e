//! The handles: [`SharedValue`], [`SharedArray`], [`SharedBytes`], [`SharedLock`],
//! and their guards. Each is a cheap `Clone` of one mapping, and serde data: passed
//! into a task, it maps the same memory in the worker.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use bytemuck::Pod;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::SharedError;
use super::lock::{self, LockResult, Locked};
use super::memory::MAX_ALIGN;
use super::segment::{Elem, Kind, Segment, Wire};

/// Refuses, at compile time, an element type the segment layout cannot align.
const fn check_align<T>() {
    assert!(
        std::mem::align_of::<T>() <= MAX_ALIGN,
        "shared memory elements must have an alignment of at most 64"
    );
}

fn serialize_segment<S: Serializer>(segment: &Arc<Segment>, serializer: S) -> Result<S::Ok, S::Error> {
    // On its way into a call, the segment stays alive until the call ends, even if
    // every handle here is dropped meanwhile. A call that may wait for a lock is not
    // queued behind another call in a worker: that one may hold the lock.
    #[cfg(feature = "executor")]
    crate::channel::transit::keep(segment.clone(), segment.kind != Kind::Bytes);
    segment.wire().serialize(serializer)
}

fn deserialize_segment<'de, D: Deserializer<'de>>(
    deserializer: D,
    kind: Kind,
    elem: Elem,
) -> Result<Arc<Segment>, D::Error> {
    let wire = Wire::deserialize(deserializer)?;
    Segment::resolve(&wire, kind, elem).map_err(|err| {
        let message = err.to_string();
        super::error::note_error(err);
        serde::de::Error::custom(message)
    })
}

macro_rules! lock_methods {
    ($guard:ident, |$locked:ident, $this:ident| $make:expr) => {
        /// Takes the lock, waiting without blocking the runtime: the parent's way.
        /// The guard may be held across `.await`. [`Poisoned`](crate::Poisoned) when
        /// the last holder died or panicked holding it.
        ///
        /// In a task (no runtime) use [`blocking_lock`](Self::blocking_lock).
        #[cfg(feature = "executor")]
        pub async fn lock(&self) -> LockResult<$guard<'_, T>> {
            let $this = self;
            lock::acquire(&self.segment, |$locked| $make).await
        }

        /// Takes the lock, blocking this thread: a task's way.
        ///
        /// # Panics
        ///
        /// Inside a Tokio runtime, where it would block the runtime's thread: use
        /// `lock().await` there.
        pub fn blocking_lock(&self) -> LockResult<$guard<'_, T>> {
            let $this = self;
            lock::blocking(&self.segment.map, |$locked| $make)
        }

        /// Takes the lock if it is free right now; `None` when it is held.
        pub fn try_lock(&self) -> Option<LockResult<$guard<'_, T>>> {
            let $this = self;
            lock::try_now(&self.segment.map, |$locked| $make)
        }

        /// Whether the lock is poisoned: a holder died or panicked holding it.
        /// The guard's `clear_poison` ends it, once the data is repaired.
        pub fn is_poisoned(&self) -> bool {
            lock::poison_cause(&self.segment.map).is_some()
        }
    };
}

/// One value of plain old data in shared memory: Python's `multiprocessing.Value`.
///
/// Made by [`Executor::shared_value`](crate::Executor::shared_value). Pass it (or a
/// clone) into tasks: every process sees the same value. Integer values have atomic
/// operations ([`fetch_add`](SharedValue::fetch_add) and the like); every value has
/// a cross-process lock for compound updates ([`lock`](SharedValue::lock) in the
/// parent, [`blocking_lock`](SharedValue::blocking_lock) in a task), which tells the
/// next locker when a process died holding it.
///
/// # Examples
///
/// ```
/// procexec::tasks! {
///     pub fn add_ten(counter: procexec::SharedValue<u64>) {
///         for _ in 0..10 {
///             // A compound update under the lock (a bare `fetch_add` would do here).
///             let mut n = counter.blocking_lock().unwrap_or_else(|poisoned| poisoned.into_inner());
///             *n += 1;
///         }
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(2).build().await?;
/// let counter = exec.shared_value(0u64)?;
/// exec.map(add_ten, vec![counter.clone(); 4]).await?;
/// assert_eq!(counter.load(), 40);
/// # Ok(()) }
/// ```
pub struct SharedValue<T> {
    segment: Arc<Segment>,
    _type: PhantomData<fn() -> T>,
}

impl<T: Pod> SharedValue<T> {
    pub(crate) fn create(value: T) -> Result<Self, SharedError> {
        const { check_align::<T>() };
        let mut fill = |map: &mut super::memory::Mapping| {
            map.write(0, value);
        };
        let segment = Segment::create(Kind::Value, Elem::of::<T>(), 1, Some(&mut fill), false)?;
        Ok(SharedValue { segment, _type: PhantomData })
    }

    /// The value, read without the lock.
    pub fn get(&self) -> T {
        self.segment.map.read(0).unwrap_or_else(T::zeroed)
    }

    /// Sets the value without the lock. A value larger than a machine word may be
    /// seen half written by a reader in another process: use the lock for those.
    pub fn set(&self, value: T) {
        self.segment.map.write(0, value);
    }

    lock_methods!(ValueGuard, |locked, _this| ValueGuard::new(locked));
}

macro_rules! atomic_values {
    ($($value:ty => $atomic:ty),* $(,)?) => {$(
        impl SharedValue<$value> {
            fn cell(&self) -> &$atomic {
                // A value segment is always mapped writable with one element.
                self.segment.map.atomic::<$atomic>(0).expect("a shared value maps one writable element")
            }

            /// Loads the value atomically (sequentially consistent, as every atomic
            /// operation here).
            pub fn load(&self) -> $value {
                self.cell().load(std::sync::atomic::Ordering::SeqCst)
            }

            /// Stores a value atomically.
            pub fn store(&self, value: $value) {
                self.cell().store(value, std::sync::atomic::Ordering::SeqCst)
            }

            /// Adds to the value (wrapping), returning the previous value.
            pub fn fetch_add(&self, value: $value) -> $value {
                self.cell().fetch_add(value, std::sync::atomic::Ordering::SeqCst)
            }

            /// Subtracts from the value (wrapping), returning the previous value.
            pub fn fetch_sub(&self, value: $value) -> $value {
                self.cell().fetch_sub(value, std::sync::atomic::Ordering::SeqCst)
            }

            /// Replaces the value, returning the previous one.
            pub fn swap(&self, value: $value) -> $value {
                self.cell().swap(value, std::sync::atomic::Ordering::SeqCst)
            }

            /// Stores `new` if the value is `current`; returns the previous value,
            /// `Ok` when it was `current`.
            pub fn compare_exchange(&self, current: $value, new: $value) -> Result<$value, $value> {
                use std::sync::atomic::Ordering::SeqCst;
                self.cell().compare_exchange(current, new, SeqCst, SeqCst)
            }
        }
    )*};
}

atomic_values! {
    u8 => std::sync::atomic::AtomicU8, u16 => std::sync::atomic::AtomicU16,
    u32 => std::sync::atomic::AtomicU32, u64 => std::sync::atomic::AtomicU64,
    i8 => std::sync::atomic::AtomicI8, i16 => std::sync::atomic::AtomicI16,
    i32 => std::sync::atomic::AtomicI32, i64 => std::sync::atomic::AtomicI64,
    usize => std::sync::atomic::AtomicUsize, isize => std::sync::atomic::AtomicIsize,
}

/// The lock of a [`SharedValue`], held; derefs to a copy of the value, written
/// back when the guard is dropped (if it was changed), before the lock is released.
///
/// A copy, because a Rust reference may not point at memory that another process
/// can change meanwhile (an unlocked `set` or `fetch_add` elsewhere): those writes
/// race with the lock's holder anyway, and the holder's write-back wins.
pub struct ValueGuard<'a, T: Pod> {
    locked: Locked<'a>,
    value: T,
    changed: bool,
}

impl<'a, T: Pod> ValueGuard<'a, T> {
    fn new(locked: Locked<'a>) -> Self {
        let value = locked.map().read(0).unwrap_or_else(T::zeroed);
        ValueGuard { locked, value, changed: false }
    }

    /// Ends the lock's poisoned state, once the value is repaired.
    pub fn clear_poison(&self) {
        self.locked.clear_poison()
    }
}

impl<T: Pod> Deref for ValueGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Pod> DerefMut for ValueGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.changed = true;
        &mut self.value
    }
}

impl<T: Pod> Drop for ValueGuard<'_, T> {
    fn drop(&mut self) {
        // Also when dropped by a panic: as with `std`'s `Mutex`, what the holder
        // wrote stays, and the lock is poisoned.
        if self.changed {
            self.locked.map().write(0, self.value);
        }
    }
}

/// An array of plain old data in shared memory: Python's `multiprocessing.Array`.
///
/// Made by [`Executor::shared_array`](crate::Executor::shared_array) (zeroed) or
/// [`Executor::shared_array_from`](crate::Executor::shared_array_from). Every
/// process reads and writes the elements where they lie: tasks that each write their
/// own range need no lock ([`write_from`](SharedArray::write_from)); for compound
/// updates take the lock, whose [`ArrayGuard`] has the same accessors.
///
/// Elements are copied in and out (by atomic units of their alignment, up to 8
/// bytes), never lent as references: memory another process may write cannot be a
/// Rust reference. So a value wider than its alignment (a struct of two `f64`s) can
/// be seen half written by an unlocked reader while another process writes it; a
/// `u64` or `f64` cannot.
///
/// # Examples
///
/// ```
/// use std::ops::Range;
///
/// procexec::tasks! {
///     // Each task fills its own range: no lock needed.
///     pub fn squares(array: procexec::SharedArray<u64>, range: Range<usize>) {
///         let values: Vec<u64> = range.clone().map(|i| (i * i) as u64).collect();
///         array.write_from(range.start, &values).expect("the range is in bounds");
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(2).build().await?;
/// let array = exec.shared_array::<u64>(1000)?;
/// let ranges = (0..1000).step_by(250).map(|start| (array.clone(), start..start + 250));
/// exec.map(squares, ranges).await?;
/// assert_eq!(array.get(999), Some(999 * 999)); // read where it lies
/// assert_eq!(array.to_vec()[10], 100);
/// # Ok(()) }
/// ```
pub struct SharedArray<T> {
    segment: Arc<Segment>,
    _type: PhantomData<fn() -> T>,
}

impl<T: Pod> SharedArray<T> {
    pub(crate) fn create(len: usize, data: Option<&[T]>) -> Result<Self, SharedError> {
        const { check_align::<T>() };
        let mut fill = |map: &mut super::memory::Mapping| {
            if let Some(data) = data {
                map.copy_in(0, data);
            }
        };
        let segment = Segment::create(Kind::Array, Elem::of::<T>(), len, Some(&mut fill), false)?;
        Ok(SharedArray { segment, _type: PhantomData })
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.segment.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.segment.len == 0
    }

    /// The element at `index`, read without the lock; `None` out of bounds.
    pub fn get(&self, index: usize) -> Option<T> {
        self.segment.map.read(index)
    }

    /// Sets the element at `index` without the lock.
    pub fn set(&self, index: usize, value: T) -> Result<(), SharedError> {
        bounded(self.segment.map.write(index, value), index, 1, self.len())
    }

    /// Copies `out.len()` elements from `start` into `out`, without the lock.
    pub fn read_into(&self, start: usize, out: &mut [T]) -> Result<(), SharedError> {
        bounded(self.segment.map.copy_out(start, out), start, out.len(), self.len())
    }

    /// Copies `data` into the elements from `start`, without the lock: the way for
    /// tasks that each fill their own range.
    pub fn write_from(&self, start: usize, data: &[T]) -> Result<(), SharedError> {
        bounded(self.segment.map.copy_in(start, data), start, data.len(), self.len())
    }

    /// A copy of all elements, without the lock.
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = vec![T::zeroed(); self.len()];
        self.segment.map.copy_out(0, &mut out);
        out
    }

    lock_methods!(ArrayGuard, |locked, this| ArrayGuard {
        locked,
        len: this.segment.len,
        _type: PhantomData
    });
}

/// The lock of a [`SharedArray`], held: the same element access as the array's,
/// with the other lockers kept out meanwhile.
///
/// No slice view: a Rust reference may not point at memory another process can
/// change meanwhile (an unlocked write elsewhere), so elements are copied in and out.
pub struct ArrayGuard<'a, T: Pod> {
    locked: Locked<'a>,
    len: usize,
    _type: PhantomData<&'a mut T>,
}

impl<T: Pod> ArrayGuard<'_, T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element at `index`; `None` out of bounds.
    pub fn get(&self, index: usize) -> Option<T> {
        self.locked.map().read(index)
    }

    /// Sets the element at `index`.
    pub fn set(&self, index: usize, value: T) -> Result<(), SharedError> {
        bounded(self.locked.map().write(index, value), index, 1, self.len)
    }

    /// Copies `out.len()` elements from `start` into `out`.
    pub fn read_into(&self, start: usize, out: &mut [T]) -> Result<(), SharedError> {
        bounded(self.locked.map().copy_out(start, out), start, out.len(), self.len)
    }

    /// Copies `data` into the elements from `start`.
    pub fn write_from(&self, start: usize, data: &[T]) -> Result<(), SharedError> {
        bounded(self.locked.map().copy_in(start, data), start, data.len(), self.len)
    }

    /// A copy of all elements.
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = vec![T::zeroed(); self.len];
        self.locked.map().copy_out(0, &mut out);
        out
    }

    /// Ends the lock's poisoned state, once the data is repaired.
    pub fn clear_poison(&self) {
        self.locked.clear_poison()
    }
}

fn bounded(done: bool, start: usize, count: usize, len: usize) -> Result<(), SharedError> {
    if done {
        Ok(())
    } else {
        Err(SharedError::OutOfBounds { start: start as u64, count: count as u64, len: len as u64 })
    }
}

/// A read-only byte buffer in shared memory: a task reads it where it lies, without
/// it crossing the pipe.
///
/// Made by [`Executor::shared_bytes`](crate::Executor::shared_bytes) or
/// [`Executor::shared_bytes_with`](crate::Executor::shared_bytes_with), and sealed
/// once filled: no process can write, shrink or grow it any more (so no reader can
/// be crashed by a `SIGBUS`). Derefs to `[u8]`.
///
/// # Examples
///
/// ```
/// procexec::tasks! {
///     pub fn count_zeros(data: procexec::SharedBytes) -> usize {
///         data.iter().filter(|&&byte| byte == 0).count()
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let data = exec.shared_bytes_with(1 << 20, |buf| buf[..10].fill(1))?;
/// assert_eq!(exec.spawn(count_zeros, data).await?, (1 << 20) - 10);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SharedBytes {
    segment: Arc<Segment>,
}

impl SharedBytes {
    pub(crate) fn create(len: usize, fill: impl FnOnce(&mut [u8])) -> Result<Self, SharedError> {
        let mut fill = Some(fill);
        let mut fill = |map: &mut super::memory::Mapping| {
            if let Some(fill) = fill.take() {
                fill(map.fresh_bytes());
            }
        };
        let segment = Segment::create(Kind::Bytes, Elem::of::<u8>(), len, Some(&mut fill), true)?;
        Ok(SharedBytes { segment })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.segment.sealed {
            Some(sealed) => self.segment.map.sealed_bytes(sealed),
            None => &[],
        }
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A cross-process lock guarding nothing but itself: Python's
/// `multiprocessing.Lock`. Made by [`Executor::shared_lock`](crate::Executor::shared_lock).
///
/// # Examples
///
/// ```
/// procexec::tasks! {
///     pub fn critical(lock: procexec::SharedLock) -> u32 {
///         let _held = lock.blocking_lock().unwrap_or_else(|poisoned| poisoned.into_inner());
///         std::process::id()
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let lock = exec.shared_lock()?;
/// let held = lock.lock().await?;
/// let task = exec.spawn(critical, lock.clone()); // waits for the lock...
/// drop(held); // ...until the parent lets go
/// task.await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SharedLock {
    segment: Arc<Segment>,
}

impl SharedLock {
    pub(crate) fn create() -> Result<Self, SharedError> {
        Ok(SharedLock { segment: Segment::create(Kind::Lock, Elem::of::<()>(), 0, None, false)? })
    }

    /// Takes the lock, waiting without blocking the runtime (the parent's way).
    #[cfg(feature = "executor")]
    pub async fn lock(&self) -> LockResult<LockGuard<'_>> {
        lock::acquire(&self.segment, |locked| LockGuard { _locked: locked }).await
    }

    /// Takes the lock, blocking this thread (a task's way).
    ///
    /// # Panics
    ///
    /// Inside a Tokio runtime: use `lock().await` there.
    pub fn blocking_lock(&self) -> LockResult<LockGuard<'_>> {
        lock::blocking(&self.segment.map, |locked| LockGuard { _locked: locked })
    }

    /// Takes the lock if it is free right now; `None` when it is held.
    pub fn try_lock(&self) -> Option<LockResult<LockGuard<'_>>> {
        lock::try_now(&self.segment.map, |locked| LockGuard { _locked: locked })
    }

    /// Whether the lock is poisoned: a holder died or panicked holding it.
    /// [`LockGuard::clear_poison`] ends it.
    pub fn is_poisoned(&self) -> bool {
        lock::poison_cause(&self.segment.map).is_some()
    }
}

/// A [`SharedLock`], held; released when dropped.
pub struct LockGuard<'a> {
    _locked: Locked<'a>,
}

impl LockGuard<'_> {
    /// Ends the lock's poisoned state (see [`Poisoned`](crate::Poisoned)).
    pub fn clear_poison(&self) {
        self._locked.clear_poison()
    }
}

macro_rules! handle_traits {
    ($($handle:ident $(<$t:ident>)? => $kind:expr, $elem:ty;)*) => {$(
        impl$(<$t: Pod>)? Serialize for $handle$(<$t>)? {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serialize_segment(&self.segment, serializer)
            }
        }

        impl<'de, $($t: Pod)?> Deserialize<'de> for $handle$(<$t>)? {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                $(const { check_align::<$t>() };)?
                let segment = deserialize_segment(deserializer, $kind, Elem::of::<$elem>())?;
                Ok($handle { segment, $(_type: PhantomData::<fn() -> $t>,)? })
            }
        }

        impl$(<$t>)? std::fmt::Debug for $handle$(<$t>)? {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}<{}>(len {})", stringify!($handle), self.segment.elem.name, self.segment.len)
            }
        }
    )*};
}

handle_traits! {
    SharedValue<T> => Kind::Value, T;
    SharedArray<T> => Kind::Array, T;
    SharedBytes => Kind::Bytes, u8;
    SharedLock => Kind::Lock, ();
}

impl<T> Clone for SharedValue<T> {
    fn clone(&self) -> Self {
        SharedValue { segment: self.segment.clone(), _type: PhantomData }
    }
}

impl<T> Clone for SharedArray<T> {
    fn clone(&self) -> Self {
        SharedArray { segment: self.segment.clone(), _type: PhantomData }
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ValueGuard").field(&self.value).finish()
    }
}

impl<T: Pod> std::fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrayGuard").field("len", &self.len).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard").finish_non_exhaustive()
    }
}
