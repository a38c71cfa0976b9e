//! Channels between processes while tasks run: queues, channel ends, pipes and
//! streaming tasks, with real worker processes on both sides.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt, TryStreamExt};
use procexec::{ChannelError, JoinableQueue, Pipe, Queue, Receiver, Sender};

procexec::tasks! {
    pub fn put_hello(q: Queue<String>) {
        q.blocking_put("Hello from process!".to_string()).unwrap();
    }

    pub fn get_one(q: Queue<String>) -> Option<String> {
        q.blocking_get().unwrap()
    }

    /// Puts `from..to` into the queue.
    pub fn produce(q: Queue<u64>, from: u64, to: u64) {
        for i in from..to {
            q.blocking_put(i).unwrap();
        }
    }

    /// Marks `started`, spins until its caller leaves, then marks `noticed`.
    pub fn spin_until_cancelled(started: String, noticed: String) -> u32 {
        std::fs::write(&started, b"").unwrap();
        while !procexec::is_cancelled() {
            std::hint::spin_loop();
        }
        std::fs::write(&noticed, b"").unwrap();
        std::process::id()
    }

    pub fn pid() -> u32 { std::process::id() }

    pub fn nap_us(us: u64) { std::thread::sleep(Duration::from_micros(us)) }

    /// A get that gives up at once (its answer is likely on its way), then a get
    /// (which may return that late answer while its own request waits in the
    /// parent), then a try_get, which must not wait.
    pub fn stale_then_try(q: Queue<u64>) -> (Option<u64>, Option<u64>, Option<u64>) {
        let a = q.get_timeout(Duration::ZERO).unwrap();
        let b = if a.is_none() { q.blocking_get().unwrap() } else { None };
        let c = q.try_get().unwrap();
        (a, b, c)
    }

    /// The same, without the try_get: returns right after the late answer.
    pub fn stale_get(q: Queue<u64>) -> Option<u64> {
        let a = q.get_timeout(Duration::ZERO).unwrap();
        if a.is_some() { a } else { q.blocking_get().unwrap() }
    }

    pub fn stale_get_acked(q: JoinableQueue<u64>) -> Option<u64> {
        let a = q.get_timeout(Duration::ZERO).unwrap().map(|d| d.ack());
        if a.is_some() { a } else { q.blocking_get().unwrap().map(|d| d.ack()) }
    }

    pub fn put_three(q: Queue<u64>) { q.blocking_put(3).unwrap() }

    pub fn drain_bytes(q: Queue<Vec<u8>>) -> usize {
        q.iter().map(Result::unwrap).count()
    }

    /// The length and byte sum of every item, until the queue is closed and empty.
    pub fn measure_items(q: Queue<Vec<u8>>) -> Vec<(usize, u64)> {
        q.iter().map(Result::unwrap).map(|item| (item.len(), item.iter().map(|&b| u64::from(b)).sum())).collect()
    }

    pub fn crash() { die() }

    /// One thread waits on `input` while the task's own thread puts into `output`.
    pub fn two_threads(input: Queue<u64>, output: Queue<u64>) -> Option<u64> {
        let reader = std::thread::spawn(move || input.blocking_get().unwrap());
        // Makes it likely (not needed) that the reader waits in a read by now.
        std::thread::sleep(Duration::from_millis(50));
        output.blocking_put(1).unwrap();
        reader.join().unwrap()
    }

    /// Puts `0..n`, then dies by SIGKILL.
    pub fn produce_then_die(q: Queue<u64>, n: u64) {
        for i in 0..n {
            q.blocking_put(i).unwrap();
        }
        die()
    }

    /// Takes items until the queue is closed and empty; returns them.
    pub fn drain(q: Queue<u64>) -> Vec<u64> {
        q.iter().map(Result::unwrap).collect()
    }

    /// Takes items until `stop` arrives; returns how many.
    pub fn count_until(q: Queue<u64>, stop: u64) -> u64 {
        let mut seen = 0;
        while let Some(item) = q.blocking_get().unwrap() {
            if item == stop {
                break;
            }
            seen += 1;
        }
        seen
    }

    pub fn get_with_timeout(q: Queue<u64>, ms: u64) -> Option<u64> {
        q.get_timeout(Duration::from_millis(ms)).unwrap()
    }

    pub fn try_get_now(q: Queue<u64>) -> Option<u64> {
        q.try_get().unwrap()
    }

    /// What a put into the queue says (it is closed, say).
    pub fn put_result(q: Queue<u64>, item: u64) -> Option<String> {
        q.blocking_put(item).err().map(|err| err.to_string())
    }

    /// Puts `n` items; what the first failing put says.
    pub fn put_many(q: Queue<u64>, n: u64) -> Option<String> {
        (0..n).find_map(|i| q.blocking_put(i).err()).map(|err| err.to_string())
    }

    /// What a get says.
    pub fn get_result(q: Queue<u64>) -> Result<Option<u64>, String> {
        q.blocking_get().map_err(|err| err.to_string())
    }

    pub fn close_queue(q: Queue<u64>) {
        q.close()
    }

    pub fn squares(n: u64, out: Sender<u64>) {
        for i in 0..n {
            if out.blocking_send(i * i).is_err() {
                return;
            }
        }
    }

    /// Sends `n` items, then panics.
    pub fn squares_then_panic(n: u64, out: Sender<u64>) {
        for i in 0..n {
            out.blocking_send(i).unwrap();
        }
        panic!("after {n} items");
    }

    /// Sends `n` items, then dies by SIGKILL.
    pub fn squares_then_die(n: u64, out: Sender<u64>) {
        for i in 0..n {
            out.blocking_send(i).unwrap();
        }
        die()
    }

    pub fn total(numbers: Receiver<u64>) -> u64 {
        numbers.iter().map(Result::unwrap).sum()
    }

    pub fn squarer(pipe: Pipe<u64, u64>) {
        while let Some(x) = pipe.blocking_recv().unwrap() {
            pipe.blocking_send(x * x).unwrap();
        }
    }

    /// Acknowledges every item but `skip`; returns the items it acknowledged.
    pub fn ack_all_but(q: JoinableQueue<u64>, skip: u64) -> Vec<u64> {
        let mut acked = Vec::new();
        while let Some(item) = q.blocking_get().unwrap() {
            if *item == skip {
                continue; // dropped unacknowledged: it goes back
            }
            acked.push(item.ack());
        }
        acked
    }

    /// Takes `n` items and acknowledges them, then takes one more and dies holding it.
    pub fn ack_then_die(q: JoinableQueue<u64>, n: u64, done: Queue<u64>) {
        for _ in 0..n {
            let item = q.blocking_get().unwrap().unwrap();
            done.blocking_put(item.ack()).unwrap();
        }
        let _held = q.blocking_get().unwrap();
        die()
    }

    /// Puts a `size`-byte item; what the put says.
    pub fn put_bytes(q: Queue<Vec<u8>>, size: usize) -> Option<ChannelError> {
        q.blocking_put(vec![1; size]).err()
    }

    /// Reports each item, then acknowledges it, until the queue is closed.
    pub fn report_then_ack(q: JoinableQueue<u64>, done: Queue<u64>) {
        while let Some(item) = q.blocking_get().unwrap() {
            done.blocking_put(*item).unwrap();
            item.ack();
        }
    }

    /// Acknowledges items, reporting each with how often it was delivered before.
    pub fn ack_and_report(q: JoinableQueue<u64>, done: Queue<(u64, u32)>) {
        while let Some(item) = q.blocking_get().unwrap() {
            let attempts = item.attempts();
            done.blocking_put((item.ack(), attempts)).unwrap();
        }
    }
}
procexec::test_worker!(TASKS);

