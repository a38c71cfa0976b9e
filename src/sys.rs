//! Every platform call procexec makes, so the rest of the crate never sees `libc`.
//!
//! Linux is the reference platform. Other Unixes compile without the Linux-only
//! pieces (`PR_SET_PDEATHSIG`, `F_SETPIPE_SZ`): their workers still exit on EOF of
//! their request pipe, which the hang-up watcher in the worker notices.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};

use bytes::BytesMut;

/// A pipe whose two ends are both close-on-exec, so no other child inherits them.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = io::pipe()?;
    Ok((read.into(), write.into()))
}

/// Grows a pipe's kernel buffer so large payloads cross in fewer wake-ups.
///
/// Best effort: the kernel may refuse (per-user pipe quotas), which only costs speed.
pub(crate) fn grow_pipe(fd: BorrowedFd<'_>, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ reads no memory; an invalid fd or size only yields an error.
        let _ = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (fd, bytes);
}

/// Sets up a worker command so the worker is not hit by a terminal's Ctrl-C: it gets
/// its own process group, and the parent decides what a Ctrl-C means.
///
/// Nothing runs in the child before exec, so std can use `posix_spawn` rather than
/// fork a large multi-threaded parent: the worker ties its life to the parent
/// itself, first thing (see [`die_with_parent`]).
pub(crate) fn prepare_worker_command(cmd: &mut Command) {
    cmd.process_group(0);
}

/// In a worker: asks Linux to `SIGKILL` this process when its parent dies
/// (`PR_SET_PDEATHSIG`).
///
/// The death signal fires when the *thread* that spawned the child exits, so workers
/// are spawned from a thread that lives as long as the process (`process::spawn`).
/// A parent that died before this call, or a worker started through a wrapper
/// program (whose death the signal then follows), is caught by the hang-up watcher:
/// the request pipe closes when the executor's process goes away.
pub(crate) fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) reads no memory.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    }
}

/// Writes out what C's stdio buffered in every output stream (`fflush(NULL)`).
pub(crate) fn flush_c_stdio() {
    // SAFETY: fflush(NULL) flushes every open C output stream; it reads no memory
    // of ours and takes each stream's own lock.
    unsafe {
        libc::fflush(std::ptr::null_mut());
    }
}

