mod common;
use common::*;
use procexec_worker::*;

#[tokio::test]
async fn spawn_and_map() {
    hang_guard(async {
        let exec = executor(2).await;
        assert_eq!(exec.spawn(square, 7).await.unwrap(), 49);
        assert_eq!(exec.map(square, 0..5).await.unwrap(), [0, 1, 4, 9, 16]);
        let big = exec.map(double, 0..100_000u64).await.unwrap();
        assert_eq!(big.len(), 100_000);
        assert!(big.iter().enumerate().all(|(i, &v)| v == 2 * i as u64));
        exec.shutdown().await;
    })
    .await;
}
