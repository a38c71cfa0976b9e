//! A progress bar over a `map` of a few thousand CPU-bound items, with the workers'
//! log lines printed above it: the article's advice for debugging ("use logging"),
//! with the logs of every worker process in one place, each naming its worker, pid
//! and task, under the span of the code that made the call.
//!
//! `map.progress()` is a watch of snapshots (done, failed, retried, total, elapsed):
//! a task here drives an `indicatif` bar from it, without polling. The workers'
//! `tracing` events arrive in this process's subscriber, which prints them through
//! the bar so they do not break it.
//!
//! Run: `cargo run --release --example progress`

use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

procexec::tasks! {
    /// Counts the primes between 100,000 and 100,000 + `n`, the slow way (about a
    /// millisecond each); logs now and then.
    pub fn primes_below(n: u64) -> u64 {
        let count = (100_000..100_000 + n)
            .filter(|&k| (2..k).take_while(|d| d * d <= k).all(|d| k % d != 0))
            .count() as u64;
        if n.is_multiple_of(500) {
            tracing::info!(n, count, "a round number");
        }
        if n == 2_345 {
            tracing::warn!("an unlucky number, but carrying on");
        }
        count
    }
}

/// Prints every event above the bar: message, then its fields.
struct AboveTheBar(Arc<ProgressBar>);

#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for AboveTheBar {
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        let spans: Vec<String> = ctx
            .event_scope(event)
            .map(|scope| scope.from_root().map(|s| s.name().to_string()).collect())
            .unwrap_or_default();
        let line = format!("{:>5} [{}] {}", event.metadata().level(), spans.join(":"), line.0);
        // Not a terminal: no bar, and its `println` prints nothing either.
        if self.0.is_hidden() { println!("{line}") } else { self.0.println(line) }
    }
}

fn main() -> procexec::Result<()> {
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> procexec::Result<()> {
    let bar = Arc::new(ProgressBar::new(0));
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let subscriber = tracing_subscriber::registry()
        .with(AboveTheBar(bar.clone()).with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let exec = procexec::Executor::builder().build().await?;
    let span = tracing::info_span!("report");
    let _entered = span.enter();
    let mut map = exec.map(primes_below, 2..4_002u64);
    let mut progress = map.progress();
    let drawing = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                let now = *progress.borrow_and_update();
                bar.set_length(now.total.unwrap_or(0));
                bar.set_position(now.done);
                bar.set_message(format!("{:.0} items/s, {} failed", now.rate(), now.failed));
                if progress.changed().await.is_err() {
                    break;
                }
            }
        })
    };
    let counts = map.await?;
    let _ = drawing.await;
    bar.finish();
    let last = counts.last().unwrap_or(&0);
    println!("{last} primes between 100,000 and 104,001, counted in {} worker processes", exec.processes());
    exec.shutdown().await;
    Ok(())
}
