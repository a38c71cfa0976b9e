//! The tasks the companion worker binary serves: the ones procexec's own tests,
//! examples and benchmarks call. Some misbehave on purpose.
//!
//! A real worker is this file with real tasks in it, plus a one-line `main`.

use std::time::Duration;

use procexec::WorkerState;
use serde_bytes::ByteBuf;

/// Set by the `set_greeting` initializer in each worker.
static GREETING: WorkerState<String> = WorkerState::new();

procexec::tasks! {
    /// `x * x`.
    pub fn square(x: u64) -> u64 { x * x }

    /// `2 * x`: the tiniest task.
    pub fn double(x: u64) -> u64 { 2 * x }

    /// Sleeps, then returns its argument.
    pub fn sleep_ms(ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    /// Returns its input unchanged: for payload tests.
    pub fn echo(data: ByteBuf) -> ByteBuf { data }

    /// Returns a buffer of `len` bytes.
    pub fn make_bytes(len: u64) -> ByteBuf { ByteBuf::from(vec![7u8; len as usize]) }

    /// This worker's process id.
    pub fn pid() -> u32 { std::process::id() }

    /// Sleeps, then returns this worker's process id.
    pub fn sleep_then_pid(ms: u64) -> u32 {
        std::thread::sleep(Duration::from_millis(ms));
        std::process::id()
    }

    /// Parses a number, panicking with the text when it is not one.
    pub fn panic_unless_number(text: String) -> u64 {
        text.parse().unwrap_or_else(|_| panic!("{text}"))
    }

    /// Panics with `message`.
    pub fn panic_with(message: String) -> u64 { panic!("{message}") }

    /// Aborts the worker (SIGABRT).
    pub fn abort() -> u64 { std::process::abort() }

    /// Exits the worker with `code`.
    pub fn exit_with(code: i32) -> u64 { std::process::exit(code) }

    /// Kills the worker with SIGKILL.
    pub fn kill_self() -> u64 {
        // SAFETY: kill(2) on our own pid touches no memory.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILL is not caught")
    }

    /// Recurses until the stack overflows.
    pub fn overflow_stack(depth: u64) -> u64 { recurse(depth) }

    /// Dereferences a null pointer: a segfault.
    pub fn segfault() -> u64 {
        // SAFETY: none: the point is to crash. A volatile read is not optimised away.
        unsafe { std::ptr::read_volatile(std::ptr::null::<u64>()) }
    }

    /// Prints `text` to stdout and to stderr, then returns its length.
    pub fn print(text: String) -> u64 {
        println!("stdout: {text}");
        eprintln!("stderr: {text}");
        text.len() as u64
    }

    /// Writes `bytes` bytes to stderr in lines of 100, then returns how many it wrote.
    pub fn flood_stderr(bytes: u64) -> u64 {
        use std::io::Write;
        let line = format!("{}\n", "e".repeat(99));
        let mut stderr = std::io::stderr().lock();
        let mut written = 0;
        while written < bytes {
            stderr.write_all(line.as_bytes()).expect("stderr is writable");
            written += line.len() as u64;
        }
        written
    }

    /// Prints `count` numbered lines starting with `prefix`, odd ones to stderr,
    /// even ones to stdout, and returns `count`.
    pub fn print_lines(prefix: String, count: u32) -> u32 {
        for i in 0..count {
            if i % 2 == 0 {
                println!("{prefix} {i}");
            } else {
                eprintln!("{prefix} {i}");
            }
        }
        count
    }

    /// Prints `text` to stdout, then waits (up to a minute) until a file exists at
    /// `path`: whoever creates it saw the line while the call still ran.
    pub fn print_then_wait(text: String, path: String) -> bool {
        println!("{text}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !std::path::Path::new(&path).exists() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Runs `sh -c script` with the worker's stdout and stderr, returning its exit code.
    pub fn shell(script: String) -> i32 {
        let status = std::process::Command::new("sh").arg("-c").arg(script).status().expect("sh runs");
        status.code().unwrap_or(-1)
    }

    /// Prints `text` and a newline to stdout through C's stdio (`printf`), which
    /// buffers it when stdout is not a terminal.
    pub fn c_printf(text: String) {
        #[cfg(unix)]
        {
            let text = std::ffi::CString::new(text).expect("no NUL in the text");
            // SAFETY: a NUL-terminated format string and one C string argument.
            unsafe { libc::printf(c"%s\n".as_ptr(), text.as_ptr()) };
        }
    }

    /// Prints `before` to stderr, waits `ms`, points stderr at `/dev/null` for `ms`
    /// (as crates that silence a noisy library do), points it back, and prints
    /// `after`.
    pub fn silence_stderr_for(before: String, after: String, ms: u64) {
        eprintln!("{before}");
        std::thread::sleep(Duration::from_millis(ms));
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            let null = std::fs::File::options().write(true).open("/dev/null").expect("/dev/null");
            // SAFETY: plain descriptor calls on descriptors this function owns or
            // that stay open (2); `saved` is closed at the end.
            unsafe {
                let saved = libc::dup(2);
                libc::dup2(null.as_raw_fd(), 2);
                std::thread::sleep(Duration::from_millis(ms));
                libc::dup2(saved, 2);
                libc::close(saved);
            }
        }
        eprintln!("{after}");
    }

    /// Writes `text` to stderr, then aborts.
    pub fn complain_and_abort(text: String) -> u64 {
        eprintln!("{text}");
        std::process::abort()
    }

    /// Spins on the CPU for `ms` milliseconds: stands in for real computation.
    pub fn spin_ms(ms: u64) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_millis(ms);
        let mut x = 0u64;
        while std::time::Instant::now() < deadline {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        x
    }

    /// Spins forever.
    pub fn spin_forever() -> u64 {
        loop {
            std::hint::spin_loop();
        }
    }

    /// Same name and shape as a parent-side task with other types (see the tests).
    pub fn typed(x: u32) -> u32 { x }

    /// The length of a point: the tests call it with a type of another name and
    /// the same shape, and with one of another shape.
    pub fn norm(p: Point) -> f64 { (p.x * p.x + p.y * p.y).sqrt() }

    /// Takes an untagged enum, which postcard cannot carry: every call fails
    /// before anything is sent.
    pub fn untagged(n: NumberOrText) -> u64 {
        match n {
            NumberOrText::Number(n) => n,
            NumberOrText::Text(t) => t.len() as u64,
        }
    }

    /// Adds two numbers: a task of several arguments.
    pub fn add(a: i64, b: i64) -> i64 { a + b }

    /// Creates the file at `path`: a side effect a test can look for.
    pub fn touch(path: String) {
        std::fs::write(path, b"touched").expect("the file can be written");
    }

    /// Writes `bytes` straight into the reply pipe, bypassing the protocol, then
    /// returns normally: a task that corrupts the channel.
    pub fn corrupt_replies(bytes: ByteBuf) -> u64 {
        let fd = reply_pipe().expect("the reply pipe is found");
        // SAFETY: `bytes` is a valid buffer of its length; write(2) only reads it.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        written as u64
    }

    /// Creates the file at `path`, then spins forever: a call a test can see start.
    pub fn touch_then_spin(path: String) -> u64 {
        std::fs::write(path, b"started").expect("the file can be written");
        loop {
            std::hint::spin_loop();
        }
    }

    /// Sleeps `ms`, then creates the file at `path`: a call a test can see finish.
    pub fn sleep_then_touch(ms: u64, path: String) {
        std::thread::sleep(Duration::from_millis(ms));
        std::fs::write(path, b"finished").expect("the file can be written");
    }

    /// Spins on the CPU for `us` microseconds.
    pub fn spin_us(us: u64) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_micros(us);
        let mut x = us;
        while std::time::Instant::now() < deadline {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        x
    }

    /// Touches `mb` MiB of fresh memory and returns it: pushes the worker's peak RSS.
    pub fn allocate_mb(mb: u64) -> u64 {
        let block = vec![1u8; (mb as usize) << 20];
        std::hint::black_box(&block);
        mb
    }

    /// Aborts the worker when `x == poison`, else returns `x`.
    pub fn poison_if(x: u64, poison: u64) -> u64 {
        if x == poison {
            std::process::abort();
        }
        x
    }

    /// Prints `text` to stdout without a newline: it stays in the buffer until the
    /// worker exits normally.
    pub fn print_unfinished(text: String) {
        print!("{text}");
    }

    /// Doubles the value, or fails the way its input says (see [`Fault`]).
    pub fn faulty(input: FaultyInput) -> FaultyOutput {
        match input.fault {
            Fault::Panic => panic!("injected: panic"),
            Fault::Abort => std::process::abort(),
            Fault::Exit3 => std::process::exit(3),
            Fault::KillSelf => {
                // SAFETY: kill(2) on our own pid touches no memory.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                unreachable!("SIGKILL is not caught")
            }
            Fault::Segfault => {
                // SAFETY: none: the point is to crash. A volatile read is not optimised away.
                let value = unsafe { std::ptr::read_volatile(std::ptr::null::<u64>()) };
                FaultyOutput { value, fault: Fault::None }
            }
            fault => FaultyOutput { value: 2 * input.value, fault },
        }
    }

    /// Aborts the worker the first time (creating `path`), succeeds afterwards.
    pub fn crash_once(path: String) -> u64 {
        if std::fs::metadata(&path).is_err() {
            std::fs::write(&path, b"crashed once").expect("the file can be written");
            std::process::abort();
        }
        1
    }

    /// Initializer: stores this worker's greeting.
    pub fn set_greeting(greeting: String) { GREETING.set(greeting) }

    /// Greets with the worker's greeting.
    pub fn greet(name: String) -> String { format!("{}, {name}!", GREETING.get()) }

    /// Initializer that panics with `message`.
    pub fn init_panics(message: String) { panic!("{message}") }

    /// Initializer that returns `Err(message)`.
    pub fn init_fails(message: String) -> Result<(), String> { Err(message) }

    /// Initializer that aborts the worker.
    pub fn init_aborts() { std::process::abort() }

    /// Initializer that fails once a file exists at `path`.
    pub fn init_unless_exists(path: String) -> Result<(), String> {
        match std::fs::metadata(&path) {
            Ok(_) => Err(format!("{path} exists")),
            Err(_) => Ok(()),
        }
    }

    /// Writes a length prefix promising more than follows, then aborts: a reply cut
    /// off mid-frame.
    pub fn truncate_reply() -> u64 {
        let fd = reply_pipe().expect("the reply pipe is found");
        let partial = [0u8, 0, 0, 100, 1, 2, 3];
        // SAFETY: `partial` is a valid buffer of its length; write(2) only reads it.
        unsafe { libc::write(fd, partial.as_ptr().cast(), partial.len()) };
        std::process::abort()
    }

    /// The value of environment variable `name` as the worker sees it.
    pub fn env_var(name: String) -> Option<String> { std::env::var(name).ok() }

    /// Runs the worker's own program again with `args` and stdin closed, and returns
    /// its exit code and stdout: a child that took itself for a worker would print
    /// the protocol's preamble there (and end at the closed stdin, not hang).
    pub fn run_own_program(args: Vec<String>) -> (Option<i32>, String) {
        let program = std::env::current_exe().expect("the worker's program");
        let output = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .expect("the worker's program runs again");
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts `sleep <secs>` as a grandchild that inherits the worker's stderr, and
    /// returns its pid.
    pub fn start_grandchild(secs: u64) -> u32 {
        std::process::Command::new("sleep")
            .arg(secs.to_string())
            .spawn()
            .expect("sleep starts")
            .id()
    }
}

/// A point in the plane: the input of [`norm`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// Abscissa.
    pub x: f64,
    /// Ordinate.
    pub y: f64,
}

/// A number, or a text whose length counts: the input of [`untagged`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum NumberOrText {
    /// A number.
    Number(u64),
    /// A text.
    Text(String),
}

/// A way for a call of [`faulty`] to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// None: the call succeeds.
    None,
    /// The task panics.
    Panic,
    /// The worker aborts (SIGABRT).
    Abort,
    /// The worker calls `exit(3)`.
    Exit3,
    /// The worker sends itself SIGKILL.
    KillSelf,
    /// The worker dereferences a null pointer (SIGSEGV).
    Segfault,
    /// The input fails to serialize in the parent.
    InputEncode,
    /// The input fails to deserialize in the worker.
    InputDecode,
    /// The output fails to serialize in the worker.
    OutputEncode,
    /// The output fails to deserialize in the parent.
    OutputDecode,
}

