//! `Blob`: bytes that cross the process boundary without a copy on arrival.

use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// An immutable, cheaply cloneable byte buffer for large task inputs and outputs.
///
/// Any `Vec<u8>` works as a task input or output, but each byte then goes through
/// serde one by one, and arrives as a fresh copy. A `Blob` is written to the frame
/// in one `memcpy`, and on arrival (in the worker, or back in the caller) it does
/// not copy at all: it shares the memory of the frame it came in, like
/// [`bytes::Bytes`]. Cloning one is a reference-count increment.
///
/// A `Blob` taken from a large reply keeps that whole reply alive; copy it
/// (`Blob::copy_from_slice`) if you keep a small part of a large reply for long.
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
        serializer.serialize_bytes(&self.0)
    }
}

thread_local! {
    /// The frame being decoded on this thread, which a `Blob` may share.
    static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `decode` with `frame` as the frame blobs may borrow from.
///
/// The frame stays registered (a map decodes a chunk's outputs one per poll, and
/// re-registering per output costs more than decoding it) until [`release`]d or
/// replaced. A stale registration is harmless: it keeps that frame alive, so no
/// other data can ever lie inside it.
pub(crate) fn decode_from<R>(frame: &Bytes, decode: impl FnOnce() -> R) -> R {
    FRAME.with_borrow_mut(|current| {
        if !current.as_ref().is_some_and(|current| same(current, frame)) {
            *current = Some(frame.clone());
        }
    });
    decode()
}

/// Forgets `frame` if it is the registered one.
pub(crate) fn release(frame: &Bytes) {
    FRAME.with_borrow_mut(|current| {
        if current.as_ref().is_some_and(|current| same(current, frame)) {
            *current = None;
        }
    });
}

fn same(a: &Bytes, b: &Bytes) -> bool {
    a.as_ptr() == b.as_ptr() && a.len() == b.len()
}

/// `data` as a `Bytes`: shared with the current frame when it lies inside it.
fn share_or_copy(data: &[u8]) -> Bytes {
    FRAME.with_borrow(|frame| match frame {
        Some(frame) if contains(frame, data) => frame.slice_ref(data),
        _ => Bytes::copy_from_slice(data),
    })
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

    #[test]
    fn a_blob_decoded_inside_its_frame_shares_it() {
        let frame = Bytes::from(postcard::to_allocvec(&Blob::from(vec![9u8; 1000])).unwrap());
        let blob: Blob = decode_from(&frame, || postcard::from_bytes(&frame).unwrap());
        assert_eq!(&blob[..], &[9u8; 1000][..]);
        let inside = frame.as_ptr_range();
        assert!(inside.contains(&blob.as_ptr()), "no copy was made");
    }

    #[test]
    fn a_blob_decoded_elsewhere_is_copied() {
        let encoded = postcard::to_allocvec(&Blob::from(vec![1u8, 2, 3])).unwrap();
        let unrelated = Bytes::from_static(b"another frame");
        let blob: Blob = decode_from(&unrelated, || postcard::from_bytes(&encoded).unwrap());
        assert_eq!(&blob[..], [1, 2, 3]);
        let blob: Blob = postcard::from_bytes(&encoded).unwrap();
        assert_eq!(&blob[..], [1, 2, 3]);
    }

    #[test]
    fn a_released_frame_is_forgotten_and_another_does_not_release_it() {
        let frame = Bytes::from(vec![1u8; 16]);
        decode_from(&frame, || ());
        release(&Bytes::from(vec![1u8; 16]));
        assert!(FRAME.with_borrow(Option::is_some));
        release(&frame);
        assert!(FRAME.with_borrow(Option::is_none));
    }
}
