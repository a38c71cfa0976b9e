use std::time::Instant;
procexec::tasks! {
    pub fn double(x: u64) -> u64 { 2 * x }
}
fn main() {
    procexec::init_worker(&TASKS);
    let flavor = std::env::args().nth(1).unwrap_or("current".into());
    let rt = if flavor == "multi" {
        tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    };
    rt.block_on(async {
        let exec = procexec::Executor::builder().processes(2).build().await.unwrap();
        for _ in 0..10 {
            let t = Instant::now();
            let hs: Vec<_> = (0..100_000u64).map(|i| exec.spawn(double, i)).collect();
            for h in hs {
                h.await.unwrap();
            }
            println!("{flavor}: 100k spawns: {:.3} us/task", t.elapsed().as_secs_f64() * 1e6 / 100_000.0);
        }
        exec.shutdown().await;
    });
}
