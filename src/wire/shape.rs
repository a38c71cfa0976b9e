//! What a task's input and output look like on the wire, so the parent and a worker
//! built from other sources can tell they disagree before anything is sent.
//!
//! `std::any::type_name` is neither unique nor stable, and says nothing of a field
//! that changed type. So each type is traced through its `Deserialize` impl
//! (serde-reflection) and the resulting format hashed canonically: the hash covers
//! the serde data model (kinds, and the types of fields, elements and variants, in
//! order) but no name, since postcard carries none. Tracing also reveals the serde
//! features postcard cannot carry, which would otherwise fail every call with a
//! baffling decode error.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde_reflection::{
    ContainerFormat, Format, Named, Registry, Samples, Tracer, TracerConfig, VariantFormat,
};

use crate::wire::panic::catch_panic;
use crate::wire::protocol::{Outcome, Shape};

/// The shape of `T`, traced once per process: a worker describes every task at
/// its handshake, and tasks share types (`u64`, `String`, `()`) more often than not.
pub(crate) fn shape_of<T: DeserializeOwned + 'static>() -> Shape {
    static SHAPES: Mutex<BTreeMap<TypeId, Shape>> = Mutex::new(BTreeMap::new());
    let id = TypeId::of::<T>();
    if let Some(shape) = SHAPES.lock().ok().and_then(|shapes| shapes.get(&id).cloned()) {
        return shape;
    }
    // Traced outside the lock: a `Deserialize` impl may panic, or trace other tasks.
    // A panic must not kill a worker in its handshake, nor a caller in its check.
    let shape = match catch_panic(trace_shape::<T>) {
        Ok(shape) => shape,
        Err(Outcome::Panicked { message, .. }) => Shape::Untraced(format!("tracing panicked: {message}")),
        Err(other) => Shape::Untraced(format!("tracing failed: {other:?}")),
    };
    if let Ok(mut shapes) = SHAPES.lock() {
        shapes.insert(id, shape.clone());
    }
    shape
}

fn trace_shape<T: DeserializeOwned>() -> Shape {
    match trace::<T>() {
        Ok((format, registry)) => {
            let mut hash = Fnv::new();
            hash_format(&format, &registry, &mut Vec::new(), &mut hash);
            Shape::Fingerprint(hash.finish())
        }
        Err(serde_reflection::Error::NotSupported(method)) => match unsupported(method) {
            Some(feature) => Shape::Unsupported(feature.into()),
            None => Shape::Untraced(format!("not supported: {method}")),
        },
        // Typically a `Deserialize` impl that validates and refuses the tracer's
        // made-up values: the type name is all that can be compared.
        Err(err) => Shape::Untraced(err.to_string()),
    }
}

/// Traces `T` until every variant of every enum in it has been seen.
///
/// `Tracer::trace_type` completes the enum at the top only: one nested deeper is
/// reported missing variants by `registry()`, which consumes the tracer. So a
/// trace that ends so is run again from scratch, now knowing those enums' names,
/// which is what the tracer needs to be asked about them after each pass.
fn trace<T: DeserializeOwned>() -> Result<(Format, Registry), serde_reflection::Error> {
    // Each pass over `T` explores one more variant of each incomplete enum, so this
    // bounds enums of up to about as many variants; past it, the type is untraced.
    const MAX_PASSES: usize = 1024;
    let samples = Samples::new();
    let mut enums: Vec<String> = Vec::new();
    loop {
        let mut tracer = Tracer::new(TracerConfig::default());
        let mut passes = 0;
        let format = loop {
            let (format, _) = tracer.trace_type_once::<T>(&samples)?;
            match &format {
                Format::TypeName(name) if !enums.contains(name) => enums.push(name.clone()),
                _ => {}
            }
            // Not `any`: each must be asked, as asking clears its mark for the next pass.
            let incomplete =
                enums.iter().filter(|name| tracer.check_incomplete_enum(name).is_some()).count() > 0;
            passes += 1;
            if !incomplete || passes == MAX_PASSES {
                break format;
            }
        };
        match tracer.registry() {
            Err(serde_reflection::Error::MissingVariants(missing))
                if missing.iter().any(|name| !enums.contains(name)) =>
            {
                enums.extend(missing.into_iter().filter(|name| !enums.contains(name)).collect::<Vec<_>>());
            }
            registry => return Ok((format, registry?)),
        }
    }
}

