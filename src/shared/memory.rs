//! A mapped memory file: its header, its elements and its lock word.
//!
//! All of the `unsafe` code of shared memory is in this module, and what it exports
//! is safe to call: a mapping checks its bounds against its own length (never the
//! header, which other processes can write); the data is only ever copied in and
//! out by atomic units, so no Rust reference points into memory another process may
//! change (a value may tear between units, and elements are plain old data, so any
//! bytes are valid); the one exception, a sealed buffer, is immutable.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{self, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytemuck::Pod;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::thread::futex;

/// Bytes before the data. Data starts at this offset of a page-aligned mapping, so
/// it is aligned for any element whose alignment divides it.
pub(crate) const HEADER_LEN: usize = 64;
/// The largest element alignment a segment can hold.
pub(crate) const MAX_ALIGN: usize = HEADER_LEN;
/// The header's first word, so a mapping of something else is refused.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"procxshm");

/// The lock word's bit saying that a process may be waiting for it.
const WAITERS: u32 = 1 << 31;
/// The lock word's other bits: the holder's pid, 0 when free. (Linux pids fit in 22
/// bits.)
const HOLDER: u32 = !WAITERS;

/// The poison word when the last holder panicked while holding the lock.
pub(crate) const POISON_PANICKED: u32 = 1 << 31;

/// The start of every segment, shared by all processes that map it.
#[repr(C)]
pub(crate) struct Header {
    pub(crate) magic: AtomicU64,
    /// Elements of the data.
    pub(crate) len: AtomicU64,
    /// The holder's pid (0 when free), and [`WAITERS`].
    lock: AtomicU32,
    /// 0; [`POISON_PANICKED`]; or the pid of a holder that died holding the lock.
    pub(crate) poison: AtomicU32,
    /// Set by the owner when it lets go of the segment: attached processes may unmap.
    pub(crate) freed: AtomicU32,
    /// The size of one element.
    pub(crate) elem_size: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_LEN);

/// A shared mapping of a memory file, header first.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    /// Mapped bytes: the header and the data.
    bytes: usize,
    writable: bool,
}

