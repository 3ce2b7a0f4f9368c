//! Projection weights: how a `[out, in]` weight is stored, and so how a projection multiplies by it.
//!
//! [`Weight`] is the seam between the model definition and weight formats: the layers only call
//! [`Weight::matmul`], and the weight picks the kernel for its storage, its device and the input's row count
//! (the CPU decode matvec for a few rows, candle's GEMM otherwise). Two kinds exist:
//! - dense f32/bf16/f16/f64 tensors ([`DenseWeight`]), the only kind training and lowering use;
//! - ggml block-quantized weights ([`QuantWeight`]: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants), kept in
//!   their blocks and multiplied by candle's quantized kernels, which quantize the activations per row as
//!   ggml does.
//!
//! The loaders ([`crate::Weights::weight`]) decide which kind a tensor becomes; the model code does not
//! change with the kind (see docs/pipeline.md, "adding a weight format").

use crate::kernels;
use crate::kernels::quant::BlockType;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// From this many input rows on, a CPU product runs as `x Wᵀ` rather than `(W xᵀ)ᵀ`: GEMM's tiles are full
/// either way, and the output needs no transposing copy. SmolLM2-DLO engine, 512-token prefill, 2-core
/// Sapphire Rapids: 545–574 → 578–592 tokens/s with every unit on, 715–736 → 740–751 at budget 0.5 (MLP
/// gathers of ~240 rows stay on the transposed form).
pub const TRANSPOSED_MAX_ROWS: usize = 256;

/// The storage of a [`Weight`]: what its bytes are and so which kernels apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    /// A dense tensor of this dtype.
    Dense(DType),
    /// ggml blocks of this type.
    Quantized(GgmlDType),
}

impl WeightKind {
    /// Lower-case name: `f32`, `bf16`, `q4_1`, `q4_k`, ….
    pub fn name(self) -> String {
        match self {
            WeightKind::Dense(dt) => dt.as_str().to_string(),
            WeightKind::Quantized(q) => ggml_name(q).to_string(),
        }
    }
}

