//! `Blob`: bytes that cross the process boundary without a copy on arrival.

use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::wire::protocol;

/// An immutable, cheaply cloneable byte buffer for large task inputs and outputs.
///
/// A `Blob` is written to the frame in one `memcpy` (a `spawn`'s input of 64 KiB or
/// more not even that: it goes to the pipe from its own buffer), and on arrival (in
/// the worker, or back in the caller) it does not copy at all: it shares the memory
/// of the frame it came in, like [`bytes::Bytes`]. Cloning one is a reference-count
/// increment.
///
/// A `Blob` of 4 KiB or more taken from a reply keeps that whole reply alive (smaller
/// ones are copied); copy it (`Blob::copy_from_slice`) if you keep a small part of a
/// large reply for long.
///
/// A `Vec<u8>` works as a task input or output, but each byte then goes through
/// serde one by one (4-10x slower: about 200 MB/s against 1-3 GB/s for a `Blob`
/// echo here), and arrives as a fresh copy. `tasks!` therefore warns (a deprecation
/// warning) where a task takes or returns exactly `Vec<u8>`; put
/// `#[allow(deprecated)]` on the task to keep it anyway. `serde_bytes::ByteBuf`, or
/// a field marked `#[serde(with = "serde_bytes")]`, is encoded in one copy like a
/// `Blob`, but copied again on arrival.
///
/// ```compile_fail
/// #![deny(deprecated)]
/// procexec::tasks! {
///     pub fn checksum(data: Vec<u8>) -> u32 { data.iter().map(|&b| u32::from(b)).sum() }
/// }
/// # fn main() {}
/// ```
///
/// ```
/// #![deny(deprecated)]
/// procexec::tasks! {
///     #[allow(deprecated)] // small vectors: the convenience is worth it
///     pub fn checksum(data: Vec<u8>) -> u32 { data.iter().map(|&b| u32::from(b)).sum() }
///     pub fn checksum_blob(data: procexec::Blob) -> u32 { data.iter().map(|&b| u32::from(b)).sum() }
/// }
/// # fn main() {}
/// ```
///
/// # Examples
///
/// ```
/// use procexec::Blob;
///
/// procexec::tasks! {
///     /// Reverses the bytes.
///     pub fn reverse(data: Blob) -> Blob {
///         data.iter().rev().copied().collect::<Vec<u8>>().into()
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(1).build().await?;
/// let reversed = exec.spawn(reverse, Blob::from(vec![1, 2, 3])).await?;
/// assert_eq!(&reversed[..], [3, 2, 1]);
/// # Ok(()) }
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blob(Bytes);

impl Blob {
    /// An empty blob.
    pub const fn new() -> Self {
        Blob(Bytes::new())
    }

    /// A blob of a copy of `data`.
    ///
    /// ```
    /// let blob = procexec::Blob::copy_from_slice(b"abc");
    /// assert_eq!(blob.len(), 3);
    /// ```
    pub fn copy_from_slice(data: &[u8]) -> Self {
        Blob(Bytes::copy_from_slice(data))
    }

    /// The blob as [`bytes::Bytes`], without copying.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Blob {
    fn from(data: Vec<u8>) -> Self {
        Blob(data.into())
    }
}

impl From<Bytes> for Blob {
    fn from(data: Bytes) -> Self {
        Blob(data)
    }
}

impl From<&'static [u8]> for Blob {
    fn from(data: &'static [u8]) -> Self {
        Blob(Bytes::from_static(data))
    }
}

impl From<Blob> for Bytes {
    fn from(blob: Blob) -> Self {
        blob.0
    }
}

impl From<Blob> for Vec<u8> {
    fn from(blob: Blob) -> Self {
        blob.0.into()
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A frame being spliced (see `protocol::splicing`) takes these bytes by
        // reference when they reach it; any other serializer just copies them.
        let offered = protocol::offer_splice(&self.0);
        let result = serializer.serialize_bytes(&self.0);
        if offered {
            protocol::withdraw_splice();
        }
        result
    }
}

thread_local! {
    /// The frame being decoded on this thread, which a `Blob` may share.
    static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Blobs smaller than this are copied rather than shared: a few bytes kept by a
/// task or caller should not pin a whole read buffer.
const SHARE_FROM: usize = 4 * 1024;

/// While alive, blobs decoded on this thread may share `frame`; dropping it
/// restores what was registered before (also on a panic, and if dropped on another
/// thread it only forgets its own registration's frame, so nothing outlives it).
pub(crate) struct Registration {
    previous: Option<Bytes>,
}

/// Registers `frame` as the frame blobs decoded on this thread may share.
pub(crate) fn register(frame: &Bytes) -> Registration {
    // During thread-local teardown nothing is registered: blobs are then copied.
    let previous = FRAME.try_with(|current| current.replace(Some(frame.clone()))).ok().flatten();
    Registration { previous }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let previous = self.previous.take();
        let _ = FRAME.try_with(|current| current.replace(previous));
    }
}

