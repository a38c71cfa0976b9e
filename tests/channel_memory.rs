//! A fast streaming task and a slow consumer: memory stays bounded on both sides
//! (the task waits for credit), however much flows. Alone in its binary, so the
//! parent's peak memory is this test's.
mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use procexec::{Blob, Sender};

procexec::tasks! {
    /// Sends `count` items of `size` bytes as fast as it can.
    pub fn flood(count: u64, size: usize, out: Sender<Blob>) {
        let item = Blob::from(vec![1u8; size]);
        for _ in 0..count {
            if out.blocking_send(item.clone()).is_err() {
                return;
            }
        }
    }

    /// This worker's peak resident memory, in KiB.
    pub fn worker_peak_kib() -> u64 { peak_kib() }
}
procexec::test_worker!(TASKS);

/// This process's peak resident memory (VmHWM), in KiB.
fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).expect("a VmHWM line");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a number of KiB")
}

#[tokio::test]
async fn a_slow_consumer_of_a_fast_stream_keeps_both_sides_memory_bounded() {
    hang_guard(async {
        const ITEMS: u64 = 16_000;
        const SIZE: usize = 64 * 1024; // 1 GiB in all
        let exec = executor(1).await;
        let worker_before = exec.spawn(worker_peak_kib, ()).await.unwrap();
        let parent_before = peak_kib();
        let mut stream = exec.stream(flood, (ITEMS, SIZE));
        let mut received = 0u64;
        while let Some(item) = stream.next().await {
            assert_eq!(item.unwrap().len(), SIZE);
            received += 1;
            if received.is_multiple_of(64) {
                // A consumer slower than the producer, so the producer runs ahead
                // as far as it is let.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(received, ITEMS);
        let worker_growth = exec.spawn(worker_peak_kib, ()).await.unwrap().saturating_sub(worker_before);
        let parent_growth = peak_kib().saturating_sub(parent_before);
        eprintln!("peak memory grew by {worker_growth} KiB in the worker, {parent_growth} KiB in the parent");
        // The channel holds 256 items, and the task may be 256 more ahead: 32 MiB.
        assert!(worker_growth < 64 * 1024, "the worker grew by {worker_growth} KiB while 1 GiB went through");
        assert!(
            parent_growth < 160 * 1024,
            "the parent grew by {parent_growth} KiB while 1 GiB went through"
        );
    })
    .await;
}
