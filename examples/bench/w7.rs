//! W7: channels between processes. A queue's messages per second (64-byte items)
//! and bytes per second (64 KiB items), worker -> parent, parent -> worker and
//! worker -> worker, against Python's multiprocessing Queue and Pipe doing the
//! same (channels.py) and the raw-pipe limit (chan_raw.rs); and a streaming task
//! against `map` over the same items.

use std::time::Duration;

use futures::TryStreamExt;
use procexec::{Blob, Executor, Queue, Sender};

use crate::chan_raw::{self, Direction};
use crate::table::{Better, Kind, Table};
use crate::{Config, executor, per_item, runtime, timed_async};

/// Puts `count` copies of a `size`-byte item.
pub fn produce(queue: Queue<Blob>, count: u64, size: usize) {
    let item = Blob::from(vec![7u8; size]);
    for _ in 0..count {
        queue.blocking_put(item.clone()).expect("the queue is open");
    }
}

/// Takes items until the queue is closed and empty; returns how many bytes came.
pub fn consume(queue: Queue<Blob>) -> u64 {
    queue.iter().map(|item| item.expect("an item decodes").len() as u64).sum()
}

/// Sends `2 * i` for every `i` below `count`.
pub fn doubles(count: u64, out: Sender<u64>) {
    for i in 0..count {
        out.blocking_send(2 * i).expect("the stream is read");
    }
}

/// Sends `count` results of `iterations` steps of work each.
pub fn works(count: u64, iterations: u64, out: Sender<u64>) {
    for _ in 0..count {
        out.blocking_send(crate::work(iterations)).expect("the stream is read");
    }
}

const SIZES: [(usize, u64); 2] = [(64, 200_000), (64 * 1024, 20_000)];
const STREAM_ITEMS: u64 = 100_000;
/// Items of about 1.5 µs of work each.
const WORK_ITEMS: u64 = 20_000;
const WORK_ITERATIONS: u64 = 10_000;

/// One figure per sample: messages per second for small items, MB/s for large.
fn figure(size: usize, count: u64, sample: Duration) -> f64 {
    let msgs = count as f64 / sample.as_secs_f64();
    if size < 1024 { msgs } else { msgs * size as f64 / 1e6 }
}

async fn one_way(exec: &Executor, direction: &str, count: u64, size: usize) {
    let queue = exec.queue::<Blob>(256);
    match direction {
        "worker->parent" => {
            let producer = exec.spawn(crate::produce, (queue.clone(), count, size));
            for _ in 0..count {
                queue.get().await.unwrap().expect("an item");
            }
            producer.await.unwrap();
        }
        "parent->worker" => {
            let consumer = exec.spawn(crate::consume, queue.clone());
            let item = Blob::from(vec![7u8; size]);
            for _ in 0..count {
                queue.put(item.clone()).await.unwrap();
            }
            queue.close();
            assert_eq!(consumer.await.unwrap(), count * size as u64);
        }
        _ => {
            let consumer = exec.spawn(crate::consume, queue.clone());
            let producer = exec.spawn(crate::produce, (queue.clone(), count, size));
            producer.await.unwrap();
            queue.close();
            assert_eq!(consumer.await.unwrap(), count * size as u64);
        }
    }
}