impl Fault {
    /// Every fault, `None` first.
    pub const ALL: [Fault; 10] = [
        Fault::None,
        Fault::Panic,
        Fault::Abort,
        Fault::Exit3,
        Fault::KillSelf,
        Fault::Segfault,
        Fault::InputEncode,
        Fault::InputDecode,
        Fault::OutputEncode,
        Fault::OutputDecode,
    ];

    fn from_u8(byte: u8) -> Option<Fault> {
        Fault::ALL.get(usize::from(byte)).copied()
    }
}

/// The input of [`faulty`]: its serde impls fail when its fault says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultyInput {
    /// What the task doubles.
    pub value: u64,
    /// How the call fails.
    pub fault: Fault,
}

/// The output of [`faulty`]: its serde impls fail when its fault says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultyOutput {
    /// Twice the input's value.
    pub value: u64,
    /// The input's fault.
    pub fault: Fault,
}

fn serialize_faulty<S: serde::Serializer>(
    value: u64,
    fault: Fault,
    fails: Fault,
    s: S,
) -> Result<S::Ok, S::Error> {
    if fault == fails {
        return Err(serde::ser::Error::custom(format!("injected: {fault:?} failure")));
    }
    serde::Serialize::serialize(&(value, fault as u8), s)
}

fn deserialize_faulty<'de, D: serde::Deserializer<'de>>(
    fails: Fault,
    d: D,
) -> Result<(u64, Fault), D::Error> {
    let (value, fault): (u64, u8) = serde::Deserialize::deserialize(d)?;
    let fault = Fault::from_u8(fault).ok_or_else(|| serde::de::Error::custom("no such fault"))?;
    if fault == fails {
        return Err(serde::de::Error::custom(format!("injected: {fault:?} failure")));
    }
    Ok((value, fault))
}

