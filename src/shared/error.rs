//! What fails in shared memory: shared by both sides and the wire protocol.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

/// Why a shared-memory operation failed.
///
/// In a task, a handle that cannot be mapped fails that input with
/// [`Error::Shared`](crate::Error::Shared) carrying this error.
///
/// ```
/// let err = procexec::SharedError::NotLocal;
/// assert!(err.to_string().contains("another machine"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SharedError {
    /// The handle was made on another machine: its memory cannot be mapped here.
    #[error(
        "this shared memory lives on another machine: it can be used only by the executor's process and \
         its workers on the same machine"
    )]
    NotLocal,
    /// The memory no longer exists: every handle on it in the process that made it
    /// is gone, or that process (its executor's) exited.
    #[error("this shared memory no longer exists (the process that made it dropped it or exited)")]
    Gone,
    /// The handle was decoded as another type than it was made with.
    #[error("a shared-memory handle made as `{found}` was used as `{expected}`")]
    WrongType {
        /// The type it was decoded as.
        expected: String,
        /// The type it was made with.
        found: String,
    },
    /// An access past the end of an array.
    #[error("elements {start}..{start}+{count} are out of bounds of a shared array of {len}")]
    OutOfBounds {
        /// The first element accessed.
        start: u64,
        /// How many elements.
        count: u64,
        /// The array's length.
        len: u64,
    },
    /// The lock was poisoned (see [`Poisoned`](crate::Poisoned)); converted from it by `?`.
    #[error("the shared-memory lock is poisoned: {0}")]
    Poisoned(PoisonCause),
    /// The system refused: making, mapping or passing the memory failed.
    #[error("cannot {what}: {message}")]
    System {
        /// What procexec was doing.
        what: String,
        /// The system's error.
        message: String,
    },
}

impl SharedError {
    pub(super) fn system(what: &str, err: std::io::Error) -> SharedError {
        SharedError::System { what: what.to_owned(), message: err.to_string() }
    }
}

thread_local! {
    /// The last error in decoding a handle on this thread, so that a worker reports
    /// it typed instead of as a decoding error.
    static DECODE_ERROR: RefCell<Option<SharedError>> = const { RefCell::new(None) };
}

pub(super) fn note_error(err: SharedError) {
    DECODE_ERROR.with(|last| *last.borrow_mut() = Some(err));
}

/// The shared-memory error behind a decoding error just seen on this thread whose
/// message is `message`, if any.
pub(crate) fn decode_error(message: &str) -> Option<SharedError> {
    DECODE_ERROR.with(|last| last.borrow_mut().take()).filter(|err| message.contains(&err.to_string()))
}

/// Why a lock is poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PoisonCause {
    /// The process with this pid died while it held the lock.
    OwnerDied {
        /// The pid of the process that died.
        pid: u32,
    },
    /// A thread panicked while it held the lock.
    Panicked,
}

impl std::fmt::Display for PoisonCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoisonCause::OwnerDied { pid } => write!(f, "the process {pid} died holding the lock"),
            PoisonCause::Panicked => f.write_str("a thread panicked holding the lock"),
        }
    }
}
