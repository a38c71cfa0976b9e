//! An async web service (axum) that offloads its CPU-bound handler to procexec.
//!
//! The executor is created once, at start-up, and shared by every request through
//! the router's state (an `Executor` is a cheap `Clone`). Each `/work` request runs
//! about 2 ms of hashing in a worker process, so the runtime's threads stay free for
//! IO: `/health` answers at once even while every CPU is busy, and a request whose
//! worker crashes gets a 500 while the service serves on.
//!
//! - `GET /work?input=..&rounds=..` hashes `input` (default: 2 ms of work);
//!   `GET /work?fault=1` crashes the worker running it (abort), to show isolation.
//! - `GET /health`: "ok", without touching the workers.
//! - `GET /stats`: the executor's `stats()`.
//!
//! Errors map to statuses: a crash or a panic is 500 with the error's text, a call
//! past the 2 s per-request limit 504, a full queue 503 with `Retry-After` (the
//! service sheds load instead of queueing without bound), shutdown 503. Ctrl-C stops
//! accepting, finishes the requests in flight, then shuts the workers down.
//!
//! `--mode blocking` runs the same handler on tokio's blocking pool, `--mode inline`
//! on the runtime's own threads: the comparison `scripts/service-load` measures.
//! (There a crash takes the whole service down.)
//!
//! Run: `cargo run --release --example service` serves on an ephemeral port, sends
//! itself a few requests (one of them crashing), prints what came back, and exits.
//! With `-- --addr 127.0.0.1:3000` it serves until Ctrl-C (`--mode
//! procexec|blocking|inline`, `--workers N`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use procexec::{CancelPolicy, Error, Executor};
use serde::Deserialize;

procexec::tasks! {
    /// The CPU-bound part of a request: `rounds` rounds of FNV-1a over `input`.
    pub fn digest(input: String, rounds: u32) -> String {
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for round in 0..rounds {
            for byte in input.bytes().chain(round.to_le_bytes()) {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{hash:016x}")
    }

    /// A request that crashes whatever runs it.
    pub fn crash() { std::process::abort() }
}

/// Rounds of `digest` in about 2 ms on the development machine.
pub const DEFAULT_ROUNDS: u32 = 150_000;
/// The longest a request may keep a worker.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In worker processes, through procexec.
    Procexec,
    /// On tokio's blocking pool (`spawn_blocking`).
    Blocking,
    /// On the runtime's own threads, in the handler.
    Inline,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub mode: Mode,
    /// The executor (in procexec mode).
    pub exec: Option<Executor>,
}

#[derive(Deserialize)]
pub struct WorkQuery {
    input: Option<String>,
    rounds: Option<u32>,
    #[serde(default)]
    fault: u8,
}

/// The service's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/work", get(work))
        .route("/health", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .with_state(state)
}

/// An executor as a service wants it: calls whose client left run to their end
/// (behind a proxy that times out, killing the worker would cost more than the
/// rest of the call), a bounded queue to shed load, a per-request time limit.
pub async fn executor(workers: usize) -> procexec::Result<Executor> {
    Executor::builder()
        .processes(workers)
        .cancel_policy(CancelPolicy::Finish)
        .timeout(REQUEST_TIMEOUT)
        .max_queued_bytes(64 * 1024)
        .build()
        .await
}

async fn work(State(state): State<AppState>, Query(query): Query<WorkQuery>) -> Response {
    let input = query.input.unwrap_or_else(|| "procexec".to_string());
    let rounds = query.rounds.unwrap_or(DEFAULT_ROUNDS);
    let fault = query.fault != 0;
    match (state.mode, &state.exec) {
        (Mode::Procexec, Some(exec)) => {
            let result = if fault {
                offload(exec.try_spawn(crash, ()).map_err(|_| ())).await.map(|()| String::new())
            } else {
                offload(exec.try_spawn(digest, (input, rounds)).map_err(|_| ())).await
            };
            match result {
                Ok(hash) => hash.into_response(),
                Err(response) => response,
            }
        }
        (Mode::Blocking, _) => {
            let computed = tokio::task::spawn_blocking(move || {
                if fault {
                    crash().call_in_process(());
                }
                digest().call_in_process((input, rounds))
            });
            match computed.await {
                Ok(hash) => hash.into_response(),
                Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
            }
        }
        _ => {
            if fault {
                crash().call_in_process(());
            }
            digest().call_in_process((input, rounds)).into_response()
        }
    }
}

/// Awaits a call offloaded with `try_spawn`, mapping each failure to its status.
async fn offload<O: serde::de::DeserializeOwned>(
    call: Result<procexec::TaskHandle<O>, ()>,
) -> Result<O, Response> {
    let Ok(call) = call else {
        // The queue is full: shed the request; the client retries later.
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, "busy, retry later").into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(response);
    };
    call.await.map_err(|err| {
        let status = match &err {
            Error::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, err.to_string()).into_response()
    })
}

async fn stats(State(state): State<AppState>) -> Response {
    match &state.exec {
        Some(exec) => format!("{:#?}\n", exec.stats()).into_response(),
        None => (StatusCode::NOT_FOUND, "no executor in this mode").into_response(),
    }
}

struct Args {
    mode: Mode,
    /// Where to serve until Ctrl-C; `None`: a demonstration that ends by itself.
    addr: Option<SocketAddr>,
    workers: usize,
}

fn args() -> Result<Args, String> {
    let mut args = Args { mode: Mode::Procexec, addr: None, workers: procexec::cpu_count() };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = || words.next().ok_or(format!("{word} needs a value"));
        match word.as_str() {
            "--mode" => {
                args.mode = match value()?.as_str() {
                    "procexec" => Mode::Procexec,
                    "blocking" => Mode::Blocking,
                    "inline" => Mode::Inline,
                    other => return Err(format!("unknown mode {other} (procexec, blocking or inline)")),
                }
            }
            "--addr" => args.addr = Some(value()?.parse().map_err(|err| format!("--addr: {err}"))?),
            "--workers" => args.workers = value()?.parse().map_err(|err| format!("--workers: {err}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// A plain HTTP/1.1 GET over TCP, for the demonstration: the status and the body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status_line = response.lines().next().unwrap_or_default();
    let status = status_line.split_once(' ').map_or("", |(_, status)| status).to_string();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    Ok((status, body))
}

// A plain `main`: a worker process returns from nowhere inside `init_worker`, before
// any runtime exists, so workers carry no idle runtime threads.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    procexec::init_worker(&TASKS);
    let args = args()?;
    tokio::runtime::Runtime::new()?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let exec = match args.mode {
        Mode::Procexec => Some(executor(args.workers).await?),
        _ => None,
    };
    let demo = args.addr.is_none();
    let listener = tokio::net::TcpListener::bind(args.addr.unwrap_or(([127, 0, 0, 1], 0).into())).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let app = router(AppState { mode: args.mode, exec: exec.clone() });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = stopped => {}
                }
            })
            .await
    });
    if demo {
        for path in ["/work", "/work?input=hello&rounds=1000", "/work?fault=1", "/work", "/health"] {
            let (status, body) = http_get(addr, path).await?;
            println!("GET {path} -> {status} {}", body.trim());
        }
        let _ = stop.send(());
    }
    server.await??;
    // The requests in flight are done: stop the workers.
    if let Some(exec) = exec {
        exec.shutdown().await;
    }
    Ok(())
}
