//! `build()` checks its configuration and reports a worker that cannot start, with
//! a message that says why; nothing is left running.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::time::Duration;

use common::*;
use procexec::{Error, Executor, WorkerStderr};

/// Tasks whose names clash: a worker must refuse to serve them.
mod clashing {
    pub const A: procexec::Task<u8, u8> = procexec::Task::new("same", |x| x);
    pub const B: procexec::Task<u16, u16> = procexec::Task::new("same", |x| x);
    pub static TASKS: procexec::Registry = procexec::Registry::new(&[&A, &B]);
}

#[test]
fn clashing_worker() {
    procexec::init_worker(&clashing::TASKS);
}

fn start_error(result: procexec::Result<Executor>) -> String {
    match result {
        Err(Error::WorkerStart(err)) => err.to_string(),
        other => panic!("expected a start error, got {other:?}"),
    }
}

#[tokio::test]
async fn sizes_out_of_range_are_config_errors() {
    let builder = || Executor::builder().test_harness();
    for result in [
        builder().processes(0).build().await,
        builder().processes(100_000).build().await,
        builder().processes(2).min_processes(3).build().await,
        builder().max_frame_len(10).build().await,
        builder().pipe_capacity(1).build().await,
        builder().handshake_timeout(Duration::ZERO).build().await,
    ] {
        assert!(matches!(result, Err(Error::Config { .. })), "{result:?}");
    }
}

#[test]
fn build_outside_a_runtime_is_a_config_error() {
    let result = futures::executor::block_on(Executor::builder().test_harness().build());
    assert!(
        matches!(&result, Err(Error::Config(message)) if message.contains("Tokio runtime")),
        "{result:?}"
    );
}

/// Runtimes that lack the IO driver, the time driver, and both, with what each lacks.
fn runtimes_without_drivers() -> [(tokio::runtime::Runtime, &'static str); 3] {
    let runtime = |io: bool, time: bool| {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        if io {
            builder.enable_io();
        }
        if time {
            builder.enable_time();
        }
        builder.build().unwrap()
    };
    [
        (runtime(false, true), "lacks the IO driver"),
        (runtime(true, false), "lacks the time driver"),
        (runtime(false, false), "lacks the IO and time drivers"),
    ]
}

fn build_on(runtime: &tokio::runtime::Runtime) -> procexec::Result<Executor> {
    runtime.block_on(Executor::builder().test_harness().processes(1).build())
}

#[test]
fn build_on_a_runtime_without_io_or_time_is_a_config_error_naming_what_is_missing() {
    for (runtime, missing) in runtimes_without_drivers() {
        match build_on(&runtime) {
            Err(Error::Config(message)) => {
                assert!(message.contains(missing), "{message}");
                assert!(message.contains("enable_all()"), "{message}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}

#[test]
fn driver_probe_helper() {
    if !is_helper("driver_probe_helper") {
        return;
    }
    for (runtime, _) in runtimes_without_drivers() {
        assert!(build_on(&runtime).is_err_and(|err| err.is_config()));
    }
    // Panics elsewhere still reach the panic hook that was there before.
    let _ = std::panic::catch_unwind(|| panic!("a panic outside the probe"));
    println!("OK");
}

#[test]
fn probing_the_runtime_for_its_drivers_prints_no_panic_and_keeps_the_panic_hook() {
    let output = start_helper("driver_probe_helper").wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && stdout.contains("OK"), "{stdout}\n{stderr}");
    assert!(stderr.contains("a panic outside the probe"), "{stderr}");
    assert_eq!(stderr.matches("panicked").count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_missing_program_is_reported() {
    let message = start_error(Executor::builder().program("/no/such/worker").build().await);
    assert!(message.contains("/no/such/worker") && message.contains("cannot be found"), "{message}");
}

#[tokio::test]
async fn a_program_that_is_not_executable_is_reported() {
    let path = std::env::temp_dir().join(format!("procexec-not-executable-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\n").unwrap();
    let message = start_error(Executor::builder().program(&path).build().await);
    std::fs::remove_file(&path).unwrap();
    assert!(message.contains("not executable"), "{message}");
}

#[tokio::test]
async fn a_program_that_is_not_a_worker_is_reported() {
    hang_guard(async {
        let message = start_error(Executor::builder().program("/bin/true").processes(2).build().await);
        assert!(message.contains("exited before the handshake"), "{message}");
        assert!(message.contains("serve_worker"), "{message}");
        assert!(message.contains("exit code 0"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn a_worker_that_never_answers_times_out_and_is_killed() {
    hang_guard(async {
        let result = Executor::builder()
            .program("/bin/sleep")
            .arg("600")
            .processes(1)
            .handshake_timeout(Duration::from_millis(500))
            .build()
            .await;
        let message = start_error(result);
        assert!(message.contains("no handshake within 500ms"), "{message}");
        assert!(message.contains("SIGKILL"), "{message}");
        let sleeping = |pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"/bin/sleep\x00600\x00")
        };
        assert!(!children_of(std::process::id()).iter().any(|pid| alive(*pid) && sleeping(pid)));
    })
    .await;
}

#[tokio::test]
async fn a_test_binary_without_the_worker_test_is_reported_with_a_hint() {
    hang_guard(async {
        // `--list` makes the harness print its tests and exit: no worker ever starts.
        let exe = std::env::current_exe().unwrap();
        let message = start_error(Executor::builder().program(exe).arg("--list").processes(1).build().await);
        assert!(message.contains("exited before the handshake"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn a_registry_with_clashing_names_is_refused_by_the_worker() {
    hang_guard(async {
        let result = Executor::builder()
            .program(std::env::current_exe().unwrap())
            .args_for_test("clashing_worker")
            .stderr(WorkerStderr::Discard)
            .processes(1)
            .build()
            .await;
        let message = start_error(result);
        assert!(message.contains("two tasks are named `same`"), "{message}");
        assert!(message.contains("exit code 3"), "{message}");
    })
    .await;
}

trait ArgsForTest {
    fn args_for_test(self, test: &str) -> Self;
}

impl ArgsForTest for procexec::Builder {
    fn args_for_test(self, test: &str) -> Self {
        self.arg(test).arg("--exact").arg("--nocapture").arg("-q")
    }
}

#[tokio::test]
async fn a_worker_of_an_older_protocol_is_refused_at_the_handshake_naming_both_versions() {
    // A stand-in for a worker built with procexec's protocol 1: its preamble, then a
    // `Ready` of that version's shape (variant 0, version 1, pid 5, no task), then it
    // waits for requests.
    let stale = r"printf '\000PRCXC1\n\000\000\000\004\000\001\005\000'; exec cat >/dev/null";
    let build = Executor::builder().program("/bin/sh").arg("-c").arg(stale).processes(1).build();
    let err = hang_guard(build).await.unwrap_err();
    let message = err.to_string();
    assert!(err.is_worker_start(), "{message}");
    assert!(
        message.contains("protocol version 1") && message.contains("this procexec speaks 5"),
        "{message}"
    );
}
