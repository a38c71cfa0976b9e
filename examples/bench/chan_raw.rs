//! The channels benchmark's limit and its Python peers: message throughput between
//! two processes.
//!
//! The limit is a parent and a child (this binary re-run as `chan-child`) over raw
//! pipes of the size procexec asks for (1 MiB), with a framed protocol at its
//! simplest: one `write` per message of a 4-byte little-endian length and the
//! payload, the reader reading with a large buffer and cutting frames. No
//! serialization, no async. The peers are Python's `multiprocessing.Queue` and
//! `multiprocessing.Pipe` (examples/bench/channels.py).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PIPE_SIZE: libc::c_int = 1 << 20;
const READ_BUFFER: usize = 1 << 20;
const READY: u8 = b'!';
const GO: u8 = b'>';
const DONE: u8 = b'.';

/// Which way the messages go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// The child writes, the parent reads.
    ChildToParent,
    /// The parent writes, the child reads (and sends one byte when it has all).
    ParentToChild,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::ChildToParent => "child->parent",
            Direction::ParentToChild => "parent->child",
        }
    }
}

/// Messages per measurement for a payload size: 500,000 at 64 bytes, 20,000 at
/// 64 KiB (about 0.3-0.6 s each on raw pipes, 2 cores); a tenth with `quick`.
pub fn default_count(size: usize, quick: bool) -> usize {
    let count = if size <= 4096 { 500_000 } else { (1_300_000_000 / size).clamp(1_000, 200_000) };
    if quick { count / 10 } else { count }
}

/// One frame: length prefix and payload, written with one `write` call.
fn frame(size: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + size);
    frame.extend_from_slice(&(size as u32).to_le_bytes());
    frame.extend((0..size).map(|i| (i % 251) as u8));
    frame
}

/// Writes `count` frames, each with a single `write_all` (one `write` syscall
/// unless the pipe takes only part of it).
fn write_frames(output: &mut File, size: usize, count: usize) {
    let frame = frame(size);
    for _ in 0..count {
        output.write_all(&frame).unwrap();
    }
}

/// Reads frames with a large buffer until `count` have arrived; returns the
/// payload bytes seen.
fn read_frames(input: &mut File, count: usize) -> usize {
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut filled, mut frames, mut payload) = (0usize, 0usize, 0usize);
    while frames < count {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0); // a frame larger than the buffer
        }
        let n = input.read(&mut buf[filled..]).unwrap();
        assert!(n > 0, "the stream ended after {frames} of {count} frames");
        filled += n;
        let mut at = 0;
        while filled - at >= 4 {
            let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            if filled - at < 4 + len {
                break;
            }
            at += 4 + len;
            frames += 1;
            payload += len;
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
    }
    assert_eq!(filled, 0, "bytes after the last frame");
    payload
}

/// Unbuffered handles on this process's stdin and stdout (std's are buffered,
/// which would merge small frames into fewer writes).
fn raw_stdio() -> (File, File) {
    let input = File::from(std::io::stdin().as_fd().try_clone_to_owned().unwrap());
    let output = File::from(std::io::stdout().as_fd().try_clone_to_owned().unwrap());
    (input, output)
}

/// In the child (`chan-child <send|recv> <size> <count>`): sends `READY`, waits
/// for `GO`, then writes or reads `count` frames of `size` bytes; a reader sends
/// `DONE` when it has them all.
pub fn child(args: &[String]) {
    let [mode, size, count] = args else { panic!("chan-child <send|recv> <size> <count>, got {args:?}") };
    let size: usize = size.parse().unwrap();
    let count: usize = count.parse().unwrap();
    let (mut input, mut output) = raw_stdio();
    output.write_all(&[READY]).unwrap();
    let mut byte = [0u8; 1];
    input.read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], GO);
    match mode.as_str() {
        "send" => write_frames(&mut output, size, count),
        "recv" => {
            assert_eq!(read_frames(&mut input, count), size * count);
            output.write_all(&[DONE]).unwrap();
        }
        other => panic!("unknown chan-child mode {other}"),
    }
}

