//! Many `spawn`s awaited together on a current-thread runtime: how the total
//! grows from 10,000 to 100,000 calls (it should be about 10x).
//!
//! Run: `cargo run --release --example many_calls [-- unordered|multi]`

use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

procexec::tasks! {
    /// The tiniest task.
    pub fn double(x: u64) -> u64 { 2 * x }
}

fn main() {
    procexec::init_worker(&TASKS);
    let args: Vec<String> = std::env::args().collect();
    let unordered = args.iter().any(|a| a == "unordered");
    let multi = args.iter().any(|a| a == "multi");
    let sizes: Vec<u64> = args[1..].iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10_000, 100_000] } else { sizes };
    let runtime = if multi {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
    .expect("a runtime");
    runtime.block_on(async {
        let exec = procexec::Executor::builder()
            .processes(2)
            .stderr(procexec::WorkerStderr::Discard)
            .build()
            .await
            .expect("the executor starts");
        exec.map(double, 0..10_000u64).await.expect("warm-up");
        let mut totals = Vec::new();
        for &n in &sizes {
            let start = Instant::now();
            if unordered {
                let mut all: FuturesUnordered<_> = (0..n).map(|i| exec.spawn(double, i)).collect();
                let mut count = 0;
                while let Some(out) = all.next().await {
                    out.expect("a result");
                    count += 1;
                }
                assert_eq!(count, n);
            } else {
                let handles: Vec<_> = (0..n).map(|i| exec.spawn(double, i)).collect();
                let outs = futures::future::join_all(handles).await;
                assert_eq!(*outs[n as usize - 1].as_ref().expect("a result"), 2 * (n - 1));
            }
            let took = start.elapsed();
            println!("{n:>8} calls: {:>10.3} ms", took.as_secs_f64() * 1e3);
            totals.push(took);
        }
        if totals.len() == 2 {
            println!("ratio: {:.1}x", totals[1].as_secs_f64() / totals[0].as_secs_f64());
        }
        exec.shutdown().await;
    });
}