/// Kills the process `pid` with SIGKILL.
fn kill(pid: u32) {
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    assert!(status.is_ok_and(|status| status.success()), "kill -KILL {pid}");
}

/// Kills this process (a worker) with SIGKILL.
fn die() -> ! {
    kill(std::process::id());
    loop {
        std::thread::park();
    }
}

#[tokio::test]
async fn the_articles_queue_program_runs_across_two_workers() {
    hang_guard(async {
        let exec = executor(2).await;
        let q = exec.queue::<String>(10);
        let got = exec.spawn(get_one, q.clone());
        exec.spawn(put_hello, q.clone()).await.unwrap();
        assert_eq!(got.await.unwrap().as_deref(), Some("Hello from process!"));
    })
    .await;
}

#[tokio::test]
async fn the_parent_puts_and_gets_like_any_process() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(4);
        for i in 0..4 {
            q.put(i).await.unwrap();
        }
        assert!(matches!(q.try_put(9), Err(procexec::TryPutError::Full(9))), "the queue is full");
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(q.get().await.unwrap().unwrap());
        }
        assert_eq!(got, [0, 1, 2, 3]);
        assert_eq!(q.try_get().unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn four_producers_and_four_consumers_on_two_workers_move_every_item_exactly_once() {
    hang_guard(async {
        let exec = executor(2).await;
        let q = exec.queue::<u64>(1000);
        const ITEMS: u64 = 100_000;
        // A worker runs one call at a time, and a consumer ends only once the queue
        // is closed: the producers go first.
        let producers: Vec<_> =
            (0..4).map(|p| exec.spawn(produce, (q.clone(), p * ITEMS / 4, (p + 1) * ITEMS / 4))).collect();
        let consumers: Vec<_> = (0..4).map(|_| exec.spawn(drain, q.clone())).collect();
        // The parent consumes too while the producers run, then closes the queue and
        // leaves what is left to the consumer tasks.
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        let mut producing = std::pin::pin!(futures::future::join_all(producers));
        let mut stream = q.clone();
        loop {
            tokio::select! {
                biased;
                done = &mut producing => {
                    done.into_iter().for_each(Result::unwrap);
                    break;
                }
                item = stream.next() => *seen.entry(item.unwrap().unwrap()).or_default() += 1,
            }
        }
        q.close();
        let by_parent = seen.len();
        let mut by_tasks = 0;
        for consumer in consumers {
            for item in consumer.await.unwrap() {
                by_tasks += 1;
                *seen.entry(item).or_default() += 1;
            }
        }
        assert_eq!(seen.len() as u64, ITEMS, "every item arrived");
        assert!(seen.values().all(|&n| n == 1), "no item arrived twice");
        // Who consumed how many depends on timing: it is not asserted.
        eprintln!("the parent consumed {by_parent} items, the consumer tasks {by_tasks}");
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_makes_a_producing_task_wait_until_the_parent_takes() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(2);
        let producer = exec.spawn(produce, (q.clone(), 0, 1000));
        let mut got = Vec::new();
        while got.len() < 1000 {
            got.push(q.get().await.unwrap().unwrap());
        }
        producer.await.unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test]
async fn close_fails_later_puts_and_lets_gets_drain_what_is_left() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(8);
        q.put(1).await.unwrap();
        q.put(2).await.unwrap();
        exec.spawn(close_queue, q.clone()).await.unwrap();
        assert_eq!(q.put(3).await, Err(ChannelError::Closed));
        let said = exec.spawn(put_result, (q.clone(), 4)).await.unwrap();
        assert_eq!(said.as_deref(), Some("the channel is closed"));
        assert_eq!(exec.spawn(drain, q.clone()).await.unwrap(), [1, 2]);
        assert_eq!(q.get().await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn a_task_waits_for_an_item_with_a_timeout_or_not_at_all() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(8);
        assert_eq!(exec.spawn(get_with_timeout, (q.clone(), 20)).await.unwrap(), None);
        assert_eq!(exec.spawn(try_get_now, q.clone()).await.unwrap(), None);
        q.put(5).await.unwrap();
        assert_eq!(exec.spawn(try_get_now, q.clone()).await.unwrap(), Some(5));
        // Put while the task waits.
        let waiting = exec.spawn(get_with_timeout, (q.clone(), 60_000));
        q.put(6).await.unwrap();
        assert_eq!(waiting.await.unwrap(), Some(6));
    })
    .await;
}

#[tokio::test]
async fn a_streaming_task_streams_its_items_in_order() {
    hang_guard(async {
        let exec = executor(1).await;
        let got: Vec<u64> = exec.stream(squares, 1000).try_collect().await.unwrap();
        assert_eq!(got, (0..1000).map(|i| i * i).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test]
async fn a_streaming_task_that_panics_ends_its_stream_with_the_panic_after_its_items() {
    hang_guard(async {
        let exec = executor(1).await;
        let items: Vec<_> = exec.stream(squares_then_panic, 10).collect().await;
        assert_eq!(items.len(), 11);
        assert!(items[..10].iter().enumerate().all(|(i, item)| item.as_ref().ok() == Some(&(i as u64))));
        let err = items[10].as_ref().unwrap_err();
        assert!(err.is_panic(), "{err}");
    })
    .await;
}

#[tokio::test]
async fn a_streaming_task_whose_worker_dies_ends_with_the_crash_after_what_it_delivered() {
    hang_guard(async {
        let exec = executor(1).await;
        let items: Vec<_> = exec.stream(squares_then_die, 10).collect().await;
        // Sends share writes for a moment, so the last ones may die with the worker;
        // what arrived comes in order, once, and the crash comes last.
        let (last, delivered) = items.split_last().expect("at least the crash");
        assert!(last.as_ref().unwrap_err().is_worker_crash(), "{items:?}");
        assert!(delivered.len() <= 10);
        assert!(
            delivered.iter().enumerate().all(|(i, item)| item.as_ref().ok() == Some(&(i as u64))),
            "{items:?}"
        );
        // The executor serves on.
        let again: Vec<u64> = exec.stream(squares, 3).try_collect().await.unwrap();
        assert_eq!(again, [0, 1, 4]);
    })
    .await;
}

#[tokio::test]
async fn items_a_task_put_into_a_queue_survive_its_worker_dying_right_after() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(100);
        let err = exec.spawn(produce_then_die, (q.clone(), 50)).await.unwrap_err();
        assert!(err.is_worker_crash(), "{err}");
        let mut got = Vec::new();
        while let Some(item) = q.try_get().unwrap() {
            got.push(item);
        }
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test]
async fn a_task_consumes_a_stream_the_parent_feeds_it() {
    hang_guard(async {
        let exec = executor(1).await;
        let (mut tx, rx) = exec.channel::<u64>(8);
        let sum = exec.spawn(total, rx);
        let mut numbers = futures::stream::iter((1..=1000).map(Ok));
        tx.send_all(&mut numbers).await.unwrap();
        drop(tx);
        assert_eq!(sum.await.unwrap(), 500_500);
    })
    .await;
}

#[tokio::test]
async fn a_pipe_talks_both_ways_and_ends_when_one_side_drops() {
    hang_guard(async {
        let exec = executor(1).await;
        let (ours, theirs) = exec.pipe::<u64, u64>();
        let task = exec.spawn(squarer, theirs);
        for x in 0..100 {
            ours.send(x).await.unwrap();
            assert_eq!(ours.recv().await.unwrap(), Some(x * x));
        }
        drop(ours);
        task.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_pipe_end_whose_worker_dies_reads_as_ended() {
    hang_guard(async {
        let exec = executor(1).await;
        let (ours, theirs) = exec.pipe::<u64, u64>();
        // The task holds its end until its worker is killed.
        let task = exec.spawn(squarer, theirs);
        ours.send(3).await.unwrap();
        assert_eq!(ours.recv().await.unwrap(), Some(9));
        let pid = exec.stats().live[0].pid;
        kill(pid);
        assert!(task.await.unwrap_err().is_worker_crash());
        assert_eq!(ours.recv().await.unwrap(), None, "the other end is gone");
        assert_eq!(ours.send(1).await, Err(ChannelError::Closed));
    })
    .await;
}

#[tokio::test]
async fn unacknowledged_items_go_back_and_join_waits_for_every_ack() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.joinable_queue::<u64>(16);
        let consumer = exec.spawn(ack_all_but, (q.clone(), 1_000));
        for i in 0..10 {
            q.put(i).await.unwrap();
        }
        q.join().await;
        q.close();
        assert_eq!(consumer.await.unwrap(), (0..10).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test]
async fn an_item_held_by_a_consumer_that_dies_is_delivered_again() {
    hang_guard(async {
        let exec = executor(2).await;
        let q = exec.joinable_queue::<u64>(100);
        let done = exec.queue::<u64>(100);
        for i in 0..20 {
            q.put(i).await.unwrap();
        }
        // Acknowledges 5 items, then dies holding the sixth.
        let dying = exec.spawn(ack_then_die, (q.clone(), 5, done.clone()));
        assert!(dying.await.unwrap_err().is_worker_crash());
        let reports = exec.queue::<(u64, u32)>(100);
        let consumer = exec.spawn(ack_and_report, (q.clone(), reports.clone()));
        q.join().await;
        q.close();
        consumer.await.unwrap();
        let mut acked: Vec<u64> = Vec::new();
        while let Some(item) = done.try_get().unwrap() {
            acked.push(item);
        }
        assert_eq!(acked, [0, 1, 2, 3, 4]);
        let mut rest = Vec::new();
        while let Some(report) = reports.try_get().unwrap() {
            rest.push(report);
        }
        assert_eq!(rest.iter().map(|(item, _)| *item).collect::<Vec<_>>(), (5..20).collect::<Vec<_>>());
        assert_eq!(rest[0], (5, 1), "the item the dead worker held came back first, counted as an attempt");
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_every_channel_and_wakes_tasks_waiting_on_them() {
    hang_guard(async {
        let exec = executor(2).await;
        let q = exec.queue::<u64>(1);
        let waiting = exec.spawn(get_result, q.clone());
        let full = exec.queue::<u64>(1);
        full.put(0).await.unwrap();
        let blocked = exec.spawn(put_many, (full.clone(), 100));
        // Both tasks wait: the queue's channels are attached (a get is in line, and
        // the producer used its credit).
        eventually("both tasks wait", || exec.stats().running == 2).await;
        exec.shutdown().await;
        let shut = "the channel's executor shut down";
        assert_eq!(waiting.await.unwrap(), Err(shut.to_string()));
        assert_eq!(blocked.await.unwrap().as_deref(), Some(shut));
        assert_eq!(q.put(1).await, Err(ChannelError::Shutdown));
        assert_eq!(q.get().await, Err(ChannelError::Shutdown), "an empty channel of a shut executor");
    })
    .await;
}

#[tokio::test]
async fn an_item_above_the_frame_limit_is_refused_on_either_side() {
    hang_guard(async {
        let exec = builder(1).max_frame_len(4096).build().await.unwrap();
        let q = exec.queue::<Vec<u8>>(4);
        let err = q.put(vec![0; 10_000]).await.unwrap_err();
        assert!(
            matches!(err, ChannelError::TooLarge { size, limit } if size > 10_000 && limit < 4096),
            "{err}"
        );
        let said = exec.spawn(put_bytes, (q.clone(), 10_000)).await.unwrap();
        assert!(matches!(said, Some(ChannelError::TooLarge { .. })), "{said:?}");
        // Both sides go on.
        assert_eq!(exec.spawn(put_bytes, (q.clone(), 100)).await.unwrap(), None);
        assert_eq!(q.get().await.unwrap().map(|item| item.len()), Some(100));
    })
    .await;
}

#[tokio::test]
async fn a_handle_of_another_executor_is_refused_when_the_task_decodes_it() {
    hang_guard(async {
        let exec = executor(1).await;
        let other = executor(1).await;
        let foreign = other.queue::<String>(1);
        let err = exec.spawn(get_one, foreign).await.unwrap_err();
        assert!(err.is_codec(), "{err}");
        assert!(err.to_string().contains("another executor"), "{err}");
        // The worker serves on.
        let q = exec.queue::<String>(1);
        q.put("still here".into()).await.unwrap();
        assert_eq!(exec.spawn(get_one, q).await.unwrap().as_deref(), Some("still here"));
    })
    .await;
}

#[tokio::test]
async fn an_item_that_does_not_decode_is_a_codec_error_and_the_next_one_is_fine() {
    hang_guard(async {
        let exec = executor(1).await;
        let texts = exec.queue::<String>(4);
        // The same queue seen with another item type (handles carry no type).
        let encoded = postcard::to_allocvec(&texts).unwrap();
        let numbers: Queue<u64> = postcard::from_bytes(&encoded).unwrap();
        texts.put("not a number".into()).await.unwrap();
        numbers.put(7).await.unwrap();
        let err = numbers.get().await.unwrap_err();
        assert!(matches!(&err, ChannelError::Codec(message) if message.contains("u64")), "{err}");
        assert_eq!(numbers.get().await.unwrap(), Some(7));
    })
    .await;
}

#[tokio::test]
async fn a_handle_outlives_its_executor_with_a_typed_error() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(4);
        let (tx, rx) = exec.channel::<u64>(4);
        drop(exec);
        assert_eq!(q.put(1).await, Err(ChannelError::Shutdown));
        assert_eq!(q.get().await, Err(ChannelError::Shutdown));
        assert_eq!(tx.send(1).await, Err(ChannelError::Shutdown));
        assert_eq!(rx.recv().await, Err(ChannelError::Shutdown));
    })
    .await;
}

#[tokio::test]
async fn consumers_killed_mid_stream_lose_no_acknowledged_item_and_repeat_none() {
    hang_guard(async {
        const ITEMS: u64 = 20_000;
        let exec = executor(2).await;
        let q = exec.joinable_queue::<u64>(ITEMS as usize);
        let done = exec.queue::<u64>(ITEMS as usize * 2);
        for i in 0..ITEMS {
            q.put(i).await.unwrap();
        }
        let mut consumers: Vec<_> = (0..2).map(|_| exec.spawn(report_then_ack, (q.clone(), done.clone()))).collect();
        let mut reports: BTreeMap<u64, u32> = BTreeMap::new();
        let mut kills = 0;
        while reports.len() < ITEMS as usize {
            let item = done.get().await.unwrap().expect("reports come until the end");
            *reports.entry(item).or_default() += 1;
            // Kill a consumer every 4,000 reports, and start another.
            if reports.len().is_multiple_of(4_000) && kills < 4 && reports[&item] == 1 {
                let pid = exec.stats().live.iter().find(|worker| worker.busy).map(|worker| worker.pid);
                if let Some(pid) = pid {
                    kill(pid);
                    kills += 1;
                    consumers.push(exec.spawn(report_then_ack, (q.clone(), done.clone())));
                }
            }
        }
        q.join().await;
        q.close();
        let crashed = futures::future::join_all(consumers).await.into_iter().filter(Result::is_err).count();
        assert_eq!(crashed, kills, "each killed consumer's call failed, and no other");
        assert!(kills >= 2, "the test killed consumers ({kills})");
        let repeated: u32 = reports.values().map(|&n| n - 1).sum();
        assert!(
            repeated as usize <= kills,
            "only an item a consumer held unacknowledged when killed comes again ({repeated} repeats, {kills} kills)"
        );
    })
    .await;
}

#[tokio::test]
async fn a_task_sees_that_its_caller_left_and_stops_early() {
    hang_guard(async {
        let exec = executor(1).await.with_cancel_policy(procexec::CancelPolicy::Finish);
        let before = exec.spawn(pid, ()).await.unwrap();
        let (started, noticed) = (marker("cancel-started"), marker("cancel-noticed"));
        let call =
            exec.spawn(spin_until_cancelled, (started.display().to_string(), noticed.display().to_string()));
        eventually("the task runs", || started.exists()).await;
        drop(call);
        eventually("the task noticed its caller left", || noticed.exists()).await;
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), before, "the worker serves on");
        assert!(!procexec::is_cancelled(), "the parent is not a task");
    })
    .await;
}

#[tokio::test]
async fn a_consumer_and_its_producer_never_wait_behind_each_other_on_one_worker() {
    hang_guard(async {
        let exec = executor(2).await;
        // Short calls teach the workers to take calls ahead.
        exec.map(nap_us, std::iter::repeat_n(700, 1000)).await.unwrap();
        let pairs = async {
            for _ in 0..20 {
                let q = exec.queue::<String>(4);
                let got = exec.spawn(get_one, q.clone());
                let put = exec.spawn(put_hello, q.clone());
                put.await.unwrap();
                assert_eq!(got.await.unwrap().as_deref(), Some("Hello from process!"));
            }
        };
        // Also while both workers are busy with short calls.
        let (map, ()) = tokio::join!(exec.map(nap_us, std::iter::repeat_n(700, 1000)), pairs);
        map.unwrap();
    })
    .await;
}

#[tokio::test]
async fn large_items_cross_whole_in_both_directions() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<Vec<u8>>(4);
        for size in [16 * 1024 - 1, 16 * 1024, 300_000] {
            assert_eq!(exec.spawn(put_bytes, (q.clone(), size)).await.unwrap(), None);
            assert_eq!(q.get().await.unwrap(), Some(vec![1; size]));
        }
        // And to a task: large items travel from their own buffers, small ones copied,
        // in one batch.
        let sizes = [100_000, 10, 300_000, 16 * 1024, 5, 70_000, 3];
        let measured = exec.spawn(measure_items, q.clone());
        for (i, &size) in sizes.iter().enumerate() {
            q.put(vec![i as u8 + 1; size]).await.unwrap();
        }
        q.close();
        let expected: Vec<_> =
            sizes.iter().enumerate().map(|(i, &size)| (size, (i as u64 + 1) * size as u64)).collect();
        assert_eq!(measured.await.unwrap(), expected);
        let (tx, rx) = exec.channel::<u64>(2);
        let total = exec.spawn(total, rx);
        for i in 0..5_000 {
            tx.send(i).await.unwrap();
        }
        drop(tx);
        assert_eq!(total.await.unwrap(), (0..5_000).sum::<u64>());
    })
    .await;
}

// From the review of the channels change: a get that gave up leaves no request
// behind, in the worker or in the parent.

#[tokio::test]
async fn try_get_after_a_late_answer_does_not_wait() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(8);
        q.put(7).await.unwrap();
        let (a, b, c) = exec.spawn(stale_then_try, q.clone()).await.unwrap();
        assert_eq!((a.or(b), c), (Some(7), None));
    })
    .await;
}

