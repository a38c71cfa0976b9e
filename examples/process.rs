//! The article's first program: three processes start, sleep, end; then the parent
//! prints "all processes done".
//!
//! Python: `Process(target=worker, args=(i,))`, `p.start()`, `p.join()`.
//! Here: one worker process per call, `spawn` starts it, awaiting the handle joins it.
//!
//! Run: `cargo run --example process`

use std::time::Duration;

procexec::tasks! {
    /// What each process runs. Its prints reach the parent's stderr, labelled
    /// with the worker's slot and pid.
    pub fn worker(num: u32) {
        println!("process {num} start");
        std::thread::sleep(Duration::from_secs(2)); // stands in for real work
        println!("process {num} end");
    }
}

fn main() -> procexec::Result<()> {
    // In a worker process this never returns. Called before any runtime exists,
    // so the workers carry none.
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> procexec::Result<()> {
    let exec = procexec::Executor::builder().processes(3).build().await?;
    // start(): all three are queued at once and run in parallel.
    let handles: Vec<_> = (0..3).map(|i| exec.spawn(worker, i)).collect();
    // join(): wait for each.
    for handle in handles {
        handle.await?;
    }
    // The workers' prints reach us through their stderr, forwarded as they come;
    // shutdown waits until the last line is out, so this one comes last.
    exec.shutdown().await;
    println!("all processes done");
    Ok(())
}