/// Blocks `SIGPIPE` on this thread (and the threads it starts): a write to a pipe
/// whose reader is gone then fails with `EPIPE` instead of raising the signal,
/// whose default action ends the whole process. For an in-process worker thread,
/// whose pipes the parent closes when it gives the thread up, in a program that
/// may have restored that default (as programs piped into `head` do).
pub(crate) fn block_sigpipe_on_this_thread() {
    // SAFETY: `set` is a valid sigset_t, initialised by sigemptyset before use;
    // pthread_sigmask only reads it and changes this thread's mask alone.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// In a worker: removes the marker `key` from this process's environment, so a
/// process a task starts (the same program again, in self-exec mode) is not taken
/// for a worker and left waiting on a stdin that never speaks the protocol.
///
/// Must be called before the worker starts any thread, and by a program whose own
/// threads (if any) do not read or write the environment meanwhile: the contract of
/// [`init_worker`](crate::init_worker).
pub(crate) fn remove_worker_marker(key: &str) {
    // SAFETY: `remove_var` races only with other threads reading or writing the
    // environment (`getenv`, `setenv`, `std::env::var`...). It runs first thing in
    // `serve`, before the worker's hang-up watcher or any task runs, so no thread of
    // procexec exists yet. A companion binary (`serve_worker` in `main`) has no
    // other thread. In self-exec mode `init_worker` documents that it must come
    // before the program starts threads that use the environment; threads started
    // earlier by a runtime (a Tokio runtime's idle workers, the test harness's main
    // thread waiting for its test) are parked and do not touch it.
    unsafe { std::env::remove_var(key) }
}

/// Kills a worker's whole process group, so grandchildren a task started die with it.
///
/// Call it before the worker is reaped: a reaped leader's group id can be reused.
pub(crate) fn kill_process_group(leader: u32) {
    let Ok(pgid) = libc::pid_t::try_from(leader) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) touches no memory; a stale group only yields ESRCH.
    let _ = unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

/// The two ends of the protocol, moved off the worker's stdio.
pub(crate) struct ProtocolFds {
    pub(crate) input: OwnedFd,
    pub(crate) output: OwnedFd,
}

/// In a worker: moves the request pipe (fd 0) and the reply pipe (fd 1) to private
/// close-on-exec descriptors, points fd 0 at `/dev/null` and fd 1 at stderr.
///
/// After this a task's `println!` lands on stderr (forwarded by the parent) instead of
/// corrupting the protocol, and a subprocess a task starts inherits neither pipe.
pub(crate) fn take_protocol_stdio() -> io::Result<ProtocolFds> {
    let input = io::stdin().as_fd().try_clone_to_owned()?;
    let output = io::stdout().as_fd().try_clone_to_owned()?;
    let devnull = std::fs::File::open("/dev/null")?;
    dup2(devnull.as_fd(), 0)?;
    dup2(io::stderr().as_fd(), 1)?;
    Ok(ProtocolFds { input, output })
}

fn dup2(from: BorrowedFd<'_>, to: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: dup2 touches no memory. Replacing fd 0 or 1 is the point: Rust's
        // stdin/stdout refer to those numbers, and nothing else owns them.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Blocks until the pipe `hangup` is closed by its last writer (returns
/// [`Wake::Hangup`]), `input` has something to read ([`Wake::Input`]), or `timeout`
/// passed.
///
/// `poll` with no requested events still reports `POLLHUP` on `hangup`, so this
/// never consumes or races for the data the worker's main thread reads from it.
pub(crate) fn wait_for_hangup_or_input(
    hangup: BorrowedFd<'_>,
    input: &[BorrowedFd<'_>],
    timeout: std::time::Duration,
) -> Wake {
    let input = |at: usize| input.get(at).map_or(-1, |fd| fd.as_raw_fd());
    let mut fds = [
        libc::pollfd { fd: hangup.as_raw_fd(), events: 0, revents: 0 },
        libc::pollfd { fd: input(0), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: input(1), events: libc::POLLIN, revents: 0 },
    ];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of 3 (poll ignores a
        // negative fd).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
        if ready > 0 {
            return if fds[0].revents != 0 { Wake::Hangup } else { Wake::Input };
        }
        if ready == 0 {
            return Wake::Timeout;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // Cannot be waited out: taken as a hang-up.
            return Wake::Hangup;
        }
    }
}

/// Why [`wait_for_hangup_or_input`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    Hangup,
    Input,
    Timeout,
}

/// The device and inode numbers of `fd` if it is a pipe.
pub(crate) fn pipe_identity(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let stat = rustix::fs::fstat(fd).ok()?;
    (rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Fifo)
        .then_some((stat.st_dev as u64, stat.st_ino))
}

/// A non-blocking read end of the pipe `fd` (a write end, say) is one end of.
pub(crate) fn reopen_for_reading(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())?)
}

/// Makes reads of `fd` return at once when nothing is there.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    Ok(rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?)
}

/// Points fd 1 at what `fd` is.
pub(crate) fn point_stdout_at(fd: BorrowedFd<'_>) -> io::Result<()> {
    dup2(fd, 1)
}

/// This process's stderr.
pub(crate) fn stderr_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 2 stays open for the life of a worker: nothing closes it.
    unsafe { BorrowedFd::borrow_raw(2) }
}

/// Reads once from the non-blocking `fd`, at most `max` bytes, appending to `buf`.
/// `Ok(0)`: nothing there now (or the end of the stream).
pub(crate) fn read_some(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + max.min(64 * 1024), 0);
    let read = loop {
        match rustix::io::read(fd, &mut buf[start..]) {
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => break Ok(0),
            other => break other.map_err(io::Error::from),
        }
    };
    buf.truncate(start + *read.as_ref().unwrap_or(&0));
    read
}

/// Everything the non-blocking `fd` holds now (up to `max` bytes).
pub(crate) fn read_available(fd: BorrowedFd<'_>, max: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < max {
        let room = max - buf.len();
        match read_some(fd, &mut buf, room) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    buf
}

