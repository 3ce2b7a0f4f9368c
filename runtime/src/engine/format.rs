//! The dlo engine file format, version 1. This doc comment is the specification.
//!
//! An engine is **one file**: a fixed 20-byte prefix, a JSON header, then the tensors, each at a 256-byte
//! aligned offset (so that a reader may map the file and view every tensor in place; this runtime reads
//! with positional reads instead, see [`EngineFile`]).
//!
//! ```text
//! offset  size  field
//! 0       8     magic  b"DLOENGN\0"
//! 8       2     format version, u16 little-endian (this runtime writes and reads 1)
//! 10      2     reserved, u16, must be 0
//! 12      4     header length H, u32 little-endian (bytes of JSON, at most MAX_HEADER_BYTES)
//! 16      4     crc32 (IEEE) of the H header bytes, u32 little-endian
//! 20      H     header: UTF-8 JSON {"file_len", "manifest", "tensors"}
//! 20+H    …     zero padding up to the first multiple of 256 (the data start)
//! …             tensor bytes (little-endian, row-major), each at a multiple of 256, zero padding between
//! ```
//!
//! The header object has three keys:
//! - `file_len`: the total file size in bytes (a shorter file is reported as truncated);
//! - `manifest`: the lowered plan ([`super::Manifest`]: model config, layer schedule, gate parameters,
//!   budget and thresholds, router-logit quantiles, tokenizer and chat template, provenance);
//! - `tensors`: the tensor table, an array of `{"name", "dtype", "shape", "offset", "length", "crc32"}`
//!   sorted by `offset`; `dtype` is `f32`, `bf16`, `f16`, or a ggml block format (`q4_0`, `q4_1`, `q5_0`, `q5_1`,
//!   `q8_0`, `q2_k`, `q3_k`, `q4_k`, `q5_k`, `q6_k`: the last dimension a whole number of blocks, each row its
//!   blocks in ggml's byte layout); `offset` is absolute (from the start of the file) and a multiple of 256;
//!   `length` is exactly `product(shape) × dtype size` (for blocks: `product(shape) / block elements × block
//!   bytes`); `crc32` is 8 lower-case hex digits (fixed width, so the writer can stream tensors and patch the
//!   checksums in afterwards). Block formats are an additive change: version-1 readers that predate them
//!   refuse the unknown dtype by name.
//!
//! **Versioning.** The version sits right after the magic and is checked before anything else is parsed:
//! a file with a newer version is refused with [`Error::EngineVersion`] ("rebuild the engine or upgrade
//! dlo"). Readers ignore unknown JSON keys, so additive changes do not need a new version.
//!
//! **Integrity.** The crc32 in the prefix covers the whole JSON header (manifest and tensor table); it is
//! checked at open, before the JSON is parsed. Each tensor carries its own crc32, checked **lazily, on
//! first access** ([`EngineFile::load`]): building a model reads every tensor once, so every byte
//! the model uses is verified exactly when it is copied into the model's storage, and opening an engine
//! stays O(header). [`EngineFile::verify`] checks all tensors up front (what `dlo-run --verify` and the
//! tests use). crc32 (crc32fast, SSE4.2/PCLMUL) runs at several GB/s, so verifying a 135M-parameter f32
//! engine (540 MB) costs about a tenth of a second; see `docs/benchmarks.md` "Engine load". Zero padding
//! is checked at open, so a flipped byte anywhere in the file is detected: in the prefix (magic, version,
//! reserved, length, checksum), in the header, in padding, or in a tensor (the error names the tensor).
//!
//! **Limits**, checked before anything is allocated from file-derived sizes: the header is at most
//! [`MAX_HEADER_BYTES`]; the table at most [`MAX_TENSORS`] entries of rank at most [`MAX_RANK`]. Every
//! offset and length is checked (with overflow-checked arithmetic) to lie inside the file.
//!
//! **Writing** ([`write_engine`]) streams one tensor at a time into a temporary file next to the target,
//! patches the checksums into the header, syncs, and renames it into place: a failed build leaves no file.