/// One measurement: a fresh child, timed from `GO` until the reader has every
/// frame (for `ParentToChild`, until the child's `DONE` arrives).
fn raw_once(size: usize, count: usize, direction: Direction) -> Duration {
    let mode = match direction {
        Direction::ChildToParent => "send",
        Direction::ParentToChild => "recv",
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["chan-child", mode, &size.to_string(), &count.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = File::from(std::os::fd::OwnedFd::from(child.stdin.take().unwrap()));
    let mut from_child = File::from(std::os::fd::OwnedFd::from(child.stdout.take().unwrap()));
    for fd in [to_child.as_raw_fd(), from_child.as_raw_fd()] {
        // SAFETY: F_SETPIPE_SZ on a pipe we own reads no memory.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    let mut byte = [0u8; 1];
    from_child.read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], READY);
    let start = Instant::now();
    to_child.write_all(&[GO]).unwrap();
    match direction {
        Direction::ChildToParent => assert_eq!(read_frames(&mut from_child, count), size * count),
        Direction::ParentToChild => {
            write_frames(&mut to_child, size, count);
            from_child.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], DONE);
        }
    }
    let took = start.elapsed();
    drop(to_child);
    assert!(child.wait().unwrap().success());
    took
}

/// The raw-pipe limit: `reps` samples of `count` messages of `size` payload bytes
/// going `direction`, each sample with a fresh child (its start not timed).
pub fn raw_messages(size: usize, count: usize, direction: Direction, reps: usize) -> Vec<Duration> {
    raw_once(size, (count / 100).max(10), direction); // warm-up, not counted
    (0..reps).map(|_| raw_once(size, count, direction)).collect()
}

/// Messages per second and payload bytes per second of each sample.
pub fn rates(samples: &[Duration], count: usize, size: usize) -> Vec<(f64, f64)> {
    samples
        .iter()
        .map(|d| {
            let msgs = count as f64 / d.as_secs_f64();
            (msgs, msgs * size as f64)
        })
        .collect()
}

/// One line of channels.py: the median over its repetitions.
#[derive(Clone, Debug)]
pub struct PyRow {
    /// "python Queue" or "python Pipe".
    pub peer: String,
    /// "worker->parent", "parent->worker" or "worker->worker".
    pub direction: String,
    pub size: usize,
    pub msgs_per_s: f64,
    /// Payload bytes only.
    pub bytes_per_s: f64,
    #[allow(dead_code)] // for the table row to come
    pub messages: usize,
    #[allow(dead_code)]
    pub reps: usize,
    /// multiprocessing's start method ("fork" on Linux before Python 3.14).
    pub start_method: String,
    /// Messages per second of each repetition (the median is `msgs_per_s`).
    pub samples: Vec<f64>,
}

/// Runs examples/bench/channels.py (both sizes; fewer messages and repetitions
/// with `quick`); empty, with a note on stderr, if python3 is absent or fails.
pub fn python_channels(quick: bool) -> Vec<PyRow> {
    python_channels_sized(quick, &[])
}

/// As `python_channels`, for the given payload sizes only (all if empty).
pub fn python_channels_sized(quick: bool, sizes: &[usize]) -> Vec<PyRow> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bench/channels.py");
    let mut command = Command::new("python3");
    command.arg(script);
    if quick {
        command.arg("--quick");
    }
    for size in sizes {
        command.arg(format!("--size={size}"));
    }
    let output = match command.stderr(Stdio::inherit()).output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            eprintln!("note: python3 channels.py failed ({})", output.status);
            return Vec::new();
        }
        Err(err) => {
            eprintln!("note: python3 is not available ({err}); the Python channel peers are skipped");
            return Vec::new();
        }
    };
    String::from_utf8_lossy(&output.stdout).lines().filter_map(parse_row).collect()
}

