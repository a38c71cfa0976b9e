//! Where workers run and how they are started: worker groups, each with a launcher
//! (this machine, OpenSSH, a Slurm allocation, or any command that pipes stdin and
//! stdout), the hosts file, shipping the worker binary, and the Slurm allocation.
//!
//! Every launcher comes down to one mechanism: a command line put in front of the
//! worker's own (`ssh host --`, `srun --jobid=… --`, `docker exec -i ctr`, or a
//! wrapper such as `valgrind`), the protocol then running over the launcher's
//! stdin and stdout exactly as over a local worker's pipes.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::parent::error::{Error, Result};

/// The variable through which a worker learns which group's host it serves on
/// (a [`WorkerGroup`]'s label: `local`, the ssh host, `slurm:<job>`).
pub const HOST_ENV: &str = "PROCEXEC_HOST";

/// The variable [`Hosts::from_env`] reads.
pub const HOSTS_ENV: &str = "PROCEXEC_HOSTS";

/// Workers started over OpenSSH: `ssh [options] host -- env K=V … program args`.
///
/// The remote side runs the worker with the environment the executor was given
/// with [`Builder::env`](crate::Builder::env) (and procexec's own markers), never
/// the parent's whole environment. Authentication is ssh's (keys, agent, config):
/// procexec runs `ssh` with `BatchMode=yes`, so it never waits for a password,
/// and opens no port of its own. When the parent dies, `ssh` sees its stdin close
/// and the remote worker exits on that end of input.
///
/// # Examples
///
/// ```no_run
/// use procexec::{Ssh, WorkerGroup};
///
/// # async fn demo() -> procexec::Result<()> {
/// let exec = procexec::Executor::builder()
///     .program("/opt/app/worker")
///     .group(WorkerGroup::local(2))
///     .group(WorkerGroup::ssh(8, Ssh::new("node1").user("app").port(2222).ship_to("/tmp/procexec")))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssh {
    host: String,
    port: Option<u16>,
    user: Option<String>,
    identity: Option<PathBuf>,
    config: Option<PathBuf>,
    options: Vec<String>,
    program: Option<PathBuf>,
    ship_to: Option<PathBuf>,
    ssh: PathBuf,
}

impl Ssh {
    /// Workers on `host` (a name, an address, or a `Host` alias of the ssh config).
    pub fn new(host: impl Into<String>) -> Self {
        Ssh {
            host: host.into(),
            port: None,
            user: None,
            identity: None,
            config: None,
            options: Vec::new(),
            program: None,
            ship_to: None,
            ssh: PathBuf::from("ssh"),
        }
    }

    /// The host it connects to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (`ssh -p`). Default: ssh's (22, or the config's).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The remote user (`ssh -l`). Default: ssh's.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The private key (`ssh -i`). Default: ssh's.
    pub fn identity(mut self, key: impl Into<PathBuf>) -> Self {
        self.identity = Some(key.into());
        self
    }

