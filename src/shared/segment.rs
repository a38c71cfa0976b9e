//! Segments: anonymous memory files a process makes (the parent, through its
//! executor), maps, and hands to the workers that receive a handle on one.
//!
//! A worker gets a segment's descriptor when it first decodes a handle on it: it
//! connects to its maker's descriptor service, an abstract Unix socket (no file, so
//! nothing is left behind, even after `SIGKILL`), presents the segment's secret
//! token, and receives the descriptor by `SCM_RIGHTS`. So workers that were already
//! running, and workers that replace dead ones, get what they need when they need it,
//! and a worker that never sees a handle costs nothing. The service answers only
//! processes of the same user that know the token, and the memory file has no name
//! anywhere (`memfd_create`), so no other process can open it.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::Duration;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use super::SharedError;
use super::memory::{HEADER_LEN, MAGIC, Mapping, Sealed};

/// What a segment holds, in its wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Kind {
    Value,
    Array,
    Bytes,
    Lock,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Value => "SharedValue",
            Kind::Array => "SharedArray",
            Kind::Bytes => "SharedBytes",
            Kind::Lock => "SharedLock",
        }
    }
}

/// The process that made a segment, and how to reach its descriptor service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Home {
    /// This boot's id: a handle from another machine has another.
    boot: [u8; 16],
    pid: u32,
    /// Names the service's socket, so nobody can guess it ahead of time.
    key: u64,
}

impl Home {
    fn socket_name(&self) -> String {
        format!("procexec-shm/{}/{:016x}", self.pid, self.key)
    }
}

/// A segment's wire form: everything a process needs to find and check it.
#[derive(Serialize, Deserialize)]
pub(crate) struct Wire<'a> {
    home: Home,
    id: u64,
    token: [u8; 16],
    kind: Kind,
    len: u64,
    elem_size: u32,
    #[serde(borrow)]
    elem: std::borrow::Cow<'a, str>,
}

/// The type of a segment's elements.
#[derive(Clone, Copy)]
pub(crate) struct Elem {
    pub(crate) name: &'static str,
    pub(crate) size: usize,
}

impl Elem {
    pub(crate) fn of<T>() -> Elem {
        Elem { name: std::any::type_name::<T>(), size: std::mem::size_of::<T>() }
    }
}

/// A mapped segment, shared by every handle on it in this process.
pub(crate) struct Segment {
    pub(crate) map: Mapping,
    pub(crate) kind: Kind,
    /// Elements in the data.
    pub(crate) len: usize,
    pub(crate) elem: Elem,
    /// Present when no process can write the data (a frozen [`SharedBytes`]).
    pub(crate) sealed: Option<Sealed>,
    home: Home,
    id: u64,
    token: [u8; 16],
    /// The memory file, kept by the process that made it, for its service to send.
    owned: Option<OwnedFd>,
    /// Orders this process's async lockers (see `lock::acquire`).
    #[cfg(feature = "executor")]
    pub(crate) turn: tokio::sync::Mutex<()>,
}

