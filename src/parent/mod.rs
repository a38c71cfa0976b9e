//! The parent side: the executor and everything that supervises its workers.

pub(crate) mod builder;
pub(crate) mod channels;
pub(crate) mod dispatch;
pub(crate) mod drivers;
pub(crate) mod error;
pub(crate) mod executor;
#[cfg(test)]
mod fuzz;
pub(crate) mod in_process;
pub(crate) mod launch;
pub(crate) mod map;
pub(crate) mod output;
pub(crate) mod pool;
pub(crate) mod process;
pub(crate) mod progress;
pub(crate) mod shared;
pub(crate) mod stats;
pub(crate) mod supervisor;
