//! A task's prints never touch the protocol; what a worker prints reaches the
//! parent labelled with the worker's slot and pid and the call that printed it, or
//! comes back with the call's result (`spawn_captured`).
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
    // The third call of the executor: `pid` was its second (after the handshake's).
    let prefix = format!("[procexec worker 0 pid {worker} task print call ");
    for stream in ["stdout", "stderr"] {
        let line = stderr.lines().find(|line| line.ends_with(&format!("] {stream}: hello from a task")));
        assert!(line.is_some_and(|line| line.starts_with(&prefix)), "{stderr}");
    }
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

/// Runs `body` with one worker whose output goes to `tracing`, on a current-thread
/// runtime (so the session runs on this thread) under a subscriber that keeps the
/// lines.
fn traced<F, Fut>(builder: procexec::Builder, body: F)
where
    F: FnOnce(Executor, Lines) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let lines = Lines::default();
    let _guard = tracing::subscriber::set_default(lines.clone());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(hang_guard(async {
        let exec = builder.test_harness().processes(1).stderr(WorkerStderr::Tracing).build().await.unwrap();
        body(exec, lines).await
    }));
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
    traced(Executor::builder(), |exec, lines| async move {
        let worker = exec.spawn(pid, ()).await.unwrap();
        exec.spawn(print, "traced".into()).await.unwrap();
        exec.shutdown().await;
        let lines = lines.0.lock().unwrap();
        let traced = lines.iter().find(|line| line.starts_with("message=stderr: traced "));
        let expected = format!("worker=0 pid={worker} task=\"print\" call=");
        assert!(traced.is_some_and(|line| line.contains(&expected)), "{lines:?}");
    });
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
    let prefix = format!("[procexec worker 0 pid {worker} task print_unfinished call ");
    let line = stderr.lines().find(|line| line.ends_with("] no newline yet"));
    assert!(line.is_some_and(|line| line.starts_with(&prefix)), "{stderr}");
    assert!(stdout.contains("EXITS 0"), "a normal stop is no exit to report: {stdout}");
}

