//! The words of a codec error: what the user's serde code said, and where.
//!
//! postcard keeps no text: a `Serialize` or `Deserialize` impl that fails with
//! `Error::custom("...")` comes out as "Serde Serialization Error". Erasing postcard
//! (erased-serde) keeps a message raised at the top level only: one raised inside a
//! field passes back through postcard's error type on its way out and is lost there
//! too. So on the failure path, and only there, the value is encoded or decoded a
//! second time by a serializer and a deserializer of our own, whose error keeps the
//! text, under `serde_path_to_error` for the path to the failing field. The hot path
//! stays plain postcard.

use std::any::type_name;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser;

/// Why `value` failed to encode, given what postcard said (`err`).
pub(crate) fn encode_error_message<T: Serialize + ?Sized>(value: &T, err: &postcard::Error) -> String {
    let explained = match serde_path_to_error::serialize(value, Sink) {
        Ok(()) => None,
        Err(failure) => Some((failure.path().to_string(), failure.into_inner().0)),
    };
    describe("encode", type_name::<T>(), explained, err)
}

/// Why `bytes` failed to decode as a `T`, given what postcard said (`err`).
pub(crate) fn decode_error_message<T: DeserializeOwned>(bytes: &[u8], err: &postcard::Error) -> String {
    let explain = |names| {
        let mut decoder = Decoder { input: bytes, names };
        match serde_path_to_error::deserialize::<_, T>(&mut decoder) {
            Ok(_) => None,
            Err(failure) => Some((failure.path().to_string(), failure.into_inner().0)),
        }
    };
    // The pass that reads exactly as postcard does has the true message; the pass
    // that hands fields and variants over by name has the readable path. A
    // hand-written visitor may refuse names, so the path is taken only when both
    // passes failed the same way.
    let explained = match (explain(false), explain(true)) {
        (Some((_, raw)), Some((path, named))) if raw == named => Some((path, named)),
        (raw, _) => raw,
    };
    describe("decode", type_name::<T>(), explained, err)
}

fn describe(
    action: &str,
    type_name: &str,
    explained: Option<(String, String)>,
    err: &postcard::Error,
) -> String {
    match explained {
        // serde_path_to_error writes an empty path as ".".
        Some((path, message)) if path != "." => {
            format!("cannot {action} a `{type_name}`: {message} (at {path})")
        }
        Some((_, message)) => format!("cannot {action} a `{type_name}`: {message}"),
        // The second pass succeeded (a value whose serde impl changes its mind):
        // postcard's word is all there is.
        None => format!("cannot {action} a `{type_name}`: {err}"),
    }
}

/// An error that keeps its text.
#[derive(Debug)]
struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

impl ser::Error for Failure {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Failure(msg.to_string())
    }
}

impl de::Error for Failure {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Failure(msg.to_string())
    }
}

impl From<postcard::Error> for Failure {
    fn from(err: postcard::Error) -> Self {
        Failure(err.to_string())
    }
}

/// A serializer that writes nothing and fails where postcard's does: in the
/// user's code, or on a sequence or map of unknown length.
struct Sink;

type SinkResult = Result<(), Failure>;

fn unknown_length(len: Option<usize>) -> Result<Sink, Failure> {
    match len {
        Some(_) => Ok(Sink),
        None => Err(postcard::Error::SerializeSeqLengthUnknown.into()),
    }
}

macro_rules! sink_scalars {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> SinkResult { Ok(()) })*
    };
}

impl ser::Serializer for Sink {
    type Ok = ();
    type Error = Failure;
    type SerializeSeq = Sink;
    type SerializeTuple = Sink;
    type SerializeTupleStruct = Sink;
    type SerializeTupleVariant = Sink;
    type SerializeMap = Sink;
    type SerializeStruct = Sink;
    type SerializeStructVariant = Sink;

    sink_scalars! {
        serialize_bool(bool), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
        serialize_i64(i64), serialize_i128(i128), serialize_u8(u8), serialize_u16(u16),
        serialize_u32(u32), serialize_u64(u64), serialize_u128(u128), serialize_f32(f32),
        serialize_f64(f64), serialize_char(char), serialize_str(&str), serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    }