// SAFETY: the mapping is memory that other processes change anyway. Everything this
// type hands out is an atomic, a copy of plain old data, or a view behind `Held`,
// so sharing it between threads adds nothing those processes do not already do.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `bytes` bytes (at least [`HEADER_LEN`]) of the memory file `fd`.
    ///
    /// The caller has checked that the file is at least `bytes` long and sealed
    /// against shrinking, so no access within `bytes` can fault (`SIGBUS`).
    pub(crate) fn map(fd: BorrowedFd<'_>, bytes: usize, writable: bool) -> io::Result<Mapping> {
        if bytes < HEADER_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a segment is smaller than its header"));
        }
        let prot = if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ };
        // SAFETY: a new mapping at an address the kernel picks overlaps no memory
        // Rust knows of. It stays valid until `Drop` unmaps it.
        let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), bytes, prot, MapFlags::SHARED, fd, 0) }?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, bytes, writable })
    }

    pub(crate) fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and at least `HEADER_LEN` long, and
        // `Header` is atomics only, valid for any bytes. A read-only mapping is only
        // read through it (loads), as the callers of a read-only mapping do.
        unsafe { &*self.ptr.as_ptr().cast::<Header>() }
    }

    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }

    /// The data's bytes, past the header.
    fn data_bytes(&self) -> usize {
        self.bytes - HEADER_LEN
    }

    /// A pointer to `count` elements from `index`, when they are all in the data.
    fn elements<T: Pod>(&self, index: usize, count: usize) -> Option<*mut T> {
        let size = std::mem::size_of::<T>();
        assert!(std::mem::align_of::<T>() <= MAX_ALIGN, "element alignment above {MAX_ALIGN}");
        let start = index.checked_mul(size)?;
        let end = start.checked_add(count.checked_mul(size)?)?;
        // SAFETY: `start` is within the mapping (checked just below, before use).
        (end <= self.data_bytes()).then(|| unsafe { self.ptr.as_ptr().add(HEADER_LEN + start) }.cast::<T>())
    }

    /// The element at `index`.
    pub(crate) fn read<T: Pod>(&self, index: usize) -> Option<T> {
        let mut value = T::zeroed();
        self.copy_out(index, std::slice::from_mut(&mut value)).then_some(value)
    }

    /// Writes the element at `index`; false when out of bounds or read-only.
    pub(crate) fn write<T: Pod>(&self, index: usize, value: T) -> bool {
        self.copy_in(index, std::slice::from_ref(&value))
    }

    /// Copies `out.len()` elements from `index` into `out`; false when out of bounds.
    pub(crate) fn copy_out<T: Pod>(&self, index: usize, out: &mut [T]) -> bool {
        let Some(ptr) = self.elements::<T>(index, out.len()) else {
            return false;
        };
        let bytes = std::mem::size_of_val(out);
        let dst = out.as_mut_ptr().cast::<u8>();
        // SAFETY: `ptr` is in bounds for `bytes` bytes and aligned for `T` (see
        // `elements`), so for the unit, which divides `T`'s alignment; `dst` is our
        // own `out`, as many bytes, and any bytes are valid `T`s. Every access to the
        // shared bytes is atomic, by every process, so none is a data race.
        unsafe { copy_units::<T>(ptr.cast::<u8>().cast_const(), dst, bytes, Direction::Out) };
        true
    }

    /// Copies `data` into the elements from `index`; false when out of bounds or
    /// read-only.
    pub(crate) fn copy_in<T: Pod>(&self, index: usize, data: &[T]) -> bool {
        match self.elements::<T>(index, data.len()) {
            Some(ptr) if self.writable => {
                let bytes = std::mem::size_of_val(data);
                // SAFETY: as in `copy_out`, the other way, into a writable mapping.
                unsafe {
                    copy_units::<T>(data.as_ptr().cast::<u8>(), ptr.cast::<u8>(), bytes, Direction::In)
                };
                true
            }
            _ => false,
        }
    }

    /// All the data, read-only. Sound only while nobody can write it: a sealed
    /// segment ([`Mapping::sealed_bytes`]).
    fn data<T: Pod>(&self, len: usize) -> &[T] {
        match self.elements::<T>(0, len) {
            // SAFETY: in bounds and aligned; the callers guarantee no writes meanwhile.
            Some(ptr) => unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) },
            None => &[],
        }
    }

    /// The data as bytes, to fill a segment being made: `&mut self` exists only then,
    /// before the segment is shared (nobody else has its descriptor yet).
    pub(crate) fn fresh_bytes(&mut self) -> &mut [u8] {
        let len = self.data_bytes();
        match self.elements::<u8>(0, len) {
            // SAFETY: in bounds and writable (a read-only mapping yields nothing);
            // `&mut self` makes this the only view in this process, and no other
            // process has the memory file yet.
            Some(ptr) if self.writable => unsafe { std::slice::from_raw_parts_mut(ptr, len) },
            _ => &mut [],
        }
    }

    /// The data of a segment that no process can write any more (sealed with
    /// `F_SEAL_FUTURE_WRITE` after it was filled, and its filler's writable view
    /// gone): its bytes never change, so a plain shared slice is sound.
    pub(crate) fn sealed_bytes(&self, _seal: &Sealed) -> &[u8] {
        self.data::<u8>(self.data_bytes())
    }

    /// An atomic view of the element at `index`, when in bounds and writable.
    pub(crate) fn atomic<A: Atomic>(&self, index: usize) -> Option<&A> {
        let ptr = self.elements::<A::Value>(index, 1).filter(|_| self.writable)?;
        // SAFETY: in bounds, and aligned for the atomic (its size equals the value's
        // and the element offset is a multiple of it). Every process accesses it
        // atomically through the same type.
        Some(unsafe { A::from_ptr(ptr) })
    }

    /// Takes the lock for `me` (this process's pid) if it is free.
    pub(crate) fn try_lock(&self, me: u32) -> Option<Held<'_>> {
        let word = &self.header().lock;
        let free = word.load(Ordering::Relaxed);
        if !self.writable || free & HOLDER != 0 {
            return None;
        }
        word.compare_exchange(free, me | (free & WAITERS), Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Held { map: self })
    }

    /// Waits up to `patience` for the lock, parked on its futex.
    ///
    /// Returns `Err(holder)` when it is still held, so the caller can ask whether
    /// the holder still lives.
    pub(crate) fn lock_for(&self, me: u32, patience: Duration) -> Result<Held<'_>, u32> {
        if !self.writable {
            // A read-only segment has no lock to take (and its page would fault).
            std::thread::sleep(patience);
            return Err(0);
        }
        let word = &self.header().lock;
        let deadline = std::time::Instant::now() + patience;
        loop {
            let seen = word.load(Ordering::Relaxed);
            if seen & HOLDER == 0 {
                // Keep the waiters bit: others may still wait, and our release must
                // wake one (a spurious wake-up at worst).
                if word.compare_exchange(seen, me | WAITERS, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return Ok(Held { map: self });
                }
                continue;
            }
            if seen & WAITERS == 0
                && word.compare_exchange(seen, seen | WAITERS, Ordering::Relaxed, Ordering::Relaxed).is_err()
            {
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(seen & HOLDER);
            }
            let timeout =
                rustix::time::Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ };
            // Shared (not private): the waiters are other processes. A changed word
            // (EAGAIN), a wake-up, a signal or the timeout all lead back to the top.
            let _ = futex::wait(word, futex::Flags::empty(), seen | WAITERS, Some(&timeout));
        }
    }

    /// Takes over the lock that `me` holds already (acquired on another thread of
    /// this process for a future that waits on it).
    pub(crate) fn adopt(&self, me: u32) -> Option<Held<'_>> {
        (self.writable && self.header().lock.load(Ordering::Acquire) & HOLDER == me)
            .then_some(Held { map: self })
    }

    /// Frees the lock if `pid` holds it (a process that died holding it): marks the
    /// segment poisoned with that pid first, then wakes every waiter.
    pub(crate) fn release_dead_holder(&self, pid: u32) -> bool {
        let word = &self.header().lock;
        if !self.writable || pid == 0 {
            return false;
        }
        let mut seen = word.load(Ordering::Acquire);
        while seen & HOLDER == pid {
            self.header().poison.store(pid, Ordering::Release);
            match word.compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let _ = futex::wake(word, futex::Flags::empty(), u32::MAX);
                    return true;
                }
                Err(now) => seen = now,
            }
        }
        false
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what `map` mapped; every reference into it borrowed `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Proof that a segment was sealed against writes after it was filled.
pub(crate) struct Sealed(());

impl Sealed {
    /// Seals `fd` against every change of size and every future write, and vouches
    /// that the caller will not write through its own mapping any more.
    pub(crate) fn seal(fd: BorrowedFd<'_>) -> io::Result<Sealed> {
        use rustix::fs::SealFlags;
        let seals = SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE | SealFlags::SEAL;
        rustix::fs::fcntl_add_seals(fd, seals)?;
        Ok(Sealed(()))
    }

    /// Checks that `fd` carries the seals of [`Sealed::seal`].
    pub(crate) fn check(fd: BorrowedFd<'_>) -> io::Result<Sealed> {
        use rustix::fs::SealFlags;
        let needed = SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE;
        if rustix::fs::fcntl_get_seals(fd)?.contains(needed) {
            Ok(Sealed(()))
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidData, "the buffer is not sealed against writes"))
        }
    }
}

/// The lock, held by this process.
///
/// Releases the lock when dropped.
pub(crate) struct Held<'a> {
    map: &'a Mapping,
}

impl<'a> Held<'a> {
    pub(crate) fn map(&self) -> &'a Mapping {
        self.map
    }

    /// Keeps the lock held without this proof (to be adopted by another thread).
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let word = &self.map.header().lock;
        if word.swap(0, Ordering::Release) & WAITERS != 0 {
            let _ = futex::wake(word, futex::Flags::empty(), 1);
        }
    }
}

/// Which way [`copy_units`] copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// From the shared memory (`src`) into private memory.
    Out,
    /// From private memory into the shared memory (`dst`).
    In,
}

/// Copies `bytes` bytes of `T`s between shared and private memory, the shared side
/// accessed only by relaxed atomic loads or stores of `T`'s alignment (at most 8
/// bytes), so racing another process's writes is defined: an element may be torn
/// between units, never a unit.
///
/// # Safety
/// Both ranges are valid for `bytes` bytes, `bytes` is a multiple of `T`'s size,
/// and the shared side is aligned for `T`.
unsafe fn copy_units<T>(src: *const u8, dst: *mut u8, bytes: usize, direction: Direction) {
    macro_rules! copy {
        ($atomic:ty, $int:ty) => {{
            const WIDTH: usize = std::mem::size_of::<$int>();
            for at in (0..bytes).step_by(WIDTH) {
                // SAFETY: in bounds (the caller's contract); the shared side is
                // aligned for the unit, the private side is read or written unaligned.
                unsafe {
                    match direction {
                        Direction::Out => {
                            let unit = <$atomic>::from_ptr(src.add(at).cast::<$int>().cast_mut());
                            dst.add(at).cast::<$int>().write_unaligned(unit.load(Ordering::Relaxed));
                        }
                        Direction::In => {
                            let unit = <$atomic>::from_ptr(dst.add(at).cast::<$int>());
                            unit.store(src.add(at).cast::<$int>().read_unaligned(), Ordering::Relaxed);
                        }
                    }
                }
            }
        }};
    }
    // Pairs with the fence after a copy out elsewhere: what was written before
    // this copy is seen by a reader that sees this copy (the lock's release and
    // acquire cover the locked case already).
    if direction == Direction::In {
        atomic::fence(Ordering::Release);
    }
    // `T`'s size is a multiple of its alignment, so of the unit.
    match std::mem::align_of::<T>().min(8) {
        8 => copy!(atomic::AtomicU64, u64),
        4 => copy!(atomic::AtomicU32, u32),
        2 => copy!(atomic::AtomicU16, u16),
        _ => copy!(atomic::AtomicU8, u8),
    }
    if direction == Direction::Out {
        atomic::fence(Ordering::Acquire);
    }
}

/// An integer type with an atomic counterpart.
pub(crate) trait Atomic: Sized {
    type Value: Pod;
    /// # Safety
    /// `ptr` is valid and aligned for the atomic for `'a`, and only accessed
    /// atomically meanwhile.
    unsafe fn from_ptr<'a>(ptr: *mut Self::Value) -> &'a Self;
}

