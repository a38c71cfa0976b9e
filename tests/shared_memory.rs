//! Shared memory with real worker processes: counts under contention, a lock whose
//! holder is killed, parallel fills, sizes, typed errors and no residue.

mod common;

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::time::Duration;

use common::{alive, eventually, executor, hang_guard, helper_command, is_helper, read_pids};
use procexec::{PoisonCause, Poisoned, SharedArray, SharedBytes, SharedError, SharedLock, SharedValue};

procexec::tasks! {
    /// Adds 1 `times` times under the lock, as a plain read-modify-write.
    pub fn add_locked(counter: SharedValue<u64>, times: u32) -> u32 {
        for _ in 0..times {
            let mut count = counter.blocking_lock().unwrap_or_else(Poisoned::into_inner);
            *count += 1;
        }
        std::process::id()
    }

    pub fn add_atomic(counter: SharedValue<u64>, times: u32) {
        for _ in 0..times {
            counter.fetch_add(1);
        }
    }

    /// Takes the lock, says so with its pid, waits until told, then is `SIGKILL`ed.
    pub fn hold_and_die(lock: SharedValue<u64>, state: SharedArray<u32>) {
        let _held = lock.blocking_lock();
        state.set(0, std::process::id()).unwrap();
        // Until a waiter is on its way (or 60 s: a hang guard, not a synchronisation).
        for _ in 0..60_000 {
            if state.get(1) == Some(1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::thread::sleep(Duration::from_secs(60));
    }

    /// Waits for the lock; repairs the value when poisoned and reports the cause.
    pub fn lock_and_repair(lock: SharedValue<u64>, state: SharedArray<u32>) -> Option<u32> {
        state.set(1, 1).unwrap();
        match lock.blocking_lock() {
            Ok(_) => None,
            Err(poisoned) => {
                let cause = poisoned.cause();
                let mut value = poisoned.into_inner();
                *value = 100;
                value.clear_poison();
                match cause {
                    PoisonCause::OwnerDied { pid } => Some(pid),
                    _ => Some(0),
                }
            }
        }
    }

    pub fn panic_holding(lock: SharedLock) {
        let _held = lock.blocking_lock();
        panic!("half way through an update");
    }

    pub fn squares(array: SharedArray<f64>, range: Range<usize>) {
        let values: Vec<f64> = range.clone().map(|i| (i as f64) * (i as f64)).collect();
        array.write_from(range.start, &values).unwrap();
    }

    /// Writes the first and last element and returns the length.
    pub fn touch_ends(array: SharedArray<u8>) -> usize {
        if let Some(last) = array.len().checked_sub(1) {
            array.set(0, 1).unwrap();
            array.set(last, 2).unwrap();
        }
        array.len()
    }

    pub fn checksum(data: SharedBytes) -> (usize, u64) {
        (data.len(), data.iter().map(|&byte| u64::from(byte)).sum())
    }

    pub fn read_value(value: SharedValue<u64>) -> u64 {
        value.load()
    }

    pub fn shared_maps() -> usize {
        shared_mappings(std::process::id())
    }

    pub fn pid() -> u32 {
        std::process::id()
    }
}
procexec::test_worker!(TASKS);

/// How many of `pid`'s mappings are procexec shared memory.
fn shared_mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|maps| maps.lines().filter(|line| line.contains("procexec-shared")).count())
        .unwrap_or(0)
}

/// Every process on the machine that maps procexec shared memory.
fn processes_mapping_shared_memory() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| shared_mappings(pid) > 0)
        .collect()
}

/// Whether `pid` is `ancestor` or one of its descendants.
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    while pid > 1 {
        if pid == ancestor {
            return true;
        }
        match common::stat(pid) {
            Some((ppid, _)) => pid = ppid,
            None => return false,
        }
    }
    false
}

fn dev_shm() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|dir| dir.flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn four_workers_and_the_parent_count_exactly_under_the_lock() {
    hang_guard(async {
        let exec = executor(4).await;
        let counter = exec.shared_value(0u64).unwrap();
        let workers = exec.map(add_locked, vec![(counter.clone(), 10_000); 4]);
        let parent = async {
            for _ in 0..1_000 {
                *counter.lock().await.unwrap() += 1;
            }
        };
        let (pids, ()) = tokio::join!(workers, parent);
        let pids = pids.unwrap();
        assert_eq!(counter.load(), 41_000);
        assert!(pids.iter().collect::<std::collections::HashSet<_>>().len() > 1, "{pids:?}");

        let atomic = exec.shared_value(0u64).unwrap();
        exec.map(add_atomic, vec![(atomic.clone(), 10_000); 4]).await.unwrap();
        assert_eq!(atomic.load(), 40_000);
    })
    .await
}