pub fn w7(config: &Config, table: &mut Table) {
    let quick = config.reps < 5;
    let python = if config.wants("python") { chan_raw::python_channels(quick) } else { Vec::new() };
    for (size, count) in SIZES {
        let count = if quick { count / 10 } else { count };
        let (id, unit) = if size < 1024 { ("W7a", "msgs/s") } else { ("W7b", "MB/s") };
        let name = format!("W7 channels: {size}-byte items through a queue between processes");
        table.workload(id, &name, unit, Better::Higher);
        for direction in ["worker->parent", "parent->worker", "worker->worker"] {
            let label = format!("procexec Queue {direction}, current-thread");
            if !config.wants(&label) {
                continue;
            }
            let samples = runtime(false).block_on(async {
                let exec = executor().await;
                one_way(&exec, direction, count / 10, size).await; // warm-up
                let samples = timed_async(config.reps, || one_way(&exec, direction, count, size)).await;
                exec.shutdown().await;
                samples
            });
            table.row(Kind::Procexec, &label, samples.iter().map(|&s| figure(size, count, s)).collect());
        }
        for row in python.iter().filter(|row| row.size == size) {
            let label = format!("{} {} ({})", row.peer, row.direction, row.start_method);
            let pick = |msgs: f64| if size < 1024 { msgs } else { msgs * size as f64 / 1e6 };
            let samples = if row.samples.is_empty() {
                vec![pick(row.msgs_per_s)]
            } else {
                row.samples.iter().copied().map(pick).collect()
            };
            table.row(Kind::Peer, &label, samples);
        }
        for direction in [Direction::ChildToParent, Direction::ParentToChild] {
            let label = format!("raw pipes, one write per message, {}", direction.label());
            if !config.wants(&label) {
                continue;
            }
            let raw_count = chan_raw::default_count(size, quick);
            let samples = chan_raw::raw_messages(size, raw_count, direction, config.reps);
            table.row(
                Kind::Limit,
                &label,
                samples.iter().map(|&s| figure(size, raw_count as u64, s)).collect(),
            );
        }
    }
    let name = "W7 streaming: 100,000 items i -> 2*i from one streaming task, against map";
    table.workload("W7c", name, "µs/item", Better::Lower);
    runtime(false).block_on(async {
        let exec = executor().await;
        let label = "procexec stream (a task sending each item), current-thread";
        if config.wants(label) {
            let samples = timed_async(config.reps, || async {
                let out: Vec<u64> = exec.stream(crate::doubles, STREAM_ITEMS).try_collect().await.unwrap();
                assert_eq!(out.len() as u64, STREAM_ITEMS);
            })
            .await;
            table.row(Kind::Procexec, label, per_item(&samples, STREAM_ITEMS));
        }
        let label = "procexec map (one call per item), current-thread";
        if config.wants(label) {
            let samples = timed_async(config.reps, || async {
                let out = exec.map(crate::double, 0..STREAM_ITEMS).await.unwrap();
                assert_eq!(out.len() as u64, STREAM_ITEMS);
            })
            .await;
            table.row(Kind::Procexec, label, per_item(&samples, STREAM_ITEMS));
        }
        exec.shutdown().await;
    });
    let name = "W7 streaming: 20,000 items of ~1.5 µs of work from one streaming task, against map";
    table.workload("W7d", name, "µs/item", Better::Lower);
    runtime(false).block_on(async {
        let exec = executor().await;
        let label = "procexec stream (one task, one worker), current-thread";
        if config.wants(label) {
            let samples = timed_async(config.reps, || async {
                let args = (WORK_ITEMS, WORK_ITERATIONS);
                let out: Vec<u64> = exec.stream(crate::works, args).try_collect().await.unwrap();
                assert_eq!(out.len() as u64, WORK_ITEMS);
            })
            .await;
            table.row(Kind::Procexec, label, per_item(&samples, WORK_ITEMS));
        }
        let label = "procexec map (2 workers), current-thread";
        if config.wants(label) {
            let samples = timed_async(config.reps, || async {
                let items = std::iter::repeat_n(WORK_ITERATIONS, WORK_ITEMS as usize);
                let out = exec.map(crate::compute, items).await.unwrap();
                assert_eq!(out.len() as u64, WORK_ITEMS);
            })
            .await;
            table.row(Kind::Procexec, label, per_item(&samples, WORK_ITEMS));
        }
        let label = "procexec map on one worker, current-thread";
        if config.wants(label) {
            let one = Executor::builder()
                .processes(1)
                .stderr(procexec::WorkerStderr::Discard)
                .build()
                .await
                .expect("the executor starts");
            let samples = timed_async(config.reps, || async {
                let items = std::iter::repeat_n(WORK_ITERATIONS, WORK_ITEMS as usize);
                let out = one.map(crate::compute, items).await.unwrap();
                assert_eq!(out.len() as u64, WORK_ITEMS);
            })
            .await;
            table.row(Kind::Procexec, label, per_item(&samples, WORK_ITEMS));
            one.shutdown().await;
        }
        exec.shutdown().await;
    });
}
