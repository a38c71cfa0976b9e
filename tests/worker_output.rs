//! A task's prints never touch the protocol; worker stderr reaches the parent,
//! labelled with the worker's slot and pid.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use procexec::{Executor, WorkerStderr};
use procexec_worker::*;

#[tokio::test]
async fn println_in_a_task_does_not_corrupt_the_protocol() {
    hang_guard(async {
        let exec = executor(2).await;
        let texts: Vec<String> = (0..2000).map(|i| format!("line {i} {}", "x".repeat(i % 50))).collect();
        let lengths = exec.map(print, texts.clone()).await.unwrap();
        assert_eq!(lengths, texts.iter().map(|t| t.len() as u64).collect::<Vec<_>>());
    })
    .await;
}

#[test]
fn forwarding_helper() {
    if !is_helper("forwarding_helper") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let exec = Executor::builder().test_harness().processes(1).build().await.unwrap();
        let worker = exec.spawn(pid, ()).await.unwrap();
        exec.spawn(print, "hello from a task".into()).await.unwrap();
        exec.shutdown().await;
        println!("WORKER {worker}");
    });
}

#[test]
fn worker_stderr_and_prints_are_forwarded_with_slot_and_pid() {
    let mut helper = start_helper("forwarding_helper");
    let (mut stdout, mut stderr) = (String::new(), String::new());
    helper.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    helper.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(helper.wait().unwrap().success(), "{stdout}\n{stderr}");
    let worker =
        stdout.lines().find_map(|line| line.strip_prefix("WORKER ")).expect("the helper reports its worker");
    let prefix = format!("[procexec worker 0 pid {worker}]");
    assert!(stderr.contains(&format!("{prefix} stdout: hello from a task\n")), "{stderr}");
    assert!(stderr.contains(&format!("{prefix} stderr: hello from a task\n")), "{stderr}");
    assert!(!stdout.contains("hello from a task"), "a task's stdout goes to stderr: {stdout}");
}

#[test]
fn unread_stderr_helper() {
    if !is_helper("unread_stderr_helper") {
        return;
    }
    // Fill this process's stderr first, from a thread that then stays blocked on
    // it: from here on, every write to stderr blocks.
    let stderr = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
    std::thread::spawn(move || std::fs::File::from(stderr).write_all(&vec![b'.'; 1 << 20]));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let exec = builder(2).stderr(WorkerStderr::Forward).build().await.unwrap();
        // More than the pipes hold: it never finishes, and its worker waits on stderr.
        let _flood = exec.spawn(flood_stderr, 1 << 20);
        for x in 0..100 {
            assert_eq!(exec.spawn(square, x).await.unwrap(), x * x);
        }
        println!("OK");
    });
}

#[test]
fn a_stderr_nobody_reads_stalls_the_forwarding_but_not_the_runtime() {
    let mut helper = helper_command("unread_stderr_helper").stderr(Stdio::piped()).spawn().unwrap();
    let stdout = helper.stdout.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    // Hang guard: a stalled helper never prints OK.
    let said_ok = loop {
        match lines.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line == "OK" => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    // Its stderr (still held, never read) may keep it from ending by itself.
    let _ = helper.kill();
    let _ = helper.wait();
    assert!(said_ok, "the helper's runtime stalled behind its stderr, or the helper failed");
}

/// Collects the messages of `procexec::worker` events.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Lines {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "procexec::worker"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                let _ = write!(self.0, "{}={:?} ", field.name(), value);
            }
        }
        let mut line = String::new();
        event.record(&mut Message(&mut line));
        self.0.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn worker_stderr_can_go_to_tracing() {
    let lines = Lines::default();
    let _guard = tracing::subscriber::set_default(lines.clone());
    // A current-thread runtime: the forwarder runs on this thread, under the guard.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(hang_guard(async {
        let exec = Executor::builder()
            .test_harness()
            .processes(1)
            .stderr(WorkerStderr::Tracing)
            .build()
            .await
            .unwrap();
        let worker = exec.spawn(pid, ()).await.unwrap();
        exec.spawn(print, "traced".into()).await.unwrap();
        exec.shutdown().await;
        let lines = lines.0.lock().unwrap();
        let expected = format!("message=stderr: traced worker=0 pid={worker} ");
        assert!(lines.contains(&expected), "{lines:?}");
    }));
}

#[tokio::test]
async fn a_grandchild_holding_stderr_neither_delays_nor_outlives_a_crash() {
    hang_guard(async {
        let exec = executor(1).await;
        let grandchild = exec.spawn(start_grandchild, 600).await.unwrap();
        assert!(alive(grandchild));
        let started = std::time::Instant::now();
        assert!(exec.spawn(abort, ()).await.unwrap_err().is_worker_crash());
        // Generous bound: the point is "not until the grandchild's 600 s sleep ends".
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        eventually("the grandchild is killed with its worker's process group", || !alive(grandchild)).await;
        assert_eq!(exec.spawn(square, 4).await.unwrap(), 16);
    })
    .await;
}

#[test]
fn unfinished_print_helper() {
    if !is_helper("unfinished_print_helper") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let exec = Executor::builder().test_harness().processes(1).build().await.unwrap();
        let worker = exec.spawn(pid, ()).await.unwrap();
        exec.spawn(print_unfinished, "no newline yet".into()).await.unwrap();
        exec.shutdown().await;
        println!("WORKER {worker}");
        println!("EXITS {}", exec.stats().recent_exits.len());
    });
}

#[test]
fn a_worker_stopped_by_shutdown_exits_normally_and_flushes_what_tasks_left_buffered() {
    let mut helper = start_helper("unfinished_print_helper");
    let (mut stdout, mut stderr) = (String::new(), String::new());
    helper.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    helper.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(helper.wait().unwrap().success(), "{stdout}\n{stderr}");
    let worker =
        stdout.lines().find_map(|line| line.strip_prefix("WORKER ")).expect("the helper reports its worker");
    // A killed worker would have lost the line still in its stdout buffer.
    assert!(stderr.contains(&format!("[procexec worker 0 pid {worker}] no newline yet\n")), "{stderr}");
    assert!(stdout.contains("EXITS 0"), "a normal stop is no exit to report: {stdout}");
}
