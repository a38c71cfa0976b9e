//! Property tests that throw arbitrary bytes at every decoder the parent runs on a
//! worker's output, and at the worker's handling of call bodies: none may panic.
//!
//! `scripts/fuzz` runs them with many more cases (`PROPTEST_CASES`) than CI does.

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use crate::parent::dispatch::decode_record;
use crate::parent::output::{CallLabel, Source, WorkerOutput};
use crate::parent::process::ReplyCodec;
use crate::parent::stats::Counters;
use crate::parent::supervisor::replies::{self, Matched};
use crate::shared::SharedError;
use crate::wire::protocol::{self, Count, Fixed64, LogRecord, Reply};

crate::tasks! {
    fn text(s: String) -> usize { s.len() }
    #[allow(deprecated)] // a plain byte vector on purpose
    fn pair(a: u64, b: Vec<u8>) -> u64 { a + b.len() as u64 }
}

/// Feeds `stream` to the parent's reply decoding in the given read sizes, decoding
/// every frame's header and outcomes as the supervisor and the callers would.
fn decode_worker_output(stream: &[u8], reads: &[usize]) {
    let mut codec = ReplyCodec::new(0, 1 << 16);
    let source = Source { slot: 0, pid: 1, host: None, mode: crate::WorkerStderr::Discard };
    let mut output = WorkerOutput::thread(source);
    let mut buf = BytesMut::new();
    let mut at = 0;
    for &read in reads.iter().chain(std::iter::repeat(&64)) {
        if at >= stream.len() {
            break;
        }
        let end = (at + read.max(1)).min(stream.len());
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => match protocol::split_header::<Reply>(&frame) {
                    Ok((Reply::Done { .. }, mut body)) => {
                        for _ in 0..4 {
                            let _ = decode_record::<String>("fuzz", &mut body);
                            let _ = decode_record::<(u64, Vec<u8>)>("fuzz", &mut body);
                        }
                    }
                    // As the session passes it on, with no call in flight.
                    Ok((Reply::Output { .. }, _)) => {
                        let matched = replies::match_reply(frame, None, false);
                        if let Ok(Matched::Output { call, stderr, stdout }) = matched {
                            output.received(
                                call.map(|call| CallLabel { task: "fuzz", call }),
                                None,
                                &stderr,
                                &stdout,
                            );
                        }
                    }
                    // As the session re-emits them, with no call in flight.
                    Ok((Reply::Log { records, dropped }, _)) => {
                        crate::parent::supervisor::logs::emit(
                            &Counters::new(1),
                            (0, 1),
                            records,
                            dropped,
                            std::iter::empty(),
                        );
                    }
                    _ => {}
                },
                Ok(None) => break,
                Err(_) => return, // the supervisor kills such a worker
            }
        }
    }
}

proptest! {
    #[test]
    fn fuzz_the_parent_never_panics_on_worker_output(stream: Vec<u8>, reads: Vec<usize>) {
        decode_worker_output(&stream, &reads);
    }

    #[test]
    fn fuzz_the_parent_never_panics_on_mangled_valid_output(
        ids: Vec<u64>,
        flips: Vec<(usize, u8)>,
        reads: Vec<usize>,
    ) {
        let mut stream = b"noise before the preamble".to_vec();
        stream.extend_from_slice(protocol::PREAMBLE);
        let mut frames = BytesMut::new();
        for id in &ids {
            let start = protocol::begin_frame(&mut frames);
            let done = Reply::Done { id: *id, errors: Count::new(0), busy_ns: Fixed64::new(*id), peak_rss_kib: Fixed64::new(0) };
            protocol::encode_into(&mut frames, &done).unwrap();
            let record = protocol::begin_record(&mut frames);
            protocol::encode_into(&mut frames, &protocol::Outcome::Ok).unwrap();
            protocol::encode_into(&mut frames, &format!("output {id}")).unwrap();
            protocol::end_record(&mut frames, record);
            let record = protocol::begin_record(&mut frames);
            protocol::encode_into(&mut frames, &protocol::Outcome::Shared { error: SharedError::Gone }).unwrap();
            protocol::end_record(&mut frames, record);
            protocol::end_frame(&mut frames, start, 1 << 16).unwrap();
            // Protocol 4's other messages between the calls: log records, progress.
            let log = Reply::Log {
                records: vec![LogRecord {
                    call: *id,
                    level: (*id % 6) as u8,
                    target: "fuzz".into(),
                    message: format!("event {id}"),
                    fields: "k=v".into(),
                }],
                dropped: (*id % 3) as u32,
            };
            protocol::write_message(&mut frames, &log, 1 << 16).unwrap();
            let progress = Reply::Progress { call: *id, done: *id, total: id.wrapping_mul(2) };
            protocol::write_message(&mut frames, &progress, 1 << 16).unwrap();
            // Protocol 5's: what a call printed.
            let start = protocol::begin_frame(&mut frames);
            protocol::encode_into(&mut frames, &Reply::Output { call: Some(*id), stderr: 6 }).unwrap();
            frames.extend_from_slice(format!("error\nprinted {id}\n").as_bytes());
            protocol::end_frame(&mut frames, start, 1 << 16).unwrap();
        }
        stream.extend_from_slice(&frames);
        for (at, byte) in flips {
            if !stream.is_empty() {
                let at = at % stream.len();
                stream[at] ^= byte;
            }
        }
        decode_worker_output(&stream, &reads);
    }

    #[test]
    fn fuzz_the_worker_never_panics_on_call_bodies(body: Vec<u8>, items in 0u32..64) {
        let mut out = protocol::ReplyBuf::new().unwrap();
        TASKS.get(0).unwrap().invoke(&body, items, &mut out);
        // Every input gets exactly one outcome, which the parent can read.
        let mut replies: &[u8] = out.frame();
        for _ in 0..items {
            let result = decode_record::<usize>("text", &mut replies);
            let unreadable = matches!(result, Err(crate::Error::Codec { direction: crate::Direction::Output, .. }));
            prop_assert!(!unreadable, "an outcome the parent cannot read");
        }
        prop_assert!(replies.is_empty());
        let mut out = protocol::ReplyBuf::new().unwrap();
        TASKS.get(1).unwrap().invoke(&body, items, &mut out);
        let mut replies: &[u8] = out.frame();
        for _ in 0..items {
            let _ = decode_record::<u64>("pair", &mut replies);
        }
        prop_assert!(replies.is_empty());
    }
}
