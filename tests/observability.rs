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
