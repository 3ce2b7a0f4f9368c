//! A branch-free `expf` that vectorises, and what is built on it outside attention: the log-sum-exp of a
//! logits row (evaluation scores every continuation token against the whole vocabulary).

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) enum Simd {
    Avx512,
    Avx2,
    None,
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn simd() -> Simd {
    use std::sync::OnceLock;
    static HAS: OnceLock<Simd> = OnceLock::new();
    *HAS.get_or_init(|| {
        if is_x86_feature_detected!("avx512f") {
            Simd::Avx512
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Simd::Avx2
        } else {
            Simd::None
        }
    })
}

/// `ln Σᵢ exp(row[i])` and the first index of the row's maximum (`argmax` as candle picks it): the exps in f32
/// with [`exp`] (vectorised 16 or 8 wide), summed in f32 over 1024-element chunks and in f64 across them.
/// Within ~1e-7 (relative) of the f64 sum of f64 exps; a row without a finite maximum takes that slow path.
pub fn log_sum_exp(row: &[f32]) -> (f64, usize) {
    let (mut max, mut arg) = (f32::NEG_INFINITY, 0);
    for (i, &x) in row.iter().enumerate() {
        if x > max {
            (max, arg) = (x, i);
        }
    }
    if !max.is_finite() {
        let m = max as f64;
        let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        return (m + s.ln(), arg);
    }
    #[cfg(target_arch = "x86_64")]
    let sum = match simd() {
        // SAFETY: the CPU has the features (checked at run time).
        Simd::Avx512 => unsafe { sum_exp_avx512(row, max) },
        Simd::Avx2 => unsafe { sum_exp_avx2(row, max) },
        Simd::None => sum_exp(row, max),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let sum = sum_exp(row, max);
    (max as f64 + sum.ln(), arg)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_exp_avx512(row: &[f32], max: f32) -> f64 {
    sum_exp(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(row: &[f32], max: f32) -> f64 {
    sum_exp(row, max)
}

/// `Σ exp(row[i] − max)`, 16 lanes per 1024-element chunk.
#[inline(always)]
fn sum_exp(row: &[f32], max: f32) -> f64 {
    const LANES: usize = 16;
    let mut total = 0f64;
    for chunk in row.chunks(1024) {
        let mut acc = [0f32; LANES];
        let mut it = chunk.chunks_exact(LANES);
        for c in &mut it {
            for j in 0..LANES {
                acc[j] += exp(c[j] - max);
            }
        }
        let tail: f32 = it.remainder().iter().map(|&x| exp(x - max)).sum();
        total += (tail + acc.iter().sum::<f32>()) as f64;
    }
    total
}

/// `Σ row` in f32 as 16 partial sums (so that the loop vectorises inside the callers' AVX-512/AVX2 functions),
/// the remainder first, then the partial sums.
#[inline(always)]
pub(crate) fn lane_sum(row: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    it.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

/// `eˣ` for `x ≤ 0` (Cephes' `expf`: range reduction by `ln 2`, degree-6 polynomial; ~1 ulp), branch-free so
/// that loops over it vectorise; 0 below −87.3 (and for −∞).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
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

    #[test]
    fn log_sum_exp_matches_f64() {
        let mut rng = crate::testing::XorShift::new(11);
        for n in [1, 15, 16, 1000, 49_152] {
            let row = rng.symmetric_vec(n, 12.0, -3.0);
            let (lse, arg) = log_sum_exp(&row);
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            assert!((lse - want).abs() <= 1e-6 * want.abs().max(1.0), "{n}: {lse} vs {want}");
            assert_eq!(row[arg] as f64, m);
            assert_eq!(arg, row.iter().position(|&x| x as f64 == m).unwrap(), "first argmax");
        }
        let (lse, arg) = log_sum_exp(&[f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY]);
        assert_eq!((lse, arg), (1.0, 1));
    }
}
