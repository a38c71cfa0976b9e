//! Matching a worker's reply frame to the call it answers.
//!
//! A worker answers its calls one at a time, in the order they were written: a
//! reply can only be for the oldest call in flight, once its request was fully
//! written. Anything else means the stream cannot be trusted.

use bytes::{Bytes, BytesMut};

use crate::wire::protocol::{self, LogRecord, Reply, ToParent};

/// A reply that answers the head call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The outcome records, sharing the frame's buffer.
    pub(crate) body: Bytes,
    pub(crate) busy_ns: u64,
    pub(crate) peak_rss_kib: u64,
    /// Items whose outcome is an error.
    pub(crate) errors: u32,
}

/// What a reply frame is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Matched {
    /// The answer to the head call.
    Call(Answer),
    /// A channel message, and the rest of its frame.
    Channel(ToParent, Bytes),
    /// Log records of the worker's tasks.
    Log { records: Vec<LogRecord>, dropped: u32 },
    /// A call's own progress report.
    Progress { call: u64, done: u64, total: u64 },
    /// What the worker printed, during `call` if set.
    Output { call: Option<u64>, stderr: Bytes, stdout: Bytes },
}

/// Matches `frame` to the head call (`head`, its id, if a call is in flight), whose
/// request is fully written if `head_written`, unless it is a channel message. An
/// error is a protocol violation.
pub(crate) fn match_reply(frame: BytesMut, head: Option<u64>, head_written: bool) -> Result<Matched, String> {
    let frame = frame.freeze();
    let (reply, body) =
        protocol::split_header::<Reply>(&frame).map_err(|e| format!("undecodable reply: {e}"))?;
    let (id, errors, busy_ns, peak_rss_kib) = match reply {
        Reply::Done { id, errors, busy_ns, peak_rss_kib } => (id, errors, busy_ns, peak_rss_kib),
        Reply::Channel(message) => return Ok(Matched::Channel(message, frame.slice_ref(body))),
        Reply::Log { records, dropped } => return Ok(Matched::Log { records, dropped }),
        Reply::Progress { call, done, total } => return Ok(Matched::Progress { call, done, total }),
        Reply::Output { call, stderr: len } => {
            let Some((stderr, stdout)) = protocol::split_output(body, len) else {
                return Err(format!("output of {len} bytes of stderr in {} bytes", body.len()));
            };
            let (stderr, stdout) = (frame.slice_ref(stderr), frame.slice_ref(stdout));
            return Ok(Matched::Output { call, stderr, stdout });
        }
        reply => return Err(format!("unexpected message {reply:?}")),
    };
    match head {
        Some(_) if !head_written => return Err(format!("reply for call {id} before it was sent")),
        Some(head) if head == id => {}
        Some(head) => return Err(format!("reply for call {id} while call {head} was running")),
        None => return Err(format!("reply for call {id}, but no call was in flight")),
    }
    let body = frame.slice(frame.len() - body.len()..);
    Ok(Matched::Call(Answer {
        body,
        busy_ns: busy_ns.get(),
        peak_rss_kib: peak_rss_kib.get(),
        errors: errors.get(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::protocol::{Count, Fixed64, TaskInfo};

    fn frame(reply: &Reply, body: &[u8]) -> BytesMut {
        let mut frame = BytesMut::from(&postcard::to_allocvec(reply).expect("a reply encodes")[..]);
        frame.extend_from_slice(body);
        frame
    }

    fn done(id: u64) -> Reply {
        Reply::Done { id, errors: Count::new(0), busy_ns: Fixed64::new(1500), peak_rss_kib: Fixed64::new(64) }
    }

    #[test]
    fn a_reply_for_the_head_completes_it_with_its_body() {
        let answer = match_reply(frame(&done(7), b"records"), Some(7), true);
        let expected =
            Answer { body: Bytes::from_static(b"records"), busy_ns: 1500, peak_rss_kib: 64, errors: 0 };
        assert_eq!(answer, Ok(Matched::Call(expected)));
    }

    #[test]
    fn the_body_shares_the_frame_buffer() {
        let frame = frame(&done(7), b"records");
        let end = frame.as_ptr() as usize + frame.len();
        let Ok(Matched::Call(answer)) = match_reply(frame, Some(7), true) else { panic!("it matches") };
        assert_eq!(answer.body.as_ptr() as usize + answer.body.len(), end);
    }

    #[test]
    fn a_reply_for_another_call_is_a_protocol_violation() {
        let error = match_reply(frame(&done(8), b""), Some(7), true);
        assert_eq!(error, Err("reply for call 8 while call 7 was running".into()));
    }

    #[test]
    fn a_reply_before_its_request_was_fully_written_is_a_protocol_violation() {
        let error = match_reply(frame(&done(7), b""), Some(7), false);
        assert_eq!(error, Err("reply for call 7 before it was sent".into()));
    }

    #[test]
    fn a_reply_with_no_call_in_flight_is_a_protocol_violation() {
        let error = match_reply(frame(&done(7), b""), None, true);
        assert_eq!(error, Err("reply for call 7, but no call was in flight".into()));
    }

    #[test]
    fn an_undecodable_header_is_a_protocol_violation() {
        let error = match_reply(BytesMut::from(&[0xff_u8; 3][..]), Some(7), true);
        assert!(error.is_err_and(|message| message.starts_with("undecodable reply")));
    }

    #[test]
    fn a_channel_message_matches_no_call_and_keeps_its_body() {
        let put = ToParent::Put { channel: 3, count: protocol::Count::new(1) };
        let matched = match_reply(frame(&Reply::Channel(put.clone()), b"item"), Some(7), false);
        let expected = Matched::Channel(put, Bytes::from_static(b"item"));
        assert_eq!(matched, Ok(expected));
    }

    #[test]
    fn a_handshake_reply_mid_session_is_a_protocol_violation() {
        let ready = Reply::Ready {
            version: 3,
            pid: 1,
            tasks: Vec::<TaskInfo>::new(),
            progress: None,
            reads_stderr: false,
        };
        let error = match_reply(frame(&ready, b""), Some(7), true);
        assert!(error.is_err_and(|message| message.starts_with("unexpected message Ready")));
    }
}