#[tokio::test]
async fn an_item_put_after_a_worker_died_is_not_lost() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(8);
        q.put(7).await.unwrap();
        assert_eq!(exec.spawn(stale_get, q.clone()).await.unwrap(), Some(7));
        assert!(exec.spawn(crash, ()).await.unwrap_err().is_worker_crash());
        q.put(8).await.unwrap();
        assert_eq!(q.get().await.unwrap(), Some(8), "handed to the dead worker's leftover request");
    })
    .await;
}

#[tokio::test]
async fn an_item_put_after_its_consumer_ended_comes_back() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(8);
        q.put(7).await.unwrap();
        assert_eq!(exec.spawn(stale_get, q.clone()).await.unwrap(), Some(7));
        q.put(8).await.unwrap();
        assert_eq!(q.get().await.unwrap(), Some(8));
    })
    .await;
}

#[tokio::test]
async fn join_completes_after_a_worker_with_a_leftover_request_died() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.joinable_queue::<u64>(8);
        q.put(7).await.unwrap();
        assert_eq!(exec.spawn(stale_get_acked, q.clone()).await.unwrap(), Some(7));
        assert!(exec.spawn(crash, ()).await.unwrap_err().is_worker_crash());
        q.put(8).await.unwrap();
        q.get().await.unwrap().expect("item 8").ack();
        q.join().await;
    })
    .await;
}

