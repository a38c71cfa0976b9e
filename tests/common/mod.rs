//! Shared by the integration tests: building an executor whose workers are the
//! test binary itself, helper processes, and guarding against hangs.
//!
//! Each test file serves `procexec_worker::TASKS` with its own
//! `procexec::test_worker!` (not here: a file with tasks of its own serves those
//! instead, and the worker filter must match exactly one test per binary).
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use procexec::{Executor, WorkerStderr};

/// A builder for `processes` workers (this test binary, re-run through its
/// `test_worker!` test) whose stderr is kept quiet.
pub fn builder(processes: usize) -> procexec::Builder {
    Executor::builder().test_harness().processes(processes).stderr(WorkerStderr::Discard)
}

/// An executor of `processes` workers (see [`builder`]) whose stderr is kept quiet.
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

/// The harness re-runs the test binary with a name filter that must select exactly
/// one test: a second `test_worker!` (another module's) would serve first or instead.
#[test]
fn this_test_binary_has_exactly_one_worker_test() {
    let output = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["procexec_test_worker", "--list"])
        .output()
        .expect("the test binary lists its tests");
    let listing = String::from_utf8_lossy(&output.stdout);
    let workers: Vec<_> = listing.lines().filter(|line| line.ends_with(": test")).collect();
    assert_eq!(workers.len(), 1, "{listing}");
}
