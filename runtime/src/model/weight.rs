//! Projection weights: how a `[out, in]` weight is stored, and so how a projection multiplies by it.
//!
//! [`Weight`] is the seam between the model definition and weight formats: the layers only call
//! [`Weight::matmul`], and the weight picks the kernel for its storage, its device and the input's row count
//! (the CPU decode matvec for a few rows, candle's GEMM otherwise). Dense f32/bf16/f16/f64 tensors are the
//! one kind today; a block-quantized kind is a new variant with its own `matmul` (see docs/pipeline.md,
//! "adding a weight format"), and the loaders ([`crate::Weights::weight`]) decide which variant a tensor
//! becomes.

use crate::kernels;
use candle_core::{DType, Tensor};

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
}

/// A projection weight `W: [out, in]`, used as `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense candle tensor (possibly a training variable).
    Dense(DenseWeight),
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

    /// What the weight is stored as.
    pub fn kind(&self) -> WeightKind {
        match self {
            Weight::Dense(d) => WeightKind::Dense(d.tensor.dtype()),
        }
    }

    /// The dense tensor, for code that needs the values themselves (training, checkpoint writing,
    /// lowering); `None` for a kind without one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(d) => Some(&d.tensor),
        }
    }

    /// Output features (rows of `W`).
    pub fn out_features(&self) -> candle_core::Result<usize> {
        match self {
            Weight::Dense(d) => d.tensor.dim(0),
        }
    }

    /// Whether the weight is a training variable (the optimiser updates it in place).
    pub fn is_variable(&self) -> bool {
        match self {
            Weight::Dense(d) => d.tensor.is_variable(),
        }
    }

    /// `x: [rows, in]` → `x Wᵀ: [rows, out]`, in x's dtype.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(d) => d.matmul(x),
        }
    }

    /// The weights `parts` stacked along the output axis (`[Σ out, in]`), so that projections reading the same
    /// input run as one product; `None` when their kinds cannot be stacked.
    pub(crate) fn cat_rows(parts: &[&Weight]) -> candle_core::Result<Option<Weight>> {
        let mut dense = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                Weight::Dense(d) => dense.push(d),
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
        }
    }
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
