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

#[tokio::main]
async fn main() -> procexec::Result<()> {
    // This binary is its own worker: in the worker processes this never returns.
    procexec::init_worker(&TASKS);

    let exec = procexec::Executor::builder().processes(3).build().await?;
    // start(): all three are queued at once and run in parallel.
    let handles: Vec<_> = (0..3).map(|i| exec.spawn(worker, i)).collect();
    // join(): wait for each.
    for handle in handles {
        handle.await?;
    }
    println!("all processes done");
    exec.shutdown().await;
    Ok(())
}