#[tokio::test]
async fn a_task_waits_on_channels_from_two_threads() {
    hang_guard(async {
        let exec = executor(1).await;
        let input = exec.queue::<u64>(8);
        let output = exec.queue::<u64>(8);
        let call = exec.spawn(two_threads, (input.clone(), output.clone()));
        // The task's put arrives while its other thread waits on `input`.
        assert_eq!(output.get().await.unwrap(), Some(1));
        input.put(2).await.unwrap();
        assert_eq!(call.await.unwrap(), Some(2));
    })
    .await;
}

#[tokio::test]
async fn blocking_gets_in_the_parent_refuse_a_runtime_thread_and_work_off_it() {
    hang_guard(async {
        let exec = executor(1).await;
        let q = exec.queue::<u64>(8);
        let in_runtime = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            q.get_timeout(Duration::from_millis(1))
        }));
        let message = in_runtime.expect_err("refused").downcast::<String>().map(|m| *m).unwrap_or_default();
        assert!(message.contains("tokio::time::timeout"), "{message}");
        let theirs = q.clone();
        let waiting = std::thread::spawn(move || theirs.get_timeout(Duration::from_secs(60)));
        exec.spawn(put_three, q.clone()).await.unwrap();
        assert_eq!(waiting.join().unwrap(), Ok(Some(3)));
    })
    .await;
}