/// What a `Deserializer` method the tracer met means for postcard, which
/// implements none of these.
fn unsupported(method: &str) -> Option<&'static str> {
    Some(match method {
        "deserialize_any" => {
            "`deserialize_any` (an untagged, internally or adjacently tagged enum, or a \
             self-describing type such as `serde_json::Value`)"
        }
        "deserialize_identifier" => {
            "`deserialize_identifier` (`#[serde(flatten)]`, or identifiers read as such)"
        }
        "deserialize_ignored_any" => "`deserialize_ignored_any` (values to skip unread)",
        _ => return None,
    })
}

/// FNV-1a, 64 bits: small, and the same on every platform and release, which
/// `std`'s hashers do not promise.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn tag(&mut self, tag: u8) {
        self.bytes(&[tag]);
    }

    fn count(&mut self, count: usize) {
        self.bytes(&(count as u64).to_le_bytes());
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Feeds `format` to `hash`, resolving named containers through `registry`.
/// `open` holds the containers being hashed, so a recursive type refers back to
/// one by depth instead of recursing forever.
fn hash_format<'a>(format: &'a Format, registry: &'a Registry, open: &mut Vec<&'a str>, hash: &mut Fnv) {
    let primitive = match format {
        Format::Variable(_) => 0,
        Format::TypeName(name) => {
            if let Some(depth) = open.iter().position(|open| open == name) {
                hash.tag(1);
                hash.count(depth);
            } else if let Some(container) = registry.get(name) {
                open.push(name);
                hash_container(container, registry, open, hash);
                open.pop();
            } else {
                hash.tag(2);
            }
            return;
        }
        Format::Unit => 3,
        Format::Bool => 4,
        Format::I8 => 5,
        Format::I16 => 6,
        Format::I32 => 7,
        Format::I64 => 8,
        Format::I128 => 9,
        Format::U8 => 10,
        Format::U16 => 11,
        Format::U32 => 12,
        Format::U64 => 13,
        Format::U128 => 14,
        Format::F32 => 15,
        Format::F64 => 16,
        Format::Char => 17,
        Format::Str => 18,
        Format::Bytes => 19,
        Format::Option(inner) => return hash_in(20, [&**inner], registry, open, hash),
        Format::Seq(inner) => return hash_in(21, [&**inner], registry, open, hash),
        Format::Map { key, value } => return hash_in(22, [&**key, &**value], registry, open, hash),
        Format::Tuple(items) => return hash_in(23, items, registry, open, hash),
        Format::TupleArray { content, size } => {
            hash.tag(24);
            hash.count(*size);
            return hash_format(content, registry, open, hash);
        }
    };
    hash.tag(primitive);
}

/// A tag, how many formats follow, and each of them.
fn hash_in<'a>(
    tag: u8,
    formats: impl IntoIterator<Item = &'a Format, IntoIter: ExactSizeIterator>,
    registry: &'a Registry,
    open: &mut Vec<&'a str>,
    hash: &mut Fnv,
) {
    let formats = formats.into_iter();
    hash.tag(tag);
    hash.count(formats.len());
    for format in formats {
        hash_format(format, registry, open, hash);
    }
}

fn hash_fields<'a>(
    tag: u8,
    fields: &'a [Named<Format>],
    registry: &'a Registry,
    open: &mut Vec<&'a str>,
    hash: &mut Fnv,
) {
    hash_in(tag, fields.iter().map(|field| &field.value), registry, open, hash);
}

