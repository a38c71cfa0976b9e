//! W10: the cost of forwarding workers' `tracing` events. W1's map with a task that
//! emits one `debug!` per item, the parent's filter at `info` (the events are never
//! sent: against the same map without them) and at `debug` (every event forwarded
//! and re-emitted: events per second, against a thread emitting the same events
//! into the same subscriber in-process). And what tasks print: calls made one at
//! a time that print nothing, print a line forwarded to the parent (as a `tracing`
//! event), or print a line captured with the result; and what looking at the
//! output after each call costs W1(b).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};

use crate::table::{Better, Kind, Table};
use crate::{Config, executor, per_item, runtime, timed_async};

const ITEMS: u64 = 100_000;

/// The bench's subscriber: counts events at or above a level that can change.
struct Counting;

/// 3 info, 4 debug.
static LEVEL: AtomicU8 = AtomicU8::new(3);
static EVENTS: AtomicU64 = AtomicU64::new(0);

fn number(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 1,
        tracing::Level::WARN => 2,
        tracing::Level::INFO => 3,
        tracing::Level::DEBUG => 4,
        tracing::Level::TRACE => 5,
    }
}

impl Subscriber for Counting {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.enabled(metadata) { Interest::always() } else { Interest::never() }
    }
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        number(metadata.level()) <= LEVEL.load(Ordering::Relaxed)
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(if LEVEL.load(Ordering::Relaxed) >= 4 {
            tracing::level_filters::LevelFilter::DEBUG
        } else {
            tracing::level_filters::LevelFilter::INFO
        })
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {
        EVENTS.fetch_add(1, Ordering::Relaxed);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
    tracing::callsite::rebuild_interest_cache();
}

/// The task: W1's `double`, printing one line.
pub fn double_printed(x: u64) -> u64 {
    println!("doubling {x}");
    2 * x
}

/// The task: W1's `double`, with one `debug!` event.
pub fn double_logged(x: u64) -> u64 {
    tracing::debug!(x, "doubling");
    2 * x
}

pub fn w10(config: &Config, table: &mut Table) {
    if tracing::subscriber::set_global_default(Counting).is_err() {
        eprintln!("note: W10 needs its own global subscriber; another is set, W10 skipped");
        return;
    }
    table.workload(
        "W10a",
        "W10 tracing: W1 map, one debug! per item, parent's filter at info",
        "µs/task",
        Better::Lower,
    );
    set_level(3);
    for (label, logged) in [
        ("procexec map, no event, current-thread", false),
        ("procexec map, debug! per item filtered out, current-thread", true),
    ] {
        if !config.wants(label) {
            continue;
        }
        let samples = runtime(false).block_on(async {
            let exec = executor().await;
            let run = || async {
                let out = if logged {
                    exec.map(crate::double_logged, 0..ITEMS).await.unwrap()
                } else {
                    exec.map(crate::double, 0..ITEMS).await.unwrap()
                };
                assert_eq!(out.len() as u64, ITEMS);
            };
            run().await; // warm-up
            let samples = timed_async(config.reps, run).await;
            exec.shutdown().await;
            samples
        });
        table.row(Kind::Procexec, label, per_item(&samples, ITEMS));
    }

    table.workload(
        "W10b",
        "W10 tracing: every debug! forwarded (filter at debug)",
        "events/s",
        Better::Higher,
    );
    set_level(4);
    let label = "procexec: workers' events re-emitted in the parent, current-thread";
    if config.wants(label) {
        let samples = runtime(false).block_on(async {
            let exec = executor().await;
            let mut samples = Vec::new();
            for _ in 0..config.reps {
                let before = EVENTS.load(Ordering::Relaxed);
                let start = std::time::Instant::now();
                exec.map(crate::double_logged, 0..ITEMS).await.unwrap();
                let events = EVENTS.load(Ordering::Relaxed) - before;
                assert!(events >= ITEMS, "every event arrived ({events})");
                samples.push(events as f64 / start.elapsed().as_secs_f64());
            }
            let stats = exec.stats();
            eprintln!("    forwarded {} records, dropped {}", stats.log_records, stats.log_records_dropped);
            exec.shutdown().await;
            samples
        });
        table.row(Kind::Procexec, label, samples);
    }
    let label = "one thread emitting the same events in-process";
    if config.wants(label) {
        let samples: Vec<f64> = (0..config.reps)
            .map(|_| {
                let start = std::time::Instant::now();
                std::thread::spawn(|| (0..ITEMS).map(double_logged).sum::<u64>()).join().unwrap();
                ITEMS as f64 / start.elapsed().as_secs_f64()
            })
            .collect();
        table.row(Kind::InProcess, label, samples);
    }
    set_level(3);
    printing(config, table);
    attributing(config, table);
}

