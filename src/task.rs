//! Typed tasks and the registry a worker serves them from.

use std::any::{TypeId, type_name};
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::protocol::{Shape, TaskInfo};
use crate::wire::shape::shape_of;

/// A function that can run in a worker process: a stable name plus a plain
/// `fn(I) -> O` whose input and output cross the process boundary with serde.
///
/// Usually made by [`tasks!`](crate::tasks), which also builds the [`Registry`] a
/// worker serves. The parent only needs the `Task` value to call it: the worker looks
/// the function up by name, and the executor checks that both sides agree on the
/// input and output types before anything is sent. Executor methods take any
/// [`IntoTask`]: a `Task`, or a function returning one (what `tasks!` defines).
///
/// `Task` is `Copy`, so it can be passed by value to every call.
///
/// # Examples
///
/// Without the macro, for a function defined elsewhere:
///
/// ```
/// fn double(x: u64) -> u64 {
///     2 * x
/// }
///
/// const DOUBLE: procexec::Task<u64, u64> = procexec::Task::new("double", double);
/// static TASKS: procexec::Registry = procexec::Registry::new(&[&DOUBLE]);
///
/// assert_eq!(DOUBLE.name(), "double");
/// assert_eq!(DOUBLE.call_in_process(21), 42);
/// assert_eq!(TASKS.len(), 1);
/// ```
pub struct Task<I, O> {
    name: &'static str,
    // Read by the worker side, which runs it.
    pub(crate) function: fn(I) -> O,
    // Functions rather than values so that a `Task` stays a constant and its types
    // are traced only when a check needs them.
    type_ids: fn() -> [TypeId; 2],
    shapes: fn() -> [Shape; 2],
}

impl<I, O> Task<I, O> {
    /// A task called `name` that runs `function`.
    ///
    /// The name is what the parent and the worker agree on, so it must be unique in
    /// a registry (a worker refuses to start otherwise). Both types must be
    /// deserializable, the output too: each side traces them to check that the
    /// other has the same.
    pub const fn new(name: &'static str, function: fn(I) -> O) -> Self
    where
        I: DeserializeOwned + 'static,
        O: DeserializeOwned + 'static,
    {
        Task { name, function, type_ids: type_ids::<I, O>, shapes: shapes::<I, O> }
    }

    /// The name the task is called by.
    ///
    /// ```
    /// procexec::tasks! {
    ///     fn ping() {}
    /// }
    /// assert_eq!(ping().name(), "ping");
    /// ```
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Runs the task right here, in this process and thread: for unit tests of a
    /// task's logic, and for stepping through it in a debugger.
    ///
    /// ```
    /// procexec::tasks! {
    ///     fn add(a: u32, b: u32) -> u32 { a + b }
    /// }
    /// assert_eq!(add().call_in_process((2, 3)), 5);
    /// ```
    pub fn call_in_process(&self, input: I) -> O {
        (self.function)(input)
    }

    /// What the other side must agree with.
    pub(crate) fn signature(&self) -> Signature {
        let [input_shape, output_shape] = (self.shapes)();
        Signature { input: type_name::<I>(), output: type_name::<O>(), input_shape, output_shape }
    }

    /// Which types these are, in this process: what a check already passed can be
    /// recognized by.
    pub(crate) fn type_ids(&self) -> [TypeId; 2] {
        (self.type_ids)()
    }
}

fn type_ids<I: 'static, O: 'static>() -> [TypeId; 2] {
    [TypeId::of::<I>(), TypeId::of::<O>()]
}

fn shapes<I: DeserializeOwned + 'static, O: DeserializeOwned + 'static>() -> [Shape; 2] {
    [shape_of::<I>(), shape_of::<O>()]
}

/// A task's types, by name and by shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Signature {
    pub(crate) input: &'static str,
    pub(crate) output: &'static str,
    pub(crate) input_shape: Shape,
    pub(crate) output_shape: Shape,
}

impl<I, O> Clone for Task<I, O> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I, O> Copy for Task<I, O> {}

impl<I, O> fmt::Debug for Task<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Task({}: {} -> {})", self.name, type_name::<I>(), type_name::<O>())
    }
}

/// Anything that names a task: a [`Task`], or a function returning one (which is
/// what [`tasks!`](crate::tasks) defines), so `exec.spawn(square, 7)` reads like a call.
///
/// ```
/// use procexec::{IntoTask, Task};
///
/// procexec::tasks! {
///     pub fn square(x: u64) -> u64 { x * x }
/// }
/// const SQUARE: Task<u64, u64> = square();
///
/// assert_eq!(square.into_task().name(), "square");
/// assert_eq!(SQUARE.into_task().name(), "square");
/// ```
pub trait IntoTask {
    /// The task's input.
    type Input;
    /// The task's output.
    type Output;

