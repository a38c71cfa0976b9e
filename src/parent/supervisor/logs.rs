//! A worker's `tracing` events, re-emitted in the parent's subscriber: with the
//! worker's slot and pid, the task and call, under the span that was current where
//! the call was made. One callsite per level (`procexec::worker`), whatever the
//! worker's events were, so forwarding registers no metadata per event. And what
//! its calls printed, to their callers or labelled with the call.

use crate::parent::dispatch::Job;
use crate::parent::output::WorkerOutput;
use crate::parent::stats::Counters;
use crate::wire::protocol::LogRecord;

/// Re-emits `records` of the worker in `slot`; the call each names is looked up
/// among `jobs` (those in flight) for its task and span.
pub(crate) fn emit<'a>(
    counters: &Counters,
    (slot, pid): (usize, u32),
    records: Vec<LogRecord>,
    dropped: u32,
    jobs: impl Iterator<Item = &'a Job> + Clone,
) {
    Counters::add(&counters.log_records, records.len() as u64);
    Counters::add(&counters.log_records_dropped, u64::from(dropped));
    for record in records {
        let job = jobs.clone().find(|job| job.id == record.call);
        let task = job.map(|job| job.task);
        let parent = job.and_then(|job| job.span.id());
        let LogRecord { call, level, target, message, fields } = record;
        macro_rules! at {
            ($level:expr) => {
                tracing::event!(
                    target: "procexec::worker",
                    parent: parent,
                    $level,
                    worker = slot,
                    pid,
                    task,
                    call,
                    origin = %target,
                    fields = %fields,
                    "{message}"
                )
            };
        }
        match level {
            1 => at!(tracing::Level::ERROR),
            2 => at!(tracing::Level::WARN),
            3 => at!(tracing::Level::INFO),
            4 => at!(tracing::Level::DEBUG),
            _ => at!(tracing::Level::TRACE),
        }
    }
    if dropped > 0 {
        tracing::warn!(
            worker = slot,
            pid,
            dropped,
            "the worker dropped log records: its tasks logged faster than it could send"
        );
    }
}

/// Passes on what a worker printed during `call` (one of `jobs`, those in flight),
/// or between calls.
pub(crate) fn printed<'a>(
    output: &mut WorkerOutput,
    mut jobs: impl Iterator<Item = &'a Job>,
    call: Option<u64>,
    stderr: &[u8],
    stdout: &[u8],
) {
    let job = call.and_then(|id| jobs.find(|job| job.id == id));
    output.received(job.map(Job::label), job.and_then(|job| job.capture.as_ref()), stderr, stdout);
}
