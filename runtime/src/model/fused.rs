//! Fused CPU kernels with hand-written backward passes, for the training forward.
//!
//! When gradients must flow, candle composes softmax, RMSNorm and SiLU from elementwise ops (its fused kernels
//! drop gradients): every op is a pass over memory, and its backward several more. On SmolLM2-DLO training
//! those passes over the `[b, heads, t, t]` attention scores alone cost more than the attention matmuls.
//! These custom ops compute the same functions in one row-parallel pass forward and one backward, for f32 and
//! f64 tensors on the CPU; callers take the composed form for other devices and dtypes ([`supported`]).
//! Finite-difference and composed-form comparisons are in this module's tests.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether the fused ops handle `x` (CPU, f32 or f64).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The arithmetic the kernels need, for f32 and f64.
trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::iter::Sum
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn of(v: f64) -> Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn to_f64(self) -> f64;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// `row ← softmax(scale·row + mask)` in place.
    fn softmax_row(row: &mut [Self], mask: Option<&[Self]>, scale: Self);
}

macro_rules! real {
    ($t:ty, $variant:ident, $softmax_row:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn of(v: f64) -> Self {
                v as $t
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn softmax_row(row: &mut [Self], mask: Option<&[Self]>, scale: Self) {
                $softmax_row(row, mask, scale)
            }
        }
    };
}
real!(f32, F32, softmax_row_f32);
real!(f64, F64, softmax_row_plain::<f64>);

/// The contiguous elements of a storage/layout pair.
fn data<'a, T: Real>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> Result<&'a [T]> {
    let v = T::slice(s).ok_or_else(|| candle_core::Error::Msg(format!("{op}: unsupported dtype")))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// Elements per rayon task: enough work per task to amortise scheduling.
const TASK_ELEMS: usize = 16384;

/// Rows per rayon task (at least one), for rows of `width` elements.
fn chunk_rows(width: usize) -> usize {
    (TASK_ELEMS / width.max(1)).max(1)
}

/// Dispatches `$body` with `T` = f32 or f64 according to the storage `$s`.
macro_rules! by_dtype {
    ($s:expr, $op:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: unsupported dtype", $op),
        }
    };
}

// ---------------------------------------------------------------------------------------------------------
// softmax(scale · s + mask) over the last axis

/// `softmax(scale·scores + mask)` over the last axis. `scores`: `[b, .., tq, tk]` (contiguous);
/// `mask`: additive, `[b, 1, .., 1, tq, tk]` (contiguous), broadcast over the axes between b and tq.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    match mask {
        Some(m) => scores.apply_op2(&m.contiguous()?, MaskedSoftmax { scale }),
        None => scores.apply_op1(Softmax { scale }),
    }
}

struct MaskedSoftmax {
    scale: f64,
}
struct Softmax {
    scale: f64,
}
struct SoftmaxBwd {
    scale: f64,
}

/// `row ← softmax(scale·row + mask)`, exps by the type's `exp`.
fn softmax_row_plain<T: Real>(row: &mut [T], mask: Option<&[T]>, scale: T) {
    for (j, v) in row.iter_mut().enumerate() {
        *v = *v * scale;
        if let Some(m) = mask {
            *v += m[j];
        }
    }
    normalize_exp_plain(row);
}

/// `row ← exp(row − max) / Σ`, exps by the type's `exp` (NaN and ±∞ propagate as IEEE says).
fn normalize_exp_plain<T: Real>(row: &mut [T]) {
    let mut max = None::<T>;
    for v in row.iter() {
        if max.is_none_or(|mx| *v > mx) {
            max = Some(*v);
        }
    }
    let max = max.unwrap_or(T::ZERO);
    let mut sum = T::ZERO;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v = *v / sum;
    }
}