use crate::error::{Error, Result};
use crate::model::weight::BlockBytes;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use dlo_passes::fsutil::AtomicFile;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Bytes per parallel crc32 chunk when a tensor is verified (hashed while the chunk is in cache).
const HASH_CHUNK: usize = 1 << 20;

/// A crc32 hasher over one chunk.
fn chunk_hasher(chunk: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(chunk);
    h
}

/// The crc32 of consecutive chunks from their hashers.
fn combined(hashers: &[crc32fast::Hasher]) -> u32 {
    let mut total = crc32fast::Hasher::new();
    for h in hashers {
        total.combine(h);
    }
    total.finalize()
}

/// The 8 bytes every engine starts with.
pub const MAGIC: &[u8; 8] = b"DLOENGN\0";
/// The format version this runtime writes; it reads versions `1..=FORMAT_VERSION`.
pub const FORMAT_VERSION: u16 = 1;
/// Tensor data alignment in bytes (offsets are multiples of this).
pub const ALIGN: u64 = 256;
/// Size of the fixed prefix before the JSON header.
pub const PREFIX_LEN: usize = 20;
/// Largest accepted JSON header (manifest + tensor table): 64 MiB (a large tokenizer.json is ~10 MB).
pub const MAX_HEADER_BYTES: u32 = 64 << 20;
/// Largest accepted number of tensors.
pub const MAX_TENSORS: usize = 65_536;
/// Largest accepted tensor rank.
pub const MAX_RANK: usize = 8;

/// Storage dtype of an engine tensor: a float type, or a ggml block format, row-major or eight rows
/// interleaved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageDtype {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
    /// ggml blocks of this type (one of [`crate::model::weight::QUANT_TYPES`]), ggml's row-major layout.
    Blocks(GgmlDType),
    /// The same blocks in [`crate::kernels::packed`]'s layout, groups of eight rows interleaved (`q4_1_x8`,
    /// `q4_k_x8`): the 32-element block formats, Q4_K and Q6_K; 2-D, rows a multiple of eight
    /// ([`crate::kernels::packed::packed_len`] bytes: the row-major count except for Q4_K, whose scales are
    /// unpacked to bytes). The packed kernels run them in place from the engine's memory map.
    Packed(GgmlDType),
}

