//! Writes the request frames of the calls in flight to a worker's pipe.
//!
//! The writer holds no frames of its own: the calls in flight do, and it only
//! counts how many at their back are not yet fully written. That keeps the write
//! state next to the one queue the rest of the session already keeps in order.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;

use crate::parent::dispatch::Job;

/// Frames up to this size are copied into one buffer and written together.
const SMALL_FRAME: usize = 8 * 1024;
/// How much to stage before writing.
const STAGE_LIMIT: usize = 64 * 1024;

/// Something in flight with a whole request frame to write.
pub(super) trait Framed {
    /// The frame, or its first piece when it has more.
    fn frame(&self) -> &[u8];
    /// The frame's further pieces (large blobs spliced in, and what follows them).
    fn rest(&self) -> &[Bytes] {
        &[]
    }
}

impl Framed for Job {
    #[inline]
    fn frame(&self) -> &[u8] {
        &self.frame
    }

    #[inline]
    fn rest(&self) -> &[Bytes] {
        &self.rest
    }
}

/// The whole frame's length.
fn frame_len<F: Framed>(framed: &F) -> usize {
    framed.frame().len() + framed.rest().iter().map(Bytes::len).sum::<usize>()
}

/// What is left to write of a frame `written` bytes in, up to the end of the piece
/// that holds that offset.
fn unwritten<F: Framed>(framed: &F, mut written: usize) -> &[u8] {
    let first = framed.frame();
    if written < first.len() || framed.rest().is_empty() {
        return &first[written.min(first.len())..];
    }
    written -= first.len();
    for piece in framed.rest() {
        if written < piece.len() {
            return &piece[written..];
        }
        written -= piece.len();
    }
    &[]
}

/// The write state of the frames at the back of a queue of calls in flight.
#[derive(Default)]
pub(super) struct FrameWriter {
    /// How many calls at the back of the queue are not yet fully written.
    unwritten: usize,
    /// Bytes already written of the first of those, when it is written directly.
    written: usize,
    /// Copies of the oldest unwritten frames, when small, to write in one go.
    staged: BytesMut,
    /// Where each staged frame ends in `staged`, and whether it is a call's.
    staged_ends: VecDeque<(usize, bool)>,
    /// Bytes of `staged` already written.
    staged_pos: usize,
    /// A large control frame being written from its own buffer, and how much of it.
    direct: Option<Bytes>,
    direct_pos: usize,
    /// The pipe broke; nothing more is written.
    closed: bool,
}

impl FrameWriter {
    /// `count` calls were pushed at the back of the queue.
    #[inline]
    pub(super) fn queued(&mut self, count: usize) {
        self.unwritten += count;
    }

    /// How many calls at the front of a queue of `in_flight` are fully written.
    #[inline]
    pub(super) fn written(&self, in_flight: usize) -> usize {
        in_flight - self.unwritten
    }

    /// Whether the first of `in_flight` calls is fully written (so it may be running).
    #[inline]
    pub(super) fn head_written(&self, in_flight: usize) -> bool {
        self.unwritten < in_flight
    }