    /// An ssh client config file (`ssh -F`). Default: ssh's (`~/.ssh/config`).
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = Some(path.into());
        self
    }

    /// Adds an ssh option, as `ssh -o` takes it: `"ConnectTimeout=5"`. Default:
    /// only `BatchMode=yes`, which this cannot turn off.
    pub fn option(mut self, option: impl Into<String>) -> Self {
        self.options.push(option.into());
        self
    }

    /// The worker program's absolute path on the host. Default: the local
    /// program's path (a shared file system, or a copy at the same place), or the
    /// shipped copy with [`ship_to`](Ssh::ship_to).
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// Copies the local worker program to this directory on the host before the
    /// first worker starts, named by its content hash (`<name>-<hash>`), so a copy
    /// already there (from an earlier run) is reused and a rebuilt program never
    /// runs a stale one. Default: no copy. See [`Ssh::remove_shipped`].
    pub fn ship_to(mut self, dir: impl Into<PathBuf>) -> Self {
        self.ship_to = Some(dir.into());
        self
    }

    /// The ssh client to run. Default: `ssh` from `PATH`.
    pub fn ssh_program(mut self, path: impl Into<PathBuf>) -> Self {
        self.ssh = path.into();
        self
    }

    /// Whether it ships the local program.
    pub(crate) fn ships(&self) -> bool {
        self.ship_to.is_some() && self.program.is_none()
    }

    /// The `ssh` command line up to (and including) the host.
    fn command(&self) -> Command {
        let mut command = Command::new(&self.ssh);
        // No tty (so no line discipline on the frames), no escape character (a `~.`
        // in a payload must not end the session), never a password prompt.
        command.args(["-T", "-e", "none", "-o", "BatchMode=yes"]);
        if let Some(config) = &self.config {
            command.arg("-F").arg(config);
        }
        if let Some(port) = self.port {
            command.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &self.user {
            command.arg("-l").arg(user);
        }
        if let Some(identity) = &self.identity {
            command.arg("-i").arg(identity);
        }
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        command.arg("--").arg(&self.host);
        command
    }

    /// Runs `script` on the host through `sh -c`, with `input` as its stdin.
    fn run(&self, script: &str, input: Option<&Path>) -> io::Result<std::process::Output> {
        let mut command = self.command();
        command.arg(script).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.stdin(match input {
            Some(path) => Stdio::from(std::fs::File::open(path)?),
            None => Stdio::null(),
        });
        command.output()
    }

    /// Where [`ship_to`](Ssh::ship_to) puts `program` on the host, or `None`
    /// without `ship_to`. Reads the program to hash it.
    ///
    /// ```no_run
    /// let ssh = procexec::Ssh::new("node1").ship_to("/tmp/procexec");
    /// let remote = ssh.shipped_path("target/release/worker").unwrap().unwrap();
    /// assert!(remote.starts_with("/tmp/procexec/worker-"));
    /// ```
    pub fn shipped_path(&self, program: impl AsRef<Path>) -> io::Result<Option<PathBuf>> {
        let Some(dir) = &self.ship_to else {
            return Ok(None);
        };
        let program = program.as_ref();
        let hash = content_hash(program)?;
        let name = program.file_name().map_or_else(|| "worker".into(), |name| name.to_string_lossy());
        Ok(Some(dir.join(format!("{name}-{hash:016x}"))))
    }

    /// Copies `program` to the host unless the copy is there already. Returns the
    /// remote path and whether it copied.
    fn ship(&self, program: &Path) -> io::Result<(PathBuf, bool)> {
        let remote = self.shipped_path(program)?.ok_or_else(|| io::Error::other("no ship_to"))?;
        let target = quote(remote.as_os_str()).map_err(io::Error::other)?;
        let present = self.run(&format!("test -x {target}"), None)?;
        if present.status.success() {
            return Ok((remote, false));
        }
        let dir = quote(remote.parent().unwrap_or(Path::new("/")).as_os_str()).map_err(io::Error::other)?;
        // Written under a temporary name and renamed: a copy cut short never
        // carries the final name, which says its content is whole.
        let script = format!(
            "mkdir -p {dir} && tmp={target}.part.$$ && cat > \"$tmp\" && chmod 755 \"$tmp\" && mv -f \"$tmp\" {target}"
        );
        let copied = self.run(&script, Some(program))?;
        if !copied.status.success() {
            return Err(io::Error::other(format!(
                "copying the worker to {}:{} failed ({}): {}",
                self.host,
                remote.display(),
                copied.status,
                String::from_utf8_lossy(&copied.stderr).trim()
            )));
        }
        Ok((remote, true))
    }

    /// Removes the copy of `program` that [`ship_to`](Ssh::ship_to) left on the
    /// host. Returns false without `ship_to`. Blocks while `ssh` runs.
    ///
    /// ```no_run
    /// let ssh = procexec::Ssh::new("node1").ship_to("/tmp/procexec");
    /// ssh.remove_shipped("target/release/worker")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn remove_shipped(&self, program: impl AsRef<Path>) -> io::Result<bool> {
        let Some(remote) = self.shipped_path(program)? else {
            return Ok(false);
        };
        let target = quote(remote.as_os_str()).map_err(io::Error::other)?;
        let removed = self.run(&format!("rm -f {target}"), None)?;
        if !removed.status.success() {
            return Err(io::Error::other(format!(
                "removing {}:{} failed ({}): {}",
                self.host,
                remote.display(),
                removed.status,
                String::from_utf8_lossy(&removed.stderr).trim()
            )));
        }
        Ok(true)
    }
}

/// Workers as job steps of a Slurm allocation: `srun --jobid=ID --overlap
/// --unbuffered -n1 -N1 --export=NONE -- env K=V … program args`.
///
/// The allocation is one that exists ([`job`](Slurm::job), or `SLURM_JOB_ID` when
/// the program runs inside one), or one the executor requests with `salloc
/// --no-shell` and cancels when it is dropped. Steps `--overlap`, so any number of
/// workers share its CPUs. The executor reads the allocation's end and stops
/// sending work to its workers [`stop_before_end`](Slurm::stop_before_end) before
/// it, so no call is cut off by the time limit. `build` waits while a requested
/// allocation is pending (`salloc` blocks until it is granted). A worker step dies
/// with its `srun`:
/// killing it (as the executor does on drop, or the kernel on the parent's death,
/// through the end of its stdin) cancels the step.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use procexec::{Slurm, WorkerGroup};
///
/// # async fn demo() -> procexec::Result<()> {
/// let slurm = Slurm::new().partition("batch").time_limit(Duration::from_secs(3600)).nodes(2);
/// let exec = procexec::Executor::builder()
///     .program("/shared/bin/worker")
///     .group(WorkerGroup::slurm(32, slurm))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slurm {
    job: Option<u64>,
    partition: Option<String>,
    account: Option<String>,
    time_limit: Option<Duration>,
    constraint: Option<String>,
    nodes: Option<u32>,
    tasks: Option<u32>,
    program: Option<PathBuf>,
    stop_before_end: Duration,
    srun_args: Vec<String>,
}