/// The capacity of the pipe `fd`.
pub(crate) fn pipe_size(fd: BorrowedFd<'_>) -> usize {
    // SAFETY: F_GETPIPE_SZ reads no memory; an invalid fd only yields an error.
    let size = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    usize::try_from(size).unwrap_or(4096)
}

/// Bytes waiting to be read from the pipe `fd`.
pub(crate) fn bytes_readable(fd: BorrowedFd<'_>) -> usize {
    rustix::io::ioctl_fionread(fd).map_or(0, |n| n as usize)
}

/// Waits until `fd` has something to read (or its writer hung up), for at most
/// `timeout`. Returns whether it has.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut pollfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Rounded up, so a wait never ends early and spins.
        let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: `pollfd` is a valid, exclusively borrowed array of length 1.
        let ready = unsafe { libc::poll(&mut pollfd, 1, ms) };
        if ready > 0 {
            return true;
        }
        if ready == 0 && left.is_zero() {
            return false;
        }
        if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // Let the read that follows report it.
            return true;
        }
    }
}

/// Reads once from `fd` into the spare capacity of `buf` (at least `reserve` bytes of
/// it), retrying on `EINTR`. Returns how many bytes arrived; 0 means end of stream.
pub(crate) fn read_into(fd: BorrowedFd<'_>, buf: &mut BytesMut, reserve: usize) -> io::Result<usize> {
    buf.reserve(reserve);
    let spare = buf.spare_capacity_mut();
    loop {
        // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `buf`;
        // read(2) writes at most that many bytes into it and nothing else.
        let read = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        if read >= 0 {
            let read = read as usize;
            // SAFETY: read(2) initialized the first `read` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + read) };
            return Ok(read);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A growable byte buffer another process can read after this one died: a memory
/// file (`memfd`) mapped shared, whose descriptor the parent opens through `/proc`.
/// Where there is no memory file, private memory that only this process sees.
///
/// Writing to it costs what writing to a `Vec` costs: no system call per write, only
/// when it grows.
pub(crate) struct SharedBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
    file: Option<OwnedFd>,
}

// SAFETY: `SharedBuf` owns its mapping exclusively (like a `Vec` owns its heap
// block); nothing else in this process aliases it.
unsafe impl Send for SharedBuf {}

impl SharedBuf {
    /// A buffer of `capacity` bytes (rounded up to whole pages), all zero.
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        let cap = round_to_page(capacity.max(1));
        #[cfg(target_os = "linux")]
        {
            use rustix::fs::{MemfdFlags, ftruncate, memfd_create};
            use rustix::mm::{MapFlags, ProtFlags, mmap};
            if let Ok(file) = memfd_create("procexec-progress", MemfdFlags::CLOEXEC) {
                ftruncate(&file, cap as u64)?;
                // SAFETY: a fresh shared mapping of `cap` bytes of a file of that size;
                // the kernel picks the address, so no existing memory is affected.
                let ptr = unsafe {
                    mmap(
                        std::ptr::null_mut(),
                        cap,
                        ProtFlags::READ | ProtFlags::WRITE,
                        MapFlags::SHARED,
                        &file,
                        0,
                    )
                }?;
                let ptr =
                    std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
                return Ok(SharedBuf { ptr, cap, len: 0, file: Some(file) });
            }
        }
        use rustix::mm::{MapFlags, ProtFlags, mmap_anonymous};
        // SAFETY: a fresh private anonymous mapping; the kernel picks the address.
        let ptr = unsafe {
            mmap_anonymous(std::ptr::null_mut(), cap, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE)
        }?;
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(SharedBuf { ptr, cap, len: 0, file: None })
    }

    /// The memory file's descriptor, if other processes can read the buffer.
    pub(crate) fn file(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|file| file.as_fd())
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are mapped and initialized (mappings start
        // zeroed), and `&self` keeps the mapping alive and unmoved.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Makes room for `additional` more bytes. Panics when the memory cannot be had,
    /// as a `Vec` would.
    #[inline]
    fn reserve(&mut self, additional: usize) {
        if additional > self.cap - self.len {
            self.grow_for(additional);
        }
    }

    #[cold]
    #[inline(never)]
    fn grow_for(&mut self, additional: usize) {
        let needed = self.len.checked_add(additional).expect("a reply buffer above usize::MAX");
        let cap = round_to_page(needed.max(self.cap.saturating_mul(2)));
        if let Err(err) = self.grow(cap) {
            panic!("cannot grow the reply buffer to {cap} bytes: {err}");
        }
    }

    fn grow(&mut self, cap: usize) -> io::Result<()> {
        if let Some(file) = &self.file {
            rustix::fs::ftruncate(file, cap as u64)?;
        }
        #[cfg(target_os = "linux")]
        {
            use rustix::mm::{MremapFlags, mremap};
            // SAFETY: `ptr` and `cap` describe our whole mapping; MAYMOVE lets the
            // kernel move it, and nothing borrows it while `&mut self` is held.
            let ptr = unsafe { mremap(self.ptr.as_ptr().cast(), self.cap, cap, MremapFlags::MAYMOVE) }?;
            self.ptr =
                std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mremap gave null"))?;
            self.cap = cap;
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            let mut bigger = SharedBuf::new(cap)?;
            bigger.extend_from_slice(self.as_slice());
            *self = bigger;
            Ok(())
        }
    }

    #[inline]
    pub(crate) fn extend_from_slice(&mut self, data: &[u8]) {
        self.reserve(data.len());
        // SAFETY: `reserve` made `len + data.len()` bytes mapped; `data` cannot
        // overlap the mapping, which only `&mut self` reaches.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(self.len), data.len()) };
        self.len += data.len();
    }

    #[inline]
    pub(crate) fn push(&mut self, byte: u8) {
        self.reserve(1);
        // SAFETY: `reserve` made byte `len` mapped.
        unsafe { self.ptr.as_ptr().add(self.len).write(byte) };
        self.len += 1;
    }

    /// Shortens the buffer (a no-op when it is shorter already).
    #[inline]
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Overwrites bytes already written, from `at`.
    #[inline]
    pub(crate) fn patch(&mut self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len, "patching bytes never written");
        // SAFETY: the range lies within the first `len` (mapped) bytes, checked above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len()) };
    }

    /// Stores `value` at `at` (a multiple of 8 within the written bytes) as one
    /// atomic write, so a reader in another process sees all of it or none.
    #[inline]
    pub(crate) fn publish(&self, at: usize, value: u64) {
        assert!(at.is_multiple_of(8) && at + 8 <= self.len, "a misplaced progress field");
        // SAFETY: the mapping is page-aligned and `at` a multiple of 8, so the
        // address is aligned for an `AtomicU64`; it lies within the mapping (checked
        // above); and all access to these bytes from this process goes through
        // atomics (`publish`) while others only read them.
        let field = unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(at).cast()) };
        field.store(value.to_le(), std::sync::atomic::Ordering::Release);
    }
}