/// The f32 row: the branch-free [`crate::kernels::exp`] vectorised 16 or 8 wide (masked entries, far below
/// the maximum, cost no more than others). A row with a NaN or infinite entry takes the plain path, so that
/// those propagate as they would there.
fn softmax_row_f32(row: &mut [f32], mask: Option<&[f32]>, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::exp::{simd, Simd};
        match simd() {
            // SAFETY: the CPU has the features these functions are compiled for.
            Simd::Avx512 => return unsafe { softmax_row_f32_avx512(row, mask, scale) },
            Simd::Avx2 => return unsafe { softmax_row_f32_avx2(row, mask, scale) },
            Simd::None => {}
        }
    }
    softmax_row_f32_impl(row, mask, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_f32_avx512(row: &mut [f32], mask: Option<&[f32]>, scale: f32) {
    softmax_row_f32_impl(row, mask, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_f32_avx2(row: &mut [f32], mask: Option<&[f32]>, scale: f32) {
    softmax_row_f32_impl(row, mask, scale)
}

#[inline(always)]
fn softmax_row_f32_impl(row: &mut [f32], mask: Option<&[f32]>, scale: f32) {
    const LANES: usize = 16;
    match mask {
        Some(m) => {
            for (v, &mv) in row.iter_mut().zip(m) {
                *v = *v * scale + mv;
            }
        }
        None => {
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
    }
    // Lane-wise max, and a probe that is NaN iff some entry is NaN or ±∞ (x·0).
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut probe = [0f32; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
            probe[j] += c[j] * 0.0;
        }
    }
    let rest = it.remainder();
    let probe = rest.iter().fold(probe.iter().sum::<f32>(), |a, &x| a + x * 0.0);
    if row.is_empty() || probe.is_nan() {
        return normalize_exp_plain(row);
    }
    let max = rest
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    for v in row.iter_mut() {
        *v = crate::kernels::exp::exp(*v - max);
    }
    let inv = 1.0 / crate::kernels::exp::lane_sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

fn softmax_rows<T: Real>(x: &[T], mask: Option<(&[T], usize, usize)>, width: usize, scale: f64) -> Vec<T> {
    let scale = T::of(scale);
    let mut out = x.to_vec();
    let rows_per_task = chunk_rows(width);
    out.par_chunks_mut(width * rows_per_task)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_mut(width).enumerate() {
                let r = c * rows_per_task + i;
                let m = mask.map(|(m, per_b, tq)| {
                    // row r = ((bi · heads + h) · tq + qi): the mask row is (bi, qi)
                    let (bi, qi) = (r / per_b, r % tq);
                    &m[(bi * tq + qi) * width..(bi * tq + qi + 1) * width]
                });
                T::softmax_row(row, m, scale);
            }
        });
    out
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = l.dims().last().copied().unwrap_or(1);
        by_dtype!(s, self.name(), |T| {
            let x = data::<T>(s, l, self.name())?;
            Ok((T::storage(softmax_rows(x, None, width, self.scale)), l.shape().clone()))
        })
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let md = l2.dims();
        let (n, width) = (dims.len(), dims[dims.len() - 1]);
        let ok = n >= 3
            && md.len() == n
            && md[0] == dims[0]
            && md[n - 2..] == dims[n - 2..]
            && md[1..n - 2].iter().all(|&d| d == 1);
        if !ok {
            candle_core::bail!("{}: mask {md:?} does not broadcast to scores {dims:?}", self.name());
        }
        let tq = dims[n - 2];
        let per_b = dims[1..n - 1].iter().product::<usize>();
        by_dtype!(s1, self.name(), |T| {
            let x = data::<T>(s1, l1, self.name())?;
            let m = data::<T>(s2, l2, self.name())?;
            let y = softmax_rows(x, Some((m, per_b, tq)), width, self.scale);
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, _s: &Tensor, _m: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }
    /// dx = scale · y ⊙ (dy − Σ dy ⊙ y), row by row.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = l1.dims().last().copied().unwrap_or(1);
        by_dtype!(s1, self.name(), |T| {
            let y = data::<T>(s1, l1, self.name())?;
            let dy = data::<T>(s2, l2, self.name())?;
            let scale = T::of(self.scale);
            let mut dx = dy.to_vec();
            let rows_per_task = chunk_rows(width);
            dx.par_chunks_mut(width * rows_per_task)
                .zip(y.par_chunks(width * rows_per_task))
                .for_each(|(dxc, yc)| {
                    for (d, yr) in dxc.chunks_mut(width).zip(yc.chunks(width)) {
                        let dot: T = d.iter().zip(yr).map(|(a, b)| *a * *b).sum();
                        for (v, yv) in d.iter_mut().zip(yr) {
                            *v = scale * *yv * (*v - dot);
                        }
                    }
                });
            Ok((T::storage(dx), l1.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x²) + eps) ⊙ w

/// RMSNorm over the last axis with weight `w` (`[d]`), as HF computes it.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNormOp { eps })
}

struct RmsNormOp {
    eps: f64,
}
struct RmsNormBwd {
    eps: f64,
}

fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let ss: T = row.iter().map(|v| *v * *v).sum();
    let d = T::of(row.len() as f64);
    (ss / d + T::of(eps)).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1);
        if l2.dims() != [d] {
            candle_core::bail!("{}: weight {:?} for rows of {d}", self.name(), l2.dims());
        }
        by_dtype!(s1, self.name(), |T| {
            let x = data::<T>(s1, l1, self.name())?;
            let w = data::<T>(s2, l2, self.name())?;
            let mut y = x.to_vec();
            let rows_per_task = chunk_rows(d);
            y.par_chunks_mut(d * rows_per_task).for_each(|c| {
                for row in c.chunks_mut(d) {
                    let r = inv_rms(row, self.eps);
                    for (v, wv) in row.iter_mut().zip(w) {
                        *v = *v / r * *wv;
                    }
                }
            });
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both =
            x.contiguous()?
                .apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        // rows 0..n: dx; row n: dw
        let n = x.elem_count() / w.elem_count();
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = both.narrow(0, n, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }
    /// With ρ = sqrt(mean(x²) + eps): dx = w⊙dy / ρ − x · Σⱼ wⱼ dyⱼ xⱼ / (d ρ³); dw = Σ_rows dy ⊙ x / ρ.
    /// Output `[n + 1, d]`: the n rows of dx, then dw.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l2.dims().iter().product::<usize>();
        by_dtype!(s1, self.name(), |T| {
            let x = data::<T>(s1, l1, self.name())?;
            let w = data::<T>(s2, l2, self.name())?;
            let dy = data::<T>(s3, l3, self.name())?;
            let n = x.len() / d;
            let mut out = vec![T::ZERO; (n + 1) * d];
            let (dx, _) = out.split_at_mut(n * d);
            let rows_per_task = chunk_rows(d);
            let dw_parts: Vec<Vec<T>> = dx
                .par_chunks_mut(d * rows_per_task)
                .zip(x.par_chunks(d * rows_per_task))
                .zip(dy.par_chunks(d * rows_per_task))
                .map(|((dxc, xc), dyc)| {
                    let mut dw = vec![T::ZERO; d];
                    for ((dxr, xr), dyr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(dyc.chunks(d)) {
                        let rho = inv_rms(xr, self.eps);
                        let dot: T = (0..d).map(|j| w[j] * dyr[j] * xr[j]).sum();
                        let k = dot / (T::of(d as f64) * rho * rho * rho);
                        for j in 0..d {
                            dxr[j] = w[j] * dyr[j] / rho - xr[j] * k;
                            dw[j] += dyr[j] * xr[j] / rho;
                        }
                    }
                    dw
                })
                .collect();
            let dw = &mut out[n * d..];
            for part in dw_parts {
                for (a, b) in dw.iter_mut().zip(part) {
                    *a += b;
                }
            }
            Ok((T::storage(out), Shape::from((n + 1, d))))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// SwiGLU: silu(g) ⊙ u

/// `silu(g) ⊙ u` (same shapes).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;
struct SwiGluBwd;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!("{}: shapes {:?} and {:?} differ", self.name(), l1.dims(), l2.dims());
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) {
            let g = data::<f32>(s1, l1, self.name())?;
            let u = data::<f32>(s2, l2, self.name())?;
            let mut y = vec![0f32; g.len()];
            y.par_chunks_mut(TASK_ELEMS)
                .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
                .for_each(|(yc, (gc, uc))| crate::kernels::swiglu(gc, uc, yc));
            return Ok((CpuStorage::F32(y), l1.shape().clone()));
        }
        by_dtype!(s1, self.name(), |T| {
            let g = data::<T>(s1, l1, self.name())?;
            let u = data::<T>(s2, l2, self.name())?;
            let mut y = g.to_vec();
            y.par_chunks_mut(TASK_ELEMS)
                .zip(u.par_chunks(TASK_ELEMS))
                .for_each(|(yc, uc)| {
                    for (v, uv) in yc.iter_mut().zip(uc) {
                        *v = *v / (T::ONE + (-*v).exp()) * *uv;
                    }
                });
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g
            .contiguous()?
            .apply_op3_no_bwd(&u.contiguous()?, &grad.contiguous()?, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }
    /// With σ = sigmoid(g): dg = dy ⊙ u ⊙ σ (1 + g (1 − σ)), du = dy ⊙ g σ. Output `[2, ..shape]`: dg, du.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), |T| {
            let g = data::<T>(s1, l1, self.name())?;
            let u = data::<T>(s2, l2, self.name())?;
            let dy = data::<T>(s3, l3, self.name())?;
            let n = g.len();
            let mut out = vec![T::ZERO; 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_chunks_mut(TASK_ELEMS)
                .zip(du.par_chunks_mut(TASK_ELEMS))
                .zip(
                    g.par_chunks(TASK_ELEMS)
                        .zip(u.par_chunks(TASK_ELEMS))
                        .zip(dy.par_chunks(TASK_ELEMS)),
                )
                .for_each(|((dgc, duc), ((gc, uc), dyc))| {
                    for i in 0..gc.len() {
                        let s = T::ONE / (T::ONE + (-gc[i]).exp());
                        duc[i] = dyc[i] * gc[i] * s;
                        dgc[i] = dyc[i] * uc[i] * s * (T::ONE + gc[i] * (T::ONE - s));
                    }
                });
            let mut dims = vec![2];
            dims.extend_from_slice(l1.dims());
            Ok((T::storage(out), Shape::from(dims)))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// next-token cross-entropy over the last axis

/// The mean cross-entropy `mean_i (logsumexp(x_i) − x_i[t_i])` over the rows `i` of `logits: [n, V]` that have a
/// target (`targets[i]`; `None` takes no loss), as a scalar of the logits' dtype. One row-parallel pass forward
/// and one backward (`(softmax(x_i) − onehot(t_i)) / count` on target rows, 0 elsewhere) instead of the composed
/// log-softmax's passes over `n × V` values, with no gather of the target rows. At least one row must have a
/// target, and every target must be below V.
pub fn cross_entropy(logits: &Tensor, targets: &[Option<u32>]) -> Result<Tensor> {
    let count = targets.iter().flatten().count();
    if count == 0 {
        candle_core::bail!("fused-cross-entropy: no row has a target");
    }
    let op = CrossEntropy {
        targets: std::sync::Arc::new(targets.to_vec()),
        count,
    };
    logits.contiguous()?.apply_op1(op)
}

struct CrossEntropy {
    targets: std::sync::Arc<Vec<Option<u32>>>,
    count: usize,
}

struct CrossEntropyBwd {
    targets: std::sync::Arc<Vec<Option<u32>>>,
    /// d(loss)/d(mean) / count.
    scale: f64,
}

/// Checks `[n, V]` logits against the targets; returns V.
fn ce_width(l: &Layout, targets: &[Option<u32>], op: &'static str) -> Result<usize> {
    let &[n, v] = l.dims() else {
        candle_core::bail!("{op}: logits must be [n, V], found {:?}", l.dims());
    };
    if n != targets.len() {
        candle_core::bail!("{op}: {} targets for {n} rows", targets.len());
    }
    if let Some(t) = targets.iter().flatten().find(|&&t| t as usize >= v) {
        candle_core::bail!("{op}: target {t} is outside the vocabulary ({v})");
    }
    Ok(v)
}

/// `(max, Σ exp(x − max))` of a row, the sum accumulated in f64: a sequential f32 sum over a 49152-token
/// vocabulary is off by ~1e-4 relative, worse than the composed form's.
fn max_and_sum_exp<T: Real>(row: &[T]) -> (T, f64) {
    let m = row.iter().copied().fold(row[0], |a, b| if b > a { b } else { a });
    (m, row.iter().map(|&x| (x - m).exp().to_f64()).sum())
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = ce_width(l, &self.targets, self.name())?;
        by_dtype!(s, self.name(), |T| {
            let x = data::<T>(s, l, self.name())?;
            let total: f64 = x
                .par_chunks(v)
                .zip(self.targets.par_iter())
                .filter_map(|(row, t)| t.map(|t| (row, t as usize)))
                .map(|(row, t)| {
                    let (m, z) = max_and_sum_exp(row);
                    let lse = m.to_f64() + z.ln();
                    lse - row[t].to_f64()
                })
                .sum();
            Ok((T::storage(vec![T::of(total / self.count as f64)]), Shape::from(())))
        })
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let op = CrossEntropyBwd {
            targets: self.targets.clone(),
            scale: g / self.count as f64,
        };
        Ok(Some(arg.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-bwd"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = ce_width(l, &self.targets, self.name())?;
        by_dtype!(s, self.name(), |T| {
            let x = data::<T>(s, l, self.name())?;
            let scale = T::of(self.scale);
            let mut out = vec![T::ZERO; x.len()];
            out.par_chunks_mut(v)
                .zip(x.par_chunks(v))
                .zip(self.targets.par_iter())
                .for_each(|((o, row), t)| {
                    let Some(t) = t else { return };
                    let (m, z) = max_and_sum_exp(row);
                    let k = T::of(self.scale / z);
                    for (oj, &xj) in o.iter_mut().zip(row) {
                        *oj = (xj - m).exp() * k;
                    }
                    o[*t as usize] -= scale;
                });
            Ok((T::storage(out), l.shape().clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, xorshift_uniform};
    use candle_core::{Device, Module, Var, D};

    /// Values uniform in [-2, 2), seeded, in `dt`.
    fn rand(shape: &[usize], seed: u64, dt: DType) -> Tensor {
        let v = xorshift_uniform(shape.iter().product(), seed, -2.0, 2.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
    }

    /// The vectorised f32 row against the f64 softmax: rows of every length around the 16-lane blocks, causal
    /// masks (−1e30, far below the row), large and small scales; and NaN/∞ propagate as in the plain form.
    #[test]
    fn f32_softmax_row_matches_f64_and_propagates_non_finite_values() {
        let mut worst = 0f64;
        for (n, seed) in (0..70).map(|n| (n, n as u64 + 1)) {
            for scale in [0.125f32, 3.0] {
                let x: Vec<f32> = xorshift_uniform(n, seed, -8.0, 8.0).iter().map(|&v| v as f32).collect();
                let m: Vec<f32> = (0..n).map(|j| if j > n / 2 { -1e30 } else { 0.0 }).collect();
                for mask in [None, Some(m.as_slice())] {
                    let mut got = x.clone();
                    softmax_row_f32(&mut got, mask, scale);
                    let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                    let m64: Vec<f64> = m.iter().map(|&v| v as f64).collect();
                    softmax_row_plain(&mut want, mask.map(|_| m64.as_slice()), scale as f64);
                    for (g, w) in got.iter().zip(&want) {
                        worst = worst.max((*g as f64 - w).abs() / w.abs().max(1e-30).max(1e-6));
                    }
                }
            }
        }
        assert!(worst < 2e-6, "worst relative error {worst}");
        for bad in [f32::NAN, f32::INFINITY] {
            let mut row: Vec<f32> = (0..20).map(|i| i as f32 * 0.1).collect();
            row[7] = bad;
            let mut plain = row.clone();
            softmax_row_f32(&mut row, None, 1.0);
            softmax_row_plain(&mut plain, None, 1.0);
            assert!(row.iter().any(|v| v.is_nan()), "{bad}: {row:?}");
            assert_eq!(
                row.iter().map(|v| v.is_nan()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.is_nan()).collect::<Vec<_>>()
            );
        }
    }

    /// Value and gradients (of the output summed against fixed random weights) of the fused and the composed
    /// form agree, in f64 within 1e-12 and in f32 within `f32_tol`.
    fn check2(
        shapes: (&[usize], &[usize]),
        fused: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        composed: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        f32_tol: f64,
        grad_b: bool,
    ) {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, f32_tol)] {
            let a = Var::from_tensor(&rand(shapes.0, 1, dt)).unwrap();
            let b = Var::from_tensor(&rand(shapes.1, 2, dt)).unwrap();
            let mut out = vec![];
            for f in [&fused as &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>, &composed] {
                let y = f(a.as_tensor(), b.as_tensor()).unwrap();
                let wts = rand(y.dims(), 3, dt);
                let loss = (&y * &wts).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                out.push((y, g.get(a.as_tensor()).unwrap().clone(), g.get(b.as_tensor()).cloned()));
            }
            let (f, c) = (&out[0], &out[1]);
            assert!(
                max_abs_diff(&f.0, &c.0) < tol,
                "{dt:?} value {}",
                max_abs_diff(&f.0, &c.0)
            );
            assert!(
                max_abs_diff(&f.1, &c.1) < tol,
                "{dt:?} grad a {}",
                max_abs_diff(&f.1, &c.1)
            );
            if grad_b {
                let (fb, cb) = (f.2.as_ref().unwrap(), c.2.as_ref().unwrap());
                assert!(max_abs_diff(fb, cb) < tol, "{dt:?} grad b {}", max_abs_diff(fb, cb));
            }
        }
    }

    fn composed_softmax(s: &Tensor, m: Option<&Tensor>, scale: f64) -> Result<Tensor> {
        let x = (s * scale)?;
        let x = match m {
            Some(m) => x.broadcast_add(m)?,
            None => x,
        };
        candle_nn::ops::softmax(&x, D::Minus1)
    }

    #[test]
    fn masked_softmax_matches_the_composed_form_with_gradients() {
        // scores [b=2, kv=3, g=2, tq=5, tk=5], causal mask with one padded key in the second sequence
        let mut m = vec![0f64; 2 * 5 * 5];
        for b in 0..2 {
            for q in 0..5 {
                for k in 0..5 {
                    if k > q || (b == 1 && k == 0 && q > 0) {
                        m[(b * 5 + q) * 5 + k] = -1e30;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (2, 1, 1, 5, 5), &Device::Cpu).unwrap();
        let mask_as = |s: &Tensor| mask.to_dtype(s.dtype());
        check2(
            (&[2, 3, 2, 5, 5], &[1]),
            |s, _| masked_softmax(s, Some(&mask_as(s)?), 0.125),
            |s, _| composed_softmax(s, Some(&mask_as(s)?), 0.125),
            1e-5,
            false,
        );
        check2(
            (&[4, 7], &[1]),
            |s, _| masked_softmax(s, None, 0.5),
            |s, _| composed_softmax(s, None, 0.5),
            1e-5,
            false,
        );
    }

    #[test]
    fn rms_norm_matches_the_composed_form_with_gradients() {
        check2(
            (&[3, 4, 16], &[16]),
            |x, w| rms_norm(x, w, 1e-5),
            |x, w| {
                let var = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(w)
            },
            1e-4,
            true,
        );
    }

    #[test]
    fn swiglu_matches_the_composed_form_with_gradients() {
        check2(
            (&[3, 5, 24], &[3, 5, 24]),
            swiglu,
            |g, u| candle_nn::Activation::Silu.forward(g)? * u,
            1e-5,
            true,
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        let s = rand(&[2, 3, 4, 4], 1, DType::F32);
        let m = rand(&[2, 1, 4, 3], 2, DType::F32);
        assert!(masked_softmax(&s, Some(&m), 1.0).is_err());
        assert!(rms_norm(&s, &rand(&[3], 3, DType::F32), 1e-5).is_err());
        assert!(swiglu(&s, &m).is_err());
        assert!(!supported(&s.to_dtype(DType::BF16).unwrap()));
    }

    /// The fused cross-entropy equals the composed form (gather the target rows, log-softmax, pick, mean) in
    /// value and gradient, with rows that take no loss; bad targets are errors, not panics.
    #[test]
    fn cross_entropy_matches_the_composed_form() {
        let targets = [Some(3u32), None, Some(0), Some(6), None, Some(6)];
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = Var::from_tensor(&(rand(&[6, 7], 11, dt) * 4.0).unwrap()).unwrap();
            let fused = cross_entropy(x.as_tensor(), &targets).unwrap();
            let rows: Vec<u32> = (0..6u32).filter(|&i| targets[i as usize].is_some()).collect();
            let tgt: Vec<u32> = targets.iter().flatten().copied().collect();
            let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
            let picked = x.as_tensor().index_select(&idx, 0).unwrap();
            let lsm = candle_nn::ops::log_softmax(&picked, D::Minus1).unwrap();
            let tgt = Tensor::from_vec(tgt, (4, 1), &Device::Cpu).unwrap();
            let composed = lsm.gather(&tgt, 1).unwrap().neg().unwrap().mean_all().unwrap();
            let (a, b) = (
                fused.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
                composed.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            );
            assert!((a - b).abs() < tol, "{dt:?}: {a} vs {b}");
            // a non-unit upstream gradient, as the trainer's loss weighting gives
            let ga = (fused * 0.7).unwrap().backward().unwrap();
            let gb = (composed * 0.7).unwrap().backward().unwrap();
            let d = max_abs_diff(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
            assert!(d < tol, "{dt:?}: gradients differ by {d}");
        }
        let x = rand(&[2, 4], 1, DType::F32);
        for (t, needle) in [
            (vec![Some(4u32), None], "outside the vocabulary"),
            (vec![None, None], "no row has a target"),
            (vec![Some(1)], "1 targets for 2 rows"),
        ] {
            let e = cross_entropy(&x, &t).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    /// Over a real vocabulary (49152 logits a row) the f32 loss is as close to the f64 truth as the composed
    /// form's: a sequential f32 sum of the exponentials was off by ~1e-4 relative.
    #[test]
    fn cross_entropy_in_f32_is_accurate_over_a_large_vocabulary() {
        let (n, v) = (8, 49152);
        let x64 = (rand(&[n, v], 5, DType::F64) * 3.0).unwrap();
        let targets: Vec<Option<u32>> = (0..n).map(|i| Some((i * 7919 % v) as u32)).collect();
        let truth = cross_entropy(&x64, &targets).unwrap().to_scalar::<f64>().unwrap();
        let x32 = x64.to_dtype(DType::F32).unwrap();
        let fused = cross_entropy(&x32, &targets).unwrap().to_scalar::<f32>().unwrap() as f64;
        let lsm = candle_nn::ops::log_softmax(&x32, D::Minus1).unwrap();
        let t: Vec<u32> = targets.iter().flatten().copied().collect();
        let t = Tensor::from_vec(t, (n, 1), &Device::Cpu).unwrap();
        let composed = lsm
            .gather(&t, 1)
            .unwrap()
            .neg()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let (ef, ec) = ((fused - truth).abs(), (composed - truth).abs());
        assert!(ef <= ec.max(1e-6), "fused off by {ef}, composed by {ec}");
    }
}
