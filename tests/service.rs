//! The service example's router, served on a loopback port and driven by a real
//! HTTP client: concurrent requests, a crashing one, and no worker left behind.
mod common;
#[path = "../examples/service.rs"]
#[allow(dead_code)]
mod service;

use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use procexec::CancelPolicy;
use service::{AppState, Mode};

procexec::test_worker!(service::TASKS);

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<bytes::Bytes>>;

async fn get(client: &HttpClient, url: String) -> (u16, String) {
    let response = client.get(url.parse().expect("a URL")).await.expect("a response");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.expect("a body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Serves the example's router over `exec` on an ephemeral loopback port: its base
/// URL, the server's task, and a client.
async fn serve(
    exec: &procexec::Executor,
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>, HttpClient) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = service::router(AppState { mode: Mode::Procexec, exec: Some(exec.clone()) });
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    (base, server, Client::builder(TokioExecutor::new()).build_http())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_answers_concurrent_requests_survives_a_crash_and_leaves_no_worker() {
    hang_guard(async {
        let exec = builder(2)
            .cancel_policy(CancelPolicy::Finish)
            .timeout(service::REQUEST_TIMEOUT)
            .build()
            .await
            .unwrap();
        let (base, server, client) = serve(&exec).await;

        let expected = service::digest().call_in_process(("abc".into(), 500));
        let requests = (0..32).map(|_| get(&client, format!("{base}/work?input=abc&rounds=500")));
        for (status, body) in futures::future::join_all(requests).await {
            assert_eq!((status, body.as_str()), (200, expected.as_str()));
        }

        let (status, body) = get(&client, format!("{base}/work?fault=1")).await;
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("crash") || body.contains("died"), "{body}");
        for _ in 0..4 {
            assert_eq!(
                get(&client, format!("{base}/work?input=abc&rounds=500")).await,
                (200, expected.clone())
            );
        }
        assert_eq!(get(&client, format!("{base}/health")).await, (200, "ok".to_string()));
        let (status, stats) = get(&client, format!("{base}/stats")).await;
        assert_eq!(status, 200);
        assert!(stats.contains("crashed: 1"), "{stats}");

        // The crashed worker's replacement may still be starting.
        eventually("both workers are up", || exec.stats().live.len() == 2).await;
        let pids: Vec<u32> = exec.stats().live.iter().map(|worker| worker.pid).collect();
        server.abort();
        exec.shutdown().await;
        for pid in pids {
            assert!(!alive(pid), "worker {pid} outlived the executor");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_time_limit_is_a_504_and_a_full_queue_a_503_with_retry_after() {
    hang_guard(async {
        let exec = builder(1)
            .cancel_policy(CancelPolicy::Finish)
            // Long enough for the queue to be seen full while a call runs.
            .timeout(std::time::Duration::from_secs(3))
            .max_queued_bytes(1024)
            .build()
            .await
            .unwrap();
        let (base, server, client) = serve(&exec).await;

        // Seconds of work against a 3 s limit.
        let slow = format!("{base}/work?rounds=2000000000");
        let (status, body) = get(&client, slow.clone()).await;
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("time limit"), "{body}");

        // One call runs, the next waits in the queue and fills it (its input is
        // larger than the queue's 1 KiB), so a third is shed.
        let slow = format!("{slow}&input={}", "x".repeat(1100));
        let call = |url: String| {
            let client = client.clone();
            tokio::spawn(async move { get(&client, url).await })
        };
        let first = call(slow.clone());
        eventually("the first call runs", || exec.stats().running == 1).await;
        let second = call(slow.clone());
        eventually("the second call waits", || exec.stats().queued == 1).await;
        let response = client.get(slow.parse().unwrap()).await.unwrap();
        let retry_after =
            response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_owned());
        assert_eq!((response.status().as_u16(), retry_after.as_deref()), (503, Some("1")));
        assert_eq!(first.await.unwrap().0, 504);
        assert_eq!(second.await.unwrap().0, 504);
        server.abort();
        exec.shutdown().await;
    })
    .await;
}