#[tokio::test]
async fn a_batch_of_items_fits_a_small_frame_limit() {
    hang_guard(async {
        let exec = builder(1).max_frame_len(16 * 1024).build().await.unwrap();
        let q = exec.queue::<Vec<u8>>(64);
        for _ in 0..40 {
            q.put(vec![1u8; 8000]).await.unwrap();
        }
        q.close();
        assert_eq!(exec.spawn(drain_bytes, q.clone()).await.unwrap(), 40);
    })
    .await;
}

#[tokio::test]
async fn a_full_channel_blocks_only_its_producer() {
    hang_guard(async {
        let exec = executor(2).await;
        let stuck = exec.queue::<u64>(1);
        // Its producer fills the queue and its credit, then waits in its worker.
        let producer = exec.spawn(produce, (stuck.clone(), 0, 1_000));
        eventually("the producer is stuck", || exec.stats().running == 1).await;
        // Another channel, and other calls, go on through the other worker.
        let (ours, theirs) = exec.pipe::<u64, u64>();
        let squarer = exec.spawn(squarer, theirs);
        for x in 0..50 {
            ours.send(x).await.unwrap();
            assert_eq!(ours.recv().await.unwrap(), Some(x * x));
        }
        drop(ours);
        squarer.await.unwrap();
        // Then the stuck queue drains, in order.
        let mut got = Vec::new();
        while got.len() < 1_000 {
            got.push(stuck.get().await.unwrap().unwrap());
        }
        producer.await.unwrap();
        assert_eq!(got, (0..1_000).collect::<Vec<_>>());
    })
    .await;
}
