//! Calls that cannot work fail with a typed error before anything is sent, and
//! corrupt replies fail only the calls involved; the executor serves on.
mod common;

use common::*;
use procexec::{Direction, Error, Executor, WorkerStderr};
use procexec_worker::*;
use serde_bytes::ByteBuf;

/// Tasks as this process knows them, disagreeing with the worker binary.
mod stale {
    procexec::tasks! {
        /// The worker has no such task.
        pub fn not_in_the_worker(x: u64) -> u64 { x }
        /// The worker's `typed` is `u32 -> u32`.
        pub fn typed(x: u64) -> u64 { x }
    }
}

async fn small_frames() -> Executor {
    Executor::builder()
        .program(worker_program())
        .processes(1)
        .max_frame_len(1024)
        .stderr(WorkerStderr::Discard)
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_task_the_worker_lacks_is_an_unknown_task_error() {
    hang_guard(async {
        let exec = executor(1).await;
        let err = exec.spawn(stale::not_in_the_worker, 1).await.unwrap_err();
        assert!(matches!(&err, Error::UnknownTask { task } if task == "not_in_the_worker"), "{err:?}");
        let err = exec.map(stale::not_in_the_worker, 0..10).await.unwrap_err();
        assert!(matches!(err, Error::UnknownTask { .. }));
        assert_eq!(exec.spawn(square, 3).await.unwrap(), 9);
    })
    .await;
}

#[tokio::test]
async fn a_task_with_other_types_is_a_mismatch_error() {
    hang_guard(async {
        let exec = executor(1).await;
        match exec.spawn(stale::typed, 1).await.unwrap_err() {
            Error::TaskMismatch { task, parent, worker } => {
                assert_eq!(task, "typed");
                assert_eq!(parent, "u64 -> u64");
                assert_eq!(worker, "u32 -> u32");
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert_eq!(exec.spawn(typed, 5).await.unwrap(), 5);
    })
    .await;
}

#[tokio::test]
async fn an_input_above_the_frame_limit_is_refused_before_sending() {
    hang_guard(async {
        let exec = small_frames().await;
        let worker = exec.spawn(pid, ()).await.unwrap();
        match exec.spawn(echo, ByteBuf::from(vec![0; 2000])).await.unwrap_err() {
            Error::FrameTooLarge { task, direction: Direction::Input, size, limit } => {
                assert_eq!(task, "echo");
                assert!(size > 2000, "{size}");
                assert_eq!(limit, 1024);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(exec.spawn(echo, ByteBuf::from(vec![1; 100])).await.unwrap().len(), 100);
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), worker, "the worker was not touched");
    })
    .await;
}

#[tokio::test]
async fn a_map_input_above_the_frame_limit_fails_only_that_item() {
    hang_guard(async {
        let exec = small_frames().await;
        let inputs = [10usize, 3000, 10].map(|len| ByteBuf::from(vec![0; len]));
        let results: Vec<_> =
            futures::StreamExt::collect(exec.map_stream(echo, futures::stream::iter(inputs))).await;
        assert_eq!(results[0].as_ref().unwrap().len(), 10);
        assert!(matches!(results[1], Err(Error::FrameTooLarge { direction: Direction::Input, .. })));
        assert_eq!(results[2].as_ref().unwrap().len(), 10);
    })
    .await;
}

#[tokio::test]
async fn an_output_above_the_frame_limit_fails_the_call_and_the_worker_serves_on() {
    hang_guard(async {
        let exec = small_frames().await;
        let worker = exec.spawn(pid, ()).await.unwrap();
        match exec.spawn(make_bytes, 5000).await.unwrap_err() {
            Error::FrameTooLarge { direction: Direction::Output, size, limit: 1024, .. } => {
                assert!(size > 5000)
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(exec.spawn(make_bytes, 100).await.unwrap().len(), 100);
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), worker, "the same worker serves on");
    })
    .await;
}

/// A raw frame: length prefix and body.
fn frame(body: &[u8]) -> ByteBuf {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    ByteBuf::from(frame)
}

async fn corrupt_with(bytes: ByteBuf) {
    let exec = executor(1).await;
    let before = exec.spawn(pid, ()).await.unwrap();
    let err = exec.spawn(corrupt_replies, bytes).await.unwrap_err();
    let violation = match &err {
        Error::Protocol(violation) => violation,
        other => panic!("expected a protocol error, got {other:?}"),
    };
    assert_eq!(violation.pid(), before);
    assert!(!violation.message().is_empty());
    let after = exec.spawn(pid, ()).await.unwrap();
    assert_ne!(after, before, "the corrupt worker was replaced");
    assert!(!alive(before), "the corrupt worker was killed");
    assert_eq!(exec.map(square, 0..100).await.unwrap()[99], 99 * 99);
}

#[tokio::test]
async fn an_undecodable_frame_is_a_protocol_error_and_the_worker_is_replaced() {
    hang_guard(corrupt_with(frame(&[0xff; 16]))).await;
}

#[tokio::test]
async fn a_frame_above_the_limit_from_a_worker_is_a_protocol_error() {
    hang_guard(corrupt_with(ByteBuf::from(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]))).await;
}

#[tokio::test]
async fn a_reply_for_an_unknown_call_is_a_protocol_error() {
    // Reply::Done { id, busy_ns: 0, peak_rss_kib: 0 }: variant 1, varint id, 16 bytes.
    let mut body = vec![1, 0xff, 0xfe, 0x01];
    body.extend_from_slice(&[0; 16]);
    hang_guard(corrupt_with(frame(&body))).await;
}

#[tokio::test]
async fn a_reply_of_the_wrong_kind_is_a_protocol_error() {
    // Reply::Ready { version: 1, pid: 1, tasks: [] } in the middle of a session.
    hang_guard(corrupt_with(frame(&[0, 1, 1, 0]))).await;
}