#[tokio::test]
async fn captured_output_is_each_calls_own_even_when_calls_run_at_once() {
    hang_guard(async {
        let exec = executor(2).await;
        let handles: Vec<_> =
            (0..200u32).map(|i| exec.spawn_captured(print_lines, (format!("call {i}"), i % 7))).collect();
        for (i, captured) in futures::future::join_all(handles).await.into_iter().enumerate() {
            let count = (i % 7) as u32;
            assert_eq!(*captured.result.as_ref().unwrap(), count);
            let expected = |parity: u32| -> String {
                (0..count).filter(|n| n % 2 == parity).map(|n| format!("call {i} {n}\n")).collect()
            };
            assert_eq!(captured.stdout, expected(0), "call {i}");
            assert_eq!(captured.stderr, expected(1), "call {i}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_crashed_call_captures_what_it_printed_before_it_died() {
    hang_guard(async {
        let exec = executor(1).await;
        let captured = exec.spawn_captured(complain_and_abort, "last words".into()).await;
        let crash = captured.result.as_ref().unwrap_err();
        assert!(crash.is_worker_crash(), "{crash}");
        assert_eq!(captured.stderr, "last words\n");
        // And the crash report quotes it.
        assert!(crash.to_string().contains("last words"), "{crash}");
        assert_eq!(exec.spawn(square, 3).await.unwrap(), 9);
    })
    .await;
}

#[tokio::test]
async fn a_timed_out_call_captures_what_it_printed() {
    hang_guard(async {
        let exec = executor(1).await.with_timeout(Duration::from_millis(300));
        // Its stderr is kept whatever the timing: sent while it ran, or read from the
        // pipe once it was killed.
        let captured = exec.spawn_captured(shell, "echo waiting >&2; exec sleep 60".into()).await;
        assert!(matches!(captured.result, Err(procexec::Error::TimedOut { .. })), "{:?}", captured.result);
        assert_eq!(captured.stderr, "waiting\n");
    })
    .await;
}

#[tokio::test]
async fn programs_a_task_runs_print_into_its_call() {
    hang_guard(async {
        let exec = executor(1).await;
        let captured = exec.spawn_captured(shell, "echo out; echo err >&2; printf partial".into()).await;
        assert_eq!(*captured.result.as_ref().unwrap(), 0);
        assert_eq!(captured.stdout, "out\npartial");
        assert_eq!(captured.stderr, "err\n");
    })
    .await;
}

#[tokio::test]
async fn a_call_that_prints_megabytes_captures_every_byte() {
    hang_guard(async {
        let exec = executor(1).await;
        let captured = exec.spawn_captured(flood_stderr, 5 << 20).await;
        let written = captured.result.unwrap();
        assert_eq!(captured.stderr.len() as u64, written);
        assert!(
            captured
                .stderr
                .as_bytes()
                .split(|&b| b == b'\n')
                .all(|line| line.is_empty() || line == [b'e'; 99])
        );
        // The next call captures only its own.
        let next = exec.spawn_captured(print, "after".into()).await;
        assert_eq!(next.stderr, "stderr: after\n");
    })
    .await;
}

#[test]
fn a_running_calls_lines_arrive_while_it_runs() {
    traced(Executor::builder(), |exec, lines| async move {
        let go = marker("live-line-seen");
        let call = exec.spawn(print_then_wait, ("still running".into(), go.display().to_string()));
        let call = tokio::spawn(call);
        let seen = || lines.0.lock().unwrap().iter().any(|line| line.starts_with("message=still running "));
        eventually("the line printed by the running call", seen).await;
        let line =
            lines.0.lock().unwrap().iter().find(|line| line.starts_with("message=still running ")).cloned();
        assert!(line.is_some_and(|line| line.contains("task=\"print_then_wait\"")));
        std::fs::write(&go, b"").unwrap();
        assert!(call.await.unwrap().unwrap(), "the call saw the file");
        let _ = std::fs::remove_file(go);
    });
}

#[test]
fn forwarded_lines_keep_their_order_across_stdout_and_stderr() {
    traced(Executor::builder(), |exec, lines| async move {
        // Even lines go to stdout, odd ones to stderr.
        assert_eq!(exec.spawn(print_lines, ("ordered".into(), 50)).await.unwrap(), 50);
        exec.shutdown().await;
        let printed: Vec<String> = lines
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| line.strip_prefix("message=ordered "))
            .map(|rest| rest.split(' ').next().unwrap().to_string())
            .collect();
        let expected: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        assert_eq!(printed, expected);
    });
}

#[tokio::test]
async fn what_a_call_captured_is_not_quoted_in_another_calls_crash_report() {
    hang_guard(async {
        let exec = executor(1).await;
        let captured = exec.spawn_captured(print, "kept for its caller".into()).await;
        assert_eq!(captured.stdout, "stdout: kept for its caller\n");
        exec.spawn(print, "shown to everyone".into()).await.unwrap();
        let crash = exec.spawn(complain_and_abort, "last words".into()).await.unwrap_err();
        let report = crash.to_string();
        assert!(report.contains("last words") && report.contains("shown to everyone"), "{report}");
        assert!(!report.contains("kept for its caller"), "{report}");
    })
    .await;
}

// Programs a task runs may open `/dev/stdout` or `/dev/stderr` by name (`>
// /dev/stdout` in dash, `tee /dev/stderr`, `--log-file=/dev/stderr`): that reopens
// the worker's pipe, and what they print is the call's like the rest.
#[tokio::test]
async fn a_program_writing_to_dev_stdout_prints_into_its_call() {
    hang_guard(async {
        let exec = executor(1).await;
        let captured =
            exec.spawn_captured(shell, "echo before; echo middle > /dev/stdout; echo after".into()).await;
        assert_eq!(*captured.result.as_ref().unwrap(), 0);
        assert_eq!(captured.stdout, "before\nmiddle\nafter\n", "{:?}", captured.stdout);
        assert_eq!(captured.stderr, "");
    })
    .await;
}

#[tokio::test]
async fn a_program_writing_to_dev_stderr_prints_into_its_call() {
    hang_guard(async {
        let exec = executor(1).await;
        let first = exec.spawn_captured(shell, "echo first call >&2".into()).await;
        assert_eq!(first.stderr, "first call\n");
        let captured =
            exec.spawn_captured(shell, "echo a >&2; echo out; echo b > /dev/stderr; echo c >&2".into()).await;
        assert_eq!(*captured.result.as_ref().unwrap(), 0);
        assert_eq!(captured.stderr, "a\nb\nc\n", "{:?}", captured.stderr);
        assert_eq!(captured.stdout, "out\n", "{:?}", captured.stdout);
    })
    .await;
}

// An initializer that prints sends an `Output` frame ahead of its `Done`: the
// worker starts all the same.
#[tokio::test]
async fn an_initializer_that_prints_starts_its_worker() {
    hang_guard(async {
        let exec = builder(1).initializer(print_unfinished, "the initializer says hi".into()).build().await;
        let exec = exec.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(exec.spawn(square, 3).await.unwrap(), 9);
    })
    .await;
}

// What a task prints through C's stdio is in its call's output (C buffers it: a
// worker's stdout is a file).
#[tokio::test]
async fn what_a_task_prints_through_c_stdio_is_its_calls() {
    hang_guard(async {
        let exec = executor(1).await;
        let captured = exec.spawn_captured(c_printf, "from C".into()).await;
        assert!(captured.result.is_ok(), "{:?}", captured.result);
        assert_eq!(captured.stdout, "from C\n");
    })
    .await;
}

// A task that points its stderr elsewhere for a while (and back) keeps its call's
// output whole: nothing is sent twice.
#[tokio::test]
async fn pointing_stderr_elsewhere_for_a_while_loses_and_repeats_nothing() {
    hang_guard(async {
        let exec = executor(1).await;
        let call = ("before".to_string(), "after".to_string(), 1200);
        let captured = exec.spawn_captured(silence_stderr_for, call).await;
        assert!(captured.result.is_ok(), "{:?}", captured.result);
        assert_eq!(captured.stderr, "before\nafter\n", "{:?}", captured.stderr);
    })
    .await;
}

// A call's output taken at its end goes out in frames of at most 256 KiB, each cut
// after a newline: the parent takes a frame's last piece for a whole line.
#[test]
fn the_lines_of_a_large_output_are_forwarded_whole() {
    traced(Executor::builder(), |exec, lines| async move {
        let written = exec.spawn(flood_stderr, 2 << 20).await.unwrap();
        exec.shutdown().await;
        let whole = format!("message={} ", "e".repeat(99));
        let lines = lines.0.lock().unwrap();
        let floods: Vec<&String> = lines.iter().filter(|line| line.starts_with("message=e")).collect();
        let broken: Vec<usize> =
            floods.iter().filter(|line| !line.starts_with(&whole)).map(|line| line.len()).collect();
        assert!(broken.is_empty(), "{} of {} lines broken: {broken:?}", broken.len(), written / 100);
    });
}

// A wrapper that passes the worker's stderr through a pipe of its own (as `docker
// exec -i` does): what its calls print is still forwarded while it lives.
#[test]
fn output_behind_a_piping_wrapper_is_forwarded_while_the_worker_lives() {
    traced(
        Executor::builder().worker_wrapper(["sh", "-c", r#"{ "$@" 2>&1 1>&3 3>&- | cat >&2; } 3>&1"#, "sh"]),
        |exec, lines| async move {
            exec.spawn(print, "through a wrapper".into()).await.unwrap();
            // The wrapper's `cat` and the worker both read that pipe: the line comes
            // labelled with its call, or through the wrapper, with the worker only.
            let seen = || lines.0.lock().unwrap().iter().any(|line| line.contains("through a wrapper"));
            eventually("the line, while the worker lives", seen).await;
            exec.shutdown().await;
        },
    );
}

// A worker under a file size limit (from a wrapper, or its own `main`) prints as
// any other: what it prints goes through pipes, not into a file.
#[tokio::test]
async fn a_worker_under_a_file_size_limit_of_its_own_can_print() {
    if std::process::Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: no prlimit");
        return;
    }
    hang_guard(async {
        let exec = builder(1).worker_wrapper(["prlimit", "--fsize=1073741824", "--"]).build().await.unwrap();
        let printed = exec.spawn(print, "under a limit".into()).await;
        assert!(printed.is_ok(), "{printed:?}");
    })
    .await;
}

// A running call's line without a newline, megabytes long (a progress bar that
// redraws with `\r` looks alike): it goes out in pieces while the call runs,
// nothing waits for a newline that does not come, and the capture has every byte.
#[tokio::test]
async fn a_running_calls_long_unfinished_line_neither_blocks_nor_loses_a_byte() {
    hang_guard(async {
        let exec = executor(1).await;
        let script = "printf 'line\\n'; head -c 3000000 /dev/zero | tr '\\0' x; printf '\\r'; echo end";
        let captured = exec.spawn_captured(shell, script.into()).await;
        assert_eq!(*captured.result.as_ref().unwrap(), 0);
        let stdout = captured.stdout.as_bytes();
        assert_eq!(stdout.len(), 5 + 3_000_000 + 5, "{:?}", &stdout[..stdout.len().min(80)]);
        assert!(stdout.starts_with(b"line\n") && stdout.ends_with(b"x\rend\n"));
        assert!(stdout[5..5 + 3_000_000].iter().all(|&b| b == b'x'));
    })
    .await;
}

// Discarded output is not read at each call's end (that costs a read per call),
// but a captured call still gets exactly its own.
#[tokio::test]
async fn with_output_discarded_a_captured_call_still_gets_exactly_its_own() {
    hang_guard(async {
        let exec = builder(1).stderr(WorkerStderr::Discard).build().await.unwrap();
        for round in 0..20 {
            exec.spawn(print, format!("discarded {round}")).await.unwrap();
            let captured = exec.spawn_captured(print, format!("kept {round}")).await;
            assert_eq!(captured.stdout, format!("stdout: kept {round}\n"));
            assert_eq!(captured.stderr, format!("stderr: kept {round}\n"));
        }
    })
    .await;
}
