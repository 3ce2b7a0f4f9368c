//! CPU kernels for the decode hot path: `y = W x` for a few input rows, `W: [out, in]` row-major; and a
//! blocked transpose for the prefill projections, which compute `(W xᵀ)ᵀ`.
//!
//! Batch-1 decode is bound by reading the weights once per token. candle's general GEMM is tuned for
//! large `m`; for `m ≤` [`MAX_ROWS`] these kernels stream each weight row once, dot it with every input row
//! (AVX2/FMA when the CPU has it), and split the output rows over the rayon pool. bf16 weights are widened
//! to f32 in registers, so bf16 decode reads half the bytes of f32.

use half::bf16;
pub mod exp;
pub mod packed;
pub mod quant;

use rayon::prelude::*;

/// Largest number of input rows the matvec kernels take (beyond that, GEMM wins).
pub const MAX_ROWS: usize = 4;

/// Weight element types the kernels read.
pub trait WeightElem: Copy + Send + Sync {
    /// Dot product of a weight row with an f32 vector.
    fn dot(w: &[Self], x: &[f32]) -> f32;
}

impl WeightElem for f32 {
    #[inline]
    fn dot(w: &[f32], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                return unsafe { avx2::dot_f32(w, x) };
            }
        }
        w.iter().zip(x).map(|(a, b)| a * b).sum()
    }
}

impl WeightElem for bf16 {
    #[inline]
    fn dot(w: &[bf16], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                return unsafe { avx2::dot_bf16(w, x) };
            }
        }
        w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `y[r, o] = Σ_i w[o, i] · x[r, i]` for `rows` input rows; returns `y` as `[rows, out]` row-major.