    fn serialize_none(self) -> SinkResult {
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> SinkResult {
        value.serialize(Sink)
    }

    fn serialize_unit(self) -> SinkResult {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> SinkResult {
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> SinkResult {
        value.serialize(Sink)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> SinkResult {
        value.serialize(Sink)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Sink, Failure> {
        unknown_length(len)
    }

    fn serialize_tuple(self, _: usize) -> Result<Sink, Failure> {
        Ok(Sink)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Sink, Failure> {
        Ok(Sink)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Sink, Failure> {
        Ok(Sink)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Sink, Failure> {
        unknown_length(len)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Sink, Failure> {
        Ok(Sink)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Sink, Failure> {
        Ok(Sink)
    }

    fn is_human_readable(&self) -> bool {
        // As postcard says: types that serialize differently for humans must take
        // the same branch as on the wire.
        false
    }
}

macro_rules! sink_compound {
    ($($trait:ident { $($method:ident),* }),* $(,)?) => {
        $(impl ser::$trait for Sink {
            type Ok = ();
            type Error = Failure;
            $(fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> SinkResult {
                value.serialize(Sink)
            })*
            fn end(self) -> SinkResult {
                Ok(())
            }
        })*
    };
}

sink_compound! {
    SerializeSeq { serialize_element },
    SerializeTuple { serialize_element },
    SerializeTupleStruct { serialize_field },
    SerializeTupleVariant { serialize_field },
    SerializeMap { serialize_key, serialize_value },
}

impl ser::SerializeStruct for Sink {
    type Ok = ();
    type Error = Failure;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> SinkResult {
        value.serialize(Sink)
    }

    fn end(self) -> SinkResult {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Sink {
    type Ok = ();
    type Error = Failure;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> SinkResult {
        value.serialize(Sink)
    }

    fn end(self) -> SinkResult {
        Ok(())
    }
}

/// A postcard decoder whose errors keep their text: postcard 1.x's wire format,
/// read the way `postcard::Deserializer` reads it.
struct Decoder<'de> {
    input: &'de [u8],
    /// Hand struct fields over as a map keyed by field name, and enum variants by
    /// name, so the path names them; postcard itself goes by position.
    names: bool,
}

type DecodeResult<T> = Result<T, Failure>;

impl<'de> Decoder<'de> {
    fn take(&mut self, count: usize) -> DecodeResult<&'de [u8]> {
        if self.input.len() < count {
            return Err(postcard::Error::DeserializeUnexpectedEnd.into());
        }
        let (taken, rest) = self.input.split_at(count);
        self.input = rest;
        Ok(taken)
    }

    fn byte(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?[0])
    }

    /// A varint of at most `bits` bits, refused as postcard refuses it: too long,
    /// or with bits set past the type's width.
    fn varint(&mut self, bits: u32) -> DecodeResult<u128> {
        let max_bytes = bits.div_ceil(7);
        let last_byte_max = (1u16 << (bits % 7)) - 1;
        let mut out = 0u128;
        for i in 0..max_bytes {
            let byte = self.byte()?;
            out |= u128::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i == max_bytes - 1 && u16::from(byte) > last_byte_max {
                    break;
                }
                return Ok(out);
            }
        }
        Err(postcard::Error::DeserializeBadVarint.into())
    }

    fn length(&mut self) -> DecodeResult<usize> {
        usize::try_from(self.varint(usize::BITS)?).map_err(|_| postcard::Error::DeserializeBadVarint.into())
    }

    fn bytes(&mut self) -> DecodeResult<&'de [u8]> {
        let len = self.length()?;
        self.take(len)
    }

    fn str(&mut self) -> DecodeResult<&'de str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| postcard::Error::DeserializeBadUtf8.into())
    }
}

/// Zigzag decoding, as postcard encodes signed integers.
fn unzigzag(n: u128) -> i128 {
    ((n >> 1) as i128) ^ -((n & 1) as i128)
}

/// Truncates a decoded integer to its type: `varint` already refused any value
/// wider than `bits`, so nothing is lost.
macro_rules! decode_ints {
    ($($method:ident, $visit:ident, $ty:ty, $signed:expr;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
            let raw = self.varint(<$ty>::BITS)?;
            visitor.$visit(if $signed { unzigzag(raw) as $ty } else { raw as $ty })
        })*
    };
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = Failure;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> DecodeResult<V::Value> {
        Err(Failure(
            "the type needs `deserialize_any` (an untagged or internally tagged enum, \
             `#[serde(flatten)]`, or a self-describing type), which postcard cannot carry"
                .into(),
        ))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        match self.byte()? {
            0 => visitor.visit_bool(false),
            1 => visitor.visit_bool(true),
            _ => Err(postcard::Error::DeserializeBadBool.into()),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_i8(self.byte()? as i8)
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_u8(self.byte()?)
    }

    decode_ints! {
        deserialize_i16, visit_i16, i16, true;
        deserialize_i32, visit_i32, i32, true;
        deserialize_i64, visit_i64, i64, true;
        deserialize_i128, visit_i128, i128, true;
        deserialize_u16, visit_u16, u16, false;
        deserialize_u32, visit_u32, u32, false;
        deserialize_u64, visit_u64, u64, false;
        deserialize_u128, visit_u128, u128, false;
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        let mut bits = [0; 4];
        bits.copy_from_slice(self.take(4)?);
        visitor.visit_f32(f32::from_le_bytes(bits))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        let mut bits = [0; 8];
        bits.copy_from_slice(self.take(8)?);
        visitor.visit_f64(f64::from_le_bytes(bits))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        let bad = || Failure::from(postcard::Error::DeserializeBadChar);
        let len = self.length()?;
        if len > 4 {
            return Err(bad());
        }
        let text = std::str::from_utf8(self.take(len)?).map_err(|_| bad())?;
        visitor.visit_char(text.chars().next().ok_or_else(bad)?)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_borrowed_str(self.str()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_borrowed_str(self.str()?)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_borrowed_bytes(self.bytes()?)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_borrowed_bytes(self.bytes()?)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        match self.byte()? {
            0 => visitor.visit_none(),
            1 => visitor.visit_some(self),
            _ => Err(postcard::Error::DeserializeBadOption.into()),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> DecodeResult<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        let len = self.length()?;
        visitor.visit_seq(Items { decoder: self, len })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> DecodeResult<V::Value> {
        visitor.visit_seq(Items { decoder: self, len })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> DecodeResult<V::Value> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> DecodeResult<V::Value> {
        let len = self.length()?;
        visitor.visit_map(Items { decoder: self, len })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> DecodeResult<V::Value> {
        if self.names {
            visitor.visit_map(Fields { decoder: self, fields })
        } else {
            self.deserialize_tuple(fields.len(), visitor)
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> DecodeResult<V::Value> {
        visitor.visit_enum(Variant { decoder: self, variants })
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _: V) -> DecodeResult<V::Value> {
        Err(Failure(
            "the type needs `deserialize_identifier` (`#[serde(flatten)]` or a map keyed by \
             field names), which postcard cannot carry"
                .into(),
        ))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> DecodeResult<V::Value> {
        Err(Failure(
            "the type needs `deserialize_ignored_any` (fields to skip), which postcard cannot carry".into(),
        ))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The elements of a sequence, tuple or map.
struct Items<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
    len: usize,
}

impl<'de> de::SeqAccess<'de> for Items<'_, 'de> {
    type Error = Failure;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> DecodeResult<Option<T::Value>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        // Not a promise to allocate: the bytes may lie about the length.
        (self.decoder.input.len() >= self.len).then_some(self.len)
    }
}

impl<'de> de::MapAccess<'de> for Items<'_, 'de> {
    type Error = Failure;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> DecodeResult<Option<K::Value>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> DecodeResult<V::Value> {
        seed.deserialize(&mut *self.decoder)
    }

    fn size_hint(&self) -> Option<usize> {
        (self.decoder.input.len() >= self.len).then_some(self.len)
    }
}

/// A struct's fields, keyed by name (in `names` mode).
struct Fields<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
    fields: &'static [&'static str],
}

impl<'de> de::MapAccess<'de> for Fields<'_, 'de> {
    type Error = Failure;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> DecodeResult<Option<K::Value>> {
        let Some((&name, rest)) = self.fields.split_first() else {
            return Ok(None);
        };
        self.fields = rest;
        seed.deserialize(IntoDeserializer::<Failure>::into_deserializer(name)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> DecodeResult<V::Value> {
        seed.deserialize(&mut *self.decoder)
    }
}

/// An enum's variant.
struct Variant<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
    variants: &'static [&'static str],
}

impl<'a, 'de> de::EnumAccess<'de> for Variant<'a, 'de> {
    type Error = Failure;
    type Variant = &'a mut Decoder<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> DecodeResult<(V::Value, Self::Variant)> {
        let index = self.decoder.varint(u32::BITS)? as u32;
        let name = self.variants.get(index as usize).filter(|_| self.decoder.names);
        let variant = match name {
            Some(&name) => seed.deserialize(IntoDeserializer::<Failure>::into_deserializer(name))?,
            None => seed.deserialize(IntoDeserializer::<Failure>::into_deserializer(index))?,
        };
        Ok((variant, self.decoder))
    }
}

impl<'de> de::VariantAccess<'de> for &mut Decoder<'de> {
    type Error = Failure;

    fn unit_variant(self) -> DecodeResult<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> DecodeResult<T::Value> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> DecodeResult<V::Value> {
        de::Deserializer::deserialize_tuple(self, len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> DecodeResult<V::Value> {
        if self.names {
            visitor.visit_map(Fields { decoder: self, fields })
        } else {
            de::Deserializer::deserialize_tuple(self, fields.len(), visitor)
        }
    }
}

/// Decodes a whole record as a `T`: bytes left over mean the two sides disagree on
/// the type as surely as bytes missing do.
pub(crate) fn decode_exactly<T: DeserializeOwned>(record: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes::<T>(record) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => {
            Err(format!("{} bytes left over after decoding a `{}`", rest.len(), type_name::<T>()))
        }
        Err(err) => Err(decode_error_message::<T>(record, &err)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::*;

    /// Refuses 7 both ways, with a message of its own.
    #[derive(Debug, PartialEq)]
    struct Picky(u8);

    impl Serialize for Picky {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if self.0 == 7 {
                return Err(ser::Error::custom("injected: seven will not encode"));
            }
            s.serialize_u8(self.0)
        }
    }

    impl<'de> Deserialize<'de> for Picky {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            match u8::deserialize(d)? {
                7 => Err(de::Error::custom("injected: seven will not decode")),
                n => Ok(Picky(n)),
            }
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Inner {
        id: u32,
        picky: Picky,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Outer {
        name: String,
        items: Vec<Inner>,
    }

    fn outer(second: u8) -> Outer {
        Outer {
            name: "x".into(),
            items: vec![Inner { id: 1, picky: Picky(1) }, Inner { id: 2, picky: Picky(second) }],
        }
    }

    fn encode_message<T: Serialize>(value: &T) -> String {
        let err = postcard::to_stdvec(value).expect_err("the value does not encode");
        encode_error_message(value, &err)
    }

    fn decode_message<T: DeserializeOwned + fmt::Debug>(bytes: &[u8]) -> String {
        let err = postcard::from_bytes::<T>(bytes).expect_err("the bytes do not decode");
        decode_error_message::<T>(bytes, &err)
    }

    #[test]
    fn postcard_alone_loses_the_message() {
        let err = postcard::to_stdvec(&outer(7)).unwrap_err();
        assert!(!err.to_string().contains("injected"), "{err}");
    }

    #[test]
    fn an_encode_error_at_the_top_keeps_its_message_and_has_no_path() {
        let message = encode_message(&Picky(7));
        assert_eq!(
            message,
            format!("cannot encode a `{}`: injected: seven will not encode", type_name::<Picky>())
        );
    }

    #[test]
    fn an_encode_error_in_a_nested_field_keeps_its_message_and_its_path() {
        let message = encode_message(&outer(7));
        assert!(message.contains("injected: seven will not encode (at items[1].picky)"), "{message}");
        assert!(message.starts_with("cannot encode a `"), "{message}");
    }

    #[test]
    fn a_sequence_of_unknown_length_is_reported_as_postcard_reports_it() {
        struct Unsized;
        impl Serialize for Unsized {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq((0..3u8).filter(|_| true))
            }
        }
        let message = encode_message(&Unsized);
        assert!(message.contains(&postcard::Error::SerializeSeqLengthUnknown.to_string()), "{message}");
    }

    #[test]
    fn a_decode_error_at_the_top_keeps_its_message() {
        let message = decode_message::<Picky>(&[7]);
        assert_eq!(
            message,
            format!("cannot decode a `{}`: injected: seven will not decode", type_name::<Picky>())
        );
    }

    #[test]
    fn a_decode_error_in_a_nested_field_keeps_its_message_and_its_path() {
        let bytes = postcard::to_stdvec(&("x", vec![(1u32, 1u8), (2, 7)])).unwrap();
        let message = decode_message::<Outer>(&bytes);
        assert!(message.contains("injected: seven will not decode (at items[1].picky)"), "{message}");
    }

    #[test]
    fn a_decode_error_inside_an_enum_variant_names_the_variant() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)] // only ever fails to decode
        enum Choice {
            Plain(u8),
            Boxed { inner: Inner },
        }
        let bytes = postcard::to_stdvec(&(1u8, 4u32, 7u8)).unwrap();
        let message = decode_message::<Choice>(&bytes);
        assert!(message.contains("injected: seven will not decode (at Boxed.inner.picky)"), "{message}");
    }

    #[test]
    fn truncated_bytes_say_where_they_ran_out() {
        let mut bytes = postcard::to_stdvec(&outer(3)).unwrap();
        bytes.truncate(bytes.len() - 1);
        let message = decode_message::<Outer>(&bytes);
        let end = postcard::Error::DeserializeUnexpectedEnd.to_string();
        assert!(message.contains(&format!("{end} (at items[1].picky)")), "{message}");
    }

    #[test]
    fn an_unknown_variant_is_named() {
        #[derive(Debug, Deserialize)]
        enum Two {
            _A,
            _B,
        }
        let message = decode_message::<Two>(&[5]);
        assert!(message.contains("integer `5`, expected variant index"), "{message}");
    }

    #[test]
    fn the_decoder_reads_what_postcard_writes() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        enum Shape {
            Unit,
            Newtype(i64),
            Tuple(i16, u128),
            Struct { c: char, f: f32 },
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Everything {
            flag: bool,
            small: i8,
            big: i128,
            wide: u64,
            float: f64,
            text: String,
            #[serde(with = "serde_bytes")]
            blob: Vec<u8>,
            maybe: Option<(u16, i32)>,
            nothing: Option<u8>,
            unit: (),
            shapes: Vec<Shape>,
            map: BTreeMap<String, u32>,
        }
        let value = Everything {
            flag: true,
            small: -3,
            big: i128::MIN,
            wide: u64::MAX,
            float: -1.5,
            text: "héllo".into(),
            blob: vec![0, 255, 7],
            maybe: Some((65535, -70000)),
            nothing: None,
            unit: (),
            shapes: vec![
                Shape::Unit,
                Shape::Newtype(-1),
                Shape::Tuple(-300, u128::MAX),
                Shape::Struct { c: 'ß', f: 0.25 },
            ],
            map: [("a".to_string(), 1), ("b".to_string(), 300)].into(),
        };
        let bytes = postcard::to_stdvec(&value).unwrap();
        for names in [false, true] {
            let decoded: Everything =
                serde_path_to_error::deserialize(&mut Decoder { input: &bytes, names }).unwrap();
            assert_eq!(decoded, value, "names: {names}");
        }
    }

    #[test]
    fn a_field_skipped_when_encoding_fails_the_decode_where_the_bytes_shift() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Sparse {
            #[serde(skip_serializing_if = "Option::is_none")]
            note: Option<String>,
            count: u32,
        }
        let bytes = postcard::to_stdvec(&Sparse { note: None, count: 300 }).unwrap();
        let message = decode_message::<Sparse>(&bytes);
        assert!(message.ends_with("(at note)"), "{message}");
    }

    #[test]
    fn an_overlong_varint_is_refused_as_postcard_refuses_it() {
        // A u16 whose third byte sets bits past 16.
        let message = decode_message::<u16>(&[0xff, 0xff, 0x7f]);
        assert!(message.contains(&postcard::Error::DeserializeBadVarint.to_string()), "{message}");
    }
}
