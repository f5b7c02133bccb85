//! A memory-mapped GGUF (v2 and v3) reader: metadata, tensor infos and tensor data.
//!
//! Every count and size read from the header is checked against the bytes that remain before
//! anything is allocated from it, so a truncated or hostile file is an error, never a panic or
//! a huge allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use flint_quant::GgmlType;
use memmap2::Mmap;

use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Tensors of more dimensions than this are not ggml tensors.
const MAX_DIMS: u32 = 4;
/// Nesting depth for arrays of arrays; real files use one level.
const MAX_ARRAY_DEPTH: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
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

    /// The value as a float, when it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description for listings: arrays show their length, not their contents.
    pub fn summary(&self) -> String {
        match self {
            Value::Array(a) => format!("[{} values]", a.len()),
            Value::String(s) if s.len() > 60 => {
                let cut = s.char_indices().nth(57).map_or(s.len(), |(i, _)| i);
                format!("{:?}...", &s[..cut])
            }
            Value::String(s) => format!("{s:?}"),
            other => format!("{other:?}")
                .trim_end_matches(')')
                .split_once('(')
                .map_or_else(String::new, |(_, v)| v.to_string()),
        }
    }
}

/// Where one tensor lives in the file and how it is stored.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Axis lengths outermost first (ggml's `ne` reversed): a `[out, in]` matrix is `[out, in]`.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the file.
    pub offset: usize,
    /// Bytes of data.
    pub size: usize,
}

impl TensorInfo {
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    mmap: Mmap,
}

impl GgufFile {
    /// Opens and memory-maps `path`, and parses and validates its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        // SAFETY: the mapping is read-only, and the file is opened by us for reading; a change to
        // the file by another process while mapped is outside what this reader guards against, as
        // with every memory-mapped model loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let header = parse(&mmap).map_err(|message| Error::Gguf { path: path.to_path_buf(), message })?;
        let index = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            index,
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset..info.offset + info.size]
    }

    /// Bytes of tensor data in the file.
    pub fn data_size(&self) -> usize {
        self.tensors.iter().map(|t| t.size).sum()
    }
}

struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "file truncated: {what} needs {n} bytes at offset {}, only {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count that must fit the remaining bytes at `min_item_size` bytes per item.
    fn count(&mut self, what: &str, min_item_size: usize) -> Result<usize, String> {
        let n = self.u64(what)?;
        let max = self.remaining() / min_item_size.max(1);
        if n > max as u64 {
            return Err(format!(
                "file truncated or corrupt: {what} is {n}, more than the {} bytes left at offset {} can hold",
                self.remaining(),
                self.pos
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.count(what, 1)?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }
}

fn value_size_min(type_id: u32) -> usize {
    match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

fn read_value(c: &mut Cursor<'_>, type_id: u32, depth: u32, key: &str) -> Result<Value, String> {
    Ok(match type_id {
        0 => Value::U8(c.array::<1>(key)?[0]),
        1 => Value::I8(c.array::<1>(key)?[0] as i8),
        2 => Value::U16(u16::from_le_bytes(c.array(key)?)),
        3 => Value::I16(i16::from_le_bytes(c.array(key)?)),
        4 => Value::U32(c.u32(key)?),
        5 => Value::I32(i32::from_le_bytes(c.array(key)?)),
        6 => Value::F32(f32::from_le_bytes(c.array(key)?)),
        7 => match c.array::<1>(key)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(format!("metadata {key}: invalid bool byte {b}")),
        },
        8 => Value::String(c.string(key)?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(format!("metadata {key}: arrays nested deeper than {MAX_ARRAY_DEPTH}"));
            }
            let elem_type = c.u32(key)?;
            let n = c.count(key, value_size_min(elem_type))?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_value(c, elem_type, depth + 1, key)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(c.u64(key)?),
        11 => Value::I64(i64::from_le_bytes(c.array(key)?)),
        12 => Value::F64(f64::from_le_bytes(c.array(key)?)),
        other => return Err(format!("metadata {key}: unknown value type {other}")),
    })
}

fn parse(bytes: &[u8]) -> Result<Header, String> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != MAGIC {
        return Err("not a GGUF file (bad magic)".to_string());
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version} (versions 2 and 3 are supported)"));
    }
    // A tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes,
    // a metadata entry at least 8 (key length) + 4 (type) + 1 byte.
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata count", 13)?;

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let type_id = c.u32("metadata type")?;
        let value = read_value(&mut c, type_id, 0, &key)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => return Err(format!("general.alignment must be a power of two, got {v:?}")),
        },
    };

    let mut raw_infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor {name}: rank {n_dims} (must be 1 to {MAX_DIMS})"));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(c.u64("tensor dimension")?);
        }
        let type_id = c.u32("tensor type")?;
        let offset = c.u64("tensor offset")?;
        raw_infos.push((name, ne, type_id, offset));
    }

    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw_infos.len());
    for (name, ne, type_id, offset) in raw_infos {
        let ggml_type = GgmlType::from_id(type_id).map_err(|e| format!("tensor {name}: {e}"))?;
        let mut n_elements: u64 = 1;
        for &d in &ne {
            n_elements = n_elements
                .checked_mul(d)
                .filter(|&n| n <= file_len.saturating_mul(8))
                .ok_or_else(|| format!("tensor {name}: dimensions {ne:?} are larger than the file"))?;
        }
        if offset % alignment != 0 {
            return Err(format!("tensor {name}: offset {offset} is not aligned to {alignment}"));
        }
        let size = ggml_type
            .bytes_for(n_elements as usize)
            .map_err(|e| format!("tensor {name}: {e}"))?
            .ok_or_else(|| format!("tensor {name}: size overflows"))? as u64;
        let start = data_start.checked_add(offset).ok_or_else(|| format!("tensor {name}: offset overflows"))?;
        let end = start.checked_add(size).ok_or_else(|| format!("tensor {name}: size overflows"))?;
        if end > file_len {
            return Err(format!("file truncated: tensor {name} needs bytes {start}..{end}, the file has {file_len}"));
        }
        tensors.push(TensorInfo {
            name,
            dims: ne.iter().rev().map(|&d| d as usize).collect(),
            ggml_type,
            offset: start as usize,
            size: size as usize,
        });
    }
    Ok(Header { version, metadata, tensors })
}

/// Parses a GGUF header from bytes; for tests and fuzzing of the parser without a file.
pub fn parse_header(bytes: &[u8]) -> Result<(BTreeMap<String, Value>, Vec<TensorInfo>), String> {
    parse(bytes).map(|h| (h.metadata, h.tensors))
}
