//! GGUF header parsing: metadata key/values and tensor infos, with bounds checks on every
//! length, so a truncated or hostile file gives an error instead of a panic or a huge
//! allocation. Used for packaging (`docker model package` metadata), memory estimates and
//! model facts (architecture, quantization, parameter count, context length).

use std::collections::BTreeMap;

use crate::ProtoError;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest key or string value accepted.
const MAX_STRING: u64 = 16 << 20;
/// Most metadata entries or tensors accepted.
const MAX_COUNT: u64 = 1 << 20;
/// Most dimensions of one tensor (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Arrays longer than this are left out of [`GgufHeader::metadata_strings`], like DMR does.
pub const MAX_ARRAY_IN_METADATA: usize = 50;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The string form Docker Model Runner puts in its config (`%d`, `%f`, `%t`, arrays
    /// joined by ", ").
    pub fn to_dmr_string(&self) -> String {
        match self {
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => format!("{v:.6}"),
            Value::F64(v) => format!("{v:.6}"),
            Value::Bool(v) => v.to_string(),
            Value::Str(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .map(Value::to_dmr_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// One tensor's description.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// The parsed header of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Bytes from the start of the file to the end of the tensor infos.
    pub header_len: u64,
}

impl GgufHeader {
    /// Parses the header from the first bytes of a file. If `bytes` ends before the header
    /// does, the error says how much was needed so the caller can read more.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(gguf_err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(gguf_err(&format!("unsupported GGUF version {version}")));
        }
        let tensor_count = r.count("tensor count")?;
        let kv_count = r.count("metadata count")?;
        let mut metadata = Vec::with_capacity(kv_count.min(1024) as usize);
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(tensor_count.min(4096) as usize);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > MAX_DIMS {
                return Err(gguf_err(&format!(
                    "tensor {name:?} has {n_dims} dimensions"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            header_len: r.pos as u64,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// Total parameter count (elements of all tensors in this file).
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d)))
            .fold(0u64, u64::saturating_add)
    }

    /// Quantization name from `general.file_type` (`Q4_1`, `Q4_K_M`, …).
    pub fn quantization(&self) -> Option<&'static str> {
        self.get("general.file_type")
            .and_then(Value::as_u64)
            .and_then(file_type_name)
    }

    /// Trained context length, `<arch>.context_length`.
    pub fn context_length(&self) -> Option<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.context_length"))
            .and_then(Value::as_u64)
    }

    /// `split.count` for sharded models (1 when absent).
    pub fn split_count(&self) -> u64 {
        self.get("split.count").and_then(Value::as_u64).unwrap_or(1)
    }

    /// Every metadata key as a string, arrays over [`MAX_ARRAY_IN_METADATA`] items left out:
    /// the `config.gguf` map of a Docker model artifact.
    pub fn metadata_strings(&self) -> BTreeMap<String, String> {
        self.metadata
            .iter()
            .filter(|(_, v)| !matches!(v, Value::Array(a) if a.len() > MAX_ARRAY_IN_METADATA))
            .map(|(k, v)| (k.clone(), v.to_dmr_string()))
            .collect()
    }
}

/// llama.cpp's `llama_ftype` names.
pub fn file_type_name(ftype: u64) -> Option<&'static str> {
    Some(match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4",
        _ => return None,
    })
}

/// Human form of a parameter count the way Docker Model Runner prints it (`134.52 M`).
pub fn format_parameters(count: u64) -> String {
    let c = count as f64;
    if c >= 1e12 {
        format!("{:.2} T", c / 1e12)
    } else if c >= 1e9 {
        format!("{:.2} B", c / 1e9)
    } else if c >= 1e6 {
        format!("{:.2} M", c / 1e6)
    } else if c >= 1e3 {
        format!("{:.2} K", c / 1e3)
    } else {
        count.to_string()
    }
}

/// Human form of a byte size (`103.24 MiB`).
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut i = 0;
    let mut v = b;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

