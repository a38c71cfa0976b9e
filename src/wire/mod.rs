//! What the parent and its workers share on the pipes: frames and messages, the
//! zero-copy byte type, codec error messages, type fingerprints, and panics as data.

pub(crate) mod blob;
pub(crate) mod codec;
pub(crate) mod panic;
pub(crate) mod protocol;
pub(crate) mod shape;