    /// The pipe broke (or was closed): the worker reads no more.
    #[inline]
    pub(super) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Writes unwritten frames of `in_flight`, and the `control` frames (channel
    /// messages, taken first, between whole call frames), until the pipe is full,
    /// it broke, or nothing is left.
    pub(super) fn poll_write<W, F>(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut W,
        in_flight: &VecDeque<F>,
        control: &mut VecDeque<Bytes>,
    ) where
        W: AsyncWrite + Unpin + ?Sized,
        F: Framed,
    {
        while (self.unwritten > 0
            || !control.is_empty()
            || !self.staged_ends.is_empty()
            || self.direct.is_some())
            && !self.closed
        {
            let first = in_flight.len() - self.unwritten;
            if self.staged_ends.is_empty() && self.written == 0 && self.direct.is_none() {
                // Small frames go out copied into one buffer: one long write costs the
                // kernel far less than dozens of tiny ones in a vector.
                while self.staged.len() < STAGE_LIMIT {
                    let Some(frame) = control.pop_front() else { break };
                    if frame.len() > SMALL_FRAME {
                        // A large one goes out from its own buffer, after what is staged.
                        if self.staged_ends.is_empty() {
                            self.direct = Some(frame);
                        } else {
                            control.push_front(frame);
                        }
                        break;
                    }
                    self.staged.extend_from_slice(&frame);
                    self.staged_ends.push_back((self.staged.len(), false));
                }
                for job in in_flight.range(first..) {
                    let frame = job.frame();
                    // Control frames may come in parts: no call frame goes between.
                    if !control.is_empty()
                        || self.direct.is_some()
                        || frame.len() > SMALL_FRAME
                        || !job.rest().is_empty()
                        || self.staged.len() >= STAGE_LIMIT
                    {
                        break;
                    }
                    self.staged.extend_from_slice(frame);
                    self.staged_ends.push_back((self.staged.len(), true));
                }
            }
            let staging = !self.staged_ends.is_empty();
            let direct = !staging && self.direct.is_some();
            let bytes = if staging {
                &self.staged[self.staged_pos..]
            } else if let Some(frame) = self.direct.as_ref().filter(|_| direct) {
                &frame[self.direct_pos..]
            } else if self.unwritten > 0 {
                unwritten(&in_flight[first], self.written)
            } else {
                return;
            };
            match Pin::new(&mut *out).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => self.closed = true,
                Poll::Ready(Ok(n)) if staging => {
                    self.staged_pos += n;
                    while let Some(&(end, call)) = self.staged_ends.front() {
                        if end > self.staged_pos {
                            break;
                        }
                        self.staged_ends.pop_front();
                        if call {
                            self.unwritten -= 1;
                        }
                    }
                    if self.staged_ends.is_empty() {
                        self.staged.clear();
                        self.staged_pos = 0;
                    }
                }
                Poll::Ready(Ok(n)) if direct => {
                    self.direct_pos += n;
                    if self.direct.as_ref().is_some_and(|frame| self.direct_pos == frame.len()) {
                        self.direct = None;
                        self.direct_pos = 0;
                    }
                }
                // A large frame goes out as it is, without a copy.
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    if self.written == frame_len(&in_flight[first]) {
                        self.written = 0;
                        self.unwritten -= 1;
                    }
                }
                Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                // The worker is gone; its replies are still read to the end.
                Poll::Ready(Err(_)) => self.closed = true,
                Poll::Pending => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    impl Framed for Bytes {
        fn frame(&self) -> &[u8] {
            self
        }
    }

    /// A pipe that takes at most `chunk` bytes per write, then says it is full
    /// until `room` is raised, and records each write's address and length.
    #[derive(Default)]
    struct Pipe {
        data: Vec<u8>,
        writes: Vec<(usize, usize)>,
        chunk: usize,
        room: usize,
        broken: bool,
    }

    impl Pipe {
        fn new(chunk: usize, room: usize) -> Self {
            Pipe { chunk, room, ..Pipe::default() }
        }
    }

    impl AsyncWrite for Pipe {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            if self.broken {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let n = buf.len().min(self.chunk).min(self.room);
            if n == 0 {
                return Poll::Pending;
            }
            self.room -= n;
            self.writes.push((buf.as_ptr() as usize, n));
            self.data.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn frames(sizes: &[usize]) -> VecDeque<Bytes> {
        sizes.iter().enumerate().map(|(i, &len)| Bytes::from(vec![i as u8; len])).collect()
    }

    fn write(writer: &mut FrameWriter, pipe: &mut Pipe, in_flight: &VecDeque<Bytes>) {
        writer.poll_write(&mut Context::from_waker(Waker::noop()), pipe, in_flight, &mut VecDeque::new());
    }

    fn concat(in_flight: &VecDeque<Bytes>) -> Vec<u8> {
        in_flight.iter().flat_map(|frame| frame.iter().copied()).collect()
    }

    /// A frame in pieces, as a spliced call's.
    struct Pieces(Bytes, Vec<Bytes>);

    impl Framed for Pieces {
        fn frame(&self) -> &[u8] {
            &self.0
        }
        fn rest(&self) -> &[Bytes] {
            &self.1
        }
    }

    #[test]
    fn a_frame_in_pieces_is_written_whole_each_piece_from_its_own_buffer() {
        let blob = Bytes::from(vec![9u8; 3 * SMALL_FRAME]);
        let small = Pieces(Bytes::from_static(b"s"), Vec::new());
        let spliced = Pieces(Bytes::from_static(b"head"), vec![blob.clone(), Bytes::from_static(b"tail")]);
        let in_flight: VecDeque<Pieces> = [small, spliced].into();
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(SMALL_FRAME, usize::MAX));
        writer.queued(2);
        writer.poll_write(
            &mut Context::from_waker(Waker::noop()),
            &mut pipe,
            &in_flight,
            &mut VecDeque::new(),
        );
        let mut expected = b"shead".to_vec();
        expected.extend_from_slice(&blob);
        expected.extend_from_slice(b"tail");
        assert_eq!(pipe.data, expected);
        assert_eq!(writer.written(2), 2);
        assert!(pipe.writes.contains(&(blob.as_ptr() as usize, SMALL_FRAME)), "the blob is not copied");
    }

    #[test]
    fn small_frames_are_coalesced_into_one_write() {
        let in_flight = frames(&[10, 20, 30]);
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(usize::MAX, usize::MAX));
        writer.queued(3);
        write(&mut writer, &mut pipe, &in_flight);
        assert_eq!(pipe.writes.len(), 1);
        assert_eq!(pipe.data, concat(&in_flight));
        assert_eq!(writer.written(3), 3);
    }

    #[test]
    fn frames_are_written_whole_and_in_order_through_a_narrow_pipe() {
        let in_flight = frames(&[100, SMALL_FRAME + 1, 7, 3 * SMALL_FRAME, 50]);
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(333, usize::MAX));
        writer.queued(in_flight.len());
        write(&mut writer, &mut pipe, &in_flight);
        assert_eq!(pipe.data, concat(&in_flight));
        assert_eq!(writer.written(in_flight.len()), in_flight.len());
    }

    #[test]
    fn a_large_frame_is_written_in_pieces_from_its_own_buffer() {
        let in_flight = frames(&[4 * SMALL_FRAME]);
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(SMALL_FRAME, usize::MAX));
        writer.queued(1);
        write(&mut writer, &mut pipe, &in_flight);
        let start = in_flight[0].as_ptr() as usize;
        let expected: Vec<_> = (0..4).map(|i| (start + i * SMALL_FRAME, SMALL_FRAME)).collect();
        assert_eq!(pipe.writes, expected, "each piece is written from the frame itself, not a copy");
        assert!(writer.head_written(1));
    }