impl Segment {
    /// Makes a segment of `len` elements of `elem` (zeroed), registered with this
    /// process's descriptor service. `fill` writes the data before anyone else can
    /// see it; `seal` then seals it against writes.
    pub(crate) fn create(
        kind: Kind,
        elem: Elem,
        len: usize,
        fill: Option<&mut dyn FnMut(&mut Mapping)>,
        seal: bool,
    ) -> Result<Arc<Segment>, SharedError> {
        let service = Service::get()?;
        let data =
            len.checked_mul(elem.size).and_then(|data| data.checked_add(HEADER_LEN)).ok_or_else(|| {
                SharedError::system("size a segment", io::Error::from(io::ErrorKind::OutOfMemory))
            })?;
        let fd = rustix::fs::memfd_create("procexec-shared", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|err| SharedError::system("create a memory file (memfd_create)", err.into()))?;
        rustix::fs::ftruncate(&fd, data as u64)
            .map_err(|err| SharedError::system("size the memory file", err.into()))?;
        // Fixed size from here on: a process that shrank it would crash the others
        // with SIGBUS on their next access.
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)
            .map_err(|err| SharedError::system("seal the memory file's size", err.into()))?;
        let mut map = Mapping::map(fd.as_fd(), data, true)
            .map_err(|err| SharedError::system("map the memory file", err))?;
        map.header().len.store(len as u64, Ordering::Relaxed);
        map.header().elem_size.store(elem.size as u32, Ordering::Relaxed);
        if let Some(fill) = fill {
            fill(&mut map);
        }
        map.header().magic.store(MAGIC, Ordering::Release);
        let sealed = if seal {
            Some(Sealed::seal(fd.as_fd()).map_err(|err| SharedError::system("seal the buffer", err))?)
        } else {
            None
        };
        let segment = Arc::new(Segment {
            map,
            kind,
            len,
            elem,
            sealed,
            home: service.home,
            id: service.next_id.fetch_add(1, Ordering::Relaxed),
            token: random()?,
            owned: Some(fd),
            #[cfg(feature = "executor")]
            turn: tokio::sync::Mutex::new(()),
        });
        lock(&service.segments).insert(segment.id, Arc::downgrade(&segment));
        Ok(segment)
    }

    /// The wire form of a handle on this segment.
    pub(crate) fn wire(&self) -> Wire<'static> {
        Wire {
            home: self.home,
            id: self.id,
            token: self.token,
            kind: self.kind,
            len: self.len as u64,
            elem_size: self.elem.size as u32,
            elem: self.elem.name.into(),
        }
    }

    /// The segment a decoded handle names, mapped in this process: its maker's own
    /// segment, one attached earlier, or one attached now.
    pub(crate) fn resolve(wire: &Wire<'_>, kind: Kind, elem: Elem) -> Result<Arc<Segment>, SharedError> {
        if wire.kind != kind || wire.elem != elem.name || wire.elem_size as usize != elem.size {
            return Err(SharedError::WrongType {
                expected: format!("{}<{}>", kind.name(), elem.name),
                found: format!("{}<{}>", wire.kind.name(), wire.elem),
            });
        }
        let segment = if let Some(service) = SERVICE.get().filter(|service| service.home == wire.home) {
            lock(&service.segments)
                .get(&wire.id)
                .and_then(Weak::upgrade)
                .filter(|segment| segment.token == wire.token)
                .ok_or(SharedError::Gone)?
        } else {
            let mut attached = lock(&ATTACHED);
            match attached.get(&(wire.home, wire.id)).filter(|segment| segment.token == wire.token) {
                Some(segment) => segment.clone(),
                None => {
                    let segment = Arc::new(attach(wire, elem)?);
                    attached.insert((wire.home, wire.id), segment.clone());
                    ATTACHED_ANY.store(true, Ordering::Release);
                    start_sweeper();
                    segment
                }
            }
        };
        // What the segment really is, not what the handle says: a forged handle must
        // not turn a sealed buffer into a writable array.
        if segment.kind != kind || segment.elem.size != elem.size || segment.len as u64 != wire.len {
            return Err(SharedError::WrongType {
                expected: format!("{}<{}>", kind.name(), elem.name),
                found: format!("{}<{}>", segment.kind.name(), segment.elem.name),
            });
        }
        Ok(segment)
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owned.is_some() {
            // Processes that attached it unmap it at the end of their next call.
            self.map.header().freed.store(1, Ordering::Release);
            if let Some(service) = SERVICE.get() {
                lock(&service.segments).remove(&self.id);
            }
        }
    }
}

/// The segments this process attached, kept mapped across calls, so a handle sent
/// with every call costs one lookup after the first.
type Attached = HashMap<(Home, u64), Arc<Segment>>;
static ATTACHED: LazyLock<Mutex<Attached>> = LazyLock::new(Mutex::default);
/// Whether this process ever attached a segment.
static ATTACHED_ANY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sweeps every half second in a process that attached segments, so an idle worker
/// does not keep memory its parent let go of until its next call.
fn start_sweeper() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new().name("procexec-shm-sweep".into()).spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                sweep();
            }
        });
    });
}

