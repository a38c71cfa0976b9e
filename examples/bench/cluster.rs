//! `-- WC`, only when named: W1 `map`, W3 payload and W5 round trip through the
//! launchers, side by side in one run: 2 local workers, 2 over ssh, 2 as srun steps,
//! against the loopback daemons of `scripts/test-cluster` (`eval "$(scripts/test-cluster
//! env)"` first; without them it says so and measures local only). Loopback: what
//! these rows show is each launcher's own cost, not a network's.

use std::time::{Duration, Instant};

use procexec::{Executor, Slurm, Ssh, WorkerGroup, WorkerStderr};

use crate::table::{Better, Kind, Table};
use crate::{Config, double, echo, runtime, timed_async};

const MAP_ITEMS: u64 = 20_000;
const PAYLOADS: usize = 32;
const PAYLOAD: usize = 256 * 1024;
const ROUND_TRIPS: usize = 1_000;

fn launchers() -> Vec<(&'static str, WorkerGroup)> {
    let mut all = vec![("local", WorkerGroup::local(2))];
    match (std::env::var("PROCEXEC_TEST_SSH_HOST"), std::env::var("PROCEXEC_TEST_SSH_CONFIG")) {
        (Ok(host), Ok(config)) => all.push(("ssh", WorkerGroup::ssh(2, Ssh::new(host).config_file(config)))),
        _ => eprintln!("WC: no loopback ssh (PROCEXEC_TEST_SSH_HOST unset): ssh rows skipped"),
    }
    if std::env::var("PROCEXEC_TEST_SLURM").is_ok_and(|value| value == "1") {
        all.push(("srun", WorkerGroup::slurm(2, Slurm::new().tasks(1))));
    } else {
        eprintln!("WC: no Slurm (PROCEXEC_TEST_SLURM unset): srun rows skipped");
    }
    all
}

async fn executor(group: WorkerGroup) -> Executor {
    Executor::builder().stderr(WorkerStderr::Discard).group(group).build().await.expect("the executor starts")
}

pub fn wc(config: &Config, table: &mut Table) {
    let launchers = launchers();
    let name = format!("WC/W5 round trip through a launcher: {ROUND_TRIPS} trivial calls, one at a time");
    table.workload("WC5", &name, "µs", Better::Lower);
    for (label, group) in &launchers {
        runtime(false).block_on(async {
            let exec = executor(group.clone()).await;
            for i in 0..100 {
                exec.spawn(double, i).await.unwrap();
            }
            let mut rtts = Vec::with_capacity(ROUND_TRIPS);
            for i in 0..ROUND_TRIPS as u64 {
                let start = Instant::now();
                exec.spawn(double, i).await.unwrap();
                rtts.push(start.elapsed());
            }
            let mut sorted = rtts.clone();
            sorted.sort();
            let p99 = sorted[sorted.len() * 99 / 100];
            let stalls = sorted.iter().filter(|rtt| **rtt >= Duration::from_millis(30)).count();
            table.row(
                Kind::Procexec,
                &format!(
                    "{label}: spawn().await (p99 {:.2} ms, {stalls} of {ROUND_TRIPS} >= 30 ms)",
                    p99.as_secs_f64() * 1e3
                ),
                rtts.iter().map(|d| d.as_secs_f64() * 1e6).collect(),
            );
            exec.shutdown().await;
        });
    }
    let name = format!("WC/W1 map through a launcher: {MAP_ITEMS} calls of i -> 2*i");
    table.workload("WC1", &name, "µs/task", Better::Lower);
    for (label, group) in &launchers {
        runtime(false).block_on(async {
            let exec = executor(group.clone()).await;
            exec.map(double, 0..1_000u64).await.unwrap();
            let samples = timed_async(config.reps, || async {
                let out = exec.map(double, 0..MAP_ITEMS).await.unwrap();
                assert_eq!(out.len(), MAP_ITEMS as usize);
            })
            .await;
            table.row(Kind::Procexec, &format!("{label}: map"), crate::per_item(&samples, MAP_ITEMS));
            exec.shutdown().await;
        });
    }
    let name =
        format!("WC/W3 payload through a launcher: {PAYLOADS} tasks, each sends 256 KiB and gets it back");
    table.workload("WC3", &name, "MB/s", Better::Higher);
    let data = procexec::Blob::from(vec![7u8; PAYLOAD]);
    for (label, group) in &launchers {
        runtime(false).block_on(async {
            let exec = executor(group.clone()).await;
            let samples = timed_async(config.reps, || async {
                let out = exec.map(echo, vec![data.clone(); PAYLOADS]).await.unwrap();
                assert!(out.iter().all(|blob| blob.len() == PAYLOAD));
            })
            .await;
            let bytes = (2 * PAYLOADS * PAYLOAD) as f64;
            table.row(
                Kind::Procexec,
                &format!("{label}: map of echo, both ways"),
                samples.iter().map(|d| bytes / d.as_secs_f64() / 1e6).collect(),
            );
            exec.shutdown().await;
        });
    }
}