impl Default for Slurm {
    fn default() -> Self {
        Slurm::new()
    }
}

impl Slurm {
    /// Steps in the allocation of `SLURM_JOB_ID` if it is set, or else in one the
    /// executor requests.
    pub fn new() -> Self {
        Slurm {
            job: None,
            partition: None,
            account: None,
            time_limit: None,
            constraint: None,
            nodes: None,
            tasks: None,
            program: None,
            stop_before_end: Duration::from_secs(60),
            srun_args: Vec::new(),
        }
    }

    /// Uses this existing allocation (the executor never cancels it). Default:
    /// `SLURM_JOB_ID`, or a new allocation.
    pub fn job(mut self, id: u64) -> Self {
        self.job = Some(id);
        self
    }

    /// For a new allocation: the partition (`salloc -p`). Default: Slurm's.
    pub fn partition(mut self, partition: impl Into<String>) -> Self {
        self.partition = Some(partition.into());
        self
    }

    /// For a new allocation: the account (`salloc -A`). Default: Slurm's.
    pub fn account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// For a new allocation: its time limit (`salloc -t`, whole seconds).
    /// Default: the partition's.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }

    /// For a new allocation: node features (`salloc -C`). Default: none.
    pub fn constraint(mut self, constraint: impl Into<String>) -> Self {
        self.constraint = Some(constraint.into());
        self
    }

    /// For a new allocation: the number of nodes (`salloc -N`). Default: Slurm's.
    pub fn nodes(mut self, nodes: u32) -> Self {
        self.nodes = Some(nodes);
        self
    }

    /// For a new allocation: the number of tasks, so of CPUs (`salloc -n`).
    /// Default: the group's number of workers.
    pub fn tasks(mut self, tasks: u32) -> Self {
        self.tasks = Some(tasks);
        self
    }

    /// The worker program's absolute path on the nodes. Default: the local
    /// program's path (clusters share the file system).
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// How long before the allocation ends its workers stop taking work. Default:
    /// 60 s.
    pub fn stop_before_end(mut self, margin: Duration) -> Self {
        self.stop_before_end = margin;
        self
    }

    /// Adds an argument to each worker's `srun` (say, `--mem-per-cpu=2G`). Default:
    /// none.
    pub fn srun_arg(mut self, arg: impl Into<String>) -> Self {
        self.srun_args.push(arg.into());
        self
    }
}

/// How the workers of a [`WorkerGroup`] are started.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Launcher {
    /// Child processes of this one: the default.
    Local,
    /// Over OpenSSH.
    Ssh(Ssh),
    /// As steps of a Slurm allocation.
    Slurm(Slurm),
    /// After this command, which must connect the worker's stdin and stdout to its
    /// own, on another machine or in a container: `["docker", "exec", "-i",
    /// "ctr"]`, `["kubectl", "exec", "-i", "pod", "--"]`. The worker gets only the
    /// executor's explicit environment, through `env`.
    Command(Vec<OsString>),
}

/// Workers started the same way: how many, and their [`Launcher`].
///
/// An executor runs one or more groups ([`Builder::group`](crate::Builder::group));
/// calls go to whichever worker is free, so each group takes work in proportion to
/// its free workers. Slots are numbered through the groups in order. For a worker
/// elsewhere (ssh, Slurm, a command), the pid that [`Stats`](crate::Stats) and
/// errors report is its launcher's (`ssh`, `srun`) on this machine, and its
/// stderr lines are labelled with the group's [`label`](WorkerGroup::label).
///
/// ```
/// use procexec::{Launcher, WorkerGroup};
///
/// let here = WorkerGroup::local(2).wrapper(["env", "RUST_BACKTRACE=1"]);
/// assert_eq!(here.processes(), 2);
/// let box1 = WorkerGroup::command(4, ["docker", "exec", "-i", "box1"]);
/// assert!(matches!(box1.launcher(), Launcher::Command(_)));
/// assert_eq!(box1.label(), "docker exec -i box1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerGroup {
    processes: usize,
    launcher: Launcher,
    wrapper: Vec<OsString>,
    label: Option<String>,
}

impl WorkerGroup {
    /// `processes` workers launched by `launcher`.
    pub fn new(processes: usize, launcher: Launcher) -> Self {
        WorkerGroup { processes, launcher, wrapper: Vec::new(), label: None }
    }

    /// `processes` workers on this machine.
    pub fn local(processes: usize) -> Self {
        WorkerGroup::new(processes, Launcher::Local)
    }