/// Unmaps attached segments that their maker let go of and nothing here still uses:
/// run by a worker after each call, and every half second.
pub(crate) fn sweep() {
    // After every call of every worker: nothing to do in one that never attached.
    if !ATTACHED_ANY.load(Ordering::Acquire) {
        return;
    }
    let Ok(mut attached) = ATTACHED.try_lock() else {
        return;
    };
    if !attached.is_empty() {
        attached.retain(|_, segment| {
            Arc::strong_count(segment) > 1 || segment.map.header().freed.load(Ordering::Acquire) == 0
        });
    }
}

/// A process died: every lock of this process's segments it held is freed and
/// marked poisoned, so the next locker is told (and nobody waits forever).
///
/// Called with the pid of a worker that has exited, before its pid can be reused.
pub(crate) fn holder_died(pid: u32) {
    let Some(service) = SERVICE.get() else {
        return;
    };
    let segments: Vec<Arc<Segment>> = lock(&service.segments).values().filter_map(Weak::upgrade).collect();
    for segment in segments {
        if segment.map.release_dead_holder(pid) {
            tracing::warn!(
                pid,
                "a worker died holding a shared-memory lock: the next locker finds it poisoned"
            );
        }
    }
}

/// This process's descriptor service, started with its first segment.
struct Service {
    home: Home,
    next_id: AtomicU64,
    segments: Mutex<HashMap<u64, Weak<Segment>>>,
}

static SERVICE: OnceLock<Service> = OnceLock::new();
/// Serialises starting the service, which may fail and be tried again.
static STARTING: Mutex<()> = Mutex::new(());

impl Service {
    fn get() -> Result<&'static Service, SharedError> {
        if let Some(service) = SERVICE.get() {
            return Ok(service);
        }
        let _starting = lock(&STARTING);
        if let Some(service) = SERVICE.get() {
            return Ok(service);
        }
        let key = u64::from_le_bytes(random::<8>()?);
        let home = Home { boot: boot_id()?, pid: std::process::id(), key };
        let listener =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                .and_then(|listener| {
                    let name = SocketAddrUnix::new_abstract_name(home.socket_name().as_bytes())?;
                    rustix::net::bind(&listener, &name)?;
                    rustix::net::listen(&listener, 64)?;
                    Ok(listener)
                })
                .map_err(|err| {
                    SharedError::system("start the shared-memory descriptor service", err.into())
                })?;
        std::thread::Builder::new()
            .name("procexec-shm".into())
            .spawn(move || serve(listener))
            .map_err(|err| SharedError::system("start the shared-memory descriptor service", err))?;
        Ok(SERVICE.get_or_init(|| Service { home, next_id: AtomicU64::new(1), segments: Mutex::default() }))
    }
}

/// A request: the segment's id and token.
const REQUEST_LEN: usize = 24;
const ANSWER_OK: u8 = 0;
const ANSWER_UNKNOWN: u8 = 1;

/// Answers descriptor requests for the life of the process.
fn serve(listener: OwnedFd) {
    let me = rustix::process::getuid();
    loop {
        let Ok(conn) = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) else {
            // EMFILE and the like: let the moment pass rather than spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        // A peer that connects and says nothing must not stall the others.
        let _ = rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(2)),
        );
        match rustix::net::sockopt::socket_peercred(&conn) {
            Ok(peer) if peer.uid == me => {}
            _ => continue,
        }
        let mut request = [0u8; REQUEST_LEN];
        match rustix::net::recv(&conn, &mut request, RecvFlags::empty()) {
            Ok((REQUEST_LEN, _)) => {}
            _ => continue,
        }
        let id = u64::from_le_bytes(request[..8].try_into().unwrap_or_default());
        let token = &request[8..];
        let segment =
            SERVICE.get().and_then(|service| lock(&service.segments).get(&id).and_then(Weak::upgrade));
        let fd = segment
            .as_ref()
            .filter(|segment| segment.token == token)
            .and_then(|segment| segment.owned.as_ref());
        let _ = match fd {
            Some(fd) => {
                let fds = [fd.as_fd()];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                control.push(SendAncillaryMessage::ScmRights(&fds));
                rustix::net::sendmsg(&conn, &[IoSlice::new(&[ANSWER_OK])], &mut control, SendFlags::NOSIGNAL)
            }
            None => rustix::net::send(&conn, &[ANSWER_UNKNOWN], SendFlags::NOSIGNAL),
        };
    }
}