#[tokio::test]
async fn a_worker_killed_holding_the_lock_poisons_it_and_the_next_locker_recovers() {
    hang_guard(async {
        let exec = executor(2).await;
        let value = exec.shared_value(7u64).unwrap();
        let state = exec.shared_array::<u32>(2).unwrap();
        let holder = exec.spawn(hold_and_die, (value.clone(), state.clone()));
        eventually("the holder has the lock", || state.get(0) != Some(0)).await;
        let holder_pid = state.get(0).unwrap();
        // A waiter in the other worker, parked on the lock when its holder dies.
        let waiter = exec.spawn(lock_and_repair, (value.clone(), state.clone()));
        let crash = holder.await.unwrap_err();
        assert!(crash.is_worker_crash(), "{crash}");
        assert_eq!(waiter.await.unwrap(), Some(holder_pid), "the waiter is told who died");
        // Repaired and cleared by the waiter.
        let guard = value.lock().await.expect("no longer poisoned");
        assert_eq!(*guard, 100);
        drop(guard);

        // Without a waiter: the parent is the next locker.
        state.write_from(0, &[0, 1]).unwrap();
        let holder = exec.spawn(hold_and_die, (value.clone(), state.clone()));
        assert!(holder.await.unwrap_err().is_worker_crash());
        let holder_pid = state.get(0).unwrap();
        let poisoned = value.lock().await.unwrap_err();
        assert_eq!(poisoned.cause(), PoisonCause::OwnerDied { pid: holder_pid });
        drop(poisoned); // releases the lock: still poisoned
        let err: procexec::Error = value.lock().await.unwrap_err().into();
        assert!(matches!(err, procexec::Error::Shared(SharedError::Poisoned(PoisonCause::OwnerDied { .. }))));
        value.lock().await.unwrap_err().into_inner().clear_poison();
        assert!(!value.is_poisoned());
        assert_eq!(*value.lock().await.unwrap(), 100);
    })
    .await
}

#[tokio::test]
async fn a_task_that_panics_holding_the_lock_poisons_it() {
    hang_guard(async {
        let exec = executor(1).await;
        let lock = exec.shared_lock().unwrap();
        assert!(exec.spawn(panic_holding, lock.clone()).await.unwrap_err().is_panic());
        let poisoned = lock.lock().await.unwrap_err();
        assert_eq!(poisoned.cause(), PoisonCause::Panicked);
        poisoned.into_inner().clear_poison();
        assert!(lock.lock().await.is_ok());
    })
    .await
}

#[tokio::test]
async fn a_dropped_lock_future_leaves_the_lock_free() {
    hang_guard(async {
        let exec = executor(1).await;
        let lock = exec.shared_lock().unwrap();
        let held = lock.lock().await.unwrap();
        // Waits on a blocking thread, and is dropped while it waits.
        assert!(tokio::time::timeout(Duration::from_millis(20), lock.lock()).await.is_err());
        drop(held);
        // The waiting thread may take it after the release: it must give it back.
        let again = lock.lock().await.unwrap();
        drop(again);
        assert!(lock.try_lock().is_some());
    })
    .await
}

#[tokio::test]
async fn workers_fill_disjoint_ranges_and_the_parent_reads_the_whole() {
    hang_guard(async {
        let exec = executor(4).await;
        let len = 1_000_000;
        let array = exec.shared_array::<f64>(len).unwrap();
        let ranges = (0..len).step_by(len / 8).map(|start| (array.clone(), start..start + len / 8));
        exec.map(squares, ranges).await.unwrap();
        let all = array.to_vec();
        assert_eq!(all.len(), len);
        assert!(all.iter().enumerate().all(|(i, &x)| x == (i as f64) * (i as f64)));
        let locked = array.lock().await.unwrap();
        assert_eq!(locked.get(999_999), Some(999_999.0 * 999_999.0));
    })
    .await
}

#[tokio::test]
async fn sizes_zero_one_and_a_sparse_gibibyte() {
    hang_guard(async {
        let exec = executor(1).await;
        for len in [0, 1, 1 << 30] {
            let array = exec.shared_array::<u8>(len).unwrap();
            assert_eq!(exec.spawn(touch_ends, array.clone()).await.unwrap(), len);
            if len > 1 {
                assert_eq!((array.get(0), array.get(len - 1)), (Some(1), Some(2)));
            } else if len == 1 {
                assert_eq!(array.get(0), Some(2));
            }
            assert_eq!(array.get(len), None);
        }
        for len in [0, 1, 64 << 20] {
            let data = exec.shared_bytes_with(len, |buf| buf.iter_mut().for_each(|byte| *byte = 3)).unwrap();
            assert_eq!(exec.spawn(checksum, data).await.unwrap(), (len, 3 * len as u64));
        }
        let empty = exec.shared_array_from::<u64>(&[]).unwrap();
        assert!(empty.is_empty());
        assert!(empty.to_vec().is_empty());
    })
    .await
}