impl Serialize for StorageDtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for StorageDtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        StorageDtype::parse(&name).ok_or_else(|| {
            let blocks = crate::model::weight::QUANT_TYPES.iter().map(|(_, n)| *n);
            let packed = PACKED_NAMES.iter().map(|(_, n)| *n);
            serde::de::Error::custom(format!(
                "unknown tensor dtype `{name}` (supported: f32, bf16, f16, {})",
                blocks.chain(packed).collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

/// The block types with a packed storage form, and its name.
const PACKED_NAMES: [(GgmlDType, &str); 7] = [
    (GgmlDType::Q4_0, "q4_0_x8"),
    (GgmlDType::Q4_1, "q4_1_x8"),
    (GgmlDType::Q5_0, "q5_0_x8"),
    (GgmlDType::Q5_1, "q5_1_x8"),
    (GgmlDType::Q8_0, "q8_0_x8"),
    (GgmlDType::Q4K, "q4_k_x8"),
    (GgmlDType::Q6K, "q6_k_x8"),
];

impl StorageDtype {
    /// Bytes that a tensor of `shape` takes in this storage, or why the shape cannot be stored in it. This is
    /// the one place that knows a storage kind's layout; the reader and the writer follow it.
    pub fn byte_len(self, shape: &[usize]) -> std::result::Result<u64, String> {
        let elems = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| "its byte length overflows".to_string())?;
        match self {
            StorageDtype::Blocks(t) | StorageDtype::Packed(t) => {
                let cols = shape.last().copied().unwrap_or(1) as u64;
                let block = t.block_size() as u64;
                if !cols.is_multiple_of(block) {
                    return Err(format!(
                        "rows of {cols} elements are not a whole number of {} blocks ({block} elements)",
                        self.as_str()
                    ));
                }
                if let StorageDtype::Packed(_) = self {
                    let rows = elems / cols.max(1);
                    return match (shape.len(), usize::try_from(rows), usize::try_from(cols)) {
                        (2, Ok(out), Ok(inp)) => crate::kernels::packed::packed_len(t, out, inp).map(|n| n as u64),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        format!(
                            "{} stores 2-D tensors whose rows are a multiple of {}",
                            self.as_str(),
                            crate::kernels::packed::ROWS
                        )
                    });
                }
                (elems / block)
                    .checked_mul(t.type_size() as u64)
                    .ok_or_else(|| "its byte length overflows".to_string())
            }
            _ => elems
                .checked_mul(self.size() as u64)
                .ok_or_else(|| "its byte length overflows".to_string()),
        }
    }

    /// Bytes per element of a float type (0 for block formats, whose size is per block).
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::Bf16 | StorageDtype::F16 => 2,
            StorageDtype::Blocks(_) | StorageDtype::Packed(_) => 0,
        }
    }
    /// The candle dtype values are read as: the float type itself, f32 for block formats (dequantized).
    pub fn dtype(self) -> DType {
        match self {
            StorageDtype::F32 | StorageDtype::Blocks(_) | StorageDtype::Packed(_) => DType::F32,
            StorageDtype::Bf16 => DType::BF16,
            StorageDtype::F16 => DType::F16,
        }
    }
    /// The block type, for block formats (row-major or packed).
    pub fn blocks(self) -> Option<GgmlDType> {
        match self {
            StorageDtype::Blocks(t) | StorageDtype::Packed(t) => Some(t),
            _ => None,
        }
    }
    /// The packed form of a row-major block format, where it has one.
    pub fn packed(self) -> Option<Self> {
        match self {
            StorageDtype::Blocks(t) if PACKED_NAMES.iter().any(|(p, _)| *p == t) => Some(StorageDtype::Packed(t)),
            _ => None,
        }
    }
    /// `f32`, `bf16`, `f16`, `q4_1`, `q4_k`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            StorageDtype::F32 => "f32",
            StorageDtype::Bf16 => "bf16",
            StorageDtype::F16 => "f16",
            StorageDtype::Blocks(t) => crate::model::weight::ggml_name(t),
            StorageDtype::Packed(t) => PACKED_NAMES
                .iter()
                .find(|(p, _)| *p == t)
                .map(|(_, n)| *n)
                .expect("Packed holds a type with a packed form"),
        }
    }
    /// Parses `f32`, `bf16`, `f16`, a block format's name (`q8_0`, `Q4_K`, …) or a packed one (`q4_1_x8`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(StorageDtype::F32),
            "bf16" => Some(StorageDtype::Bf16),
            "f16" => Some(StorageDtype::F16),
            _ => PACKED_NAMES
                .iter()
                .find(|(_, n)| *n == s)
                .map(|(t, _)| StorageDtype::Packed(*t))
                .or_else(|| crate::model::weight::parse_quant(s).map(StorageDtype::Blocks)),
        }
    }
    /// Little-endian bytes of `t` in this storage (block formats quantize the rows as ggml does).
    pub fn tensor_bytes(self, t: &Tensor) -> Result<Vec<u8>> {
        if let StorageDtype::Blocks(q) | StorageDtype::Packed(q) = self {
            let t = t.to_dtype(DType::F32)?;
            let t = if t.rank() == 2 {
                t
            } else {
                t.flatten_to(t.rank().saturating_sub(2))?
            };
            let rows = crate::model::weight::quantize(&t, q)?.data()?.into_owned();
            return Ok(self.pack_rows(rows, t.dims()));
        }
        let flat = t.to_dtype(self.dtype())?.flatten_all()?;
        Ok(match self {
            StorageDtype::F32 => flat.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            StorageDtype::Bf16 => flat
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
            StorageDtype::F16 => flat
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
            StorageDtype::Blocks(_) | StorageDtype::Packed(_) => unreachable!("handled above"),
        })
    }

    /// Row-major ggml blocks of `shape` in this storage: packed for [`StorageDtype::Packed`], as they are
    /// otherwise.
    pub fn pack_rows(self, bytes: Vec<u8>, shape: &[usize]) -> Vec<u8> {
        match (self, shape) {
            (StorageDtype::Packed(t), [out, inp]) => crate::kernels::packed::pack_any(t, &bytes, *out, *inp),
            _ => bytes,
        }
    }

    /// Stored bytes of `shape` in ggml's row-major block layout: unpacked for [`StorageDtype::Packed`], as
    /// they are otherwise.
    pub fn unpack_rows(self, bytes: Vec<u8>, shape: &[usize]) -> Vec<u8> {
        match (self, shape) {
            (StorageDtype::Packed(t), [out, inp]) => crate::kernels::packed::unpack_any(t, &bytes, *out, *inp),
            _ => bytes,
        }
    }
}

