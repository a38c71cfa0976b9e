//! One poison input costs exactly one result: in a map of hundreds of items, each
//! kind of fault in the middle fails that item alone, and every other item,
//! including those that shared its chunk and ran before it, comes back with its
//! real output. No retries are configured.

mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use common::*;
use futures::StreamExt;
use procexec::{Direction, Error};
use procexec_worker::{Fault, FaultyInput, faulty};

const ITEMS: u64 = 300;
const POISON: u64 = 150;

fn inputs(fault: Fault) -> impl Iterator<Item = FaultyInput> {
    (0..ITEMS)
        .map(move |value| FaultyInput { value, fault: if value == POISON { fault } else { Fault::None } })
}

/// Whether `err` is what `fault` should produce. A codec fault must also carry the
/// message the serde impl failed with, whichever side it failed on.
fn expected(fault: Fault, err: &Error) -> bool {
    let says_why = |err: &Error| matches!(err, Error::Codec { message, .. } if message.contains("injected"));
    match fault {
        Fault::Panic => err.is_panic(),
        Fault::Abort | Fault::Exit3 | Fault::KillSelf | Fault::Segfault => err.is_worker_crash(),
        Fault::InputEncode => {
            matches!(err, Error::Codec { direction: Direction::Input, action: "encode", .. }) && says_why(err)
        }
        Fault::InputDecode => {
            matches!(err, Error::Codec { direction: Direction::Input, action: "decode", .. }) && says_why(err)
        }
        Fault::OutputEncode => {
            matches!(err, Error::Codec { direction: Direction::Output, action: "encode", .. })
                && says_why(err)
        }
        Fault::OutputDecode => {
            matches!(err, Error::Codec { direction: Direction::Output, action: "decode", .. })
                && says_why(err)
        }
        Fault::None => false,
    }
}

async fn one_poison_costs_one_item(processes: usize, ordered: bool) {
    let exec = executor(processes).await;
    for fault in Fault::ALL {
        let results: Vec<_> = if ordered {
            exec.map_stream(faulty, futures::stream::iter(inputs(fault))).collect().await
        } else {
            exec.map_unordered(faulty, futures::stream::iter(inputs(fault))).collect().await
        };
        assert_eq!(results.len() as u64, ITEMS, "{fault:?}: one result per input");
        let mut values = Vec::new();
        let mut failed = Vec::new();
        for result in results {
            match result {
                Ok(output) => values.push(output.value / 2),
                Err(err) => failed.push(err),
            }
        }
        if fault == Fault::None {
            assert!(failed.is_empty(), "{failed:?}");
        } else {
            assert_eq!(failed.len(), 1, "{processes} workers, {fault:?}: exactly one item fails: {failed:?}");
            assert!(expected(fault, &failed[0]), "{fault:?} gave {:?}", failed[0]);
        }
        let mut expected_values: Vec<u64> =
            (0..ITEMS).filter(|&v| fault == Fault::None || v != POISON).collect();
        if !ordered {
            values.sort_unstable();
            expected_values.sort_unstable();
        }
        assert_eq!(
            values, expected_values,
            "{processes} workers, {fault:?}: every other item has its output"
        );
    }
    let stats = exec.stats();
    assert_eq!(stats.retried, 0, "nothing was retried: {stats:?}");
}

#[tokio::test]
async fn each_fault_fails_its_item_alone_with_one_worker() {
    hang_guard(one_poison_costs_one_item(1, true)).await;
}

#[tokio::test]
async fn each_fault_fails_its_item_alone_with_two_workers() {
    hang_guard(one_poison_costs_one_item(2, true)).await;
}

#[tokio::test]
async fn each_fault_fails_its_item_alone_with_five_workers() {
    hang_guard(one_poison_costs_one_item(5, true)).await;
}

#[tokio::test]
async fn each_fault_fails_its_item_alone_in_an_unordered_map() {
    hang_guard(one_poison_costs_one_item(2, false)).await;
}

#[tokio::test]
async fn a_single_call_reports_each_codec_fault_with_its_message() {
    hang_guard(async {
        let exec = executor(1).await;
        for fault in [Fault::InputEncode, Fault::InputDecode, Fault::OutputEncode, Fault::OutputDecode] {
            let err = exec.spawn(faulty, FaultyInput { value: 1, fault }).await.unwrap_err();
            assert!(expected(fault, &err), "{fault:?} gave {err:?}");
        }
    })
    .await;
}
