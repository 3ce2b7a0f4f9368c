//! Blocked attention over a KV cache, for chunked prefill of long prompts on the CPU.
//!
//! The general attention path materialises scores, mask and probabilities as `[heads, t, n]` tensors and makes
//! several passes over them; for a long prompt those are gigabytes. Here each rayon task takes [`QUERY_BLOCK`]
//! query tokens of one sequence and, per KV head (its query heads together), walks the keys they can see in
//! blocks of [`KEY_BLOCK`] with an online softmax (flash-attention style): one GEMM for the score tile, an
//! vectorised exp in place, a second GEMM accumulating into the output. Memory is a few tiles per thread whatever the
//! prompt length, and keys past the block's last visible slot (the causal upper triangle) are never touched.
//!
//! Masking is the cache's ([`super::cache::build_mask`]): query `i` sees slot `s` iff the slot is valid and its
//! position is `≤` the query's. A query that sees no slot (only padding or packing filler can) gets zeros.

use crate::kernels::exp::exp;
#[cfg(target_arch = "x86_64")]
use crate::kernels::exp::{simd, Simd};
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Query tokens per task.
pub const QUERY_BLOCK: usize = 32;

/// Keys per step of the online softmax: the `heads-per-KV-head · QUERY_BLOCK × KEY_BLOCK` score tile and the K/V
/// rows it reads stay in a core's L2.
pub const KEY_BLOCK: usize = 512;

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
/// `q: [b, heads, t, hd]`; `k, v: [b, kv_heads, n, hd]` (rows may be strided, as cache views are; f32, or an
/// f16/bf16 cache read as it is, each block of keys widened to f32 in a scratch tile);
/// `q_pos`: `b*t`; `keys[bi]`: sequence `bi`'s `n` slots. Returns `[b, t, heads*hd]` in `q`'s dtype.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, q_pos: &[u32], keys: &[Keys], scale: f64) -> Result<Tensor> {
    let dt = q.dtype();
    let (b, heads, t, hd) = q.dims4()?;
    let (_, kvh, n, _) = k.dims4()?;
    if heads % kvh != 0 || q_pos.len() != b * t || keys.len() != b || keys.iter().any(|k| k.pos.len() != n) {
        bail!("blocked attention: inconsistent shapes");
    }
    let q = q.to_dtype(DType::F32)?.contiguous()?;
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
                // The g query heads of a KV head run as one tile of g·m rows (head-major), so that each K/V
                // block is packed once for all of them.
                let gm = g * m;
                let mut qs = vec![0f32; gm * hd];
                let mut sc = vec![0f32; gm * KEY_BLOCK.min(vis)];
                let mut o = vec![0f32; gm * hd];
                // Widened K/V blocks, for a cache stored narrower than f32.
                let (mut kw, mut vw) = match kd {
                    Rows::F32(_) => (Vec::new(), Vec::new()),
                    _ => (vec![0f32; KEY_BLOCK.min(vis) * hd], vec![0f32; KEY_BLOCK.min(vis) * hd]),
                };
                let (mut mx, mut sum) = (vec![0f32; gm], vec![0f32; gm]);
                for kv in 0..kvh {
                    for gi in 0..g {
                        let h = kv * g + gi;
                        qs[gi * m * hd..(gi + 1) * m * hd]
                            .copy_from_slice(&q[((bi * heads + h) * t + q0) * hd..][..m * hd]);
                    }
                    o.fill(0.0);
                    mx.fill(f32::NEG_INFINITY);
                    sum.fill(0.0);
                    for k0 in (0..vis).step_by(KEY_BLOCK) {
                        let kn = KEY_BLOCK.min(vis - k0);
                        let sc = &mut sc[..gm * kn];
                        let (kb, ks) = kd.block(bi * kst.0 + kv * kst.1 + k0 * kst.2, kst.2, kn, hd, &mut kw);
                        let (vb, vs) = vd.block(bi * vst.0 + kv * vst.1 + k0 * vst.2, vst.2, kn, hd, &mut vw);
                        // SAFETY: `qs` is gm × hd, `sc` gm × kn, and kn ≤ n - k0 rows of K of stride kst.2 with hd
                        // unit-stride columns follow `kb`.
                        unsafe {
                            gemm::gemm(
                                gm,
                                kn,
                                hd,
                                sc.as_mut_ptr(),
                                1,
                                kn as isize,
                                false,
                                qs.as_ptr(),
                                1,
                                hd as isize,
                                kb.as_ptr(),
                                ks as isize,
                                1,
                                0.0,
                                scale as f32,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        for (r, row) in sc.chunks_mut(kn).enumerate() {
                            if k0 + kn > full {
                                let p = qp[r % m];
                                for (j, x) in row.iter_mut().enumerate().skip(full.saturating_sub(k0)) {
                                    if !sees(k0 + j, p) {
                                        *x = f32::NEG_INFINITY;
                                    }
                                }
                            }
                            let c = online_softmax(row, &mut mx[r], &mut sum[r]);
                            if c != 1.0 {
                                o[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= c);
                            }
                        }
                        // SAFETY: `o` is gm × hd, `sc` gm × kn, and kn rows of V of stride vst.2 follow `vb`.
                        unsafe {
                            gemm::gemm(
                                gm,
                                hd,
                                kn,
                                o.as_mut_ptr(),
                                1,
                                hd as isize,
                                true,
                                sc.as_ptr(),
                                1,
                                kn as isize,
                                vb.as_ptr(),
                                1,
                                vs as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                    for (r, (orow, l)) in o.chunks(hd).zip(&sum).enumerate() {
                        let (gi, i) = (r / m, r % m);
                        let inv = if *l > 0.0 { 1.0 / l } else { 0.0 };
                        let dst = &mut rows[i * width + (kv * g + gi) * hd..][..hd];
                        dst.iter_mut().zip(orow).for_each(|(d, x)| *d = x * inv);
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

/// The elements of a K or V tensor from its first one.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
}

impl Rows<'_> {
    /// `n` rows of `hd` elements starting at element `at`, `stride` apart, as f32 rows and their stride: in
    /// place for f32, widened into `scratch` (`n·hd`, stride `hd`) otherwise.
    fn block<'s>(
        &'s self,
        at: usize,
        stride: usize,
        n: usize,
        hd: usize,
        scratch: &'s mut [f32],
    ) -> (&'s [f32], usize) {
        use half::slice::HalfFloatSliceExt;
        match self {
            Rows::F32(v) => (&v[at..], stride),
            Rows::F16(v) => {
                for (r, dst) in scratch.chunks_mut(hd).take(n).enumerate() {
                    v[at + r * stride..][..hd].convert_to_f32_slice(dst);
                }
                (scratch, hd)
            }
            Rows::Bf16(v) => {
                for (r, dst) in scratch.chunks_mut(hd).take(n).enumerate() {
                    v[at + r * stride..][..hd].convert_to_f32_slice(dst);
                }
                (scratch, hd)
            }
        }
    }
}

/// The elements of a `[b, heads, n, hd]` CPU tensor (f32, f16 or bf16) with unit-stride rows, from its first
/// element, and its strides over (b, heads, n).
fn view<'a>(s: &'a Storage, l: &Layout) -> Result<(Rows<'a>, Strides)> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        bail!("blocked attention: expected a CPU tensor with unit-stride rows");
    }
    let o = l.start_offset();
    let rows = match s {
        Storage::Cpu(CpuStorage::F32(v)) => Rows::F32(&v[o..]),
        Storage::Cpu(CpuStorage::F16(v)) => Rows::F16(&v[o..]),
        Storage::Cpu(CpuStorage::BF16(v)) => Rows::Bf16(&v[o..]),
        _ => bail!("blocked attention: K/V must be f32, f16 or bf16 on the CPU"),
    };
    Ok((rows, (st[0], st[1], st[2])))
}

/// One step of the online softmax over a row of (masked, `-inf`) scores: exponentiates the row in place against
/// the running max `mx` (updated), adds its mass to the running sum (rescaled), and returns the factor by which
/// the row's accumulated output must be rescaled (1 when the max did not change).
fn online_softmax(row: &mut [f32], mx: &mut f32, sum: &mut f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        match simd() {
            // SAFETY: the CPU supports the features (checked at run time).
            Simd::Avx512 => return unsafe { online_softmax_avx512(row, mx, sum) },
            Simd::Avx2 => return unsafe { online_softmax_avx2(row, mx, sum) },
            Simd::None => {}
        }
    }
    online_softmax_impl(row, mx, sum)
}

/// [`online_softmax_impl`] compiled for AVX-512, so that its loops vectorise 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn online_softmax_avx512(row: &mut [f32], mx: &mut f32, sum: &mut f32) -> f32 {
    online_softmax_impl(row, mx, sum)
}