/// One row of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// HF tensor name.
    pub name: String,
    /// Storage dtype.
    pub dtype: StorageDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file (a multiple of [`ALIGN`]).
    pub offset: u64,
    /// Byte length.
    pub length: u64,
    /// crc32 of the bytes, 8 lower-case hex digits.
    pub crc32: String,
}

/// What the writer needs to know about a tensor before its bytes exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF tensor name.
    pub name: String,
    /// Storage dtype.
    pub dtype: StorageDtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// The JSON header as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    file_len: u64,
    manifest: serde_json::Value,
    tensors: Vec<TensorEntry>,
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

fn crc_hex(c: u32) -> String {
    format!("{c:08x}")
}

/// Names what a non-engine file looks like, for the "not a dlo engine" message.
fn sniff(bytes: &[u8]) -> String {
    if bytes.starts_with(b"GGUF") {
        return "GGUF magic".into();
    }
    if bytes.starts_with(b"PK\x03\x04") {
        return "a zip archive (a PyTorch .pt/.bin checkpoint?)".into();
    }
    if bytes.starts_with(b"\x89HDF") {
        return "HDF5 magic".into();
    }
    if bytes.len() >= 9 && bytes[8] == b'{' {
        return "a safetensors header".into();
    }
    if bytes.starts_with(b"DLOENGN") {
        return "a damaged dlo magic".into();
    }
    if bytes.first().is_some_and(|b| *b == b'{') {
        return "JSON text".into();
    }
    let hex: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("bytes {}", hex.join(" "))
}

/// An opened engine file: the open file (read with positional reads), the validated tensor table and the
/// raw manifest JSON.
///
/// The file is not memory-mapped: a mapped file that another process truncates while it is read kills the
/// reader with SIGBUS, where a positional read returns an error ("the file ended early"). Tensors are
/// copied into their own storage either way, so reading costs the same single copy.
pub struct EngineFile {
    path: PathBuf,
    file: File,
    manifest: serde_json::Value,
    tensors: Vec<TensorEntry>,
    crcs: Vec<u32>,
    index: HashMap<String, usize>,
    verified: Vec<AtomicBool>,
    /// The file mapped read-only, on first use ([`Self::tensor_mapped`]).
    map: OnceLock<Arc<memmap2::Mmap>>,
}