/// Gets a segment's descriptor from its maker and maps it.
fn attach(wire: &Wire<'_>, elem: Elem) -> Result<Segment, SharedError> {
    if wire.home.boot != boot_id()? {
        return Err(SharedError::NotLocal);
    }
    let fd = fetch(wire)?;
    let system = |what: &'static str| move |err: io::Error| SharedError::system(what, err);
    let data = (wire.len as usize)
        .checked_mul(elem.size)
        .and_then(|data| data.checked_add(HEADER_LEN))
        .ok_or(SharedError::WrongType {
            expected: "a segment that fits memory".into(),
            found: "a larger one".into(),
        })?;
    let size = rustix::fs::fstat(&fd).map_err(|err| system("inspect a shared segment")(err.into()))?.st_size;
    let seals =
        rustix::fs::fcntl_get_seals(&fd).map_err(|err| system("inspect a shared segment")(err.into()))?;
    if (size as u64) < data as u64 || !seals.contains(SealFlags::SHRINK) {
        return Err(SharedError::system(
            "map a shared segment",
            io::Error::other("it is not sealed at its size"),
        ));
    }
    let sealed = match wire.kind {
        Kind::Bytes => Some(Sealed::check(fd.as_fd()).map_err(system("map a shared buffer"))?),
        _ => None,
    };
    let map = Mapping::map(fd.as_fd(), data, sealed.is_none()).map_err(system("map a shared segment"))?;
    let header = map.header();
    if header.magic.load(Ordering::Acquire) != MAGIC
        || header.len.load(Ordering::Relaxed) != wire.len
        || header.elem_size.load(Ordering::Relaxed) != wire.elem_size
    {
        return Err(SharedError::system(
            "map a shared segment",
            io::Error::other("its header does not match the handle"),
        ));
    }
    Ok(Segment {
        map,
        kind: wire.kind,
        len: wire.len as usize,
        elem,
        sealed,
        home: wire.home,
        id: wire.id,
        token: wire.token,
        owned: None,
        #[cfg(feature = "executor")]
        turn: tokio::sync::Mutex::new(()),
    })
}

/// Asks the segment's maker for its descriptor.
fn fetch(wire: &Wire<'_>) -> Result<OwnedFd, SharedError> {
    let system =
        |err: rustix::io::Errno| SharedError::system("reach the shared memory's process", err.into());
    let conn =
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
            .map_err(system)?;
    let name = SocketAddrUnix::new_abstract_name(wire.home.socket_name().as_bytes()).map_err(system)?;
    match rustix::net::connect(&conn, &name) {
        Ok(()) => {}
        // No such service: its process exited (or lives in another network namespace,
        // whose abstract sockets this process cannot see).
        Err(rustix::io::Errno::CONNREFUSED | rustix::io::Errno::NOENT) => return Err(SharedError::Gone),
        Err(err) => return Err(system(err)),
    }
    // The name is visible to all (/proc/net/unix): after its maker exited, another
    // process may have taken it. Only the maker itself gets the token.
    match rustix::net::sockopt::socket_peercred(&conn) {
        Ok(peer)
            if peer.uid == rustix::process::getuid()
                && peer.pid.as_raw_nonzero().get() as u32 == wire.home.pid => {}
        _ => return Err(SharedError::Gone),
    }
    let _ = rustix::net::sockopt::set_socket_timeout(
        &conn,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(10)),
    );
    let mut request = [0u8; REQUEST_LEN];
    request[..8].copy_from_slice(&wire.id.to_le_bytes());
    request[8..].copy_from_slice(&wire.token);
    rustix::net::send(&conn, &request, SendFlags::NOSIGNAL).map_err(system)?;
    let mut answer = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &conn,
        &mut [IoSliceMut::new(&mut answer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(system)?;
    let mut fds = control.drain().filter_map(|message| match message {
        RecvAncillaryMessage::ScmRights(fds) => Some(fds),
        _ => None,
    });
    let fd = fds.next().and_then(|mut fds| fds.next());
    match (got.bytes, answer[0], fd) {
        (1, ANSWER_OK, Some(fd)) => Ok(fd),
        (1, ANSWER_UNKNOWN, _) => Err(SharedError::Gone),
        _ => Err(SharedError::Gone),
    }
}

fn random<const N: usize>() -> Result<[u8; N], SharedError> {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        filled += rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|err| SharedError::system("draw a random token", err.into()))?;
    }
    Ok(bytes)
}

