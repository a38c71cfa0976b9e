//! The limit: a minimal parent/child pair over raw pipes with blocking std IO and
//! the same pipe size procexec asks for. No framing beyond fixed-size items, no
//! serialization, no async: what the pipes themselves allow on this machine.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const PIPE_SIZE: libc::c_int = 1 << 20;

/// What a child sends once it runs, before serving: the limits are timed from the
/// moment their children are ready, as procexec's rows are timed after `build()`.
const READY: u8 = b'!';

/// In the child: serves `mode` on stdin/stdout until EOF, then exits.
pub fn child(mode: &str) {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    output.write_all(&[READY]).unwrap();
    output.flush().unwrap();
    match mode {
        "pingpong" => {
            let mut word = [0u8; 8];
            while input.read_exact(&mut word).is_ok() {
                output.write_all(&word).unwrap();
                output.flush().unwrap();
            }
        }
        "double" => {
            // Batched 8-byte items: answer whatever arrived, in one write.
            let mut buf = vec![0u8; 64 * 1024];
            let mut pending = Vec::new();
            let mut out = Vec::with_capacity(64 * 1024);
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                let whole = pending.len() / 8 * 8;
                out.clear();
                for item in pending[..whole].chunks_exact(8) {
                    let x = u64::from_le_bytes(item.try_into().unwrap());
                    out.extend_from_slice(&(2 * x).to_le_bytes());
                }
                pending.drain(..whole);
                output.write_all(&out).unwrap();
                output.flush().unwrap();
            }
        }
        "echo" => {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                output.write_all(&buf[..n]).unwrap();
                output.flush().unwrap();
            }
        }
        "ready" => {
            let _ = input.read_to_end(&mut Vec::new());
        }
        other => panic!("unknown raw mode {other}"),
    }
}

struct Pair {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

fn start(mode: &str) -> Pair {
    let pair = start_plain(mode);
    for fd in [pair.stdin.as_raw_fd(), pair.stdout.as_raw_fd()] {
        // SAFETY: F_SETPIPE_SZ on a pipe we own reads no memory.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    pair
}

/// A child in `mode`, with default pipes.
fn start_plain(mode: &str) -> Pair {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["raw-child", mode])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    Pair { child, stdin, stdout }
}

impl Pair {
    /// Waits until the child runs (has sent `READY`).
    fn wait_ready(&mut self) {
        let mut byte = [0u8; 1];
        self.stdout.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], READY);
    }

    fn finish(self) {
        drop(self.stdin);
        let mut child = self.child;
        child.wait().unwrap();
    }
}

/// W5: round trips of an 8-byte word, one at a time.
pub fn ping_pong(calls: usize, placement: crate::pin::Placement) -> Vec<Duration> {
    let mut pair = start("pingpong");
    pair.wait_ready();
    placement.pin_parent();
    placement.pin_child(pair.child.id());
    let mut word = [0u8; 8];
    let mut rtts = Vec::with_capacity(calls);
    for i in 0..calls + 100 {
        let start = Instant::now();
        pair.stdin.write_all(&(i as u64).to_le_bytes()).unwrap();
        pair.stdout.read_exact(&mut word).unwrap();
        if i >= 100 {
            rtts.push(start.elapsed());
        }
    }
    pair.finish();
    rtts
}

/// Runs `children` children in `mode`, each fed `send` bytes in `write_size`
/// writes from one thread while another thread reads `receive` bytes back. Timed
/// from the moment every child runs and every thread is ready: starting processes
/// and threads is not what the pipes cost.
fn stream(mode: &str, children: usize, send: usize, write_size: usize, receive: usize) -> Duration {
    let mut pairs: Vec<Pair> = (0..children).map(|_| start(mode)).collect();
    pairs.iter_mut().for_each(Pair::wait_ready);
    let go = Arc::new(Barrier::new(2 * children + 1));
    let threads: Vec<_> = pairs
        .into_iter()
        .map(|pair| {
            let Pair { child, mut stdin, mut stdout } = pair;
            let writer_go = go.clone();
            let writer = std::thread::spawn(move || {
                let block: Vec<u8> = (0..write_size).map(|i| (i % 251) as u8).collect();
                writer_go.wait();
                let mut left = send;
                while left > 0 {
                    let n = left.min(write_size);
                    stdin.write_all(&block[..n]).unwrap();
                    left -= n;
                }
                stdin
            });
            let reader_go = go.clone();
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                reader_go.wait();
                let mut left = receive;
                while left > 0 {
                    let n = stdout.read(&mut buf[..left.min(256 * 1024)]).unwrap();
                    assert!(n > 0);
                    left -= n;
                }
            });
            (child, writer, reader)
        })
        .collect();
    go.wait();
    let start = Instant::now();
    let mut children_left = Vec::new();
    for (child, writer, reader) in threads {
        let stdin = writer.join().unwrap();
        reader.join().unwrap();
        children_left.push((child, stdin));
    }
    let took = start.elapsed();
    for (mut child, stdin) in children_left {
        drop(stdin);
        child.wait().unwrap();
    }
    took
}

/// W1: `items` 8-byte items doubled by 2 children, written in batches of 1,024:
/// tried from 128 to 65,536 items per write, 512 to 4,096 did alike and best, 1,024
/// with the best runs.
pub fn batched_items(items: usize) -> Duration {
    let per_child = items / 2 * 8;
    stream("double", 2, per_child, 1024 * 8, per_child)
}

/// W3: `tasks` payloads of `size` bytes echoed by 2 children.
pub fn echo(tasks: usize, size: usize) -> Duration {
    let per_child = tasks / 2 * size;
    stream("echo", 2, per_child, size, per_child)
}

/// W4: spawns 2 children and waits until both are running; returns
/// (start-up, teardown).
pub fn bare_spawn() -> (Duration, Duration) {
    let start = Instant::now();
    let mut pairs: Vec<Pair> = (0..2).map(|_| start_plain("ready")).collect();
    pairs.iter_mut().for_each(Pair::wait_ready);
    let started = start.elapsed();
    let start = Instant::now();
    pairs.into_iter().for_each(Pair::finish);
    (started, start.elapsed())
}
