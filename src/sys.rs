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

/// Blocks until every writer of the pipe `fd` has closed it: the parent died or
/// dropped the executor.
///
/// `poll` with no requested events still reports `POLLHUP`, so this never consumes or
/// races for the data the worker's main thread is reading from the same pipe.
pub(crate) fn wait_for_hangup(fd: BorrowedFd<'_>) {
    let mut pollfd = libc::pollfd { fd: fd.as_raw_fd(), events: 0, revents: 0 };
    loop {
        // SAFETY: `pollfd` is a valid, exclusively borrowed array of length 1.
        let ready = unsafe { libc::poll(&mut pollfd, 1, -1) };
        if ready > 0 {
            return;
        }
        if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
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
            wait_for_hangup(read.as_fd());
            // The data is still there to read after the hang-up.
            let mut rest = String::new();
            std::fs::File::from(read).read_to_string(&mut rest).unwrap();
            rest
        });
        drop(writer);
        assert!(watcher.join().unwrap().starts_with("pending data"));
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
    fn pipes_are_close_on_exec() {
        let (read, write) = pipe().unwrap();
        for fd in [read.as_raw_fd(), write.as_raw_fd()] {
            // SAFETY: F_GETFD on a descriptor we own reads no memory.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }
}
