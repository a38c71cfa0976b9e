//! Calls that cannot work fail with a typed error before anything is sent; the
//! executor serves on.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

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
        /// The worker's `norm` takes a `Point` of two `f64`s.
        pub fn norm(p: Vector) -> f64 { p.dx.hypot(p.dy) }
    }

    /// The worker's `Point` under other names.
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Vector {
        pub dx: f64,
        pub dy: f64,
    }

    /// A stale `Point`, from before its fields were widened.
    pub mod narrow {
        procexec::tasks! {
            pub fn norm(p: Point) -> f64 { f64::from(p.x).hypot(f64::from(p.y)) }
        }

        #[derive(serde::Serialize, serde::Deserialize)]
        pub struct Point {
            pub x: f32,
            pub y: f32,
        }
    }
}

async fn small_frames() -> Executor {
    Executor::builder()
        .test_harness()
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
        assert!(matches!(&err, Error::UnknownTask { task, .. } if task == "not_in_the_worker"), "{err:?}");
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
            Error::TaskMismatch { task, parent, worker, .. } => {
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
            Error::FrameTooLarge { task, direction: Direction::Input, size, limit, .. } => {
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

#[tokio::test]
async fn a_type_of_another_name_and_the_same_shape_is_accepted() {
    hang_guard(async {
        let exec = executor(1).await;
        let norm = exec.spawn(stale::norm, stale::Vector { dx: 3.0, dy: 4.0 }).await.unwrap();
        assert_eq!(norm, 5.0);
    })
    .await;
}

#[tokio::test]
async fn a_type_of_the_same_name_and_another_shape_is_a_mismatch_error() {
    hang_guard(async {
        let exec = executor(1).await;
        let point = stale::narrow::Point { x: 3.0, y: 4.0 };
        match exec.spawn(stale::narrow::norm, point).await.unwrap_err() {
            Error::TaskMismatch { task, parent, worker, .. } => {
                assert_eq!(task, "norm");
                assert!(parent.contains("narrow::Point"), "{parent}");
                assert!(worker.contains("procexec_worker::Point"), "{worker}");
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert_eq!(exec.spawn(norm, Point { x: 3.0, y: 4.0 }).await.unwrap(), 5.0);
    })
    .await;
}

#[tokio::test]
async fn a_type_postcard_cannot_carry_fails_before_anything_is_sent() {
    hang_guard(async {
        let exec = executor(1).await;
        let worker = exec.spawn(pid, ()).await.unwrap();
        let err = exec.spawn(untagged, NumberOrText::Number(3)).await.unwrap_err();
        match &err {
            Error::Codec { task, direction: Direction::Input, action: "encode", message, .. } => {
                assert_eq!(task, "untagged");
                assert!(message.contains("NumberOrText"), "{message}");
                assert!(message.contains("deserialize_any"), "{message}");
            }
            other => panic!("expected a codec error, got {other:?}"),
        }
        let err = exec.map(untagged, [NumberOrText::Text("ab".into())]).await.unwrap_err();
        assert!(matches!(err, Error::Codec { .. }), "{err:?}");
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), worker, "the worker was not touched");
        assert_eq!(exec.stats().completed, 2, "only the two `pid` calls ran: {:?}", exec.stats());
    })
    .await;
}