    /// `processes` workers over ssh.
    pub fn ssh(processes: usize, ssh: Ssh) -> Self {
        WorkerGroup::new(processes, Launcher::Ssh(ssh))
    }

    /// `processes` workers as steps of a Slurm allocation.
    pub fn slurm(processes: usize, slurm: Slurm) -> Self {
        WorkerGroup::new(processes, Launcher::Slurm(slurm))
    }

    /// `processes` workers run through `command` (see [`Launcher::Command`]).
    pub fn command<I, S>(processes: usize, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        WorkerGroup::new(processes, Launcher::Command(command.into_iter().map(Into::into).collect()))
    }

    /// Runs each worker of the group under `wrapper`, where the worker runs:
    /// `valgrind --error-exitcode=9`, `strace -f -o trace.txt`, `env FOO=1`, `gdb
    /// -batch -ex run -ex bt --args`. Default: none.
    pub fn wrapper<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Names the group in logs, errors and [`HOST_ENV`]. Default: `local`, the
    /// ssh host (`user@host:port` as given), `slurm`, or the command.
    pub fn label(&self) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        match &self.launcher {
            Launcher::Local => "local".into(),
            Launcher::Ssh(ssh) => {
                let mut label = String::new();
                if let Some(user) = &ssh.user {
                    label.push_str(user);
                    label.push('@');
                }
                label.push_str(&ssh.host);
                if let Some(port) = ssh.port {
                    label.push_str(&format!(":{port}"));
                }
                label
            }
            Launcher::Slurm(_) => "slurm".into(),
            Launcher::Command(command) => {
                command.iter().map(|arg| arg.to_string_lossy()).collect::<Vec<_>>().join(" ")
            }
        }
    }

    /// Sets the group's [`label`](WorkerGroup::label).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub(crate) fn wrapper_is_empty(&self) -> bool {
        self.wrapper.is_empty()
    }

    /// How many workers.
    pub fn processes(&self) -> usize {
        self.processes
    }

    /// How they are started.
    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }
}

/// A hosts file in the spirit of GNU parallel's `--sshloginfile`: one entry a
/// line (or separated by commas), `[workers/][user@]host[:port]`, with `:` for
/// this machine; `#` starts a comment.
///
/// ```
/// use procexec::{Hosts, Launcher, Ssh};
///
/// let hosts = Hosts::parse("4/:\n8/app@node2:2222  # the big one\nnode3")?;
/// let groups = hosts.groups(&Ssh::new("").identity("/keys/id"));
/// assert_eq!(groups.len(), 3);
/// assert_eq!((groups[0].processes(), groups[0].launcher()), (4, &Launcher::Local));
/// assert_eq!(groups[1].label(), "app@node2:2222");
/// assert_eq!(groups[1].processes(), 8);
/// assert_eq!(groups[2].processes(), 1);
/// # Ok::<(), procexec::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    entries: Vec<HostEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostEntry {
    workers: Option<usize>,
    /// `None` for this machine.
    host: Option<(Option<String>, String, Option<u16>)>,
}

impl Hosts {
    /// Parses entries (see [`Hosts`]). Fails with [`Error::Config`] naming the
    /// entry that is wrong.
    pub fn parse(text: &str) -> Result<Hosts> {
        let mut entries = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            for entry in line.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
                entries.push(parse_entry(entry)?);
            }
        }
        if entries.is_empty() {
            return Err(Error::Config("the hosts list names no host".into()));
        }
        Ok(Hosts { entries })
    }

    /// Reads and parses a hosts file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Hosts> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|err| Error::Config(format!("cannot read the hosts file {}: {err}", path.display())))?;
        Hosts::parse(&text)
    }

    /// The hosts in [`HOSTS_ENV`] (`PROCEXEC_HOSTS`): entries, or the path of a
    /// hosts file. `Ok(None)` when it is unset or empty.
    pub fn from_env() -> Result<Option<Hosts>> {
        let Some(value) = std::env::var_os(HOSTS_ENV).filter(|value| !value.is_empty()) else {
            return Ok(None);
        };
        let path = Path::new(&value);
        if path.is_file() {
            return Hosts::from_file(path).map(Some);
        }
        let text = value.to_str().ok_or_else(|| Error::Config(format!("{HOSTS_ENV} is not UTF-8")))?;
        Hosts::parse(text).map(Some)
    }

    /// One group per entry: ssh hosts take every other setting (identity, config,
    /// options, program, shipping) from `template`; `:` is a local group (of
    /// [`cpu_count`](crate::cpu_count) workers when no count is given), a host
    /// without a count gets one worker.
    pub fn groups(&self, template: &Ssh) -> Vec<WorkerGroup> {
        self.entries
            .iter()
            .map(|entry| match &entry.host {
                None => WorkerGroup::local(
                    entry
                        .workers
                        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                ),
                Some((user, host, port)) => {
                    let mut ssh = template.clone();
                    ssh.host = host.clone();
                    if user.is_some() {
                        ssh.user = user.clone();
                    }
                    if port.is_some() {
                        ssh.port = *port;
                    }
                    WorkerGroup::ssh(entry.workers.unwrap_or(1), ssh)
                }
            })
            .collect()
    }
}