    /// The task.
    fn into_task(self) -> Task<Self::Input, Self::Output>;
}

impl<I, O> IntoTask for Task<I, O> {
    type Input = I;
    type Output = O;

    fn into_task(self) -> Task<I, O> {
        self
    }
}

impl<F, I, O> IntoTask for F
where
    F: FnOnce() -> Task<I, O>,
{
    type Input = I;
    type Output = O;

    fn into_task(self) -> Task<I, O> {
        self()
    }
}

pub(crate) mod sealed {
    /// Keeps [`AnyTask`](super::AnyTask) to procexec, and carries its worker-side half.
    // Users can name neither this trait nor the buffer, so the buffer stays private.
    #[allow(private_interfaces)]
    pub trait Sealed {
        /// Runs the task on each of `items` inputs (records in `body`), appending one
        /// outcome record per input to `out`.
        fn invoke(&self, body: &[u8], items: u32, out: &mut crate::wire::protocol::ReplyBuf);
    }
}

/// A [`Task`] with its types erased, as a [`Registry`] holds it.
///
/// Implemented by every `Task<I, O>` whose input is `DeserializeOwned` and whose
/// output is `Serialize`; it cannot be implemented outside procexec.
pub trait AnyTask: sealed::Sealed + Sync {
    /// The task's name.
    fn name(&self) -> &'static str;

    #[doc(hidden)]
    fn info(&self) -> TaskInfoRef;
}

/// The type signature of a task, as the handshake reports it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct TaskInfoRef {
    pub(crate) name: &'static str,
    pub(crate) input: &'static str,
    pub(crate) output: &'static str,
    pub(crate) shapes: fn() -> [Shape; 2],
}

impl<I, O> AnyTask for Task<I, O>
where
    I: DeserializeOwned + 'static,
    O: Serialize + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn info(&self) -> TaskInfoRef {
        TaskInfoRef {
            name: self.name,
            input: type_name::<I>(),
            output: type_name::<O>(),
            shapes: self.shapes,
        }
    }
}

/// The set of tasks a worker serves, in a fixed order.
///
/// A worker binary is `procexec::serve_worker(&TASKS)` over one of these, and a
/// self-executing binary calls `procexec::init_worker(&TASKS)`. [`tasks!`](crate::tasks)
/// builds one named `TASKS`; [`Registry::new`] builds one by hand.
///
/// # Examples
///
/// ```
/// procexec::tasks! {
///     /// Squares a number.
///     pub fn square(x: u64) -> u64 { x * x }
///     pub fn shout(s: String) -> String { s.to_uppercase() }
/// }
///
/// assert_eq!(TASKS.len(), 2);
/// assert!(TASKS.contains("shout"));
/// ```
pub struct Registry {
    tasks: &'static [&'static dyn AnyTask],
}

impl Registry {
    /// A registry of `tasks`, which must have distinct names.
    pub const fn new(tasks: &'static [&'static dyn AnyTask]) -> Self {
        Registry { tasks }
    }

    /// How many tasks it holds.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether it holds no task.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Whether it holds a task called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tasks.iter().any(|task| task.name() == name)
    }

    pub(crate) fn get(&self, index: u32) -> Option<&'static dyn AnyTask> {
        self.tasks.get(index as usize).copied()
    }

    pub(crate) fn infos(&self) -> Vec<TaskInfo> {
        self.tasks
            .iter()
            .map(|task| {
                let info = task.info();
                let [input_shape, output_shape] = (info.shapes)();
                TaskInfo {
                    name: info.name.into(),
                    input: info.input.into(),
                    output: info.output.into(),
                    input_shape,
                    output_shape,
                }
            })
            .collect()
    }

    /// The first name that appears twice, if any.
    pub(crate) fn duplicate_name(&self) -> Option<&'static str> {
        self.tasks.iter().enumerate().find_map(|(i, task)| {
            self.tasks[..i].iter().any(|earlier| earlier.name() == task.name()).then(|| task.name())
        })
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.tasks.iter().map(|task| task.name())).finish()
    }
}

