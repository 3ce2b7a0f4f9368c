//! merge-linear and merge-slerp against hand-computed values.

use dlo_passes::init::{lerp, merge_linear, normal, slerp};

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

#[test]
fn merge_linear_is_the_elementwise_mean() {
    close(
        &merge_linear(&[1.0, -2.0, 4.0], &[3.0, 2.0, 0.0]),
        &[2.0, 0.0, 2.0],
        0.0,
    );
}

#[test]
fn slerp_of_orthogonal_tensors_at_half() {
    // θ = 90°: s0 = s1 = sin 45° / sin 90° = √½; unnormalised inputs are combined.
    let r = slerp(0.5, &[2.0, 0.0], &[0.0, 4.0]);
    let h = std::f32::consts::FRAC_1_SQRT_2;
    close(&r, &[2.0 * h, 4.0 * h], 1e-6);
    // t = 0 / 1 give the endpoints.
    close(&slerp(0.0, &[2.0, 0.0], &[0.0, 4.0]), &[2.0, 0.0], 1e-6);
    close(&slerp(1.0, &[2.0, 0.0], &[0.0, 4.0]), &[0.0, 4.0], 1e-6);
}

#[test]
fn slerp_at_60_degrees_matrix_treated_as_one_vector() {
    // A 2x2 "matrix" flattened: a = [1,0,0,0], b = [½, √3/2, 0, 0] → θ = 60°, s0 = s1 = sin30/sin60 = 1/√3.
    let a = [1.0f32, 0.0, 0.0, 0.0];
    let b = [0.5f32, 3f32.sqrt() / 2.0, 0.0, 0.0];
    let s = 1.0 / 3f32.sqrt();
    close(&slerp(0.5, &a, &b), &[s * 1.5, s * 3f32.sqrt() / 2.0, 0.0, 0.0], 1e-6);
}

#[test]
fn slerp_falls_back_to_lerp_when_colinear() {
    // Parallel (cos = 1) and anti-parallel (cos = -1) tensors use lerp: the plain mean at t = 0.5.
    close(&slerp(0.5, &[1.0, 2.0], &[3.0, 6.0]), &[2.0, 4.0], 1e-6);
    close(&slerp(0.5, &[1.0, 2.0], &[-3.0, -6.0]), &[-1.0, -2.0], 1e-6);
    // Nearly colinear (cos ≈ 0.99995 > 0.9995): lerp, not the slerp formula.
    let a = [1.0f32, 0.0];
    let b = [1.0f32, 0.01];
    close(&slerp(0.5, &a, &b), &lerp(0.5, &a, &b), 0.0);
    // Just below the threshold (cos ≈ 0.9990): slerp, whose result has a larger norm than lerp's.
    let b = [1.0f32, 0.0448];
    let s = slerp(0.5, &a, &b);
    let l = lerp(0.5, &a, &b);
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
    assert!(n(&s) > n(&l), "{s:?} {l:?}");
}

#[test]
fn normal_init_has_the_requested_spread_and_is_seeded() {
    let v = normal(3, 20000, 0.02);
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
    assert!(mean.abs() < 1e-3, "{mean}");
    assert!((var.sqrt() - 0.02).abs() < 1e-3, "{}", var.sqrt());
    assert_eq!(normal(3, 5, 0.02), normal(3, 5, 0.02));
    assert_ne!(normal(3, 5, 0.02), normal(4, 5, 0.02));
}