fn parse_entry(entry: &str) -> Result<HostEntry> {
    let wrong = |why: &str| Error::Config(format!("hosts entry `{entry}`: {why}"));
    let (workers, login) = match entry.split_once('/') {
        Some((count, login)) => {
            let count: usize = count.trim().parse().map_err(|_| wrong("the worker count is not a number"))?;
            if count == 0 {
                return Err(wrong("the worker count must not be zero"));
            }
            (Some(count), login.trim())
        }
        None => (None, entry),
    };
    if login == ":" {
        return Ok(HostEntry { workers, host: None });
    }
    let (user, rest) = match login.rsplit_once('@') {
        Some((user, rest)) if !user.is_empty() => (Some(user.to_string()), rest),
        Some(_) => return Err(wrong("empty user name")),
        None => (None, login),
    };
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 address in brackets keeps its colons.
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
            let port: u16 = port.parse().map_err(|_| wrong("the port is not a number"))?;
            (host.trim_start_matches('[').trim_end_matches(']'), Some(port))
        }
        _ => (rest, None),
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(wrong("no host name"));
    }
    Ok(HostEntry { workers, host: Some((user, host.to_string(), port)) })
}

/// Quotes `arg` for the remote shell ssh hands its command to.
fn quote(arg: &OsStr) -> std::result::Result<String, String> {
    let text = arg.to_str().ok_or_else(|| format!("{} is not UTF-8", arg.to_string_lossy()))?;
    let safe =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./=:,@%+".contains(&b));
    if safe { Ok(text.to_string()) } else { Ok(format!("'{}'", text.replace('\'', r"'\''"))) }
}