fn hash_container<'a>(
    container: &'a ContainerFormat,
    registry: &'a Registry,
    open: &mut Vec<&'a str>,
    hash: &mut Fnv,
) {
    match container {
        ContainerFormat::UnitStruct => hash.tag(30),
        ContainerFormat::NewTypeStruct(inner) => hash_in(31, [&**inner], registry, open, hash),
        ContainerFormat::TupleStruct(items) => hash_in(32, items, registry, open, hash),
        ContainerFormat::Struct(fields) => hash_fields(33, fields, registry, open, hash),
        ContainerFormat::Enum(variants) => {
            hash.tag(34);
            hash.count(variants.len());
            for (&index, variant) in variants {
                hash.count(index as usize);
                match &variant.value {
                    VariantFormat::Variable(_) => hash.tag(40),
                    VariantFormat::Unit => hash.tag(41),
                    VariantFormat::NewType(inner) => hash_in(42, [&**inner], registry, open, hash),
                    VariantFormat::Tuple(items) => hash_in(43, items, registry, open, hash),
                    VariantFormat::Struct(fields) => hash_fields(44, fields, registry, open, hash),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::Deserialize;

    use super::*;

    fn fingerprint<T: DeserializeOwned + 'static>() -> u64 {
        match shape_of::<T>() {
            Shape::Fingerprint(hash) => hash,
            other => panic!("{} was not traced: {other:?}", std::any::type_name::<T>()),
        }
    }

    mod v1 {
        use super::*;

        #[derive(Deserialize)]
        #[allow(dead_code)] // only traced
        pub struct Order {
            pub id: u64,
            pub lines: Vec<(String, u32)>,
            pub kind: Kind,
        }

        #[derive(Deserialize)]
        #[allow(dead_code)]
        pub enum Kind {
            Retail,
            Wholesale { discount: f32 },
        }
    }

    mod v2 {
        use super::*;

        /// `v1::Order` with `id` widened.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        pub struct Order {
            pub id: u128,
            pub lines: Vec<(String, u32)>,
            pub kind: super::v1::Kind,
        }
    }

    mod renamed {
        use super::*;

        /// `v1::Order` under other names throughout.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        pub struct Purchase {
            pub number: u64,
            pub items: Vec<(String, u32)>,
            pub channel: Channel,
        }

        #[derive(Deserialize)]
        #[allow(dead_code)]
        pub enum Channel {
            Shop,
            Bulk { rebate: f32 },
        }
    }

    #[test]
    fn the_same_type_has_the_same_fingerprint() {
        assert_eq!(fingerprint::<v1::Order>(), fingerprint::<v1::Order>());
    }

    #[test]
    fn a_field_of_another_type_changes_the_fingerprint() {
        assert_ne!(fingerprint::<v1::Order>(), fingerprint::<v2::Order>());
        assert_ne!(fingerprint::<(u32, String)>(), fingerprint::<(String, u32)>());
        assert_ne!(fingerprint::<Vec<u8>>(), fingerprint::<Vec<u16>>());
    }

    #[test]
    fn a_renamed_type_of_the_same_shape_has_the_same_fingerprint() {
        assert_eq!(fingerprint::<v1::Order>(), fingerprint::<renamed::Purchase>());
    }

    #[test]
    fn a_nested_enum_counts_every_variant() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        pub enum Other {
            Retail,
            Wholesale { discount: f64 },
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        pub struct Order {
            pub id: u64,
            pub lines: Vec<(String, u32)>,
            pub kind: Other,
        }
        assert_ne!(fingerprint::<v1::Order>(), fingerprint::<Order>());
    }

    #[test]
    fn recursive_types_are_fingerprinted() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum List {
            Nil,
            Cons(u8, Box<List>),
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum Wide {
            Nil,
            Cons(u16, Box<Wide>),
        }
        assert_ne!(fingerprint::<List>(), fingerprint::<Wide>());
    }

    #[test]
    fn common_std_types_are_fingerprinted() {
        fingerprint::<HashMap<String, Vec<u8>>>();
        fingerprint::<Option<std::time::Duration>>();
        fingerprint::<Result<(), String>>();
        fingerprint::<std::path::PathBuf>();
        fingerprint::<()>();
    }

    #[test]
    fn what_postcard_cannot_carry_is_named() {
        #[derive(Deserialize)]
        #[serde(untagged)]
        #[allow(dead_code)]
        enum Untagged {
            Number(u64),
            Text(String),
        }
        #[derive(Deserialize)]
        #[serde(tag = "kind")]
        #[allow(dead_code)]
        enum Tagged {
            A { x: u8 },
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Flat {
            x: u8,
            #[serde(flatten)]
            rest: Inner,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            y: u8,
        }
        let feature = |shape| match shape {
            Shape::Unsupported(feature) => feature,
            other => panic!("expected unsupported, got {other:?}"),
        };
        assert!(feature(shape_of::<Untagged>()).contains("deserialize_any"));
        assert!(feature(shape_of::<Tagged>()).contains("deserialize_any"));
        assert!(feature(shape_of::<Flat>()).contains("flatten"));
    }

    #[test]
    fn a_type_the_tracer_cannot_build_falls_back_to_its_name() {
        assert!(matches!(shape_of::<std::num::NonZeroU64>(), Shape::Untraced(_)));
    }

    #[test]
    fn a_deserialize_impl_that_panics_while_traced_falls_back_to_its_name() {
        struct Fragile;
        impl<'de> Deserialize<'de> for Fragile {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                assert_ne!(u8::deserialize(d)?, 0, "zero is not a fragile thing");
                Ok(Fragile)
            }
        }
        match shape_of::<Fragile>() {
            Shape::Untraced(why) => assert!(why.contains("zero is not a fragile thing"), "{why}"),
            other => panic!("expected untraced, got {other:?}"),
        }
    }
}