impl std::fmt::Debug for EngineFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl EngineFile {
    /// Opens `path` and validates the prefix, header checksum, tensor table and padding. Tensor
    /// checksums are checked on first access.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::format(
                path,
                "not a dlo engine: this is a directory (an HF checkpoint? open it as a checkpoint)",
            ));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::format(path, "not a dlo engine: the file is empty"));
        }
        let mut bytes = vec![0u8; len.min(PREFIX_LEN as u64) as usize];
        read_at(&file, path, 0, &mut bytes)?;
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(Error::format(
                path,
                format!("not a dlo engine (found {})", sniff(&bytes)),
            ));
        }
        if bytes.len() < PREFIX_LEN {
            return Err(Error::format(
                path,
                format!(
                    "engine is truncated: {} bytes, shorter than the {PREFIX_LEN}-byte prefix",
                    bytes.len()
                ),
            ));
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u16_at(8);
        if version > FORMAT_VERSION {
            return Err(Error::EngineVersion {
                path: path.into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if version == 0 {
            return Err(Error::format(
                path,
                "engine format version 0 does not exist (corrupt prefix)",
            ));
        }
        let reserved = u16_at(10);
        if reserved != 0 {
            return Err(Error::format(
                path,
                format!("reserved prefix field is {reserved}, must be 0"),
            ));
        }
        let header_len = u32_at(12);
        if header_len > MAX_HEADER_BYTES {
            return Err(Error::format(
                path,
                format!("header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"),
            ));
        }
        let header_end = PREFIX_LEN + header_len as usize;
        if header_end as u64 > len {
            return Err(Error::format(
                path,
                format!(
                    "engine is truncated: the {header_len}-byte header ends at byte {header_end}, the file has {len}"
                ),
            ));
        }
        let stored = u32_at(16);
        let mut header_bytes = vec![0u8; header_len as usize];
        read_at(&file, path, PREFIX_LEN as u64, &mut header_bytes)?;
        let header_bytes = &header_bytes[..];
        let computed = crc32fast::hash(header_bytes);
        if stored != computed {
            return Err(Error::Integrity {
                path: path.into(),
                what: "the manifest (header)".into(),
                expected: stored,
                found: computed,
            });
        }
        let header: Header = serde_json::from_slice(header_bytes)
            .map_err(|e| Error::format(path, format!("header JSON is invalid: {e}")))?;
        if header.file_len != len {
            let problem = if len < header.file_len {
                format!("engine is truncated: {len} bytes, the header says {}", header.file_len)
            } else {
                format!(
                    "engine has {len} bytes, the header says {} (trailing data)",
                    header.file_len
                )
            };
            return Err(Error::format(path, problem));
        }
        if header.tensors.len() > MAX_TENSORS {
            return Err(Error::format(
                path,
                format!("{} tensors exceed the limit of {MAX_TENSORS}", header.tensors.len()),
            ));
        }
        let data_start = align_up(header_end as u64);
        let mut cursor = header_end as u64;
        let mut index = HashMap::with_capacity(header.tensors.len());
        let mut crcs = Vec::with_capacity(header.tensors.len());
        for (i, t) in header.tensors.iter().enumerate() {
            let bad = |p: String| Error::format(path, format!("tensor `{}`: {p}", t.name));
            if t.shape.len() > MAX_RANK {
                return Err(bad(format!("rank {} exceeds the limit of {MAX_RANK}", t.shape.len())));
            }
            let want = t
                .dtype
                .byte_len(&t.shape)
                .map_err(|p| bad(format!("shape {:?}: {p}", t.shape)))?;
            if t.length != want {
                return Err(bad(format!(
                    "length {} does not match shape {:?} of {} ({want} bytes)",
                    t.length,
                    t.shape,
                    t.dtype.as_str()
                )));
            }
            if t.offset % ALIGN != 0 {
                return Err(bad(format!("offset {} is not {ALIGN}-byte aligned", t.offset)));
            }
            if t.offset < data_start || t.offset < cursor {
                return Err(bad(format!(
                    "offset {} overlaps the header or the previous tensor (table must be sorted by offset)",
                    t.offset
                )));
            }
            let end = t.offset.checked_add(t.length).filter(|&e| e <= len).ok_or_else(|| {
                bad(format!(
                    "bytes {}+{} run past the end of the file ({len})",
                    t.offset, t.length
                ))
            })?;
            // Padding between the previous region and this tensor must be zero.
            if !all_zero(&file, path, cursor, t.offset)? {
                return Err(bad("the padding before it is not zero (corrupt file)".into()));
            }
            cursor = end;
            let crc = u32::from_str_radix(&t.crc32, 16)
                .ok()
                .filter(|_| t.crc32.len() == 8)
                .ok_or_else(|| bad(format!("crc32 `{}` is not 8 hex digits", t.crc32)))?;
            crcs.push(crc);
            if index.insert(t.name.clone(), i).is_some() {
                return Err(bad("appears twice in the tensor table".into()));
            }
        }
        if !all_zero(&file, path, cursor, len)? {
            return Err(Error::format(
                path,
                "trailing padding after the last tensor is not zero (corrupt file)",
            ));
        }
        let verified = (0..header.tensors.len()).map(|_| AtomicBool::new(false)).collect();
        Ok(EngineFile {
            path: path.into(),
            file,
            manifest: header.manifest,
            tensors: header.tensors,
            crcs,
            index,
            verified,
            map: OnceLock::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw manifest JSON.
    pub fn manifest_json(&self) -> &serde_json::Value {
        &self.manifest
    }

    /// Moves the manifest JSON out (leaving `null`), so a typed manifest can be built without copying it.
    pub fn take_manifest_json(&mut self) -> serde_json::Value {
        std::mem::take(&mut self.manifest)
    }

    /// The tensor table, sorted by offset.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The table entry of `name`.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `i`, read into a new buffer with their crc32 checked.
    fn bytes_of(&self, i: usize) -> Result<Vec<u8>> {
        let t = &self.tensors[i];
        let mut b = vec![0u8; t.length as usize];
        let found = self.read_and_hash(t.offset, &mut b)?;
        self.check_crc(i, found)?;
        Ok(b)
    }

    /// Reads `dst.len()` bytes at `offset` in parallel 1 MiB chunks and returns their crc32, each chunk
    /// hashed while it is still in cache.
    fn read_and_hash(&self, offset: u64, dst: &mut [u8]) -> Result<u32> {
        use rayon::prelude::*;
        let hashers: Vec<crc32fast::Hasher> = dst
            .par_chunks_mut(HASH_CHUNK)
            .enumerate()
            .map(|(k, d)| {
                read_at(&self.file, &self.path, offset + (k * HASH_CHUNK) as u64, d)?;
                Ok(chunk_hasher(d))
            })
            .collect::<Result<_>>()?;
        Ok(combined(&hashers))
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
        })
    }

    /// The bytes of `name` (a copy), checking its crc32; block formats in ggml's row-major layout (packed
    /// storage is unpacked).
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let i = self.index_of(name)?;
        let t = &self.tensors[i];
        Ok(t.dtype.unpack_rows(self.bytes_of(i)?, &t.shape))
    }

    /// The stored bytes of `name` in place in the file's memory map (mapped on first use), checking their
    /// crc32 (in parallel 1 MiB chunks) on first access. Nothing is copied: the pages come from the page
    /// cache.
    ///
    /// As for any mapped file, truncating the engine while it is in use makes the process fault (SIGBUS);
    /// [`Self::tensor_bytes`] reads a copy instead.
    pub fn tensor_mapped(&self, name: &str) -> Result<(StorageDtype, BlockBytes)> {
        use rayon::prelude::*;
        let i = self.index_of(name)?;
        let map = match self.map.get() {
            Some(m) => m.clone(),
            None => {
                // SAFETY: the map is read-only; see the note on truncation above.
                let m = unsafe { memmap2::Mmap::map(&self.file) }.map_err(|e| Error::io(&self.path, e))?;
                self.map.get_or_init(|| Arc::new(m)).clone()
            }
        };
        let t = &self.tensors[i];
        let (start, len) = (t.offset as usize, t.length as usize);
        let bytes = map
            .get(start..start + len)
            .ok_or_else(|| ended_before(&self.path, (start + len) as u64))?;
        if !self.verified[i].load(Ordering::Relaxed) {
            let hashers: Vec<crc32fast::Hasher> = bytes.par_chunks(HASH_CHUNK).map(chunk_hasher).collect();
            self.check_crc(i, combined(&hashers))?;
        }
        Ok((t.dtype, BlockBytes::Mapped { map, start, len }))
    }

    /// Tensor `name` on `device` in its storage dtype. On the CPU the bytes are read straight into the
    /// tensor's storage in one parallel pass that also computes the crc32.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let i = *self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
        })?;
        let t = &self.tensors[i];
        if let Some(q) = t.dtype.blocks() {
            let b = t.dtype.unpack_rows(self.bytes_of(i)?, &t.shape);
            let q = crate::model::weight::qtensor_from_bytes(&b, q, &t.shape, &Device::Cpu)
                .and_then(|q| q.dequantize(device))
                .map_err(|e| {
                    Error::format(
                        &self.path,
                        format!("tensor `{}`: {}", t.name, crate::error::candle_message(e)),
                    )
                })?;
            return Ok(q);
        }
        if !device.is_cpu() {
            let b = self.bytes_of(i)?;
            return Ok(Tensor::from_raw_buffer(&b, t.dtype.dtype(), &t.shape, device)?);
        }
        let n = t.length as usize / t.dtype.size();
        let tensor = match t.dtype {
            StorageDtype::F32 => {
                let mut v = vec![0f32; n];
                self.check_crc(i, self.read_and_hash(t.offset, as_bytes_mut(&mut v))?)?;
                Tensor::from_vec(v, t.shape.as_slice(), device)?
            }
            StorageDtype::Blocks(_) | StorageDtype::Packed(_) => unreachable!("handled above"),
            StorageDtype::Bf16 | StorageDtype::F16 => {
                use half::vec::HalfBitsVecExt;
                let mut v = vec![0u16; n];
                self.check_crc(i, self.read_and_hash(t.offset, as_bytes_mut(&mut v))?)?;
                if t.dtype == StorageDtype::Bf16 {
                    Tensor::from_vec(v.reinterpret_into::<half::bf16>(), t.shape.as_slice(), device)?
                } else {
                    Tensor::from_vec(v.reinterpret_into::<half::f16>(), t.shape.as_slice(), device)?
                }
            }
        };
        Ok(tensor)
    }

    fn check_crc(&self, i: usize, found: u32) -> Result<()> {
        if found != self.crcs[i] {
            return Err(Error::Integrity {
                path: self.path.clone(),
                what: format!("tensor `{}`", self.tensors[i].name),
                expected: self.crcs[i],
                found,
            });
        }
        self.verified[i].store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Checks the crc32 of every tensor now (those already verified are skipped), reading each in 16 MiB
    /// pieces through one buffer.
    pub fn verify(&self) -> Result<()> {
        const PIECE: u64 = 16 << 20;
        for (i, t) in self.tensors.iter().enumerate() {
            if self.verified[i].load(Ordering::Relaxed) {
                continue;
            }
            let mut buf = vec![0u8; PIECE.min(t.length) as usize];
            let mut total = crc32fast::Hasher::new();
            for start in (0..t.length).step_by(PIECE as usize) {
                let piece = &mut buf[..PIECE.min(t.length - start) as usize];
                let crc = self.read_and_hash(t.offset + start, piece)?;
                total.combine(&crc32fast::Hasher::new_with_initial_len(crc, piece.len() as u64));
            }
            self.check_crc(i, total.finalize())?;
        }
        Ok(())
    }
}