impl serde::Serialize for FaultyInput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_faulty(self.value, self.fault, Fault::InputEncode, s)
    }
}

impl<'de> serde::Deserialize<'de> for FaultyInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (value, fault) = deserialize_faulty(Fault::InputDecode, d)?;
        Ok(FaultyInput { value, fault })
    }
}

impl serde::Serialize for FaultyOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_faulty(self.value, self.fault, Fault::OutputEncode, s)
    }
}

impl<'de> serde::Deserialize<'de> for FaultyOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (value, fault) = deserialize_faulty(Fault::OutputDecode, d)?;
        Ok(FaultyOutput { value, fault })
    }
}

#[allow(unconditional_recursion)] // the point: it never returns
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 512]);
    frame[(depth % 512) as usize].wrapping_add(recurse(depth + 1))
}

/// The worker's private reply pipe: the only write-only pipe other than stderr.
fn reply_pipe() -> Option<i32> {
    let stderr = std::fs::read_link("/proc/self/fd/2").ok()?;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if fd < 3 || target == stderr || !target.to_string_lossy().starts_with("pipe:") {
            continue;
        }
        // SAFETY: F_GETFL reads no memory; a closed fd only yields an error.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags >= 0 && flags & libc::O_ACCMODE == libc::O_WRONLY {
            return Some(fd);
        }
    }
    None
}