impl SharedBuf {
    /// Loads the `u64` at `at` (as [`publish`](SharedBuf::publish) stores it): the
    /// parent writes some fields of a worker's buffer.
    #[inline]
    pub(crate) fn load(&self, at: usize) -> u64 {
        assert!(at.is_multiple_of(8) && at + 8 <= self.len, "a misplaced progress field");
        // SAFETY: as in `publish`: aligned, within the mapping, accessed atomically.
        let field = unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(at).cast()) };
        u64::from_le(field.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// The first page of a [`SharedBuf`]'s file, mapped on its own: how the parent
/// writes into a worker's progress record, and how a task reads it (whatever the
/// buffer's own mapping is doing).
pub(crate) struct ForeignPage {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: the mapping is owned by this value alone, and written only atomically.
unsafe impl Send for ForeignPage {}
// SAFETY: as above: every access is an atomic store.
unsafe impl Sync for ForeignPage {}

impl ForeignPage {
    const LEN: usize = 4096;

    /// Maps the first page of `file` (at least a page long).
    pub(crate) fn map(file: &std::fs::File) -> io::Result<Self> {
        use rustix::mm::{MapFlags, ProtFlags, mmap};
        if file.metadata()?.len() < Self::LEN as u64 {
            return Err(io::Error::other("the file is shorter than a page"));
        }
        // SAFETY: a fresh shared mapping of the file's first page, which exists (checked
        // above) and cannot shrink below it (only the worker sizes it, and it only grows);
        // the kernel picks the address.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                Self::LEN,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                file,
                0,
            )
        }?;
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(ForeignPage { ptr })
    }

    /// Loads the value at `at` (a multiple of 8 within the page) atomically.
    pub(crate) fn load(&self, at: usize) -> u64 {
        assert!(at.is_multiple_of(8) && at + 8 <= Self::LEN, "a misplaced progress field");
        // SAFETY: as in `store`.
        let field = unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(at).cast()) };
        u64::from_le(field.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Stores `value` at `at` (a multiple of 8 within the page) atomically.
    pub(crate) fn store(&self, at: usize, value: u64) {
        assert!(at.is_multiple_of(8) && at + 8 <= Self::LEN, "a misplaced progress field");
        // SAFETY: page-aligned mapping, `at` a multiple of 8 within it (checked above);
        // the other process reads these bytes only atomically.
        let field = unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(at).cast()) };
        field.store(value.to_le(), std::sync::atomic::Ordering::Release);
    }
}