/// A 64-bit FNV-1a hash of the file's content (a name for a copy, not a
/// signature: whoever can write the remote directory is trusted anyway).
fn content_hash(path: &Path) -> io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0; 1 << 20];
    loop {
        let read = file.read(&mut buf)?;
        if read == 0 {
            return Ok(hash);
        }
        for &byte in &buf[..read] {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A Slurm allocation the workers of a group run in.
#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) job: u64,
    /// Requested by the executor, so cancelled when it is dropped.
    owned: bool,
    /// When its workers stop taking work (its end minus the margin).
    pub(crate) stop_at: Option<Instant>,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.owned {
            match Command::new("scancel").arg(self.job.to_string()).stdin(Stdio::null()).output() {
                Ok(out) if out.status.success() => {
                    tracing::debug!(job = self.job, "cancelled the Slurm allocation");
                }
                Ok(out) => tracing::warn!(
                    job = self.job,
                    "scancel failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(err) => tracing::warn!(job = self.job, "cannot run scancel: {err}"),
            }
        }
    }
}

/// Finds or requests the allocation for `slurm`, and reads its end.
fn allocate(slurm: &Slurm, processes: usize) -> Result<Allocation> {
    let existing = slurm.job.or_else(|| std::env::var("SLURM_JOB_ID").ok().and_then(|id| id.parse().ok()));
    let mut allocation = match existing {
        Some(job) => Allocation { job, owned: false, stop_at: None },
        None => {
            let mut salloc = Command::new("salloc");
            salloc.args(["--no-shell", "--job-name=procexec"]);
            salloc.arg(format!("--ntasks={}", slurm.tasks.unwrap_or(processes as u32).max(1)));
            if let Some(partition) = &slurm.partition {
                salloc.arg(format!("--partition={partition}"));
            }
            if let Some(account) = &slurm.account {
                salloc.arg(format!("--account={account}"));
            }
            if let Some(limit) = slurm.time_limit {
                // Slurm counts whole minutes at least.
                let secs = limit.as_secs().max(60);
                salloc.arg(format!("--time={}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60));
            }
            if let Some(constraint) = &slurm.constraint {
                salloc.arg(format!("--constraint={constraint}"));
            }
            if let Some(nodes) = slurm.nodes {
                salloc.arg(format!("--nodes={nodes}"));
            }
            let out = salloc
                .stdin(Stdio::null())
                .output()
                .map_err(|err| Error::Config(format!("cannot run salloc: {err}")))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            // The line is on stderr; `-Q` would drop it, so it is never passed.
            let job = stderr
                .lines()
                .find_map(|line| line.split("Granted job allocation ").nth(1))
                .and_then(|rest| rest.trim().parse().ok());
            match job {
                Some(job) if out.status.success() => Allocation { job, owned: true, stop_at: None },
                _ => {
                    return Err(Error::Config(format!(
                        "salloc gave no allocation ({}): {}",
                        out.status,
                        stderr.trim()
                    )));
                }
            }
        }
    };
    let left = Command::new("squeue")
        .args(["-h", "-o", "%L", "-j"])
        .arg(allocation.job.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|err| Error::Config(format!("cannot run squeue: {err}")))?;
    let text = String::from_utf8_lossy(&left.stdout);
    if !left.status.success() || text.trim().is_empty() {
        return Err(Error::Config(format!(
            "Slurm job {} is not running (squeue: {})",
            allocation.job,
            String::from_utf8_lossy(&left.stderr).trim()
        )));
    }
    if let Some(left) = parse_time_left(text.trim()) {
        allocation.stop_at = Some(Instant::now() + left.saturating_sub(slurm.stop_before_end));
        tracing::debug!(job = allocation.job, ?left, "Slurm allocation ends in");
    }
    Ok(allocation)
}

/// Parses squeue's `%L`: `[days-]hours:minutes:seconds`, `minutes:seconds`, or
/// `UNLIMITED` (`None`).
fn parse_time_left(text: &str) -> Option<Duration> {
    let (days, clock) = match text.split_once('-') {
        Some((days, clock)) => (days.parse::<u64>().ok()?, clock),
        None => (0, text),
    };
    let parts: Vec<u64> = clock.split(':').map(|part| part.parse().ok()).collect::<Option<_>>()?;
    let secs = match parts.as_slice() {
        [s] => *s,
        [m, s] => m * 60 + s,
        [h, m, s] => h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(Duration::from_secs(days * 86_400 + secs))
}

/// The groups of an executor, and which group each slot belongs to.
#[derive(Debug)]
pub(crate) struct Groups {
    list: Vec<GroupRuntime>,
    of_slot: Vec<usize>,
}

impl Groups {
    /// Slots are numbered through the groups in order.
    pub(crate) fn new(list: Vec<(GroupRuntime, usize)>) -> Groups {
        let mut of_slot = Vec::new();
        let list = list
            .into_iter()
            .enumerate()
            .map(|(index, (group, processes))| {
                of_slot.extend(std::iter::repeat_n(index, processes));
                group
            })
            .collect();
        Groups { list, of_slot }
    }

    /// The group of `slot`.
    pub(crate) fn of(&self, slot: usize) -> &GroupRuntime {
        &self.list[self.of_slot.get(slot).copied().unwrap_or(0)]
    }

    /// Whether every group runs on this machine.
    pub(crate) fn all_local(&self) -> bool {
        self.list.iter().all(|group| group.same_host)
    }

    /// One group of local workers: a stand-in until the real groups are prepared,
    /// and for tests.
    pub(crate) fn local(program: &Path) -> Groups {
        let group = WorkerGroup::local(1);
        let runtime =
            GroupRuntime::prepare(&group, program).unwrap_or_else(|_| unreachable!("local needs nothing"));
        Groups { list: vec![runtime], of_slot: Vec::new() }
    }
}

/// Starts in progress at once per ssh group, below sshd's default `MaxStartups`.
const SSH_STARTS_AT_ONCE: usize = 8;

/// A group as the executor runs it: its command line, prepared once.
#[derive(Debug)]
pub(crate) struct GroupRuntime {
    pub(crate) label: String,
    /// The launcher's command line, in front of the worker's.
    prefix: Vec<OsString>,
    /// How the worker's own command reaches it.
    form: Form,
    /// The worker program where it runs.
    program: PathBuf,
    wrapper: Vec<OsString>,
    /// The worker is a process of this machine, in this PID namespace (its
    /// progress record can be opened by pid).
    pub(crate) same_host: bool,
    pub(crate) allocation: Option<Allocation>,
    /// Consecutive failed starts, across the group's slots.
    failures: AtomicU32,
    benched: AtomicBool,
    /// Serialises the benching log line.
    bench_lock: Mutex<()>,
    /// Bounds the group's starts in progress: sshd drops connections beyond
    /// `MaxStartups` (10 unauthenticated by default) at random.
    starting: Option<tokio::sync::Semaphore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `Command` with env and args: a local child or a local wrapper.
    Direct,
    /// One shell-quoted string (ssh hands the remote shell one).
    Shell,
    /// Argument vector through `env K=V …` (srun, docker exec).
    Env,
}

impl GroupRuntime {
    /// Prepares `group`: finds or requests a Slurm allocation, ships the worker to
    /// an ssh host. Blocking (it runs `salloc`, `ssh`).
    pub(crate) fn prepare(group: &WorkerGroup, local_program: &Path) -> Result<GroupRuntime> {
        let mut label = group.label();
        let mut allocation = None;
        let (prefix, form, program, same_host) = match &group.launcher {
            Launcher::Local => (Vec::new(), Form::Direct, local_program.to_path_buf(), true),
            Launcher::Command(command) => {
                if command.is_empty() {
                    return Err(Error::Config("a command launcher needs a command".into()));
                }
                (command.clone(), Form::Env, local_program.to_path_buf(), false)
            }
            Launcher::Ssh(ssh) => {
                let program = match (&ssh.program, &ssh.ship_to) {
                    (Some(_), Some(_)) => {
                        return Err(Error::Config(format!(
                            "ssh host {label}: program and ship_to exclude each other"
                        )));
                    }
                    (Some(program), None) => program.clone(),
                    (None, Some(_)) => {
                        let (remote, copied) = ssh.ship(local_program).map_err(|err| {
                            Error::Config(format!("cannot ship the worker to {label}: {err}"))
                        })?;
                        if copied {
                            tracing::info!(host = %label, path = %remote.display(), "shipped the worker");
                        } else {
                            tracing::debug!(host = %label, path = %remote.display(), "reusing the shipped worker");
                        }
                        remote
                    }
                    (None, None) => local_program.to_path_buf(),
                };
                let command = ssh.command();
                let mut prefix = vec![command.get_program().to_os_string()];
                prefix.extend(command.get_args().map(OsStr::to_os_string));
                (prefix, Form::Shell, program, false)
            }
            Launcher::Slurm(slurm) => {
                let granted = allocate(slurm, group.processes)?;
                let mut prefix: Vec<OsString> =
                    ["srun", "--overlap", "--unbuffered", "-n1", "-N1", "--export=NONE"]
                        .map(OsString::from)
                        .into();
                prefix.push(format!("--jobid={}", granted.job).into());
                prefix.push("--job-name=procexec-worker".into());
                prefix.extend(slurm.srun_args.iter().map(OsString::from));
                prefix.push("--".into());
                if group.label.is_none() {
                    label = format!("slurm:{}", granted.job);
                }
                allocation = Some(granted);
                let program = slurm.program.clone().unwrap_or_else(|| local_program.to_path_buf());
                (prefix, Form::Env, program, false)
            }
        };
        if !same_host && !program.is_absolute() {
            return Err(Error::Config(format!(
                "group {label}: the remote worker program must be an absolute path, not {}",
                program.display()
            )));
        }
        Ok(GroupRuntime {
            label,
            prefix,
            form,
            program,
            wrapper: group.wrapper.clone(),
            same_host,
            allocation,
            failures: AtomicU32::new(0),
            benched: AtomicBool::new(false),
            bench_lock: Mutex::new(()),
            starting: matches!(group.launcher, Launcher::Ssh(_))
                .then(|| tokio::sync::Semaphore::new(SSH_STARTS_AT_ONCE)),
        })
    }

    /// Waits for the group's turn to start a worker; held until its handshake is
    /// done.
    pub(crate) async fn start_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match &self.starting {
            Some(starting) => starting.acquire().await.ok(),
            None => None,
        }
    }

    /// The worker program where it runs.
    pub(crate) fn program(&self) -> &Path {
        &self.program
    }

    /// The command that starts one worker with `args` and the explicit `env`.
    pub(crate) fn command(
        &self,
        args: &[OsString],
        env: &[(OsString, OsString)],
    ) -> std::result::Result<Command, String> {
        let mut env: Vec<(OsString, OsString)> = env.to_vec();
        env.push((HOST_ENV.into(), self.label.clone().into()));
        match self.form {
            Form::Direct => {
                let mut command = match self.wrapper.split_first() {
                    Some((first, rest)) => {
                        let mut command = Command::new(first);
                        command.args(rest).arg(&self.program);
                        command
                    }
                    None => Command::new(&self.program),
                };
                command.args(args).envs(env);
                Ok(command)
            }
            Form::Env | Form::Shell => {
                let mut tail: Vec<OsString> = vec!["env".into()];
                for (key, value) in &env {
                    let mut pair = key.clone();
                    pair.push("=");
                    pair.push(value);
                    tail.push(pair);
                }
                tail.extend(self.wrapper.iter().cloned());
                tail.push(self.program.clone().into());
                tail.extend(args.iter().cloned());
                let (first, rest) = self.prefix.split_first().ok_or("an empty launcher")?;
                let mut command = Command::new(first);
                command.args(rest);
                if self.form == Form::Shell {
                    let quoted: Vec<String> =
                        tail.iter().map(|arg| quote(arg)).collect::<std::result::Result<_, _>>()?;
                    command.arg(format!("exec {}", quoted.join(" ")));
                } else {
                    // srun's steps run without PATH (`--export=NONE`).
                    tail[0] = "/usr/bin/env".into();
                    command.args(tail);
                }
                Ok(command)
            }
        }
    }

    /// Whether the group has stopped starting workers: benched, or its allocation
    /// is ending.
    pub(crate) fn stopped(&self) -> Option<String> {
        if self.benched.load(Ordering::Acquire) {
            return Some(format!("host {} is benched after repeated failures", self.label));
        }
        if self.stop_at().is_some_and(|at| Instant::now() >= at) {
            return Some(format!("the Slurm allocation of {} is about to end", self.label));
        }
        None
    }

    /// When the group's workers stop taking work.
    pub(crate) fn stop_at(&self) -> Option<Instant> {
        self.allocation.as_ref().and_then(|allocation| allocation.stop_at)
    }

    /// A worker of the group started.
    pub(crate) fn started(&self) {
        self.failures.store(0, Ordering::Release);
    }

    /// A start failed; true when the group is benched by it (logged once).
    pub(crate) fn start_failed(&self, limit: u32, failure: &dyn fmt::Display) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < limit {
            return false;
        }
        let _once = self.bench_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.benched.swap(true, Ordering::AcqRel) {
            tracing::error!(
                host = %self.label,
                failures,
                "benched host {}: {failures} worker starts in a row failed, the last with: {failure}; \
                 the executor serves on with its other workers",
                self.label
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_entries_parse_like_gnu_parallel() {
        let hosts = Hosts::parse("# cluster\n:\n2/:\n4/host1, 8/user@host2:2222\n[::1]:22\n").unwrap();
        let e = &hosts.entries;
        assert_eq!(e.len(), 5);
        assert_eq!(e[0], HostEntry { workers: None, host: None });
        assert_eq!(e[1], HostEntry { workers: Some(2), host: None });
        assert_eq!(e[2], HostEntry { workers: Some(4), host: Some((None, "host1".into(), None)) });
        assert_eq!(
            e[3],
            HostEntry { workers: Some(8), host: Some((Some("user".into()), "host2".into(), Some(2222))) }
        );
        assert_eq!(e[4], HostEntry { workers: None, host: Some((None, "::1".into(), Some(22))) });
        for wrong in ["0/host", "x/host", "host:port", "@host", "", "# only a comment"] {
            assert!(Hosts::parse(wrong).is_err(), "{wrong:?}");
        }
    }

    #[test]
    fn time_left_parses_every_squeue_form() {
        assert_eq!(parse_time_left("18:01"), Some(Duration::from_secs(18 * 60 + 1)));
        assert_eq!(parse_time_left("1:00:05"), Some(Duration::from_secs(3605)));
        assert_eq!(parse_time_left("2-01:00:00"), Some(Duration::from_secs(2 * 86_400 + 3600)));
        assert_eq!(parse_time_left("UNLIMITED"), None);
        assert_eq!(parse_time_left("NOT_SET"), None);
    }

    #[test]
    fn the_remote_command_quotes_for_the_shell() {
        assert_eq!(quote(OsStr::new("/bin/w")).unwrap(), "/bin/w");
        assert_eq!(quote(OsStr::new("a b'c")).unwrap(), r"'a b'\''c'");
        assert_eq!(quote(OsStr::new("")).unwrap(), "''");
        let group = WorkerGroup::ssh(1, Ssh::new("h").port(2).user("u"));
        let runtime = GroupRuntime::prepare(&group, Path::new("/opt/w")).unwrap();
        let command = runtime.command(&["x y".into()], &[("K".into(), "v;1".into())]).unwrap();
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(command.get_program(), "ssh");
        assert_eq!(args.last().unwrap(), "exec env 'K=v;1' PROCEXEC_HOST=u@h:2 /opt/w 'x y'");
        assert!(args.windows(2).any(|w| w == ["--", "h"]));
    }

    #[test]
    fn a_local_wrapper_goes_in_front_of_the_program() {
        let group = WorkerGroup::local(1).wrapper(["env", "FOO=1"]);
        let runtime = GroupRuntime::prepare(&group, Path::new("/opt/w")).unwrap();
        let command = runtime.command(&["a".into()], &[]).unwrap();
        assert_eq!(command.get_program(), "env");
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(args, ["FOO=1", "/opt/w", "a"]);
        assert!(runtime.same_host);
    }

    #[test]
    fn the_content_hash_names_a_copy_by_content() {
        let dir = std::env::temp_dir().join(format!("procexec-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"worker one").unwrap();
        std::fs::write(&b, b"worker two").unwrap();
        assert_ne!(content_hash(&a).unwrap(), content_hash(&b).unwrap());
        std::fs::write(&b, b"worker one").unwrap();
        assert_eq!(content_hash(&a).unwrap(), content_hash(&b).unwrap());
        let ssh = Ssh::new("h").ship_to("/tmp/x");
        let name = ssh.shipped_path(&a).unwrap().unwrap();
        assert!(name.to_string_lossy().starts_with("/tmp/x/a-"), "{}", name.display());
        let _ = std::fs::remove_dir_all(dir);
    }
}
