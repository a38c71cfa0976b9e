//! The companion worker explains itself when a person runs it.
use std::process::Command;

#[test]
fn running_the_worker_by_hand_explains_it_and_exits_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_procexec-worker")).output().expect("the worker runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("this is a procexec worker"), "{stderr}");
    assert!(output.stdout.is_empty());
}