/// `data` as a `Bytes`: shared with the registered frame when it lies inside it
/// and is not small.
fn share_or_copy(data: &[u8]) -> Bytes {
    if data.len() >= SHARE_FROM {
        let shared = FRAME.try_with(|frame| match &*frame.borrow() {
            Some(frame) if contains(frame, data) => Some(frame.slice_ref(data)),
            _ => None,
        });
        if let Ok(Some(shared)) = shared {
            return shared;
        }
    }
    Bytes::copy_from_slice(data)
}

fn contains(frame: &[u8], data: &[u8]) -> bool {
    let frame = frame.as_ptr_range();
    let data = data.as_ptr_range();
    !data.start.is_null() && frame.start <= data.start && data.end <= frame.end
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BlobVisitor;

        impl<'de> Visitor<'de> for BlobVisitor {
            type Value = Blob;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }

            fn visit_borrowed_bytes<E: de::Error>(self, data: &'de [u8]) -> Result<Blob, E> {
                Ok(Blob(share_or_copy(data)))
            }

            fn visit_bytes<E: de::Error>(self, data: &[u8]) -> Result<Blob, E> {
                Ok(Blob(Bytes::copy_from_slice(data)))
            }

            fn visit_byte_buf<E: de::Error>(self, data: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(data.into()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
                let mut data = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(byte) = seq.next_element()? {
                    data.push(byte);
                }
                Ok(Blob(data.into()))
            }
        }

        deserializer.deserialize_bytes(BlobVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(blob: &Blob) -> Bytes {
        Bytes::from(postcard::to_allocvec(blob).unwrap())
    }

    #[test]
    fn a_large_blob_decoded_inside_its_frame_shares_it() {
        let frame = frame_of(&Blob::from(vec![9u8; 10_000]));
        let blob: Blob = {
            let _registered = register(&frame);
            postcard::from_bytes(&frame).unwrap()
        };
        assert_eq!(&blob[..], &[9u8; 10_000][..]);
        assert!(frame.as_ptr_range().contains(&blob.as_ptr()), "no copy was made");
    }

    #[test]
    fn small_blobs_and_blobs_from_elsewhere_are_copied() {
        let small = frame_of(&Blob::from(vec![1u8, 2, 3]));
        let _registered = register(&small);
        let blob: Blob = postcard::from_bytes(&small).unwrap();
        assert_eq!(&blob[..], [1, 2, 3]);
        assert!(!small.as_ptr_range().contains(&blob.as_ptr()));
        let large = frame_of(&Blob::from(vec![5u8; 10_000]));
        let blob: Blob = postcard::from_bytes(&large).unwrap();
        assert!(!large.as_ptr_range().contains(&blob.as_ptr()), "not registered: copied");
    }

    #[test]
    fn a_large_blob_is_spliced_out_of_the_buffer_and_a_small_one_copied() {
        let large = Blob::from(vec![3u8; protocol::SPLICE_FROM]);
        let small = Blob::from(vec![4u8; 10]);
        let mut buf = bytes::BytesMut::new();
        let (encoded, parts) = protocol::splicing(|| protocol::encode_into(&mut buf, &(&small, &large, 7u8)));
        encoded.unwrap();
        assert_eq!(parts.len(), 1);
        let (at, part) = &parts[0];
        assert_eq!(part.as_ptr(), large.as_ptr(), "the blob itself, not a copy");
        // Put back in place, the bytes are the plain encoding.
        let mut whole = buf[..*at].to_vec();
        whole.extend_from_slice(part);
        whole.extend_from_slice(&buf[*at..]);
        assert_eq!(whole, postcard::to_allocvec(&(&small, &large, 7u8)).unwrap());
        // Outside `splicing`, nothing is left out.
        let mut plain = bytes::BytesMut::new();
        protocol::encode_into(&mut plain, &large).unwrap();
        assert_eq!(plain.len(), protocol::SPLICE_FROM + 3);
    }

    #[test]
    fn a_registration_ends_with_its_guard_even_on_panic() {
        let frame = Bytes::from(vec![1u8; 16]);
        let _ = std::panic::catch_unwind(|| {
            let _registered = register(&frame);
            panic!("decoder bug");
        });
        assert!(FRAME.with_borrow(Option::is_none));
    }
}