macro_rules! atomics {
    ($($atomic:ty => $value:ty),* $(,)?) => {$(
        impl Atomic for $atomic {
            type Value = $value;
            unsafe fn from_ptr<'a>(ptr: *mut $value) -> &'a Self {
                // SAFETY: the caller's contract is `from_ptr`'s.
                unsafe { <$atomic>::from_ptr(ptr) }
            }
        }
    )*};
}

atomics! {
    atomic::AtomicU8 => u8, atomic::AtomicU16 => u16, atomic::AtomicU32 => u32, atomic::AtomicU64 => u64,
    atomic::AtomicI8 => i8, atomic::AtomicI16 => i16, atomic::AtomicI32 => i32, atomic::AtomicI64 => i64,
    atomic::AtomicUsize => usize, atomic::AtomicIsize => isize,
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn segment(data: usize) -> (std::os::fd::OwnedFd, Mapping) {
        let fd = rustix::fs::memfd_create(
            "test",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        rustix::fs::ftruncate(&fd, (HEADER_LEN + data) as u64).unwrap();
        let map = Mapping::map(fd.as_fd(), HEADER_LEN + data, true).unwrap();
        (fd, map)
    }

    #[test]
    fn element_access_is_bounds_checked() {
        let (_fd, map) = segment(4 * 8);
        assert!(map.write(3, 7u64));
        assert_eq!(map.read::<u64>(3), Some(7));
        assert!(!map.write(4, 1u64));
        assert_eq!(map.read::<u64>(4), None);
        assert_eq!(map.read::<u64>(usize::MAX), None);
        let mut out = [0u64; 2];
        assert!(map.copy_out(2, &mut out));
        assert_eq!(out, [0, 7]);
        assert!(!map.copy_out(3, &mut out));
        assert!(map.copy_in(0, &[1u64, 2]));
        assert!(!map.copy_in(3, &[1u64, 2]));
        assert_eq!(map.atomic::<atomic::AtomicU64>(1).unwrap().fetch_add(5, Ordering::SeqCst), 2);
        assert!(map.atomic::<atomic::AtomicU64>(4).is_none());
    }

    #[test]
    fn a_second_mapping_sees_the_same_memory() {
        let (fd, map) = segment(8);
        let other = Mapping::map(fd.as_fd(), HEADER_LEN + 8, false).unwrap();
        assert!(map.write(0, 42u64));
        assert_eq!(other.read::<u64>(0), Some(42));
        assert!(!other.write(0, 1u64), "a read-only mapping refuses writes");
        assert!(other.atomic::<atomic::AtomicU64>(0).is_none());
    }

    #[test]
    fn the_lock_excludes_and_a_dead_holder_is_released() {
        let (_fd, map) = segment(8);
        let held = map.try_lock(10).unwrap();
        assert!(map.try_lock(11).is_none());
        assert_eq!(map.lock_for(11, Duration::from_millis(1)).err(), Some(10));
        drop(held);
        let held = map.lock_for(11, Duration::from_secs(5)).unwrap();
        held.keep();
        assert!(map.adopt(11).is_some_and(|held| {
            held.keep();
            true
        }));
        assert!(!map.release_dead_holder(10));
        assert!(map.release_dead_holder(11));
        assert_eq!(map.header().poison.load(Ordering::Relaxed), 11);
        assert!(map.try_lock(12).is_some());
    }

    #[test]
    fn a_waiter_on_another_thread_is_woken_by_the_release() {
        let (_fd, map) = segment(8);
        let map = std::sync::Arc::new(map);
        let held = map.try_lock(1).unwrap();
        let waiter = {
            let map = map.clone();
            std::thread::spawn(move || {
                let _held = map.lock_for(2, Duration::from_secs(30)).expect("woken before the hang guard");
                let value = map.read::<u64>(0).unwrap();
                map.write(0, value + 1);
            })
        };
        // Wait until the waiter is parked, so the release has someone to wake.
        while map.header().lock.load(Ordering::Relaxed) & WAITERS == 0 {
            std::thread::yield_now();
        }
        drop(held);
        waiter.join().unwrap();
        assert_eq!(map.read::<u64>(0), Some(1));
    }

    #[test]
    fn sealed_buffers_refuse_writable_mappings() {
        let (fd, map) = segment(16);
        assert!(map.copy_in(0, &[9u8; 16]));
        let sealed = Sealed::seal(fd.as_fd()).unwrap();
        assert!(Sealed::check(fd.as_fd()).is_ok());
        assert!(Mapping::map(fd.as_fd(), HEADER_LEN + 16, true).is_err());
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        let reader = Mapping::map(fd.as_fd(), HEADER_LEN + 16, false).unwrap();
        assert_eq!(reader.sealed_bytes(&sealed), &[9u8; 16]);
    }
}
