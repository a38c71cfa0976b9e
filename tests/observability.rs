//! Seeing inside the workers: their `tracing` events re-emitted in the parent.

mod common;

use std::sync::{Arc, Mutex};

use common::{executor, hang_guard};
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

procexec::tasks! {
    pub fn chatty(n: u32) -> u32 {
        tracing::info!(answer = 42, "hello from {}", std::process::id());
        for i in 0..n {
            tracing::debug!(i, "a detail nobody wants");
        }
        tracing::warn!(n, "done");
        std::process::id()
    }

    /// Panics on multiples of 100.
    pub fn picky(x: u64) -> u64 {
        assert!(!x.is_multiple_of(100), "{x} is round");
        x
    }

    /// Reports 5 of 10, then runs until the marker file exists.
    pub fn half_way(path: String) {
        procexec::report_progress(5, 10);
        while !std::path::Path::new(&path).exists() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Runs until the marker file exists.
    pub fn wait_for(path: String) {
        while !std::path::Path::new(&path).exists() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    pub fn flood(n: u32) {
        for i in 0..n {
            tracing::info!(i, "flood");
        }
    }
}
procexec::test_worker!(TASKS);

/// One event as the test's subscriber saw it.
#[derive(Debug, Clone)]
struct Seen {
    level: tracing::Level,
    target: String,
    fields: Vec<(String, String)>,
    spans: Vec<String>,
}

impl Seen {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<Seen>>>);

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_string(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Collect {
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        let spans = ctx
            .event_scope(event)
            .map(|scope| scope.map(|span| span.name().to_string()).collect())
            .unwrap_or_default();
        self.0.lock().unwrap().push(Seen {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            fields: fields.0,
            spans,
        });
    }
}

fn subscriber(level: tracing::Level) -> (impl Subscriber + Send + Sync, Collect) {
    let collect = Collect::default();
    let filter = tracing_subscriber::filter::LevelFilter::from_level(level);
    (tracing_subscriber::registry().with(collect.clone().with_filter(filter)), collect)
}

fn from_workers(collect: &Collect) -> Vec<Seen> {
    collect.0.lock().unwrap().iter().filter(|seen| seen.target == "procexec::worker").cloned().collect()
}

#[test]
fn a_workers_events_arrive_in_the_parents_subscriber_under_the_callers_span() {
    let (subscriber, collect) = subscriber(tracing::Level::INFO);
    let _default = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(hang_guard(async {
        let exec = executor(1).await;
        let pid = {
            let span = tracing::info_span!("request", id = 7);
            let _entered = span.enter();
            exec.spawn(chatty, 100)
        }
        .await
        .unwrap();
        let seen = from_workers(&collect);
        assert_eq!(seen.len(), 2, "info and warn, not the 100 debug events: {seen:?}");
        let hello = &seen[0];
        assert_eq!(hello.level, tracing::Level::INFO);
        assert_eq!(hello.field("message"), Some(format!("hello from {pid}").as_str()));
        assert_eq!(hello.field("pid"), Some(pid.to_string().as_str()));
        assert_eq!(hello.field("worker"), Some("0"));
        assert!(hello.field("task").unwrap().contains("chatty"), "{hello:?}");
        assert_eq!(hello.field("fields"), Some("answer=42"));
        assert!(hello.field("origin").unwrap().contains("observability"), "{hello:?}");
        assert_eq!(hello.spans, ["request"], "nested under the caller's span");
        assert_eq!(seen[1].level, tracing::Level::WARN);
        assert_eq!(seen[1].field("fields"), Some("n=100"));
        assert_eq!(exec.stats().log_records, 2, "the filtered-out events were never sent");
    }));
}

#[test]
fn many_events_all_arrive_in_order_before_the_result() {
    let (subscriber, collect) = subscriber(tracing::Level::INFO);
    let _default = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(hang_guard(async {
        let exec = executor(2).await;
        exec.map(flood, vec![1_000; 4]).await.unwrap();
        let seen = from_workers(&collect);
        assert_eq!(seen.len(), 4_000);
        let stats = exec.stats();
        assert_eq!((stats.log_records, stats.log_records_dropped), (4_000, 0));
        for pid in seen
            .iter()
            .map(|s| s.field("pid").unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let of_call: Vec<u64> = seen
                .iter()
                .filter(|s| s.field("pid") == Some(pid.as_str()))
                .map(|s| s.field("fields").unwrap().trim_start_matches("i=").parse().unwrap())
                .collect();
            assert!(of_call.windows(2).all(|w| w[0] + 1 == w[1] || w[1] == 0), "in order per worker");
        }
    }));
}

/// Runs a call in a process with no subscriber at all (the level filter is global
/// to a process, and this binary's other tests install subscribers), and prints how
/// many records its worker forwarded.
#[test]
fn no_subscriber_helper() {
    if !common::is_helper("no_subscriber_helper") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let exec = executor(1).await;
        exec.spawn(chatty, 10).await.unwrap();
        println!("RECORDS {}", exec.stats().log_records);
    });
}