fn gguf_err(reason: &str) -> ProtoError {
    ProtoError::Malformed {
        kind: "GGUF header",
        reason: reason.to_string(),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], ProtoError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| ProtoError::Malformed {
                kind: "GGUF header",
                reason: format!(
                    "truncated: needs more than the {} bytes given (at offset {}, wanted {n})",
                    self.bytes.len(),
                    self.pos
                ),
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn count(&mut self, what: &str) -> Result<u64, ProtoError> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(gguf_err(&format!("{what} {n} is implausibly large")));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(gguf_err(&format!("string of {len} bytes is too long")));
        }
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, ProtoError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(gguf_err("arrays nested too deeply"));
                }
                let item_ty = self.u32()?;
                let n = self.count("array length")?;
                // Never trust the count for the allocation: every item takes at least a byte.
                let remaining = (self.bytes.len() - self.pos) as u64;
                let mut items = Vec::with_capacity(n.min(remaining) as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => return Err(gguf_err(&format!("unknown metadata value type {other}"))),
        })
    }
}

/// Writes a GGUF header (metadata and tensor infos, no tensor data). For tests and tools
/// that need small valid GGUF files, such as sharded fixtures.
pub fn write_header(metadata: &[(String, Value)], tensors: &[TensorInfo]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::Str(s) => string(out, s),
            Value::Array(items) => {
                let item_ty = items.first().map_or(0, type_id);
                out.extend_from_slice(&item_ty.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    value(out, item);
                }
            }
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend_from_slice(&type_id(v).to_le_bytes());
        value(&mut out, v);
    }
    for t in tensors {
        string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&t.offset.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        write_header(
            &[
                ("general.architecture".into(), Value::Str("llama".into())),
                ("general.file_type".into(), Value::U32(3)),
                ("llama.context_length".into(), Value::U32(8192)),
                ("llama.rope.freq_base".into(), Value::F32(10000.0)),
                (
                    "tokenizer.ggml.tokens".into(),
                    Value::Array((0..60).map(|i| Value::Str(i.to_string())).collect()),
                ),
                (
                    "small".into(),
                    Value::Array(vec![Value::I32(1), Value::I32(2)]),
                ),
                ("flag".into(), Value::Bool(true)),
            ],
            &[
                TensorInfo {
                    name: "a".into(),
                    dims: vec![10, 20],
                    ggml_type: 3,
                    offset: 0,
                },
                TensorInfo {
                    name: "b".into(),
                    dims: vec![5],
                    ggml_type: 0,
                    offset: 256,
                },
            ],
        )
    }

    #[test]
    fn parses_written_header() {
        let bytes = sample();
        let h = GgufHeader::parse(&bytes).unwrap();
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.quantization(), Some("Q4_1"));
        assert_eq!(h.context_length(), Some(8192));
        assert_eq!(h.parameter_count(), 205);
        assert_eq!(h.header_len as usize, bytes.len());
        let m = h.metadata_strings();
        assert_eq!(m["llama.rope.freq_base"], "10000.000000");
        assert_eq!(m["small"], "1, 2");
        assert_eq!(m["flag"], "true");
        assert!(
            !m.contains_key("tokenizer.ggml.tokens"),
            "arrays over 50 items are left out"
        );
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(
                GgufHeader::parse(&bytes[..cut]).is_err(),
                "prefix {cut} parsed"
            );
        }
        assert!(
            GgufHeader::parse(b"GGML\x03\0\0\0")
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut huge = b"GGUF\x03\0\0\0".to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        huge.extend_from_slice(&0u64.to_le_bytes());
        assert!(
            GgufHeader::parse(&huge)
                .unwrap_err()
                .to_string()
                .contains("implausibly")
        );
    }

    #[test]
    fn formats_like_dmr() {
        assert_eq!(format_parameters(134_515_008), "134.52 M");
        assert_eq!(format_bytes(103_240_000), "98.46 MiB");
        assert_eq!(format_bytes(12), "12 B");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
            if magic && bytes.len() >= 8 {
                bytes[..4].copy_from_slice(b"GGUF");
                bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
            }
            let _ = GgufHeader::parse(&bytes);
        }

        #[test]
        fn mutated_headers_never_panic(edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..6)) {
            let mut bytes = sample();
            for (at, v) in edits { let i = at.index(bytes.len()); bytes[i] = v; }
            let _ = GgufHeader::parse(&bytes);
        }
    }
}