pub fn matvec<W: WeightElem>(w: &[W], x: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
    debug_assert_eq!(w.len(), out * inp);
    debug_assert_eq!(x.len(), rows * inp);
    // Output-major scratch [out, rows] so that each parallel chunk owns whole weight rows.
    let mut scratch = vec![0f32; out * rows];
    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = out.div_ceil(threads * 4).max(16);
    scratch
        .par_chunks_mut(chunk_rows * rows)
        .enumerate()
        .for_each(|(c, ys)| {
            let o0 = c * chunk_rows;
            for (j, y) in ys.chunks_mut(rows).enumerate() {
                let wr = &w[(o0 + j) * inp..(o0 + j + 1) * inp];
                for (r, yr) in y.iter_mut().enumerate() {
                    *yr = W::dot(wr, &x[r * inp..(r + 1) * inp]);
                }
            }
        });
    if rows == 1 {
        return scratch;
    }
    let mut y = vec![0f32; rows * out];
    for o in 0..out {
        for r in 0..rows {
            y[r * out + o] = scratch[o * rows + r];
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::bf16;
    use std::arch::x86_64::*;

    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_hadd_ps(s, s);
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(s)
    }

    /// Defines `$name(w: &[$t], x: &[f32]) -> f32`: four independent FMA accumulators over 32-element blocks,
    /// then 8-element blocks, then a scalar tail; `$load` turns 8 weights into 8 f32 lanes.
    macro_rules! dot_kernel {
        ($name:ident, $t:ty, $load:expr, $scalar:expr) => {
            /// # Safety
            /// Requires AVX2 and FMA.
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $name(w: &[$t], x: &[f32]) -> f32 {
                let n = w.len().min(x.len());
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut i = 0;
                let (wp, xp) = (w.as_ptr(), x.as_ptr());
                while i + 32 <= n {
                    a0 = _mm256_fmadd_ps($load(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
                    a1 = _mm256_fmadd_ps($load(wp.add(i + 8)), _mm256_loadu_ps(xp.add(i + 8)), a1);
                    a2 = _mm256_fmadd_ps($load(wp.add(i + 16)), _mm256_loadu_ps(xp.add(i + 16)), a2);
                    a3 = _mm256_fmadd_ps($load(wp.add(i + 24)), _mm256_loadu_ps(xp.add(i + 24)), a3);
                    i += 32;
                }
                while i + 8 <= n {
                    a0 = _mm256_fmadd_ps($load(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
                    i += 8;
                }
                let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                while i < n {
                    s += $scalar(w[i]) * x[i];
                    i += 1;
                }
                s
            }
        };
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        // bf16 is the top half of an f32: widen 8 × u16 to u32 and shift into place.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    dot_kernel!(dot_f32, f32, load_f32, |v: f32| v);

    /// `e^x` for 8 lanes: Cephes' `expf` (range reduction by ln 2 in two parts, degree-5 polynomial), inputs
    /// clamped to ±88.376 so that the result stays finite.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.376_26)), _mm256_set1_ps(88.376_26));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    /// [`super::swiglu`] over whole 8-lane chunks; returns how many elements it wrote.
    ///
    /// # Safety
    /// Requires AVX2 and FMA; the slices have equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
        let n = g.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
            );
            i += 8;
        }
        n
    }
    dot_kernel!(dot_bf16, bf16, load_bf16, |v: bf16| v.to_f32());
}

/// Runs `f` over `0..n` split into contiguous ranges on the rayon pool, about 8 per thread (enough to balance
/// uneven speeds, few enough that the split costs nothing next to the work).
pub(crate) fn par_ranges(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let piece = n.div_ceil(threads * 8).max(1);
    (0..n.div_ceil(piece))
        .into_par_iter()
        .for_each(|p| f(p * piece..n.min((p + 1) * piece)));
}

/// `out[i] = silu(g[i]) · u[i]` (`silu(x) = x / (1 + e^−x)`), the SwiGLU of an MLP; AVX2 with a vectorized
/// `exp` (Cephes' polynomial, ~1 ulp) where the CPU has it. libm's scalar `expf` took 12 % of a SmolLM2
/// prefill once the quantized projections were fast.
pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = g.len().min(u.len()).min(out.len());
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); the loop stays inside the slices.
            unsafe { i = avx2::swiglu(&g[..n], &u[..n], &mut out[..n]) };
        }
    }
    for j in i..n {
        out[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized SwiGLU matches the scalar formula to a few ulps, saturating cleanly at large |g|.
    #[test]
    fn swiglu_matches_the_scalar_formula() {
        let mut g: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.05).collect();
        g.extend([-200.0, -90.0, 90.0, 200.0, 0.0, -0.0, 1e-8]);
        let u: Vec<f32> = g.iter().enumerate().map(|(i, _)| 1.0 + (i % 7) as f32 * 0.3).collect();
        let mut out = vec![0f32; g.len()];
        swiglu(&g, &u, &mut out);
        for ((&g, &u), &o) in g.iter().zip(&u).zip(&out) {
            let want = (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32;
            assert!(
                o.is_finite() && (o - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "g {g}: {o} vs {want}"
            );
        }
    }

    fn naive(w: &[f32], x: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inp)
                    .map(|i| w[o * inp + i] as f64 * x[r * inp + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matvec_matches_naive_for_odd_shapes() {
        let mut rng = crate::testing::XorShift(17);
        for &(rows, out, inp) in &[(1, 1, 1), (1, 37, 77), (3, 130, 64), (4, 9, 1000), (2, 576, 576)] {
            let w = rng.normal_vec(out * inp, 1.0);
            let x = rng.normal_vec(rows * inp, 1.0);
            let want = naive(&w, &x, rows, out, inp);
            let got = matvec(&w, &x, rows, out, inp);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{rows}x{out}x{inp}: {a} vs {b}"
                );
            }
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want = naive(&wr, &x, rows, out, inp);
            let got = matvec(&wb, &x, rows, out, inp);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "bf16 {rows}x{out}x{inp}: {a} vs {b}"
                );
            }
        }
    }
}

/// Tile side of [`transpose`]: a 32×32 f32 tile (4 KiB) read row by row and written column by column stays
/// in L1.
const TILE: usize = 32;

/// `src: [rows, cols]` row-major → `[cols, rows]` row-major, tile by tile, the output's row bands split
/// over the rayon pool. candle's strided copy walks element by element; on SmolLM2 prefill its transposes
/// of the projections' outputs took 17% of the time.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose: {} elements for {rows}×{cols}",
        src.len()
    );
    let mut dst = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    // Each task writes TILE output rows (TILE source columns) completely.
    dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(band, out)| {
        let c0 = band * TILE;
        let cn = out.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            let rn = TILE.min(rows - r0);
            for c in 0..cn {
                let o = &mut out[c * rows + r0..][..rn];
                for (r, x) in o.iter_mut().enumerate() {
                    *x = src[(r0 + r) * cols + c0 + c];
                }
            }
        }
    });
    dst
}

#[cfg(test)]
mod transpose_tests {
    #[test]
    fn transpose_matches_the_definition_on_ragged_shapes() {
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (100, 1536), (0, 4)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
            let t = super::transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], src[r * cols + c], "{rows}×{cols} at ({r}, {c})");
                }
            }
        }
    }
}
