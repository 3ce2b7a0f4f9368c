//! Tensor arithmetic for new layers: merges, SLERP, reproducible normal init. Plain `f32` slices (the
//! passes crate has no tensor library); reductions accumulate in `f64`.

/// Colinearity threshold of SLERP: above this |cos| it falls back to lerp (as the reference / mergekit).
pub const SLERP_DOT_THRESHOLD: f64 = 0.9995;
/// Norms at or below this are not normalised (a zero tensor stays zero).
const SLERP_EPS: f64 = 1e-8;

/// Element-wise mean of two equal-length tensors.
pub fn merge_linear(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect()
}

/// `(1 − t)·a + t·b`.
pub fn lerp(t: f64, a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((1.0 - t) * x as f64 + t * y as f64) as f32)
        .collect()
}

/// Spherical interpolation from `a` (t = 0) to `b` (t = 1), treating each tensor as one flattened vector.
/// The angle comes from the Frobenius-normalised tensors; the result combines the *unnormalised* tensors
/// `sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b`. Falls back to [`lerp`] when |cos θ| > 0.9995.
pub fn slerp(t: f64, a: &[f32], b: &[f32]) -> Vec<f32> {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let (na, nb) = (na.sqrt(), nb.sqrt());
    let scale_a = if na > SLERP_EPS { 1.0 / na } else { 1.0 };
    let scale_b = if nb > SLERP_EPS { 1.0 / nb } else { 1.0 };
    let cos = dot * scale_a * scale_b;
    if cos.abs() > SLERP_DOT_THRESHOLD {
        return lerp(t, a, b);
    }
    let theta = cos.clamp(-1.0, 1.0).acos();
    let sin_theta = theta.sin();
    let s0 = (theta - theta * t).sin() / sin_theta;
    let s1 = (theta * t).sin() / sin_theta;
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (s0 * x as f64 + s1 * y as f64) as f32)
        .collect()
}

/// A small deterministic generator (splitmix64) with Box–Muller normals; enough for initialisation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    /// Fills `out` with N(0, std²).
    pub fn fill_normal(&mut self, out: &mut [f32], std: f64) {
        for pair in out.chunks_mut(2) {
            let (u1, u2) = (self.unit(), self.unit());
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let th = std::f64::consts::TAU * u2;
            pair[0] = (r * th.cos()) as f32;
            if let Some(x) = pair.get_mut(1) {
                *x = (r * th.sin()) as f32;
            }
        }
    }
}

/// `n` values from N(0, std²), reproducible from `seed`.
pub fn normal(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    Rng::new(seed).fill_normal(&mut v, std);
    v
}

/// A stable 64-bit hash of a string (FNV-1a), to derive per-tensor seeds from names.
pub fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
