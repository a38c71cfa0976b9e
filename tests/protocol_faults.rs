//! A worker that breaks the protocol (garbage, an oversized or truncated frame, a
//! reply to no call, a reply of the wrong kind) fails only the calls it held, is
//! replaced, and never panics the parent.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use common::*;
use procexec::{Error, ExitReason};
use procexec_worker::*;
use serde_bytes::ByteBuf;

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

#[tokio::test]
async fn a_frame_cut_off_by_the_workers_death_is_a_crash_of_its_call() {
    hang_guard(async {
        let exec = executor(1).await;
        let before = exec.spawn(pid, ()).await.unwrap();
        let err = exec.spawn(truncate_reply, ()).await.unwrap_err();
        let crash = err.crash().unwrap_or_else(|| panic!("expected a crash, got {err:?}"));
        assert_eq!(crash.exit(), ExitReason::Signal(libc::SIGABRT));
        assert_ne!(exec.spawn(pid, ()).await.unwrap(), before);
    })
    .await;
}

#[tokio::test]
async fn a_protocol_error_fails_only_the_calls_of_that_worker() {
    hang_guard(async {
        let exec = executor(2).await;
        let bystanders: Vec<_> = (0..2000u64).map(|i| exec.spawn(square, i)).collect();
        let corrupt = exec.spawn(corrupt_replies, frame(&[0xff; 8]));
        let mut protocol_errors = 0;
        for (i, call) in bystanders.into_iter().enumerate() {
            match call.await {
                Ok(square) => assert_eq!(square, (i * i) as u64),
                Err(err) => {
                    assert!(err.is_protocol(), "{err}");
                    protocol_errors += 1;
                }
            }
        }
        assert!(corrupt.await.unwrap_err().is_protocol());
        // Only calls sent to the corrupt worker after the garbage can be hit.
        assert!(protocol_errors < 300, "{protocol_errors}");
    })
    .await;
}