impl Drop for ForeignPage {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), Self::LEN) };
    }
}

impl Drop for SharedBuf {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing borrows it any more.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.cap) };
    }
}

fn round_to_page(bytes: usize) -> usize {
    const PAGE: usize = 4096;
    bytes.div_ceil(PAGE).saturating_mul(PAGE)
}

/// Opens descriptor `fd` of process `pid` (same user) through `/proc`: a new open
/// file of the same memory file, readable after that process died.
pub(crate) fn open_foreign_fd(pid: u32, fd: u32) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/fd/{fd}"))
}

/// Whether `err` says this process (`EMFILE`) or the system (`ENFILE`) is out of
/// descriptors.
pub(crate) fn out_of_descriptors(err: &io::Error) -> bool {
    matches!(rustix::io::Errno::from_io_error(err), Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE))
}

/// This process's peak resident memory so far, in KiB (`getrusage`'s `ru_maxrss`).
pub(crate) fn peak_rss_kib() -> u64 {
    // SAFETY: `usage` is a properly sized, writable rusage that getrusage fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    // Linux reports KiB; macOS reports bytes.
    let peak = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    if cfg!(target_os = "macos") { peak / 1024 } else { peak }
}

/// The soft and hard limits on open descriptors (`RLIMIT_NOFILE`).
#[allow(clippy::unnecessary_cast)] // `rlim_t` is `u64` on Linux, not everywhere
pub(crate) fn fd_limits() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit that getrlimit fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur as u64, limit.rlim_max as u64))
}

/// Sets the soft limit on open descriptors (at most the hard limit).
#[allow(clippy::unnecessary_cast)] // `rlim_t` is `u64` on Linux, not everywhere
pub(crate) fn set_fd_soft_limit(soft: u64) -> io::Result<()> {
    let (_, hard) = fd_limits()?;
    let limit = libc::rlimit { rlim_cur: soft.min(hard) as libc::rlim_t, rlim_max: hard as libc::rlim_t };
    // SAFETY: `limit` is a valid rlimit; setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many descriptors this process has open (counted in `/proc/self/fd`).
pub(crate) fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// Checks that `program` is a file this process may execute.
pub(crate) fn check_executable(program: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(program) {
        Err(err) => Err(format!("it cannot be found ({err})")),
        Ok(meta) if !meta.is_file() => Err("it is not a file".into()),
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => Err("it is not executable".into()),
        Ok(_) => Ok(()),
    }
}

/// Ends this process at once, running no exit handler and flushing nothing.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) never returns and touches no memory of this process.
    unsafe { libc::_exit(code) }
}

/// How a process ended, in the words an error message needs.
pub(crate) fn describe_exit(status: &ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), status.signal())
}