    #[test]
    fn a_full_pipe_leaves_the_rest_for_later_and_counts_only_whole_frames() {
        let in_flight = frames(&[10, 10, 10]);
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(usize::MAX, 15));
        writer.queued(3);
        write(&mut writer, &mut pipe, &in_flight);
        assert_eq!(writer.written(3), 1, "the second frame is only half written");
        assert!(writer.head_written(3));
        pipe.room = usize::MAX;
        write(&mut writer, &mut pipe, &in_flight);
        assert_eq!(pipe.data, concat(&in_flight));
        assert_eq!(writer.written(3), 3);
    }

    #[test]
    fn a_frame_not_yet_written_is_not_the_head_written() {
        let in_flight = frames(&[10]);
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(usize::MAX, 9));
        writer.queued(1);
        write(&mut writer, &mut pipe, &in_flight);
        assert!(!writer.head_written(1));
    }

    #[test]
    fn frames_queued_later_follow_those_answered_meanwhile() {
        let mut in_flight = frames(&[10, 20]);
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(usize::MAX, usize::MAX));
        writer.queued(2);
        write(&mut writer, &mut pipe, &in_flight);
        in_flight.pop_front();
        in_flight.push_back(Bytes::from_static(b"next"));
        writer.queued(1);
        write(&mut writer, &mut pipe, &in_flight);
        assert_eq!(&pipe.data[30..], b"next");
        assert_eq!(writer.written(2), 2);
    }

    #[test]
    fn control_frames_go_between_whole_call_frames_and_large_ones_from_their_own_buffer() {
        let in_flight = frames(&[10, 3 * SMALL_FRAME, 20]);
        let large = Bytes::from(vec![9u8; 2 * SMALL_FRAME]);
        let mut control: VecDeque<Bytes> = [Bytes::from_static(b"ctl"), large.clone()].into();
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(SMALL_FRAME / 2, usize::MAX));
        writer.queued(in_flight.len());
        writer.poll_write(&mut Context::from_waker(Waker::noop()), &mut pipe, &in_flight, &mut control);
        // Control frames (which may be parts of one frame) all go before any call
        // frame is taken.
        let mut expected = b"ctl".to_vec();
        expected.extend_from_slice(&large);
        expected.extend_from_slice(&concat(&in_flight));
        assert!(pipe.data == expected, "frames went out whole, in that order");
        let start = large.as_ptr() as usize;
        assert!(
            pipe.writes.iter().any(|&(at, _)| at == start),
            "the large one is written from its own buffer"
        );
        assert_eq!(writer.written(in_flight.len()), in_flight.len());
    }

    #[test]
    fn a_broken_pipe_is_reported_closed() {
        let in_flight = frames(&[10]);
        let (mut writer, mut pipe) = (FrameWriter::default(), Pipe::new(usize::MAX, usize::MAX));
        pipe.broken = true;
        writer.queued(1);
        write(&mut writer, &mut pipe, &in_flight);
        assert!(writer.is_closed());
        assert!(!writer.head_written(1));
    }

    #[tokio::test]
    async fn frames_arrive_whole_over_an_in_memory_pipe() {
        use tokio::io::AsyncReadExt;
        let in_flight = frames(&[5, 2 * SMALL_FRAME, 9]);
        let (mut near, mut far) = tokio::io::duplex(1000);
        let mut writer = FrameWriter::default();
        writer.queued(in_flight.len());
        let expected = concat(&in_flight);
        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            far.read_exact(&mut got).await.map(|_| got == expected)
        });
        std::future::poll_fn(|cx| {
            writer.poll_write(cx, &mut near, &in_flight, &mut VecDeque::new());
            if writer.written(in_flight.len()) == in_flight.len() { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
        assert!(matches!(reader.await, Ok(Ok(true))));
    }

    /// Random interleavings of multi-part control frames, calls, replies
    /// and a narrow pipe: the stream must parse as whole frames in order, and
    /// `written` must count exactly the call frames fully in the pipe.
    #[test]
    fn random_interleavings_keep_frames_whole() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        fn frame(tag: u8, id: u32, body: usize) -> Vec<u8> {
            let mut f = ((body + 5) as u32).to_be_bytes().to_vec();
            f.push(tag);
            f.extend_from_slice(&id.to_le_bytes());
            f.extend((0..body).map(|i| (i as u32 ^ id) as u8));
            f
        }
        fn check(
            data: &[u8],
            writer: &FrameWriter,
            in_flight: &VecDeque<Bytes>,
            popped: usize,
            round: usize,
        ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
            let (mut calls, mut ctls) = (Vec::new(), Vec::new());
            let mut at = 0;
            while at + 4 <= data.len() {
                let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                if at + 4 + len > data.len() {
                    break;
                }
                let f = data[at..at + 4 + len].to_vec();
                let id = u32::from_le_bytes(f[5..9].try_into().unwrap());
                match f[4] {
                    b'J' => {
                        assert_eq!(id as usize, calls.len(), "round {round}: call order");
                        calls.push(f)
                    }
                    b'C' => {
                        assert_eq!(id as usize, ctls.len(), "round {round}: control order");
                        ctls.push(f)
                    }
                    t => panic!("round {round}: garbage tag {t} at {at}"),
                }
                at += 4 + len;
            }
            assert_eq!(
                writer.written(in_flight.len()) + popped,
                calls.len(),
                "round {round}: written() counts exactly the calls fully in the pipe"
            );
            assert_eq!(writer.head_written(in_flight.len()), writer.written(in_flight.len()) > 0);
            (calls, ctls)
        }
        let sizes = [0, 3, 100, SMALL_FRAME - 5, SMALL_FRAME, SMALL_FRAME + 1, 3 * SMALL_FRAME, STAGE_LIMIT];
        for round in 0..300 {
            let mut writer = FrameWriter::default();
            let mut pipe = Pipe::new(1 + rand(3 * SMALL_FRAME), 0);
            let mut in_flight: VecDeque<Bytes> = VecDeque::new();
            let mut control: VecDeque<Bytes> = VecDeque::new();
            let (mut calls, mut ctls) = (0u32, 0u32);
            let mut popped = 0usize;
            let (mut expect_calls, mut expect_ctls) = (Vec::new(), Vec::new());
            for _ in 0..60 {
                match rand(5) {
                    0 => {
                        let f = frame(b'C', ctls, sizes[rand(sizes.len())]);
                        ctls += 1;
                        expect_ctls.push(f.clone());
                        let mut at = 0;
                        while at < f.len() {
                            let n = (1 + rand(3 * SMALL_FRAME)).min(f.len() - at);
                            control.push_back(Bytes::copy_from_slice(&f[at..at + n]));
                            at += n;
                        }
                    }
                    1 => {
                        let f = frame(b'J', calls, sizes[rand(sizes.len())]);
                        calls += 1;
                        expect_calls.push(f.clone());
                        in_flight.push_back(Bytes::from(f));
                        writer.queued(1);
                    }
                    2 => pipe.room += rand(4 * SMALL_FRAME),
                    3 if writer.written(in_flight.len()) > 0 => {
                        in_flight.pop_front();
                        popped += 1;
                    }
                    _ => {}
                }
                writer.poll_write(
                    &mut Context::from_waker(Waker::noop()),
                    &mut pipe,
                    &in_flight,
                    &mut control,
                );
                check(&pipe.data, &writer, &in_flight, popped, round);
            }
            pipe.room = usize::MAX;
            writer.poll_write(&mut Context::from_waker(Waker::noop()), &mut pipe, &in_flight, &mut control);
            let (got_calls, got_ctls) = check(&pipe.data, &writer, &in_flight, popped, round);
            assert_eq!(got_calls, expect_calls, "round {round}");
            assert_eq!(got_ctls, expect_ctls, "round {round}");
            assert!(control.is_empty() && writer.written(in_flight.len()) == in_flight.len());
        }
    }
}