#[test]
fn without_a_subscriber_nothing_is_forwarded() {
    let output = common::helper_command("no_subscriber_helper").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("RECORDS 0"), "{stdout}");
}

#[tokio::test]
async fn progress_counts_every_input_and_failure_and_reaches_the_total_once() {
    hang_guard(async {
        use futures::StreamExt;
        let exec = executor(2).await;
        let mut stream = exec.map_stream(picky, futures::stream::iter(1..=2_000u64));
        let mut progress = stream.progress();
        let watcher = tokio::spawn(async move {
            let (mut snapshots, mut complete) = (Vec::new(), 0);
            loop {
                let now = *progress.borrow_and_update();
                complete += u32::from(now.total == Some(now.done));
                snapshots.push(now);
                if progress.changed().await.is_err() {
                    break;
                }
            }
            (snapshots, complete)
        });
        let results: Vec<_> = (&mut stream).collect().await;
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 20);
        drop(stream);
        let (snapshots, complete) = watcher.await.unwrap();
        let last = snapshots.last().unwrap();
        assert_eq!((last.done, last.failed, last.total), (2_000, 20, Some(2_000)));
        assert_eq!(complete, 1, "100% exactly once");
        assert!(snapshots.windows(2).all(|w| w[0].done <= w[1].done), "never backwards");
        assert!(last.rate() > 0.0 && last.fraction() == Some(1.0));
    })
    .await
}

#[tokio::test]
async fn stats_show_the_call_each_worker_runs_and_export_as_prometheus_text() {
    hang_guard(async {
        let exec = executor(1).await;
        let marker = common::marker("running-call");
        let call = exec.spawn(wait_for, marker.display().to_string());
        common::eventually("the worker shows its running call", || {
            exec.stats().live.iter().any(|w| w.running.as_ref().is_some_and(|c| c.task == "wait_for"))
        })
        .await;
        let text = exec.stats().prometheus();
        assert!(text.contains("procexec_worker_running_seconds{slot=\"0\""), "{text}");
        assert!(text.contains("task=\"wait_for\"} "), "{text}");
        std::fs::write(&marker, b"").unwrap();
        call.await.unwrap();
        let _ = std::fs::remove_file(&marker);
        let stats = exec.stats();
        assert!(stats.live.iter().all(|w| w.running.is_none()), "{stats:?}");
        assert!(stats.prometheus().contains("procexec_inputs_total{outcome=\"completed\"} 1\n"));
    })
    .await
}

/// A subscriber whose level the test changes, as a reloadable filter does.
struct Switchable(Arc<std::sync::atomic::AtomicU8>);

impl Subscriber for Switchable {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.enabled(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        let debug = self.0.load(std::sync::atomic::Ordering::Relaxed) == 1;
        *metadata.level() <= if debug { tracing::Level::DEBUG } else { tracing::Level::INFO }
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(if self.0.load(std::sync::atomic::Ordering::Relaxed) == 1 {
            tracing::level_filters::LevelFilter::DEBUG
        } else {
            tracing::level_filters::LevelFilter::INFO
        })
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Calls `chatty` at `info`, then again after the parent's filter turned to `debug`,
/// printing how many records its worker forwarded after each.
#[test]
fn level_change_helper() {
    if !common::is_helper("level_change_helper") {
        return;
    }
    let level = Arc::new(std::sync::atomic::AtomicU8::new(0));
    tracing::subscriber::set_global_default(Switchable(level.clone())).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let exec = executor(1).await;
        exec.spawn(chatty, 5).await.unwrap();
        println!("INFO {}", exec.stats().log_records);
        level.store(1, std::sync::atomic::Ordering::Relaxed);
        tracing::callsite::rebuild_interest_cache();
        exec.spawn(chatty, 5).await.unwrap();
        println!("DEBUG {}", exec.stats().log_records);
    });
}

#[test]
fn the_workers_follow_a_change_of_the_parents_filter() {
    let output = common::helper_command("level_change_helper").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // info + warn; then info + 5 debug + warn more.
    assert!(stdout.contains("INFO 2\n") && stdout.contains("DEBUG 9\n"), "{stdout}");
}

#[tokio::test]
async fn a_tasks_own_progress_report_shows_in_the_live_view() {
    hang_guard(async {
        let exec = executor(1).await;
        let marker = common::marker("half-way");
        let call = exec.spawn(half_way, marker.display().to_string());
        common::eventually("the report arrives", || {
            exec.stats().live.iter().any(|w| w.running.as_ref().is_some_and(|c| c.reported == Some((5, 10))))
        })
        .await;
        std::fs::write(&marker, b"").unwrap();
        call.await.unwrap();
        let _ = std::fs::remove_file(&marker);
        // A new call starts without a report.
        let call = exec.spawn(wait_for, marker.display().to_string());
        common::eventually("the next call runs", || exec.stats().live.iter().any(|w| w.running.is_some()))
            .await;
        assert!(exec.stats().live.iter().all(|w| w.running.as_ref().is_none_or(|c| c.reported.is_none())));
        std::fs::write(&marker, b"").unwrap();
        call.await.unwrap();
        let _ = std::fs::remove_file(&marker);
    })
    .await
}
