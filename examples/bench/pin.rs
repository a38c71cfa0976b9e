//! CPU placement for the latency workload: a round trip costs ~5 µs when both sides
//! share a CPU and ~30 µs when each wakes the other across CPUs, and the scheduler
//! picks either from run to run. Pinning makes each placement measurable on its own.

/// Where the two sides of a round trip run.
#[derive(Clone, Copy)]
pub enum Placement {
    /// Everything on CPU 0.
    SameCpu,
    /// This process on CPU 0, the child or workers on CPU 1.
    CrossCpu,
    /// Wherever the scheduler puts them.
    Free,
}

impl Placement {
    pub fn label(self) -> &'static str {
        match self {
            Placement::SameCpu => "same CPU",
            Placement::CrossCpu => "across CPUs",
            Placement::Free => "placed by the scheduler",
        }
    }

    /// Pins every thread of this process to CPU 0.
    pub fn pin_parent(self) {
        if !matches!(self, Placement::Free) {
            for_each_thread(std::process::id(), |tid| set_affinity(tid, &[0]));
        }
    }

    /// Pins (the main thread of) a child or worker.
    pub fn pin_child(self, pid: u32) {
        match self {
            Placement::SameCpu => set_affinity(pid, &[0]),
            Placement::CrossCpu => set_affinity(pid, &[1]),
            Placement::Free => {}
        }
    }
}

/// Lets every thread of this process run anywhere again.
pub fn unpin_parent() {
    let all: Vec<usize> = (0..procexec::cpu_count().max(2)).collect();
    for_each_thread(std::process::id(), |tid| set_affinity(tid, &all));
}

fn for_each_thread(pid: u32, mut f: impl FnMut(u32)) {
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
                f(tid);
            }
        }
    }
}

fn set_affinity(tid: u32, cpus: &[usize]) {
    // SAFETY: `set` is a properly sized, zeroed cpu_set_t that CPU_SET fills in, and
    // sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