impl std::fmt::Display for WeightKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A projection weight `W: [out, in]`, used as `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense candle tensor (possibly a training variable).
    Dense(DenseWeight),
    /// ggml blocks, multiplied without dequantizing.
    Quantized(QuantWeight),
}

/// A block-quantized weight `[out, in]` (possibly a row range of a larger one: what [`Weight::cat_rows`]
/// leaves in the parts of a fused projection).
#[derive(Debug, Clone)]
pub struct QuantWeight {
    ty: GgmlDType,
    out: usize,
    inp: usize,
    data: QData,
}

#[derive(Debug, Clone)]
enum QData {
    /// The 32-element block formats, multiplied by [`kernels::quant`] straight from `bytes[start..]`, or by
    /// [`kernels::packed`] when `packed` (eight-row interleaved groups; `start` and the row count are then
    /// multiples of 8 rows).
    Blocks {
        ty: BlockType,
        bytes: Arc<BlockBytes>,
        start: usize,
        packed: bool,
    },
    /// Q4_K or Q6_K in eight-row groups ([`kernels::packed::pack_q4k`], [`kernels::packed::pack_q6k`]), from
    /// `bytes[start..]` (a whole number of groups).
    PackedK { bytes: Arc<BlockBytes>, start: usize },
    /// The other k-quants, multiplied by candle's kernels; `rows` is this weight's range of `q`'s rows.
    Candle {
        q: Arc<QTensor>,
        rows: Option<(usize, usize)>,
    },
}

/// The bytes of ggml blocks: owned, or a range of a read-only memory map (an engine file used in place).
#[derive(Debug)]
pub enum BlockBytes {
    /// Read into memory.
    Owned(Vec<u8>),
    /// `map[start..start + len]`.
    Mapped {
        /// The mapped file.
        map: Arc<memmap2::Mmap>,
        /// First byte.
        start: usize,
        /// Length.
        len: usize,
    },
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BlockBytes::Owned(v) => v,
            BlockBytes::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

/// A dense weight and its kernel choice.
#[derive(Debug, Clone)]
pub struct DenseWeight {
    /// `[out, in]`.
    pub tensor: Tensor,
    /// Whether a few-row product on the CPU may use the decode matvec ([`kernels::matvec`]);
    /// [`crate::RuntimeOptions::matvec`].
    pub matvec: bool,
}

impl Weight {
    /// A dense weight with the default kernels.
    pub fn dense(tensor: Tensor) -> Self {
        Weight::Dense(DenseWeight { tensor, matvec: true })
    }

    /// A quantized weight from a candle tensor `[out, in]` (the 32-element block formats are moved to our
    /// kernels' storage).
    pub fn quantized(q: QTensor) -> candle_core::Result<Self> {
        let (out, inp) = q.shape().dims2()?;
        let ty = q.dtype();
        if BlockType::of(ty).is_some() || packs_k(ty, out) {
            return Self::from_blocks(ty, out, inp, BlockBytes::Owned(q.data()?.into_owned()));
        }
        Ok(Self::candle(q, out, inp))
    }

    fn candle(q: QTensor, out: usize, inp: usize) -> Self {
        let ty = q.dtype();
        Weight::Quantized(QuantWeight {
            ty,
            out,
            inp,
            data: QData::Candle {
                q: Arc::new(q),
                rows: None,
            },
        })
    }

    /// A quantized weight `[out, in]` of ggml type `ty` from its raw blocks. Errors (never panics) when the
    /// type is not one we multiply, the rows are not whole blocks, or the byte count is not the shape's.
    pub fn from_blocks(ty: GgmlDType, out: usize, inp: usize, bytes: BlockBytes) -> candle_core::Result<Self> {
        check_blocks(ty, out, inp, bytes.len())?;
        if packs_k(ty, out) {
            let packed = if ty == GgmlDType::Q4K {
                kernels::packed::pack_q4k(&bytes, out, inp)
            } else {
                kernels::packed::pack_q6k(&bytes, out, inp)
            };
            return Ok(Weight::Quantized(QuantWeight {
                ty,
                out,
                inp,
                data: QData::PackedK {
                    bytes: Arc::new(BlockBytes::Owned(packed)),
                    start: 0,
                },
            }));
        }
        let Some(bt) = BlockType::of(ty) else {
            return Ok(Self::candle(
                qtensor_from_bytes(&bytes, ty, &[out, inp], &Device::Cpu)?,
                out,
                inp,
            ));
        };
        // Eight-row interleaved blocks where the CPU has the kernel for them (kernels::packed).
        if kernels::packed::available() && out.is_multiple_of(kernels::packed::ROWS) {
            let packed = kernels::packed::pack(bt, &bytes, out, inp);
            return Ok(Self::blocks_weight(ty, bt, out, inp, BlockBytes::Owned(packed), true));
        }
        Ok(Self::blocks_weight(ty, bt, out, inp, bytes, false))
    }

    /// A quantized weight `[out, in]` of ggml type `ty` from blocks already in [`kernels::packed`]'s layout (an
    /// engine's `q4_1_x8`, `q4_k_x8`, …): used as they are where the CPU has the packed kernels (so a
    /// memory-mapped engine's bytes are used in place), unpacked to ggml's rows otherwise.
    pub fn from_packed(ty: GgmlDType, out: usize, inp: usize, bytes: BlockBytes) -> candle_core::Result<Self> {
        let want = kernels::packed::packed_len(ty, out, inp)
            .ok_or_else(|| candle_core::Error::Msg(format!("no packed {} layout for [{out}, {inp}]", ggml_name(ty))))?;
        if bytes.len() != want {
            candle_core::bail!(
                "{} bytes of packed {} blocks for shape [{out}, {inp}], which needs {want}",
                bytes.len(),
                ggml_name(ty)
            );
        }
        if !kernels::packed::available() {
            let rows = kernels::packed::unpack_any(ty, &bytes, out, inp);
            return Self::from_blocks(ty, out, inp, BlockBytes::Owned(rows));
        }
        Ok(match BlockType::of(ty) {
            Some(bt) => Self::blocks_weight(ty, bt, out, inp, bytes, true),
            None => Weight::Quantized(QuantWeight {
                ty,
                out,
                inp,
                data: QData::PackedK {
                    bytes: Arc::new(bytes),
                    start: 0,
                },
            }),
        })
    }

    fn blocks_weight(ty: GgmlDType, bt: BlockType, out: usize, inp: usize, bytes: BlockBytes, packed: bool) -> Self {
        Weight::Quantized(QuantWeight {
            ty,
            out,
            inp,
            data: QData::Blocks {
                ty: bt,
                bytes: Arc::new(bytes),
                start: 0,
                packed,
            },
        })
    }

    /// Whether the weight's bytes are used in place from a memory-mapped file (an engine's packed blocks).
    pub fn in_place(&self) -> bool {
        match self {
            Weight::Quantized(QuantWeight {
                data: QData::Blocks { bytes, .. } | QData::PackedK { bytes, .. },
                ..
            }) => matches!(**bytes, BlockBytes::Mapped { .. }),
            _ => false,
        }
    }

    /// What the weight is stored as.
    pub fn kind(&self) -> WeightKind {
        match self {
            Weight::Dense(d) => WeightKind::Dense(d.tensor.dtype()),
            Weight::Quantized(q) => WeightKind::Quantized(q.ty),
        }
    }

    /// The dense tensor, for code that needs the values themselves (training, checkpoint writing,
    /// lowering); `None` for a kind without one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(d) => Some(&d.tensor),
            Weight::Quantized(_) => None,
        }
    }

    /// The values as a dense tensor in `dtype` (quantized blocks are dequantized).
    pub fn to_dense(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(d) => d.tensor.to_dtype(dtype),
            Weight::Quantized(q) => q.dequantize()?.to_dtype(dtype),
        }
    }

    /// Output features (rows of `W`).
    pub fn out_features(&self) -> candle_core::Result<usize> {
        match self {
            Weight::Dense(d) => d.tensor.dim(0),
            Weight::Quantized(q) => Ok(q.out),
        }
    }

    /// Bytes the weight's storage takes (a row view counts its share of the rows).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::Dense(d) => d.tensor.elem_count() * d.tensor.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.out * q.inp / q.ty.block_size() * q.ty.type_size(),
        }
    }

    /// Whether the weight is a training variable (the optimiser updates it in place).
    pub fn is_variable(&self) -> bool {
        match self {
            Weight::Dense(d) => d.tensor.is_variable(),
            Weight::Quantized(_) => false,
        }
    }

    /// `x: [rows, in]` → `x Wᵀ: [rows, out]`, in x's dtype.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(d) => d.matmul(x),
            Weight::Quantized(q) => q.matmul(x),
        }
    }

    /// Rows `ids` of `W` (an embedding lookup): `[ids.len(), in]` in `dtype`. Quantized rows are dequantized
    /// one at a time, so the table stays in its blocks.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(d) => d.tensor.index_select(ids, 0)?.to_dtype(dtype),
            Weight::Quantized(q) => q.rows(ids)?.to_dtype(dtype),
        }
    }

    /// The weights `parts` stacked along the output axis (`[Σ out, in]`), so that projections reading the same
    /// input run as one product; `None` when their kinds cannot be stacked.
    pub(crate) fn cat_rows(parts: &[&Weight]) -> candle_core::Result<Option<Weight>> {
        if parts.iter().all(|p| matches!(p, Weight::Quantized(_))) {
            return QuantWeight::cat_rows(parts);
        }
        let mut dense = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                Weight::Dense(d) => dense.push(d),
                Weight::Quantized(_) => return Ok(None),
            }
        }
        let matvec = dense.iter().all(|d| d.matvec);
        let tensor = Tensor::cat(&dense.iter().map(|d| &d.tensor).collect::<Vec<_>>(), 0)?;
        Ok(Some(Weight::Dense(DenseWeight { tensor, matvec })))
    }

    /// Rows `off..off + n` of the output axis, sharing storage where the kind allows.
    pub(crate) fn narrow_rows(&self, off: usize, n: usize) -> candle_core::Result<Weight> {
        match self {
            Weight::Dense(d) => Ok(Weight::Dense(DenseWeight {
                tensor: d.tensor.narrow(0, off, n)?,
                matvec: d.matvec,
            })),
            Weight::Quantized(q) => {
                if off + n > q.out {
                    candle_core::bail!("rows {off}..{} of a {}-row weight", off + n, q.out);
                }
                let data = match &q.data {
                    QData::Blocks { ty, packed: true, .. }
                        if !(off.is_multiple_of(kernels::packed::ROWS) && n.is_multiple_of(kernels::packed::ROWS)) =>
                    {
                        // Rows that split a packed group: copy them out in ggml's row layout.
                        let (_, w, _) = q.blocks().expect("block data");
                        let rb = ty.row_bytes(q.inp);
                        let mut bytes = vec![0u8; n * rb];
                        for (r, dst) in bytes.chunks_exact_mut(rb).enumerate() {
                            kernels::packed::unpack_row(*ty, w, off + r, q.inp, dst);
                        }
                        return Ok(Self::blocks_weight(
                            q.ty,
                            *ty,
                            n,
                            q.inp,
                            BlockBytes::Owned(bytes),
                            false,
                        ));
                    }
                    QData::Blocks {
                        ty,
                        bytes,
                        start,
                        packed,
                    } => QData::Blocks {
                        ty: *ty,
                        bytes: bytes.clone(),
                        start: start + off * ty.row_bytes(q.inp),
                        packed: *packed,
                    },
                    QData::PackedK { bytes, start } if off.is_multiple_of(8) && n.is_multiple_of(8) => QData::PackedK {
                        bytes: bytes.clone(),
                        start: start + off / 8 * q.inp / kernels::packed::QK_K * k_group_bytes(q.ty),
                    },
                    QData::PackedK { .. } => {
                        let rows = q.ggml_rows(off, n)?;
                        return Weight::quantized(qtensor_from_bytes(&rows, q.ty, &[n, q.inp], &Device::Cpu)?);
                    }
                    QData::Candle { q: t, rows } => QData::Candle {
                        q: t.clone(),
                        rows: Some((rows.map_or(0, |(o, _)| o) + off, n)),
                    },
                };
                Ok(Weight::Quantized(QuantWeight {
                    out: n,
                    data,
                    ..q.clone()
                }))
            }
        }
    }
}

impl QuantWeight {
    /// The block type.
    pub fn dtype(&self) -> GgmlDType {
        self.ty
    }

    /// This weight's bytes, for the 32-element block formats, and whether they are packed.
    fn blocks(&self) -> Option<(BlockType, &[u8], bool)> {
        match &self.data {
            QData::Blocks {
                ty,
                bytes,
                start,
                packed,
            } => Some((*ty, &bytes[*start..*start + self.out * ty.row_bytes(self.inp)], *packed)),
            QData::PackedK { .. } | QData::Candle { .. } => None,
        }
    }

    /// Packed k-quant bytes of this weight.
    fn packed_k(&self) -> Option<&[u8]> {
        match &self.data {
            QData::PackedK { bytes, start } => {
                let len = self.out / 8 * self.inp / kernels::packed::QK_K * k_group_bytes(self.ty);
                Some(&bytes[*start..*start + len])
            }
            _ => None,
        }
    }

    /// Rows `off..off + n` of a packed k-quant weight in ggml's block layout.
    fn ggml_rows(&self, off: usize, n: usize) -> candle_core::Result<Vec<u8>> {
        let w = self
            .packed_k()
            .ok_or_else(|| candle_core::Error::Msg("not a packed k-quant weight".into()))?;
        let rb = self.inp / self.ty.block_size() * self.ty.type_size();
        let mut out = vec![0u8; n * rb];
        for (r, dst) in out.chunks_exact_mut(rb).enumerate() {
            if self.ty == GgmlDType::Q4K {
                kernels::packed::unpack_row_q4k(w, off + r, self.inp, dst);
            } else {
                kernels::packed::unpack_row_q6k(w, off + r, self.inp, dst);
            }
        }
        Ok(out)
    }

    /// `x Wᵀ` on f32 activations (bf16/f16 inputs are widened and the result narrowed back): our kernels
    /// for the 32-element block formats, candle's for the k-quants. A row view of a k-quant computes the
    /// whole product and keeps its columns (views exist only in the parts of a fused projection, which
    /// inference does not call).
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let xf = if dt == DType::F32 {
            x.contiguous()?
        } else {
            x.to_dtype(DType::F32)?
        };
        let y = match &self.data {
            QData::Blocks { .. } => {
                let (ty, w, packed) = self.blocks().expect("block data");
                self.run_f32(&xf, |v, rows| {
                    if packed {
                        let act = kernels::quant::quantize_activations(v, self.inp);
                        kernels::packed::matmul(ty, w, self.out, self.inp, &act, rows)
                    } else {
                        kernels::quant::matmul(ty, w, self.out, self.inp, v, rows)
                    }
                })?
            }
            QData::PackedK { .. } => {
                let w = self.packed_k().expect("packed data");
                self.run_f32(&xf, |v, rows| {
                    let act = kernels::quant::quantize_activations(v, self.inp);
                    if self.ty == GgmlDType::Q4K {
                        kernels::packed::matmul_q4k(w, self.out, self.inp, &act, rows)
                    } else {
                        kernels::packed::matmul_q6k(w, self.out, self.inp, &act, rows)
                    }
                })?
            }
            QData::Candle { q, rows } => {
                let y = xf.apply_op1_no_bwd(q.as_ref())?;
                match rows {
                    Some((off, n)) => y.narrow(1, *off, *n)?.contiguous()?,
                    None => y,
                }
            }
        };
        y.to_dtype(dt)
    }

    /// `f(x, rows)` on the values of a contiguous f32 CPU tensor `x: [rows, in]`, its result as `[rows, out]`.
    fn run_f32(&self, x: &Tensor, f: impl FnOnce(&[f32], usize) -> Vec<f32>) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let (st, layout) = x.storage_and_layout();
        let y = match (&*st, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => f(&v[a..b], rows),
            _ => candle_core::bail!("quantized weights run on the CPU"),
        };
        drop(st);
        Tensor::from_vec(y, (rows, self.out), x.device())
    }

    /// Rows `ids` dequantized to f32: `[ids.len(), in]`.
    fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.data {
            QData::Blocks { .. } => {
                let (ty, w, packed) = self.blocks().expect("block data");
                let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
                let rb = ty.row_bytes(self.inp);
                let mut out = vec![0f32; ids.len() * self.inp];
                let mut row = vec![0u8; rb];
                for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.inp)) {
                    let id = id as usize;
                    if id >= self.out {
                        candle_core::bail!("row {id} of a {}-row weight", self.out);
                    }
                    if packed {
                        kernels::packed::unpack_row(ty, w, id, self.inp, &mut row);
                        kernels::quant::dequantize_row(ty, &row, dst);
                    } else {
                        kernels::quant::dequantize_row(ty, &w[id * rb..(id + 1) * rb], dst);
                    }
                }
                Tensor::from_vec(out, (ids.len(), self.inp), &Device::Cpu)
            }
            QData::PackedK { .. } => {
                let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
                let mut out = Vec::with_capacity(ids.len() * self.inp);
                for &id in &ids {
                    if id as usize >= self.out {
                        candle_core::bail!("row {id} of a {}-row weight", self.out);
                    }
                    let row = self.ggml_rows(id as usize, 1)?;
                    let q = qtensor_from_bytes(&row, self.ty, &[1, self.inp], &Device::Cpu)?;
                    out.extend(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
                }
                Tensor::from_vec(out, (ids.len(), self.inp), &Device::Cpu)
            }
            QData::Candle { q, rows: None } => q.embedding(ids),
            QData::Candle { .. } => candle_core::bail!("row lookup in a row view of a quantized weight"),
        }
    }

    /// All values as an f32 `[out, in]` tensor.
    fn dequantize(&self) -> candle_core::Result<Tensor> {
        match &self.data {
            QData::Blocks { .. } => {
                let ids = Tensor::arange(0u32, self.out as u32, &Device::Cpu)?;
                self.rows(&ids)
            }
            QData::PackedK { .. } => {
                let rows = self.ggml_rows(0, self.out)?;
                qtensor_from_bytes(&rows, self.ty, &[self.out, self.inp], &Device::Cpu)?.dequantize(&Device::Cpu)
            }
            QData::Candle { q, rows } => {
                let t = q.dequantize(&Device::Cpu)?;
                match rows {
                    Some((off, n)) => t.narrow(0, *off, *n),
                    None => Ok(t),
                }
            }
        }
    }

    /// Whole quantized weights of one block type stacked along the output axis: their blocks concatenated
    /// (rows are independent runs of blocks). `None` for k-quants or mixed types.
    fn cat_rows(parts: &[&Weight]) -> candle_core::Result<Option<Weight>> {
        let mut qs = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                Weight::Quantized(q) if q.blocks().is_some() => qs.push(q),
                _ => return Ok(None),
            }
        }
        let Some(first) = qs.first() else { return Ok(None) };
        let (bt, _, packed) = first.blocks().expect("block data");
        if qs
            .iter()
            .any(|q| q.ty != first.ty || q.inp != first.inp || q.blocks().expect("block data").2 != packed)
        {
            return Ok(None);
        }
        let out = qs.iter().map(|q| q.out).sum();
        // Parts that lie back to back in one memory map (an engine's q/k/v, gate/up) stay in place.
        if let Some(bytes) = adjacent_in_map(&qs) {
            return Ok(Some(Weight::blocks_weight(first.ty, bt, out, first.inp, bytes, packed)));
        }
        let mut bytes = Vec::new();
        for q in &qs {
            bytes.extend_from_slice(q.blocks().expect("block data").1);
        }
        // Packed parts are whole groups, so their concatenation is the packed stack.
        Ok(Some(Weight::blocks_weight(
            first.ty,
            bt,
            out,
            first.inp,
            BlockBytes::Owned(bytes),
            packed,
        )))
    }
}

/// One mapped range covering `parts` when their bytes are consecutive ranges of the same memory map.
fn adjacent_in_map(parts: &[&QuantWeight]) -> Option<BlockBytes> {
    let mut range: Option<(&Arc<memmap2::Mmap>, usize, usize)> = None;
    for q in parts {
        let QData::Blocks { bytes, start, .. } = &q.data else {
            return None;
        };
        let BlockBytes::Mapped { map, start: base, .. } = &**bytes else {
            return None;
        };
        let (from, len) = (base + start, q.blocks()?.1.len());
        range = match range {
            None => Some((map, from, len)),
            Some((m, s, l)) if Arc::ptr_eq(m, map) && s + l == from => Some((m, s, l + len)),
            _ => return None,
        };
    }
    range.map(|(map, start, len)| BlockBytes::Mapped {
        map: map.clone(),
        start,
        len,
    })
}

/// Whether a `ty` weight of `out` rows is repacked for [`kernels::packed::matmul_q4k`] / `matmul_q6k`.
fn packs_k(ty: GgmlDType, out: usize) -> bool {
    matches!(ty, GgmlDType::Q4K | GgmlDType::Q6K)
        && out.is_multiple_of(kernels::packed::ROWS)
        && kernels::packed::available()
}

/// Bytes of one packed eight-row super block of a k-quant.
fn k_group_bytes(ty: GgmlDType) -> usize {
    if ty == GgmlDType::Q4K {
        kernels::packed::Q4K_GROUP_BLOCK
    } else {
        kernels::packed::Q6K_GROUP_BLOCK
    }
}

/// `bytes` are exactly the blocks of an `[out, inp]` tensor of ggml type `ty`, whose rows are whole blocks.
fn check_blocks(ty: GgmlDType, out: usize, inp: usize, bytes: usize) -> candle_core::Result<()> {
    if !inp.is_multiple_of(ty.block_size()) {
        candle_core::bail!(
            "rows of {inp} elements are not a whole number of {} blocks ({} elements each)",
            ggml_name(ty),
            ty.block_size()
        );
    }
    let want = out * inp / ty.block_size() * ty.type_size();
    if bytes != want {
        candle_core::bail!(
            "{bytes} bytes of {} blocks for shape [{out}, {inp}], which needs {want}",
            ggml_name(ty)
        );
    }
    Ok(())
}

/// A [`QTensor`] of `shape` and block type `dtype` from its raw ggml bytes (copied). Checks that the bytes
/// are exactly the shape's blocks, so candle's reader (which asserts) cannot panic.
pub fn qtensor_from_bytes(
    bytes: &[u8],
    dtype: GgmlDType,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<QTensor> {
    let cols = shape.last().copied().unwrap_or(0);
    let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
    check_blocks(dtype, rows, cols, bytes.len())?;
    // candle views the bytes as blocks and asserts their alignment; copy to 8-byte-aligned memory if needed.
    let storage = if (bytes.as_ptr() as usize).is_multiple_of(8) {
        QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?
    } else {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        let view = words_as_bytes_mut(&mut words);
        view[..bytes.len()].copy_from_slice(bytes);
        QStorage::from_data(Cow::Borrowed(&view[..bytes.len()]), device, dtype)?
    };
    QTensor::new(storage, shape)
}

/// A `u64` buffer as bytes (for reading block data into 8-byte-aligned memory).
pub(crate) fn words_as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements, and the length covers exactly the words.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) }
}

/// ggml block types a [`QuantWeight`] may hold (those candle multiplies on the CPU), with their names.
pub const QUANT_TYPES: &[(GgmlDType, &str)] = &[
    (GgmlDType::Q4_0, "q4_0"),
    (GgmlDType::Q4_1, "q4_1"),
    (GgmlDType::Q5_0, "q5_0"),
    (GgmlDType::Q5_1, "q5_1"),
    (GgmlDType::Q8_0, "q8_0"),
    (GgmlDType::Q2K, "q2_k"),
    (GgmlDType::Q3K, "q3_k"),
    (GgmlDType::Q4K, "q4_k"),
    (GgmlDType::Q5K, "q5_k"),
    (GgmlDType::Q6K, "q6_k"),
];

/// The lower-case ggml name of a block type (`q4_1`), or the float dtypes' names.
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q8K => "q8_k",
        other => QUANT_TYPES.iter().find(|(q, _)| *q == other).map_or("?", |(_, n)| n),
    }
}

/// The block type named `name` (`q4_1`, `Q4_K`, …), among [`QUANT_TYPES`].
pub fn parse_quant(name: &str) -> Option<GgmlDType> {
    let lower = name.to_ascii_lowercase();
    QUANT_TYPES.iter().find(|(_, n)| *n == lower).map(|(q, _)| *q)
}

/// The ggml fallback llama.cpp uses when a row length is not a multiple of a k-quant's 256-element super
/// block (SmolLM2's 576): Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; other types map to
/// themselves. Returns the type to use for rows of `cols` elements, or `None` if even the fallback does not
/// divide them.
pub fn quant_for_row(t: GgmlDType, cols: usize) -> Option<GgmlDType> {
    let t = if cols.is_multiple_of(t.block_size()) {
        t
    } else {
        match t {
            GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        }
    };
    cols.is_multiple_of(t.block_size()).then_some(t)
}

/// Quantizes a dense `[out, in]` tensor to `t` on `device`'s CPU form (the input is read as f32).
pub fn quantize(w: &Tensor, t: GgmlDType) -> candle_core::Result<QTensor> {
    let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    QTensor::quantize(&w, t)
}

impl DenseWeight {
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, inp) = x.dims2()?;
        let w = &self.tensor;
        if let Some(y) = self.matvec(x, rows, inp)? {
            return Ok(y);
        }
        if x.device().is_cpu() && x.dtype() == DType::BF16 && !w.track_op() {
            // candle's CPU bf16 GEMM is slow; widening to f32 (as PyTorch's CPU kernels accumulate anyway)
            // is several times faster for prefill-sized inputs.
            return x
                .to_dtype(DType::F32)?
                .matmul(&w.to_dtype(DType::F32)?.t()?)?
                .to_dtype(DType::BF16);
        }
        if x.device().is_cpu() && !w.track_op() && rows < TRANSPOSED_MAX_ROWS {
            // On CPU compute (W xᵀ)ᵀ for up to a few hundred rows: the rows land on GEMM's narrow column tile
            // instead of its tall row tile, so a gathered subset of rows (routed MLPs) costs in proportion to
            // its size. Not for training variables: there the output's transposing copy, and its copy again in
            // the backward pass, cost more than the orientation gains (a SmolLM2 training step runs 1.3x
            // faster without them).
            return transposed(&w.matmul(&x.t()?)?);
        }
        x.matmul(&w.t()?)
    }

    /// The decode fast path ([`kernels::matvec`]) for a few rows on CPU, outside autograd.
    /// `None` when it does not apply (turned off, GPU, many rows, a tracked variable, other dtypes).
    fn matvec(&self, x: &Tensor, rows: usize, inp: usize) -> candle_core::Result<Option<Tensor>> {
        use candle_core::{CpuStorage, Storage};
        let w = &self.tensor;
        if !self.matvec
            || rows > kernels::MAX_ROWS
            || !x.device().is_cpu()
            || w.track_op()
            || x.track_op()
            || !w.is_contiguous()
            || x.dtype() != w.dtype()
        {
            return Ok(None);
        }
        let out = w.dim(0)?;
        let (st, layout) = w.storage_and_layout();
        let off = layout.start_offset();
        let y = match (&*st, x.dtype()) {
            (Storage::Cpu(CpuStorage::F32(w)), DType::F32) => {
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                kernels::matvec(&w[off..off + out * inp], &xs, rows, out, inp)
            }
            (Storage::Cpu(CpuStorage::BF16(w)), DType::BF16) => {
                let xs: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                kernels::matvec(&w[off..off + out * inp], &xs, rows, out, inp)
            }
            _ => return Ok(None),
        };
        drop(st);
        Ok(Some(Tensor::from_vec(y, (rows, out), x.device())?.to_dtype(x.dtype())?))
    }
}

/// The transpose of a 2-D tensor, contiguous: [`kernels::transpose`] for a contiguous f32 CPU tensor (exact,
/// so results are the same bits as candle's strided copy), candle's copy otherwise.
fn transposed(t: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    let (rows, cols) = t.dims2()?;
    let (st, layout) = t.storage_and_layout();
    if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*st, layout.contiguous_offsets()) {
        let out = kernels::transpose(&v[a..b], rows, cols);
        drop(st);
        return Tensor::from_vec(out, (cols, rows), t.device());
    }
    drop(st);
    t.t()?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        let v = crate::testing::XorShift::new(seed).symmetric_vec(shape.0 * shape.1, 1.0, 0.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Blocks already in the packed layout (an engine's `q4_1_x8`, `q4_k_x8`) give the same products, bit for
    /// bit, as the row-major blocks they came from; a wrong byte count is an error.
    #[test]
    fn packed_blocks_multiply_as_their_rows_do() {
        for t in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let w = randn((32, 512), 3);
            let rows = quantize(&w, t).unwrap().data().unwrap().into_owned();
            let packed = kernels::packed::pack_any(t, &rows, 32, 512);
            let a = Weight::from_blocks(t, 32, 512, BlockBytes::Owned(rows)).unwrap();
            let b = Weight::from_packed(t, 32, 512, BlockBytes::Owned(packed.clone())).unwrap();
            assert_eq!(a.kind(), b.kind());
            for n in [1, 5] {
                let x = randn((n, 512), 4);
                assert_eq!(
                    max_abs_diff(&a.matmul(&x).unwrap(), &b.matmul(&x).unwrap()),
                    0.0,
                    "{t:?}"
                );
            }
            let short = BlockBytes::Owned(packed[..packed.len() - 1].to_vec());
            assert!(Weight::from_packed(t, 32, 512, short).is_err(), "{t:?}");
        }
        assert!(Weight::from_packed(GgmlDType::Q5K, 32, 512, BlockBytes::Owned(vec![0; 32 * 176 * 2])).is_err());
    }

    /// A quantized product equals the dense product with the dequantized weight, up to the activations'
    /// per-row quantization (q8 blocks: ~1% relative).
    #[test]
    fn quantized_matmul_matches_the_dequantized_weight() {
        for t in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let w = randn((96, 512), 1);
            let q = Weight::quantized(quantize(&w, t).unwrap()).unwrap();
            let dense = q.to_dense(DType::F32).unwrap();
            for rows in [1, 3, 40] {
                let x = randn((rows, 512), 2);
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let err = max_abs_diff(&q.matmul(&x).unwrap(), &want);
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
                assert!(
                    err < 0.02 * scale,
                    "{t:?} rows {rows}: max error {err} vs scale {scale}"
                );
            }
        }
    }

    /// Our block kernels read ggml's layout: blocks quantized by candle (ggml's reference code) dequantize to
    /// candle's values.
    #[test]
    fn block_layout_is_ggml_s() {
        for t in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            let q = quantize(&randn((8, 96), 5), t).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let w = Weight::quantized(q).unwrap();
            assert!(matches!(
                &w,
                Weight::Quantized(QuantWeight {
                    data: QData::Blocks { .. },
                    ..
                })
            ));
            assert_eq!(w.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap(), want, "{t:?}");
        }
    }

    /// Stacking quantized weights and viewing rows of the stack gives the parts' products back.
    #[test]
    fn fused_quantized_rows_are_the_parts() {
        let parts: Vec<Weight> = [(64, 1u64), (32, 2), (32, 3)]
            .iter()
            .map(|&(o, s)| Weight::quantized(quantize(&randn((o, 256), s), GgmlDType::Q4_1).unwrap()).unwrap())
            .collect();
        let fused = Weight::cat_rows(&parts.iter().collect::<Vec<_>>()).unwrap().unwrap();
        assert_eq!(fused.out_features().unwrap(), 128);
        let x = randn((2, 256), 9);
        let y = fused.matmul(&x).unwrap();
        let mut off = 0;
        for p in &parts {
            let n = p.out_features().unwrap();
            let want = p.matmul(&x).unwrap();
            let view = fused.narrow_rows(off, n).unwrap();
            for got in [y.narrow(1, off, n).unwrap(), view.matmul(&x).unwrap()] {
                assert_eq!(max_abs_diff(&got, &want), 0.0);
            }
            assert_eq!(
                view.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                p.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap()
            );
            off += n;
        }
    }

    /// Quantized row lookups are the dequantized rows.
    #[test]
    fn quantized_rows_are_dequantized_rows() {
        let q = Weight::quantized(quantize(&randn((50, 64), 4), GgmlDType::Q8_0).unwrap()).unwrap();
        let ids = Tensor::new(&[3u32, 0, 49, 3], &Device::Cpu).unwrap();
        let got = q.rows(&ids, DType::F32).unwrap();
        let want = q.to_dense(DType::F32).unwrap().index_select(&ids, 0).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    }
}
