//! Shared by the integration tests: finding the companion worker, building an
//! executor on it, and guarding against hangs.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use procexec::{Executor, WorkerStderr};

/// The companion worker binary, next to the test binaries' directory.
///
/// Cargo builds a dependency's library for tests but not its binaries, so the first
/// call builds (or freshens) it with the same profile: a stale worker would answer
/// with yesterday's task table.
pub fn worker_program() -> PathBuf {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("the test binary's path");
            // target/<profile>/deps/<test> -> target/<profile>/procexec-worker
            let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
            let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into()));
            build.args(["build", "--quiet", "-p", "procexec-worker"]).current_dir(env!("CARGO_MANIFEST_DIR"));
            if dir.file_name().is_some_and(|profile| profile == "release") {
                build.arg("--release");
            }
            let output = build.output().expect("cargo runs");
            assert!(
                output.status.success(),
                "cannot build the worker: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let program = dir.join("procexec-worker");
            assert!(program.exists(), "{} is missing after the build", program.display());
            program
        })
        .clone()
}

/// A builder for `processes` companion workers whose stderr is kept quiet.
pub fn builder(processes: usize) -> procexec::Builder {
    Executor::builder().program(worker_program()).processes(processes).stderr(WorkerStderr::Discard)
}

/// An executor of `processes` companion workers whose stderr is kept quiet.
pub async fn executor(processes: usize) -> Executor {
    builder(processes).build().await.expect("the executor starts")
}

/// A path in the temporary directory unique to this process and `name`, removed first.
pub fn marker(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("procexec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Fails the test instead of hanging it; generous, so load never trips it.
pub async fn hang_guard<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), future).await.expect("the test hung")
}

/// Process ids of every process whose parent is `parent`, read from `/proc`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, _)) = stat(pid) {
            if ppid == parent {
                children.push(pid);
            }
        }
    }
    children
}

/// `(parent pid, state)` of a process, or `None` once it is gone.
pub fn stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after it.
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Whether `pid` is a live process (neither gone nor a zombie).
pub fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((_, state)) if state != 'Z')
}

/// Waits (polling, with a hang guard) until `condition` holds.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Environment variable naming the helper a re-executed test binary should run.
pub const HELPER_ENV: &str = "PROCEXEC_TEST_HELPER";

/// Whether this process is the re-executed test binary running helper `name`.
pub fn is_helper(name: &str) -> bool {
    std::env::var(HELPER_ENV).is_ok_and(|helper| helper == name)
}

/// A command that runs this test binary again, only the test `name`, as a helper
/// process (which checks [`is_helper`]), with piped stdout and no stderr.
pub fn helper_command(name: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the test binary"));
    command
        .args([name, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(HELPER_ENV, name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    command
}

/// Starts helper `name` (see [`helper_command`]) with stderr piped too.
pub fn start_helper(name: &str) -> std::process::Child {
    helper_command(name).stderr(std::process::Stdio::piped()).spawn().expect("the helper starts")
}

/// The pids a helper prints on its first line starting with `prefix`, reading up to it.
pub fn read_pids(lines: &mut impl Iterator<Item = String>, prefix: &str) -> Vec<u32> {
    lines
        .find_map(|line| {
            line.strip_prefix(prefix).map(|list| list.split(' ').map(|p| p.parse().unwrap()).collect())
        })
        .unwrap_or_else(|| panic!("the helper prints a line starting with {prefix:?}"))
}