/// Element types whose every bit pattern is valid and that have no padding.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u16 {}

/// The bytes of a slice of plain numbers.
fn as_bytes_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: `T` is f32 or u16: initialised, no padding, valid for any bit pattern; u8 has alignment 1
    // and the length covers exactly the slice's memory.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Reads `buf.len()` bytes of `file` at `offset`. A file that ends early (truncated or replaced while it
/// is read) is a format error saying so.
fn read_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    #[cfg(unix)]
    let r = std::os::unix::fs::FileExt::read_exact_at(file, buf, offset);
    #[cfg(windows)]
    let r = (|| {
        let (mut done, mut buf) = (0u64, buf);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_read(file, buf, offset + done)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => {
                    done += n as u64;
                    buf = &mut buf[n..];
                }
            }
        }
        Ok(())
    })();
    r.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ended_before(path, offset + buf.len() as u64),
        _ => Error::io(path, e),
    })
}

/// The error for an engine shorter than its tensor table says (another process truncated or replaced it).
fn ended_before(path: &Path, byte: u64) -> Error {
    Error::format(
        path,
        format!("the file ended before byte {byte}: it was truncated or replaced while being read"),
    )
}

/// Whether bytes `from..to` of `file` are all zero (padding), read in 64 KiB pieces.
fn all_zero(file: &File, path: &Path, from: u64, to: u64) -> Result<bool> {
    let mut buf = vec![0u8; (to.saturating_sub(from)).min(64 << 10) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(buf.len() as u64) as usize;
        read_at(file, path, at, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Removes a temporary file unless disarmed.
/// Writes an engine to `path`: the manifest JSON and the tensors `specs`, whose bytes `data(i)` yields one
/// at a time (little-endian, exactly `product(shape) × dtype size` bytes). Streams into a temporary file
/// in the same directory and renames it into place. Returns the file size.
pub fn write_engine(
    path: &Path,
    manifest: &serde_json::Value,
    specs: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    if specs.len() > MAX_TENSORS {
        return Err(Error::InvalidArgument(format!(
            "{} tensors exceed the engine limit of {MAX_TENSORS}",
            specs.len()
        )));
    }
    // Lay out the tensors with placeholder checksums: the crc32 field has a fixed width, so the header
    // length (and therefore every offset) does not change when the real values are patched in.
    let mut header = Header {
        file_len: 0,
        manifest: manifest.clone(),
        tensors: Vec::with_capacity(specs.len()),
    };
    for s in specs {
        if s.shape.len() > MAX_RANK {
            return Err(Error::InvalidArgument(format!(
                "tensor `{}` has rank above {MAX_RANK}",
                s.name
            )));
        }
        let length = s
            .dtype
            .byte_len(&s.shape)
            .map_err(|p| Error::InvalidArgument(format!("tensor `{}` of shape {:?}: {p}", s.name, s.shape)))?;
        header.tensors.push(TensorEntry {
            name: s.name.clone(),
            dtype: s.dtype,
            shape: s.shape.clone(),
            offset: 0,
            length,
            crc32: crc_hex(0),
        });
    }
    // `file_len` is itself in the header: iterate until the layout is stable (twice at most).
    let mut header_len = 0usize;
    for _ in 0..4 {
        let mut off = align_up((PREFIX_LEN + header_len) as u64);
        for t in &mut header.tensors {
            t.offset = off;
            off = align_up(off + t.length);
        }
        let last_end = header.tensors.last().map(|t| t.offset + t.length);
        header.file_len = last_end.unwrap_or(align_up((PREFIX_LEN + header_len) as u64));
        let json = serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(format!("manifest: {e}")))?;
        if json.len() == header_len {
            break;
        }
        header_len = json.len();
    }
    if header_len > MAX_HEADER_BYTES as usize {
        return Err(Error::InvalidArgument(format!(
            "engine header of {header_len} bytes exceeds the limit of {MAX_HEADER_BYTES}"
        )));
    }
    if path.file_name().is_none() {
        return Err(Error::InvalidArgument(format!("{}: not a file path", path.display())));
    }
    let mut out = AtomicFile::create(path)?;
    let tmp = out.temp_path().to_path_buf();
    let io = |e| Error::io(&tmp, e);
    let mut w = BufWriter::with_capacity(1 << 20, out.file());
    w.write_all(&[0u8; PREFIX_LEN]).map_err(io)?;
    w.write_all(&vec![b' '; header_len]).map_err(io)?;
    let mut pos = (PREFIX_LEN + header_len) as u64;
    for i in 0..specs.len() {
        let bytes = data(i)?;
        let t = &mut header.tensors[i];
        if bytes.len() as u64 != t.length {
            return Err(Error::InvalidArgument(format!(
                "tensor `{}`: got {} bytes, its shape {:?} of {} needs {}",
                t.name,
                bytes.len(),
                t.shape,
                t.dtype.as_str(),
                t.length
            )));
        }
        w.write_all(&vec![0u8; (t.offset - pos) as usize]).map_err(io)?;
        w.write_all(&bytes).map_err(io)?;
        t.crc32 = crc_hex(crc32fast::hash(&bytes));
        pos = t.offset + t.length;
    }
    if pos < header.file_len {
        w.write_all(&vec![0u8; (header.file_len - pos) as usize]).map_err(io)?;
    }
    let json = serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(format!("manifest: {e}")))?;
    if json.len() != header_len {
        return Err(Error::InvalidArgument(
            "engine header changed length while writing".into(),
        ));
    }
    let mut prefix = Vec::with_capacity(PREFIX_LEN);
    prefix.extend_from_slice(MAGIC);
    prefix.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    prefix.extend_from_slice(&0u16.to_le_bytes());
    prefix.extend_from_slice(&(header_len as u32).to_le_bytes());
    prefix.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.write_all(&prefix).map_err(io)?;
    f.write_all(&json).map_err(io)?;
    out.commit()?;
    Ok(header.file_len)
}
