//! `examples/pool.rs` scaled out: the same `map`, with workers on the hosts of a
//! hosts file (or `PROCEXEC_HOSTS`) and/or in a Slurm allocation, printing which
//! host served each input.
//!
//! ```text
//! cargo run --example cluster -- [HOSTS_FILE] [--ssh-config FILE] [--ship DIR] [--slurm N]
//! ```
//!
//! - `HOSTS_FILE`, or `PROCEXEC_HOSTS` (entries like `2/:,4/node1,8/app@node2:2222`,
//!   or a file's path): `N/host` runs N workers on `host` over ssh, `N/:` runs N here.
//! - `--ssh-config FILE`: the ssh client config (`ssh -F`) for every host.
//! - `--ship DIR`: copy this binary to `DIR` on each host (named by its content
//!   hash, reused when present) instead of expecting it at the same path there.
//! - `--slurm N`: N workers as steps of the Slurm allocation of `SLURM_JOB_ID`,
//!   or of one requested (and released) for the run.
//! - Nothing: 4 local workers, as `examples/pool.rs`.
//!
//! Against the test daemons (`sudo scripts/test-cluster up`):
//! ```text
//! eval "$(scripts/test-cluster env)"
//! PROCEXEC_HOSTS=2/:,2/procexec-test cargo run --example cluster -- \
//!     --ssh-config "$PROCEXEC_TEST_SSH_CONFIG" --slurm 2
//! ```

use std::time::Duration;

use procexec::{Hosts, Slurm, Ssh, WorkerGroup};

procexec::tasks! {
    /// pool.rs's task, also telling where it ran.
    pub fn worker(num: u64) -> (u64, String, u32) {
        std::thread::sleep(Duration::from_millis(500)); // stands in for real work
        let host = std::env::var(procexec::HOST_ENV).unwrap_or_default();
        (num * num, host, std::process::id())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut hosts_file = None;
    let mut ssh = Ssh::new("");
    let mut slurm = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--ssh-config" => ssh = ssh.config_file(value()?),
            "--ship" => ssh = ssh.ship_to(value()?),
            "--slurm" => slurm = Some(value()?.parse::<usize>()?),
            _ => hosts_file = Some(arg),
        }
    }
    let hosts = match hosts_file {
        Some(path) => Some(Hosts::from_file(path)?),
        None => Hosts::from_env()?,
    };
    let mut groups = hosts.map(|hosts| hosts.groups(&ssh)).unwrap_or_default();
    if let Some(workers) = slurm {
        groups.push(WorkerGroup::slurm(workers, Slurm::new().tasks(1)));
    }
    if groups.is_empty() {
        groups.push(WorkerGroup::local(4));
    }
    for group in &groups {
        println!("group {}: {} workers", group.label(), group.processes());
    }
    let workers: usize = groups.iter().map(WorkerGroup::processes).sum();
    let pool = procexec::Executor::builder().groups(groups).build().await?;
    let started = std::time::Instant::now();
    let results = pool.map(worker, 0..2 * workers as u64).await?;
    let elapsed = started.elapsed();
    pool.shutdown().await;
    for (num, (square, host, pid)) in results.iter().enumerate() {
        println!("{num:>3} -> {square:>5}  served by {host} (pid {pid})");
    }
    println!("{} inputs of 0.5 s on {workers} workers in {elapsed:.2?}", results.len());
    let squares: Vec<u64> = results.iter().map(|(square, ..)| *square).collect();
    assert_eq!(squares, (0..2 * workers as u64).map(|n| n * n).collect::<Vec<_>>());
    Ok(())
}
