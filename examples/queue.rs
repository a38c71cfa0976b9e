//! The article's third program: a sender process puts a message on a queue, a
//! receiver process gets it and prints it; the parent waits for both, then prints
//! "all processes done". Before it, the article's pipe (section 4): two ends, each
//! sending what the other receives.
//!
//! Python: `queue = multiprocessing.Queue()`, `Process(target=sender, args=(queue,))`,
//! `queue.put(...)`, `queue.get()`; `a, b = multiprocessing.Pipe()`.
//! Here: `exec.queue()` makes the queue, its handle goes into each task as input,
//! and tasks (plain functions) use its blocking `blocking_put` / `blocking_get`;
//! the parent uses the async `put` / `get`. The parent brokers every item, so the
//! two tasks never need to know about each other.
//!
//! Run: `cargo run --example queue`

use procexec::{Pipe, Queue};

procexec::tasks! {
    /// Sends data to the queue.
    pub fn sender(queue: Queue<String>) {
        println!("sender process start");
        queue.blocking_put("Hello from process!".to_string()).expect("the queue is open");
        println!("sender process end");
    }

    /// Receives data from the queue.
    pub fn receiver(queue: Queue<String>) {
        println!("receiver process start");
        let message = queue.blocking_get().expect("the queue is open").expect("a message");
        println!("received: {message}");
        println!("receiver process end");
    }

    /// One end of a pipe: answers each greeting, until the other end hangs up.
    pub fn echo(end: Pipe<String, String>) {
        while let Some(greeting) = end.blocking_recv().expect("the pipe works") {
            end.blocking_send(format!("{greeting} (echoed by process {})", std::process::id()))
                .expect("the other end listens");
        }
    }
}

fn main() -> procexec::Result<()> {
    // In a worker process this never returns. Called before any runtime exists,
    // so the workers carry none.
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> procexec::Result<()> {
    let exec = procexec::Executor::builder().processes(2).build().await?;

    // The pipe: one end here, the other in a worker.
    let (here, there) = exec.pipe::<String, String>();
    let echoing = exec.spawn(echo, there);
    here.send("hello through a pipe".to_string()).await?;
    if let Some(answer) = here.recv().await? {
        println!("{answer}");
    }
    drop(here); // hang up: the worker's recv returns None and its task ends
    echoing.await?;

    // The queue program.
    let queue = exec.queue::<String>(16);
    // start() both; the receiver waits in its worker until the message comes.
    let receiving = exec.spawn(receiver, queue.clone());
    let sending = exec.spawn(sender, queue.clone());
    // join() both.
    sending.await?;
    receiving.await?;
    // Workers' prints reach us through their stderr, forwarded as they come;
    // shutdown waits until the last line is out, so this one comes last.
    exec.shutdown().await;
    println!("all processes done");
    Ok(())
}