/// [`online_softmax_impl`] compiled for AVX2 + FMA, so that its loops vectorise 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn online_softmax_avx2(row: &mut [f32], mx: &mut f32, sum: &mut f32) -> f32 {
    online_softmax_impl(row, mx, sum)
}

/// Lanes of the max/sum reductions (f32 sums do not vectorise unless split by hand).
const LANES: usize = 16;

#[inline(always)]
fn online_softmax_impl(row: &mut [f32], mx: &mut f32, sum: &mut f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
        }
    }
    let new = it
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(*mx, |a, &x| if x > a { x } else { a });
    if new == f32::NEG_INFINITY {
        // nothing visible yet
        row.fill(0.0);
        return 1.0;
    }
    for x in row.iter_mut() {
        *x = exp(*x - new);
    }
    let s = crate::kernels::exp::lane_sum(row);
    let c = if new == *mx { 1.0 } else { exp(*mx - new) };
    *sum = *sum * c + s;
    *mx = new;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cache::build_mask;
    use candle_core::D;

    /// The blocked kernel against the composed form (scores, additive mask, softmax, matmul) on ragged,
    /// partly invalid key slots, strided K/V views, several query blocks and several key blocks (one sequence's
    /// first key block entirely invalid, as under heavy left padding).
    #[test]
    fn blocked_attention_equals_composed() {
        let dev = Device::Cpu;
        let (b, heads, kvh, t, hd) = (2, 6, 2, 70, 16);
        let n = KEY_BLOCK + 150;
        let cap = n + 40;
        let q = Tensor::randn(0f32, 1.0, (b, heads, t, hd), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, kvh, cap, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, kvh, cap, hd), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, n).unwrap(), vbuf.narrow(2, 0, n).unwrap());
        // Slot s of sequence bi: position s/2 + 1 + bi (two slots share a position), every fifth invalid, and
        // sequence 1's first KEY_BLOCK + 8 slots invalid.
        let kpos: Vec<Vec<u32>> = (0..b)
            .map(|bi| (0..n).map(|s| (s / 2 + 1 + bi) as u32).collect())
            .collect();
        let kval: Vec<Vec<bool>> = (0..b)
            .map(|bi| {
                (0..n)
                    .map(|s| (s + bi) % 5 != 0 && (bi == 0 || s >= KEY_BLOCK + 8))
                    .collect()
            })
            .collect();
        // Queries around the last keys' positions (some see every slot, some part), and one at position 0 that
        // sees nothing.
        let base = n / 2 - 40;
        let qpos: Vec<u32> = (0..b * t)
            .map(|i| if i % t == 3 { 0 } else { (base + i % t) as u32 })
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
        // Each KV head repeated for its g query heads.
        let per_head = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .repeat((1, 1, g, 1, 1))
                .unwrap()
                .reshape((b, heads, n, hd))
                .unwrap()
        };
        let (kr, vr) = (per_head(&k), per_head(&v));
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
        // An f16 or bf16 cache under f32 queries (strided views, as the cache's): the same bits as attending
        // over the cache widened to f32 first, since widening is exact.
        for dt in [DType::F16, DType::BF16] {
            let (kn, vn) = (
                kbuf.to_dtype(dt).unwrap().narrow(2, 0, n).unwrap(),
                vbuf.to_dtype(dt).unwrap().narrow(2, 0, n).unwrap(),
            );
            let narrow = attend(&q, &kn, &vn, &qpos, &keys, scale).unwrap();
            let wide = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let widened = attend(&q, &wide(&kn), &wide(&vn), &qpos, &keys, scale).unwrap();
            assert_eq!(narrow.dtype(), DType::F32);
            assert_eq!(crate::testing::max_abs_diff(&narrow, &widened), 0.0, "{dt:?}");
        }
    }
}