const PRINTING_CALLS: u64 = 20_000;

const W1B_CALLS: u64 = 100_000;

/// W10d: W1(b)'s spawns (all at once, awaited in order), printing nothing, with
/// output attributed to each call (a read of the pipe per call) and without.
fn attributing(config: &Config, table: &mut Table) {
    table.workload("W10d", "W10 printing: W1(b), 100,000 spawns of a silent task", "µs/task", Better::Lower);
    for (label, stderr) in [
        ("output discarded: not looked at per call, current-thread", procexec::WorkerStderr::Discard),
        ("output forwarded: looked at after each call, current-thread", procexec::WorkerStderr::Forward),
    ] {
        if !config.wants(label) {
            continue;
        }
        let samples = runtime(false).block_on(async {
            let exec =
                procexec::Executor::builder().processes(2).stderr(stderr).build().await.expect("starts");
            exec.map(crate::double, 0..10_000u64).await.unwrap();
            let samples = timed_async(config.reps, || async {
                let handles: Vec<_> = (0..W1B_CALLS).map(|i| exec.spawn(crate::double, i)).collect();
                for (i, handle) in handles.into_iter().enumerate() {
                    assert_eq!(handle.await.unwrap(), 2 * i as u64);
                }
            })
            .await;
            exec.shutdown().await;
            samples
        });
        table.row(Kind::Procexec, label, per_item(&samples, W1B_CALLS));
    }
}

/// W10c: calls one at a time (each waits for the last), printing nothing or a line.
fn printing(config: &Config, table: &mut Table) {
    table.workload("W10c", "W10 printing: spawn one call at a time", "µs/call", Better::Lower);
    for (label, printed, captured) in [
        ("prints nothing, current-thread", false, false),
        ("one println! forwarded (to tracing), current-thread", true, false),
        ("one println! captured (spawn_captured), current-thread", true, true),
    ] {
        if !config.wants(label) {
            continue;
        }
        let samples = runtime(false).block_on(async {
            let exec = procexec::Executor::builder()
                .processes(2)
                .stderr(procexec::WorkerStderr::Tracing)
                .build()
                .await
                .expect("the executor starts");
            let run = || async {
                for x in 0..PRINTING_CALLS {
                    let doubled = match (printed, captured) {
                        (false, _) => exec.spawn(crate::double, x).await.unwrap(),
                        (true, false) => exec.spawn(crate::double_printed, x).await.unwrap(),
                        (true, true) => {
                            let captured = exec.spawn_captured(crate::double_printed, x).await;
                            assert_eq!(captured.stdout.len(), format!("doubling {x}\n").len());
                            captured.result.unwrap()
                        }
                    };
                    assert_eq!(doubled, 2 * x);
                }
            };
            run().await; // warm-up
            let before = EVENTS.load(Ordering::Relaxed);
            let samples = timed_async(config.reps, run).await;
            let forwarded = EVENTS.load(Ordering::Relaxed) - before;
            if printed && !captured {
                assert!(forwarded >= PRINTING_CALLS * config.reps as u64, "every line arrived ({forwarded})");
            }
            exec.shutdown().await;
            samples
        });
        table.row(Kind::Procexec, label, per_item(&samples, PRINTING_CALLS));
    }
}