/// This machine's boot id, which tells a handle made here from one made elsewhere.
fn boot_id() -> Result<[u8; 16], SharedError> {
    static BOOT: OnceLock<Result<[u8; 16], String>> = OnceLock::new();
    BOOT.get_or_init(|| {
        let text =
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map_err(|err| err.to_string())?;
        let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        let mut id = [0u8; 16];
        for (byte, pair) in id.iter_mut().zip(hex.chunks(2)) {
            let digits = std::str::from_utf8(pair).map_err(|err| err.to_string())?;
            *byte = u8::from_str_radix(digits, 16).map_err(|err| err.to_string())?;
        }
        Ok(id)
    })
    .clone()
    .map_err(|message| SharedError::system("read this machine's boot id", io::Error::other(message)))
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value() -> Arc<Segment> {
        Segment::create(Kind::Value, Elem::of::<u64>(), 1, None, false).unwrap()
    }

    #[test]
    fn a_handle_resolves_to_its_segment_in_the_process_that_made_it() {
        let segment = value();
        let found = Segment::resolve(&segment.wire(), Kind::Value, Elem::of::<u64>()).unwrap();
        assert!(Arc::ptr_eq(&segment, &found));
    }

    #[test]
    fn another_type_is_refused_naming_both() {
        let segment = value();
        let err = Segment::resolve(&segment.wire(), Kind::Value, Elem::of::<f64>()).unwrap_err();
        assert_eq!(
            err,
            SharedError::WrongType { expected: "SharedValue<f64>".into(), found: "SharedValue<u64>".into() }
        );
        let err = Segment::resolve(&segment.wire(), Kind::Array, Elem::of::<u64>()).unwrap_err();
        assert!(matches!(err, SharedError::WrongType { .. }), "{err}");
    }

    #[test]
    fn a_handle_from_another_machine_is_not_local() {
        let segment = value();
        let mut wire = segment.wire();
        wire.home.boot[0] ^= 0xff;
        let err = Segment::resolve(&wire, Kind::Value, Elem::of::<u64>()).unwrap_err();
        assert_eq!(err, SharedError::NotLocal);
    }

    #[test]
    fn a_dropped_segment_or_a_wrong_token_is_gone() {
        let segment = value();
        let wire = segment.wire();
        let mut forged = segment.wire();
        forged.token[0] ^= 1;
        assert_eq!(Segment::resolve(&forged, Kind::Value, Elem::of::<u64>()).unwrap_err(), SharedError::Gone);
        drop(segment);
        assert_eq!(Segment::resolve(&wire, Kind::Value, Elem::of::<u64>()).unwrap_err(), SharedError::Gone);
    }

    #[test]
    fn the_service_hands_the_descriptor_to_a_process_that_knows_the_token() {
        let segment = value();
        segment.map.write(0, 99u64);
        let fd = fetch(&segment.wire()).unwrap();
        let map = Mapping::map(fd.as_fd(), HEADER_LEN + 8, false).unwrap();
        assert_eq!(map.read::<u64>(0), Some(99));
        let mut forged = segment.wire();
        forged.token[3] ^= 1;
        assert_eq!(fetch(&forged).unwrap_err(), SharedError::Gone);
    }
}
