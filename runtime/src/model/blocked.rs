//! Blocked attention over a KV cache, for chunked prefill of long prompts on the CPU.
//!
//! The general attention path materialises scores, mask and probabilities as `[heads, t, n]` tensors and makes
//! several passes over them; for a long prompt those are gigabytes. Here each rayon task takes [`QUERY_BLOCK`]
//! query tokens of one sequence and, head by head, computes their scores over the keys they can see with one
//! GEMM into a scratch of `QUERY_BLOCK × n` floats, takes the softmax in place (an AVX2 exp) and multiplies
//! by V with a second GEMM straight into the output rows: memory is that scratch per thread, and keys past
//! the block's last visible slot (the causal upper triangle) are never touched.
//!
//! Masking is the cache's ([`super::cache::build_mask`]): query `i` sees slot `s` iff the slot is valid and its
//! position is `≤` the query's. A query that sees no slot (only padding or packing filler can) gets zeros.

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Query tokens per task: the scratch is `QUERY_BLOCK × n` f32 (1 MiB at n = 8192, inside a core's L2).
pub const QUERY_BLOCK: usize = 32;

/// Whether [`attend`] takes tensors like `q` (CPU; f32, bf16 or f16, computed in f32).
pub fn supported(q: &Tensor) -> bool {
    q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// The key slots of one sequence: position and validity of each of the `n` cached slots.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// Position id of each slot.
    pub pos: &'a [u32],
    /// Whether each slot holds a real token.
    pub valid: &'a [bool],
}

/// `softmax(scale · q kᵀ + mask) v` per head, with grouped K/V heads.
///
/// `q: [b, heads, t, hd]`; `k, v: [b, kv_heads, n, hd]` (rows may be strided, as cache views are);
/// `q_pos`: `b*t`; `keys[bi]`: sequence `bi`'s `n` slots. Returns `[b, t, heads*hd]` in `q`'s dtype.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, q_pos: &[u32], keys: &[Keys], scale: f64) -> Result<Tensor> {
    let dt = q.dtype();
    let (b, heads, t, hd) = q.dims4()?;
    let (_, kvh, n, _) = k.dims4()?;
    if heads % kvh != 0 || q_pos.len() != b * t || keys.len() != b || keys.iter().any(|k| k.pos.len() != n) {
        bail!("blocked attention: inconsistent shapes");
    }
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let (k, v) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let q = f32s(&qs, ql)?;
    let (kd, kst) = view(&ks, kl)?;
    let (vd, vst) = view(&vs, vl)?;
    let width = heads * hd;
    let mut out = vec![0f32; b * t * width];
    let g = heads / kvh;
    out.par_chunks_mut(t * width).enumerate().for_each(|(bi, seq)| {
        let keys = keys[bi];
        seq.par_chunks_mut(QUERY_BLOCK * width)
            .enumerate()
            .for_each(|(blk, rows)| {
                let q0 = blk * QUERY_BLOCK;
                let m = rows.len() / width;
                let qp = &q_pos[bi * t + q0..bi * t + q0 + m];
                let (lo, hi) = (*qp.iter().min().expect("m > 0"), *qp.iter().max().expect("m > 0"));
                let sees = |s: usize, p: u32| keys.valid[s] && keys.pos[s] <= p;
                // Slots [0, full) are seen by every query of the block; none past `vis` is seen by any.
                let vis = (0..n).rev().find(|&s| sees(s, hi)).map_or(0, |s| s + 1);
                let full = (0..vis).find(|&s| !sees(s, lo)).unwrap_or(vis);
                if vis == 0 {
                    return;
                }
                let mut scores = vec![0f32; m * vis];
                for h in 0..heads {
                    let kv = h / g;
                    let qh = &q[((bi * heads + h) * t + q0) * hd..];
                    let kh = &kd[bi * kst.0 + kv * kst.1..];
                    let vh = &vd[bi * vst.0 + kv * vst.1..];
                    // SAFETY: the operands lie inside their buffers: q rows q0..q0+m of head h ([b, heads, t, hd]
                    // contiguous), `vis ≤ n` key/value rows of stride kst.2/vst.2 with `hd` unit-stride columns,
                    // `scores` is m × vis, and `rows` is m rows of `width` with this head's `hd` columns.
                    unsafe {
                        gemm::gemm(
                            m,
                            vis,
                            hd,
                            scores.as_mut_ptr(),
                            1,
                            vis as isize,
                            false,
                            qh.as_ptr(),
                            1,
                            hd as isize,
                            kh.as_ptr(),
                            kst.2 as isize,
                            1,
                            0.0,
                            scale as f32,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    for (i, row) in scores.chunks_mut(vis).enumerate() {
                        for (s, x) in row.iter_mut().enumerate().skip(full) {
                            if !sees(s, qp[i]) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                        softmax_in_place(row);
                    }
                    // SAFETY: as above.
                    unsafe {
                        gemm::gemm(
                            m,
                            hd,
                            vis,
                            rows.as_mut_ptr().add(h * hd),
                            1,
                            width as isize,
                            false,
                            scores.as_ptr(),
                            1,
                            vis as isize,
                            vh.as_ptr(),
                            1,
                            vst.2 as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            });
    });
    Tensor::from_vec(out, (b, t, width), &Device::Cpu)?.to_dtype(dt)
}

/// The contiguous f32 elements of a CPU tensor.
fn f32s<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("blocked attention: expected a contiguous f32 CPU tensor"),
    }
}

/// Element strides of a `[b, heads, n, hd]` tensor over its first three axes.
type Strides = (usize, usize, usize);

/// The f32 elements of a `[b, heads, n, hd]` CPU tensor with unit-stride rows, from its first element, and
/// its strides over (b, heads, n).
fn view<'a>(s: &'a Storage, l: &Layout) -> Result<(&'a [f32], Strides)> {
    let st = l.stride();
    match s {
        Storage::Cpu(CpuStorage::F32(v)) if st.len() == 4 && st[3] == 1 => {
            Ok((&v[l.start_offset()..], (st[0], st[1], st[2])))
        }
        _ => bail!("blocked attention: expected an f32 CPU tensor with unit-stride rows"),
    }
}

/// Softmax of one row in place; `-inf` entries get 0, and a row of only `-inf` becomes zeros.
fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { softmax_avx2(row) };
        }
    }
    softmax_rows(row)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// [`softmax_rows`] compiled for AVX2 + FMA, so that its loops vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    softmax_rows(row)
}

