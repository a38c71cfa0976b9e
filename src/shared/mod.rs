//! Shared memory between the parent and its workers: values, arrays and buffers
//! that tasks map instead of receiving them through the pipe, and a lock that
//! survives a holder's death.
//!
//! - `error`: what fails, shared with the wire protocol;
//! - `memory`: a mapping, its header, element access and the lock word (all of the
//!   `unsafe` code);
//! - `segment`: memory files, the descriptor service and attaching in a worker;
//! - `lock`: taking the lock, guards and poisoning;
//! - `handles`: the public handles.

mod error;
mod handles;
mod lock;
mod memory;
pub(crate) mod segment;

pub(crate) use error::decode_error;
pub use error::{PoisonCause, SharedError};
pub use handles::{ArrayGuard, LockGuard, SharedArray, SharedBytes, SharedLock, SharedValue, ValueGuard};
pub use lock::{LockResult, Poisoned};