#[tokio::test]
async fn out_of_bounds_and_wrong_type_are_errors() {
    hang_guard(async {
        let exec = executor(1).await;
        let array = exec.shared_array::<u32>(4).unwrap();
        let oob = SharedError::OutOfBounds { start: 3, count: 2, len: 4 };
        assert_eq!(array.write_from(3, &[1, 2]), Err(oob.clone()));
        assert_eq!(array.read_into(3, &mut [0; 2]), Err(oob));
        assert!(array.set(4, 1).is_err());

        // (Typed in the parent too; postcard only drops the message, which the
        // worker keeps: see the unit tests of `resolve`.)
        let bytes = postcard::to_allocvec(&array).unwrap();
        assert!(postcard::from_bytes::<SharedArray<f64>>(&bytes).is_err());
        assert!(postcard::from_bytes::<SharedArray<u32>>(&bytes).is_ok());
        drop(array);
        assert!(postcard::from_bytes::<SharedArray<u32>>(&bytes).is_err());
    })
    .await
}

/// Makes a value in its own executor, prints its handle, and waits to be killed.
#[test]
fn foreign_maker_helper() {
    if !is_helper("foreign_maker_helper") {
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let exec = executor(1).await;
        let value = exec.shared_value(42u64).unwrap();
        let hex: String = postcard::to_allocvec(&value).unwrap().iter().map(|b| format!("{b:02x}")).collect();
        println!("PID {}", std::process::id());
        println!("HANDLE {hex}");
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn a_handle_whose_maker_died_fails_its_input_in_the_worker_with_a_typed_error() {
    hang_guard(async {
        let mut helper = helper_command("foreign_maker_helper").spawn().unwrap();
        let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines().map(Result::unwrap);
        read_pids(&mut lines, "PID ");
        let hex = lines.find_map(|line| line.strip_prefix("HANDLE ").map(str::to_owned)).unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        // Attached here through the helper's descriptor service.
        let value: SharedValue<u64> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(value.load(), 42);
        let exec = executor(1).await;
        assert_eq!(exec.spawn(read_value, value.clone()).await.unwrap(), 42);
        helper.kill().unwrap();
        helper.wait().unwrap();
        // Still mapped here; but a fresh worker can no longer get it.
        assert_eq!(value.load(), 42);
        let fresh = executor(1).await;
        let err = fresh.spawn(read_value, value.clone()).await.unwrap_err();
        assert!(matches!(err, procexec::Error::Shared(SharedError::Gone)), "{err}");
        // The worker serves on.
        assert!(fresh.spawn(pid, ()).await.is_ok());
    })
    .await
}

#[tokio::test]
async fn a_replacement_worker_maps_the_segments_again() {
    hang_guard(async {
        let exec = executor(1).await;
        let counter = exec.shared_value(0u64).unwrap();
        let first = exec.spawn(add_locked, (counter.clone(), 5)).await.unwrap();
        let state = exec.shared_array::<u32>(2).unwrap();
        state.set(1, 1).unwrap();
        assert!(
            exec.spawn(hold_and_die, (counter.clone(), state.clone())).await.unwrap_err().is_worker_crash()
        );
        // The killed worker is gone, and its mappings with it.
        let killed = state.get(0).unwrap();
        assert_eq!(killed, first);
        eventually("the killed worker is gone", || !alive(killed) && shared_mappings(killed) == 0).await;
        if let Err(poisoned) = counter.lock().await {
            poisoned.into_inner().clear_poison();
        }
        let second = exec.spawn(add_locked, (counter.clone(), 5)).await.unwrap();
        assert_ne!(first, second);
        assert_eq!(counter.load(), 10);
    })
    .await
}

/// Maps shared memory in itself and its workers, then drops everything (or, with
/// `RESIDUE_HOLD`, waits to be killed) and reports what is left.
#[test]
fn residue_helper() {
    if !is_helper("residue_helper") {
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let exec = executor(2).await;
        let array = exec.shared_array::<u64>(1 << 20).unwrap();
        let bytes = exec.shared_bytes(&[1; 4096]).unwrap();
        let value = exec.shared_value(0u64).unwrap();
        let mut workers = Vec::new();
        for _ in 0..2 {
            workers.push(exec.spawn(pid, ()).await.unwrap());
            exec.spawn(checksum, bytes.clone()).await.unwrap();
            exec.spawn(add_locked, (value.clone(), 1)).await.unwrap();
            exec.spawn(touch_ends, SharedArray::<u8>::clone(&exec.shared_array(8).unwrap())).await.unwrap();
        }
        let _ = array.write_from(0, &[1, 2, 3]);
        let mapped: usize = exec.map(shared_maps, vec![(); 8]).await.unwrap().into_iter().max().unwrap_or(0);
        let list: Vec<String> = workers.iter().map(u32::to_string).collect();
        println!("WORKERS {}", list.join(" "));
        println!("MAPPED {mapped}");
        if std::env::var("RESIDUE_HOLD").is_ok() {
            std::future::pending::<()>().await;
        }
        drop((array, bytes, value));
        exec.shutdown().await;
        drop(exec);
        println!("LEFT {}", shared_mappings(std::process::id()));
    });
}

fn start_residue_helper(hold: bool) -> (std::process::Child, Vec<u32>, impl Iterator<Item = String>) {
    let mut command = helper_command("residue_helper");
    if hold {
        command.env("RESIDUE_HOLD", "1");
    }
    let mut helper = command.spawn().unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines().map(Result::unwrap);
    let workers = read_pids(&mut lines, "WORKERS ");
    let mapped = read_pids(&mut lines, "MAPPED ");
    assert!(mapped[0] > 0, "the workers mapped the segments");
    (helper, workers, lines)
}

#[tokio::test]
async fn nothing_is_left_after_the_executor_is_dropped() {
    let shm_before = dev_shm();
    let (mut helper, workers, mut lines) = start_residue_helper(false);
    let left = read_pids(&mut lines, "LEFT ");
    assert_eq!(left, [0], "the parent unmapped every segment");
    helper.wait().unwrap();
    eventually("the workers are gone", || workers.iter().all(|&pid| !alive(pid))).await;
    assert_eq!(dev_shm(), shm_before, "nothing was ever named in /dev/shm");
}

#[tokio::test]
async fn nothing_is_left_after_the_parent_is_killed() {
    let shm_before = dev_shm();
    let (mut helper, workers, _lines) = start_residue_helper(true);
    let helper_pid = helper.id();
    assert!(shared_mappings(helper_pid) > 0);
    helper.kill().unwrap(); // SIGKILL: no destructor runs
    helper.wait().unwrap();
    eventually("the workers are gone", || workers.iter().all(|&pid| !alive(pid))).await;
    // Nobody else maps it: with no name and no process left, the memory is freed.
    let me = std::process::id();
    let others: Vec<u32> =
        processes_mapping_shared_memory().into_iter().filter(|&pid| !descends_from(pid, me)).collect();
    assert!(others.is_empty(), "processes still map procexec shared memory: {others:?}");
    assert_eq!(dev_shm(), shm_before, "nothing was ever named in /dev/shm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parent_may_take_the_lock_blocking_on_a_blocking_thread() {
    hang_guard(async {
        let exec = executor(1).await;
        let value = exec.shared_value(1u64).unwrap();
        let on_thread = value.clone();
        tokio::task::spawn_blocking(move || *on_thread.blocking_lock().unwrap() += 1).await.unwrap();
        assert_eq!(value.load(), 2);
    })
    .await
}

#[tokio::test]
async fn a_forged_handle_cannot_turn_a_sealed_buffer_into_an_array() {
    hang_guard(async {
        let exec = executor(1).await;
        let bytes = exec.shared_bytes(b"immutable").unwrap();
        let mut wire = postcard::to_allocvec(&bytes).unwrap();
        // The handle's kind (after the home and ids) said Bytes; say Array.
        let kind_at = wire.len() - 1 - 1 - 1 - 1 - "u8".len();
        assert_eq!(wire[kind_at], 2, "{wire:?}");
        wire[kind_at] = 1;
        assert!(postcard::from_bytes::<SharedArray<u8>>(&wire).is_err());
        assert_eq!(&bytes[..], b"immutable");
    })
    .await
}

#[test]
fn many_parent_tasks_waiting_for_one_lock_need_one_blocking_thread() {
    // Two blocking threads: one waiter per task would take both.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().max_blocking_threads(2).enable_all().build().unwrap();
    runtime.block_on(hang_guard(async {
        let exec = executor(1).await;
        let value = exec.shared_value(0u64).unwrap();
        let held = value.lock().await.unwrap();
        let waiters: Vec<_> = (0..64)
            .map(|_| {
                let value = value.clone();
                tokio::spawn(async move { *value.lock().await.unwrap() += 1 })
            })
            .collect();
        tokio::task::yield_now().await;
        // A holder that needs the blocking pool is not stuck behind the waiters.
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(value.load(), 64);
    }))
}