/// Parses one flat JSON object of channels.py: string and number values, no
/// nesting, no escapes beyond `\"` and `\\` (none are printed).
fn parse_row(line: &str) -> Option<PyRow> {
    let fields = parse_flat_object(line)?;
    let get = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let number = |key: &str| get(key)?.parse::<f64>().ok();
    Some(PyRow {
        peer: get("peer")?.to_string(),
        direction: get("direction")?.to_string(),
        size: number("size")? as usize,
        msgs_per_s: number("msgs_per_s")?,
        bytes_per_s: number("bytes_per_s")?,
        messages: number("messages").unwrap_or(0.0) as usize,
        reps: number("reps").unwrap_or(0.0) as usize,
        start_method: get("start_method").unwrap_or("").to_string(),
        samples: get("samples").unwrap_or("").split(',').filter_map(|s| s.parse().ok()).collect(),
    })
}

/// `{"k":"v","n":1.5}` into (key, value) pairs, values unquoted; `None` if the
/// line is not such an object.
fn parse_flat_object(line: &str) -> Option<Vec<(String, String)>> {
    let mut chars = line.trim().strip_prefix('{')?.strip_suffix('}')?.chars().peekable();
    let mut fields = Vec::new();
    let string = |chars: &mut std::iter::Peekable<std::str::Chars>| -> Option<String> {
        let mut text = String::new();
        loop {
            match chars.next()? {
                '"' => return Some(text),
                '\\' => text.push(chars.next()?),
                c => text.push(c),
            }
        }
    };
    loop {
        while chars.peek()?.is_whitespace() {
            chars.next();
        }
        if chars.next()? != '"' {
            return None;
        }
        let key = string(&mut chars)?;
        while chars.peek()?.is_whitespace() {
            chars.next();
        }
        if chars.next()? != ':' {
            return None;
        }
        while chars.peek()?.is_whitespace() {
            chars.next();
        }
        let value = if chars.peek() == Some(&'"') {
            chars.next();
            string(&mut chars)?
        } else {
            let mut raw = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                raw.push(c);
                chars.next();
            }
            raw.trim().to_string()
        };
        fields.push((key, value));
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(fields),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

/// The hidden smoke path (`--row=chanpeers`): the raw limit and the Python peers
/// at 64 B and 64 KiB, in the bench table (messages/s and MB/s of payload).
pub fn smoke(quick: bool, table: &mut crate::table::Table) {
    use crate::table::{Better, Kind};
    let reps = if quick { 3 } else { 5 };
    let python = python_channels(quick);
    for (size, ids) in [(64usize, ["CH64", "CH64b"]), (65536, ["CH64K", "CH64Kb"])] {
        let count = default_count(size, quick);
        let raw: Vec<(Direction, Vec<(f64, f64)>)> = [Direction::ChildToParent, Direction::ParentToChild]
            .into_iter()
            .map(|direction| (direction, rates(&raw_messages(size, count, direction, reps), count, size)))
            .collect();
        for (unit_index, (id, unit)) in ids.into_iter().zip(["msgs/s", "MB/s"]).enumerate() {
            let name = format!("Channels: {size}-byte messages between processes, {unit}");
            table.workload(id, &name, unit, Better::Higher);
            let pick = |(msgs, bytes): (f64, f64)| if unit_index == 0 { msgs } else { bytes / 1e6 };
            for (direction, samples) in &raw {
                let label = format!("raw pipes, framed, one write per message, {}", direction.label());
                table.row(Kind::Limit, &label, samples.iter().copied().map(pick).collect());
            }
            for row in python.iter().filter(|row| row.size == size) {
                let label = format!("{} {} ({})", row.peer, row.direction, row.start_method);
                let samples = if row.samples.is_empty() {
                    vec![pick((row.msgs_per_s, row.bytes_per_s))]
                } else {
                    row.samples.iter().map(|&msgs| pick((msgs, msgs * size as f64))).collect()
                };
                table.row(Kind::Peer, &label, samples);
            }
        }
    }
}