/// Lanes of the max/sum reductions (f32 sums do not vectorise unless split by hand).
const LANES: usize = 16;

#[inline(always)]
fn softmax_rows(row: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            mx[j] = if c[j] > mx[j] { c[j] } else { mx[j] };
        }
    }
    let max = it
        .remainder()
        .iter()
        .chain(&mx)
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let mut acc = [0f32; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    let sum: f32 = it.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `eˣ` for `x ≤ 0` (Cephes' `expf`: range reduction by `ln 2`, degree-6 polynomial; ~1 ulp), branch-free so
/// that loops over it vectorise; 0 below −87.3 (and for −∞).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.3);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let e = (t.to_bits().wrapping_sub(ROUND.to_bits()) as i32 + 127) << 23;
    let y = y * f32::from_bits(e as u32);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cache::build_mask;
    use candle_core::D;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// The blocked kernel against the composed form (scores, additive mask, softmax, matmul) on ragged,
    /// partly invalid key slots, strided K/V views and several query blocks.
    #[test]
    fn blocked_attention_equals_composed() {
        let dev = Device::Cpu;
        let (b, heads, kvh, t, hd, cap) = (2, 6, 2, 70, 16, 160);
        let n = 150;
        let q = Tensor::randn(0f32, 1.0, (b, heads, t, hd), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, kvh, cap, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, kvh, cap, hd), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, n).unwrap(), vbuf.narrow(2, 0, n).unwrap());
        // Slot s of sequence bi: position s/2 + 1 + bi (two slots share a position), every fifth invalid.
        let kpos: Vec<Vec<u32>> = (0..b)
            .map(|bi| (0..n).map(|s| (s / 2 + 1 + bi) as u32).collect())
            .collect();
        let kval: Vec<Vec<bool>> = (0..b).map(|bi| (0..n).map(|s| (s + bi) % 5 != 0).collect()).collect();
        // Queries at positions 10.. (and one row before every key, which sees nothing).
        let qpos: Vec<u32> = (0..b * t)
            .map(|i| if i % t == 3 { 0 } else { (10 + i % t) as u32 })
            .collect();
        let keys: Vec<Keys> = (0..b)
            .map(|bi| Keys {
                pos: &kpos[bi],
                valid: &kval[bi],
            })
            .collect();
        let scale = 0.25;
        let got = attend(&q, &k, &v, &qpos, &keys, scale).unwrap();

        let key = |bi: usize, s: usize| kval[bi][s].then_some(kpos[bi][s]);
        let mask = build_mask(b, t, n, &qpos, key, DType::F32, &dev).unwrap();
        let g = heads / kvh;
        let kr = k
            .unsqueeze(2)
            .unwrap()
            .repeat((1, 1, g, 1, 1))
            .unwrap()
            .reshape((b, heads, n, hd))
            .unwrap();
        let vr = v
            .unsqueeze(2)
            .unwrap()
            .repeat((1, 1, g, 1, 1))
            .unwrap()
            .reshape((b, heads, n, hd))
            .unwrap();
        let s = (q.matmul(&kr.t().unwrap()).unwrap() * scale).unwrap();
        let s = s.broadcast_add(&mask.squeeze(1).unwrap()).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        let want = p
            .matmul(&vr)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, heads * hd))
            .unwrap();
        for bi in 0..b {
            for i in 0..t {
                let (gr, wr) = (
                    got.get(bi).unwrap().get(i).unwrap(),
                    want.get(bi).unwrap().get(i).unwrap(),
                );
                let d = crate::testing::max_abs_diff(&gr, &wr);
                if i == 3 {
                    // sees no slot: zeros here, a uniform average in the composed form
                    assert_eq!(gr.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
                } else {
                    assert!(d < 1e-5, "sequence {bi} query {i}: differs by {d}");
                }
            }
        }
        // bf16 inputs are computed in f32 and returned in bf16.
        let to = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let half = attend(&to(&q), &to(&k), &to(&v), &qpos, &keys, scale).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
    }
}