/// The conventional name of a signal number (`SIGKILL`), if it is a common one.
pub(crate) fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn signal_names_cover_the_crash_signals() {
        assert_eq!(signal_name(libc::SIGKILL), Some("SIGKILL"));
        assert_eq!(signal_name(libc::SIGSEGV), Some("SIGSEGV"));
        assert_eq!(signal_name(libc::SIGABRT), Some("SIGABRT"));
        assert_eq!(signal_name(12345), None);
    }

    #[test]
    fn hangup_is_seen_only_after_the_last_writer_closes() {
        let (read, write) = pipe().unwrap();
        let mut writer = std::fs::File::from(write);
        writer.write_all(b"pending data does not count as a hang-up").unwrap();
        let watcher = std::thread::spawn(move || {
            let wake = wait_for_hangup_or_input(read.as_fd(), &[], std::time::Duration::from_secs(600));
            assert_eq!(wake, Wake::Hangup);
            // The data is still there to read after the hang-up.
            let mut rest = String::new();
            std::fs::File::from(read).read_to_string(&mut rest).unwrap();
            rest
        });
        drop(writer);
        assert!(watcher.join().unwrap().starts_with("pending data"));
    }

    #[test]
    fn waiting_for_input_ends_when_it_comes_or_at_the_timeout() {
        let (read, write) = pipe().unwrap();
        assert!(!wait_readable(read.as_fd(), std::time::Duration::from_millis(5)));
        std::fs::File::from(write).write_all(b"x").unwrap();
        assert!(wait_readable(read.as_fd(), std::time::Duration::from_secs(60)));
    }

    #[test]
    fn read_into_appends_what_arrived_and_reports_end_of_stream() {
        let (read, write) = pipe().unwrap();
        let mut writer = std::fs::File::from(write);
        writer.write_all(b"hello").unwrap();
        drop(writer);
        let mut buf = BytesMut::from(&b">"[..]);
        assert_eq!(read_into(read.as_fd(), &mut buf, 16).unwrap(), 5);
        assert_eq!(&buf[..], b">hello");
        assert_eq!(read_into(read.as_fd(), &mut buf, 16).unwrap(), 0);
        assert_eq!(&buf[..], b">hello");
    }

    #[test]
    fn peak_memory_covers_memory_just_touched() {
        // A high-water mark of the whole process (other tests run alongside), so only
        // a lower bound is certain.
        let touched = vec![1u8; 64 << 20];
        assert!(peak_rss_kib() >= 64 * 1024, "{}", peak_rss_kib());
        drop(std::hint::black_box(touched));
    }

    #[test]
    fn a_shared_buffer_grows_and_keeps_its_bytes() {
        let mut buf = SharedBuf::new(16).unwrap();
        for i in 0..100_000u32 {
            buf.extend_from_slice(&i.to_le_bytes());
        }
        buf.push(7);
        assert_eq!(buf.len(), 400_001);
        assert_eq!(&buf.as_slice()[4 * 99_999..4 * 100_000], 99_999u32.to_le_bytes());
        buf.patch(0, &[1, 2]);
        buf.truncate(3);
        assert_eq!(buf.as_slice(), [1, 2, 0]);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn another_process_reads_a_shared_buffer_through_proc_after_it_grew() {
        use std::os::unix::fs::FileExt;
        let mut buf = SharedBuf::new(8).unwrap();
        buf.extend_from_slice(&[0; 8]);
        buf.publish(0, 42);
        buf.extend_from_slice(&vec![5u8; 1 << 20]);
        let fd = buf.file().expect("a memfd").as_raw_fd() as u32;
        let file = open_foreign_fd(std::process::id(), fd).unwrap();
        let page = ForeignPage::map(&file).unwrap();
        page.store(8, 7);
        assert_eq!(buf.load(8), 7, "the parent's stores reach the worker's mapping");
        drop(buf); // the file outlives the writer's mapping
        let mut head = [0u8; 8];
        file.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(u64::from_le_bytes(head), 42);
        let mut tail = [0u8; 4];
        file.read_exact_at(&mut tail, (1 << 20) + 4).unwrap();
        assert_eq!(tail, [5; 4]);
    }

    #[test]
    fn the_descriptor_limits_are_read_and_the_soft_one_set() {
        let (soft, hard) = fd_limits().unwrap();
        assert!(soft <= hard && soft > 0);
        set_fd_soft_limit(soft).unwrap();
        assert_eq!(fd_limits().unwrap(), (soft, hard));
        assert!(open_fds().unwrap() >= 3);
    }

    #[test]
    fn pipes_are_close_on_exec() {
        let (read, write) = pipe().unwrap();
        for fd in [read.as_raw_fd(), write.as_raw_fd()] {
            // SAFETY: F_GETFD on a descriptor we own reads no memory.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }
}