/// Defines tasks and the [`Registry`] that serves them.
///
/// Each `fn` becomes a `const fn` of the same name returning its [`Task`]; pass the
/// function itself to an [`Executor`](crate::Executor) (`exec.spawn(square, 7)`),
/// which accepts anything that is [`IntoTask`]. The block also defines
/// `pub static TASKS: Registry` holding all of them, in order. A function of one
/// argument takes that argument as its input; a function of several takes them as a
/// tuple; a function of none takes `()`. Arguments must be plain identifiers. Use one
/// `tasks!` per module.
///
/// (Tasks are functions rather than constants so that a variable or closure
/// parameter named like a task simply shadows it.)
///
/// Compile the block into both the parent and the worker (for a self-executing
/// binary that is automatic; otherwise put it in a library both depend on).
///
/// # Types
///
/// Inputs and outputs are encoded with postcard, so they must implement both
/// `Serialize` and `DeserializeOwned` (each side traces both through
/// `Deserialize`). The parent checks the worker's types before anything is sent,
/// by a fingerprint of their serde shape: kinds, and the types of fields, elements
/// and variants in order, but no names. A type renamed, or a field renamed, still
/// matches; a field of another type is [`Error::TaskMismatch`](crate::Error::TaskMismatch).
/// A type the tracer cannot build (its `Deserialize` refuses made-up values, as
/// `NonZeroU64`'s does) is compared by its type name instead.
///
/// postcard is not self-describing, and some serde features need a format that is:
///
/// | feature | what procexec reports |
/// |---|---|
/// | `deserialize_any`: `#[serde(untagged)]`, `#[serde(tag = "...")]` (internally or adjacently tagged enums), `serde_json::Value` | [`Error::Codec`](crate::Error::Codec) naming the feature, on every call, before anything is sent |
/// | `#[serde(flatten)]` (needs `deserialize_identifier`) | the same |
/// | `#[serde(skip_serializing_if = ...)]` | nothing up front (tracing sees `Deserialize` only): the skipped field shifts the bytes after it, so decoding fails with `Error::Codec` naming the field where they stop making sense, or, where they happen to line up, misreads. Do not use it |
///
/// Any codec error carries the message the serde impl failed with and, when
/// known, the path to the field (``cannot decode a `Order`: ... (at lines[2].qty)``).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// procexec::tasks! {
///     /// Squares a number.
///     pub fn square(x: u64) -> u64 { x * x }
///
///     pub fn add(a: u64, b: u64) -> u64 { a + b }
///
///     pub fn nap(ms: u64) { std::thread::sleep(Duration::from_millis(ms)) }
/// }
///
/// let _: procexec::Task<u64, u64> = square();
/// let _: procexec::Task<(u64, u64), u64> = add();
/// let _: procexec::Task<u64, ()> = nap();
/// assert_eq!(square().call_in_process(9), 81);
/// assert_eq!(TASKS.len(), 3);
/// ```
#[macro_export]
macro_rules! tasks {
    (
        $(
            $(#[$attr:meta])*
            $vis:vis fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? $body:block
        )*
    ) => {
        $(
            $(#[$attr])*
            $vis const fn $name() -> $crate::Task<$crate::__task_input!($($ty),*), $crate::__task_output!($($ret)?)> {
                $crate::Task::new(
                    ::core::stringify!($name),
                    |$crate::__task_pattern!($($arg),*): $crate::__task_input!($($ty),*)|
                        -> $crate::__task_output!($($ret)?) { $body },
                )
            }

            // Never called: type-checking it is what warns about `Vec<u8>` (the
            // task's own attributes apply: `#[allow(deprecated)]` silences it).
            const _: () = {
                $(#[$attr])*
                #[allow(dead_code, clippy::all)]
                fn lint() {
                    $( $crate::__bytes_lint!($ty); )*
                    $( $crate::__bytes_lint!($ret); )?
                }
            };
        )*


        /// Every task defined in this module's `procexec::tasks!` block.
        #[allow(dead_code)]
        pub static TASKS: $crate::Registry = $crate::Registry::new(&[$(&const { $name() }),*]);
    };
}

/// Warns (deprecation lint, at compile time) where a task takes or returns a plain
/// `Vec<u8>`: serde moves it one byte at a time, 4-10x slower than `Blob` or
/// `serde_bytes::ByteBuf` (see `Blob`). Autoref picks the warning method for
/// exactly `Vec<u8>` and the silent one for every other type.
#[doc(hidden)]
#[macro_export]
macro_rules! __bytes_lint {
    ($ty:ty) => {{
        #[allow(unused_imports)]
        use $crate::__lint::{BytesVec as _, NotBytesVec as _};
        (&$crate::__lint::Probe::<$ty>::NEW).check();
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __task_input {
    () => { () };
    ($ty:ty) => { $ty };
    ($($ty:ty),+) => { ($($ty),+) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __task_output {
    () => {
        ()
    };
    ($ty:ty) => {
        $ty
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __task_pattern {
    () => { () };
    ($arg:ident) => { $arg };
    ($($arg:ident),+) => { ($($arg),+) };
}

/// The probe behind `__bytes_lint!`.
#[doc(hidden)]
pub mod lint {
    use std::marker::PhantomData;

    pub struct Probe<T: ?Sized>(PhantomData<T>);

    impl<T: ?Sized> Probe<T> {
        pub const NEW: Self = Probe(PhantomData);
    }

    /// Picked for exactly `Vec<u8>` (the receiver matches without autoref).
    pub trait BytesVec {
        #[deprecated(
            note = "a task input or output of `Vec<u8>` goes through serde one byte at a time (4-10x slower than `procexec::Blob`): use `procexec::Blob`, or `serde_bytes::ByteBuf`, or wrap it with `#[serde(with = \"serde_bytes\")]`"
        )]
        fn check(&self) {}
    }

    impl BytesVec for Probe<Vec<u8>> {}

    /// Picked for every other type, through autoref.
    pub trait NotBytesVec {
        fn check(&self) {}
    }

    impl<T: ?Sized> NotBytesVec for &Probe<T> {}
}

#[cfg(test)]
mod tests {
    use super::sealed::Sealed;
    use super::*;
    use crate::wire::codec::decode_exactly;
    use crate::wire::protocol::{self, Outcome, ReplyBuf};

    crate::tasks! {
        fn double(x: u64) -> u64 { x * 2 }
        fn concat(a: String, b: String) -> String { a + &b }
        fn fail(message: String) -> u8 { panic!("{message}") }
        fn unit() {}
    }

    use bytes::BytesMut;

    fn decode_outcomes<O: DeserializeOwned>(out: &ReplyBuf, items: usize) -> Vec<Result<O, Outcome>> {
        let mut body = out.frame();
        let results = (0..items)
            .map(|_| {
                let record = protocol::take_record(&mut body).unwrap();
                match record.split_first() {
                    Some((&protocol::OUTCOME_OK, output)) => Ok(decode_exactly::<O>(output).unwrap()),
                    _ => Err(postcard::from_bytes::<Outcome>(record).unwrap()),
                }
            })
            .collect();
        assert!(body.is_empty(), "one record per item");
        results
    }

    fn encode_inputs<I: Serialize>(inputs: &[I]) -> BytesMut {
        let mut body = BytesMut::new();
        for input in inputs {
            let start = protocol::begin_record(&mut body);
            protocol::encode_into(&mut body, input).unwrap();
            protocol::end_record(&mut body, start);
        }
        body
    }

    fn reply_buf() -> ReplyBuf {
        ReplyBuf::new().unwrap()
    }

    #[test]
    fn the_macro_types_tasks_by_their_arguments() {
        let _: Task<u64, u64> = double();
        let _: Task<(String, String), String> = concat();
        let _: Task<(), ()> = unit();
        assert_eq!(concat().call_in_process(("a".into(), "b".into())), "ab");
        assert_eq!(TASKS.len(), 4);
        assert_eq!(TASKS.duplicate_name(), None);
        assert_eq!(TASKS.infos()[0].input, "u64");
    }

    #[test]
    fn invoke_runs_every_item_of_a_call() {
        let mut out = reply_buf();
        TASKS.get(0).unwrap().invoke(&encode_inputs(&[1u64, 2, 3]), 3, &mut out);
        let results: Vec<u64> = decode_outcomes(&out, 3).into_iter().map(Result::unwrap).collect();
        assert_eq!(results, [2, 4, 6]);
    }

    #[test]
    fn a_panic_fails_its_item_only() {
        let mut out = reply_buf();
        let inputs = encode_inputs(&["one".to_string(), "two".to_string()]);
        TASKS.get(2).unwrap().invoke(&inputs, 2, &mut out);
        let results = decode_outcomes::<u8>(&out, 2);
        for (result, expected) in results.iter().zip(["one", "two"]) {
            match result {
                Err(Outcome::Panicked { message, location, .. }) => {
                    assert_eq!(message, expected);
                    assert!(location.as_deref().unwrap().contains("task.rs"));
                }
                other => panic!("expected a panic, got {other:?}"),
            }
        }
    }

    #[test]
    fn an_undecodable_input_fails_alone() {
        let mut out = reply_buf();
        let mut inputs = encode_inputs(&[("a".to_string(), "b".to_string())]);
        // A pair whose first string's declared length runs past its record.
        let start = protocol::begin_record(&mut inputs);
        inputs.extend_from_slice(&[200, 1, b'x']);
        protocol::end_record(&mut inputs, start);
        inputs.extend_from_slice(&encode_inputs(&[("c".to_string(), "d".to_string())]));
        TASKS.get(1).unwrap().invoke(&inputs, 3, &mut out);
        let results = decode_outcomes::<String>(&out, 3);
        assert_eq!(results[0], Ok("ab".into()));
        assert!(matches!(&results[1], Err(Outcome::BadInput { message }) if message.contains("String")));
        assert_eq!(results[2], Ok("cd".into()));
    }

    #[test]
    fn bytes_left_over_after_an_input_are_a_bad_input() {
        let mut out = reply_buf();
        // Two u64s where one is expected.
        let mut inputs = BytesMut::new();
        let start = protocol::begin_record(&mut inputs);
        protocol::encode_into(&mut inputs, &(1u64, 2u64)).unwrap();
        protocol::end_record(&mut inputs, start);
        TASKS.get(0).unwrap().invoke(&inputs, 1, &mut out);
        let results = decode_outcomes::<u64>(&out, 1);
        assert!(matches!(&results[0], Err(Outcome::BadInput { message }) if message.contains("left over")));
    }

    #[test]
    fn the_progress_record_counts_every_item_done() {
        let mut out = reply_buf();
        out.begin_call(9);
        TASKS.get(0).unwrap().invoke(&encode_inputs(&[1u64, 2, 3]), 3, &mut out);
        let progress = out.progress();
        assert_eq!((progress.call, progress.items), (9, 3));
        assert_eq!(progress.bytes as usize, protocol::Progress::SIZE + out.frame().len());
    }

    /// A type whose serde impls panic on demand.
    #[derive(Debug)]
    struct Touchy(u8);

    impl Serialize for Touchy {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            assert!(self.0 != 2, "cannot serialize 2");
            serializer.serialize_u8(self.0)
        }
    }

    impl<'de> serde::Deserialize<'de> for Touchy {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let value = u8::deserialize(deserializer)?;
            assert!(value != 1, "cannot deserialize 1");
            Ok(Touchy(value))
        }
    }

    #[test]
    fn panicking_serde_impls_fail_their_input_only() {
        const ECHO: Task<Touchy, Touchy> = Task::new("echo", |x| x);
        let mut out = reply_buf();
        // 0 is fine, 2 panics when its output is encoded, 3 is fine, 1 panics
        // when decoded, 0 is fine again.
        let body = encode_inputs(&[0u8, 2, 3, 1, 0]);
        ECHO.invoke(&body, 5, &mut out);
        let results = decode_outcomes::<u8>(&out, 5);
        assert_eq!(results[0], Ok(0));
        assert!(
            matches!(&results[1], Err(Outcome::Panicked { message, .. }) if message == "cannot serialize 2")
        );
        assert_eq!(results[2], Ok(3));
        assert!(
            matches!(&results[3], Err(Outcome::Panicked { message, .. }) if message == "cannot deserialize 1")
        );
        assert_eq!(results[4], Ok(0));
    }

    /// Fails to serialize (without panicking) when it holds 2.
    #[derive(Debug)]
    struct Refusing(u8);

    impl Serialize for Refusing {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            if self.0 == 2 {
                return Err(serde::ser::Error::custom("injected: output encode failure"));
            }
            serializer.serialize_u8(self.0)
        }
    }

    impl<'de> serde::Deserialize<'de> for Refusing {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            u8::deserialize(deserializer).map(Refusing)
        }
    }

    #[test]
    fn an_output_that_cannot_be_encoded_is_a_bad_output_of_its_item_only() {
        const REFUSE: Task<u8, Refusing> = Task::new("refuse", Refusing);
        let mut out = reply_buf();
        REFUSE.invoke(&encode_inputs(&[1u8, 2, 3]), 3, &mut out);
        let results = decode_outcomes::<u8>(&out, 3);
        assert_eq!(results[0], Ok(1));
        assert!(
            matches!(&results[1], Err(Outcome::BadOutput { message }) if message.contains("injected: output encode failure")),
            "{:?}",
            results[1]
        );
        assert_eq!(results[2], Ok(3));
    }

    #[test]
    fn duplicate_names_are_found() {
        const A: Task<u8, u8> = Task::new("same", |x| x);
        const B: Task<u16, u16> = Task::new("same", |x| x);
        static DUPLICATED: Registry = Registry::new(&[&A, &B]);
        assert_eq!(DUPLICATED.duplicate_name(), Some("same"));
    }
}
