//! Products with ggml's 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), read in place.
//!
//! `y = x Wᵀ` with `W: [out, in]` stored as ggml blocks (each row a run of `in / 32` blocks) and `x: [rows, in]`
//! in f32. As in ggml, the activations are first quantized per 32-element block to 8 bits ([`ActBlock`]: a
//! scale, the 32 quants and their scaled sum), so the inner loop is an integer dot product; each block's result
//! is scaled back to f32 and accumulated. AVX2 does the dot products where the CPU has it (detected at run
//! time), portable code otherwise; both give the same result up to float summation order.
//!
//! The output rows are split over the rayon pool; each weight row is read once per call and dotted with every
//! activation row, so a batch-1 decode step streams the weights once, and a prefill reuses each weight row
//! (a few hundred bytes, in L1) across the whole batch.
//!
//! candle's CPU kernels multiply these types too, but without SIMD for Q4_1, Q5_0 and Q5_1 (the shipped
//! SmolLM2 GGUF is Q4_1, and llama.cpp's Q4_K_M falls back to Q5_0 for SmolLM2's 576-wide rows), and they own
//! their blocks, which rules out using an engine's memory map in place.

use half::f16;
use rayon::prelude::*;

/// Elements per block.
pub const BLOCK: usize = 32;

/// The block formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockType {
    /// `d: f16, q: [u4; 32]`, value `d · (q − 8)`.
    Q4_0,
    /// `d: f16, m: f16, q: [u4; 32]`, value `d · q + m`.
    Q4_1,
    /// `d: f16, qh: u32, q: [u4; 32]`, value `d · ((q | h << 4) − 16)`.
    Q5_0,
    /// `d: f16, m: f16, qh: u32, q: [u4; 32]`, value `d · (q | h << 4) + m`.
    Q5_1,
    /// `d: f16, q: [i8; 32]`, value `d · q`.
    Q8_0,
}

impl BlockType {
    /// The block type of a ggml type, if it is one of these.
    pub fn of(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::Q4_0 => BlockType::Q4_0,
            G::Q4_1 => BlockType::Q4_1,
            G::Q5_0 => BlockType::Q5_0,
            G::Q5_1 => BlockType::Q5_1,
            G::Q8_0 => BlockType::Q8_0,
            _ => return None,
        })
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q5_0 => 22,
            BlockType::Q5_1 => 24,
            BlockType::Q8_0 => 34,
        }
    }

    /// Bytes of one row of `cols` elements (`cols` a multiple of [`BLOCK`]).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }

    /// Whether the value has an offset `m` (then the dot product needs the activations' block sums).
    const fn has_min(self) -> bool {
        matches!(self, BlockType::Q4_1 | BlockType::Q5_1)
    }

    /// The integer a stored quant stands for (before the scale and offset).
    fn value(self, q: u8) -> i32 {
        match self {
            BlockType::Q8_0 => q as i8 as i32,
            _ => q as i32 - self.zero(),
        }
    }

    /// The integer offset subtracted from the unsigned quants (8 for Q4_0, 16 for Q5_0, else 0).
    const fn zero(self) -> i32 {
        match self {
            BlockType::Q4_0 => 8,
            BlockType::Q5_0 => 16,
            _ => 0,
        }
    }
}

/// One 32-element block of quantized activations: `x ≈ d · q`, and `s = d · Σ q`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(8))]
pub struct ActBlock {
    /// Scale.
    pub d: f32,
    /// `d · Σ q` (for formats with an offset).
    pub s: f32,
    /// `Σ q` (for formats with a zero point).
    pub isum: i32,
    /// `Σ q` over the first 16 quants (for Q6_K, whose scales cover 16 elements).
    pub isum_lo: i32,
    /// Quants.
    pub q: [i8; BLOCK],
}

/// Quantizes activation rows (`x: [rows, cols]`, `cols` a multiple of [`BLOCK`]) to 8-bit blocks: `d = max|x| /
/// 127`, quants rounded to nearest (ties to even, as ggml's AVX quantizer does).
pub fn quantize_activations(x: &[f32], cols: usize) -> Vec<ActBlock> {
    let mut out = vec![ActBlock::default(); x.len() / BLOCK];
    let per_row = cols / BLOCK;
    let row = |(blocks, row): (&mut [ActBlock], &[f32])| {
        for (b, v) in blocks.iter_mut().zip(row.chunks_exact(BLOCK)) {
            quantize_block(v, b);
        }
    };
    if x.len() <= 4 * cols {
        // Decode-sized inputs: not worth waking the pool.
        out.chunks_mut(per_row.max(1)).zip(x.chunks(cols.max(1))).for_each(row);
    } else {
        out.par_chunks_mut(per_row.max(1))
            .zip(x.par_chunks(cols.max(1)))
            .for_each(row);
    }
    out
}

fn quantize_block(v: &[f32], b: &mut ActBlock) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 (checked at run time); `v` holds a whole block.
            unsafe { quantize_block_avx2(v, b) };
            return;
        }
    }
    let amax = v.iter().fold(0f32, |a, &x| a.max(x.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &x) in b.q.iter_mut().zip(v) {
        *q = (x * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    b.d = d;
    b.isum = sum;
    b.isum_lo = b.q[..BLOCK / 2].iter().map(|&q| q as i32).sum();
    b.s = d * sum as f32;
}

/// [`quantize_block`] with AVX2: `vcvtps2dq` rounds to nearest even, like the portable code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(v: &[f32], b: &mut ActBlock) {
    use std::arch::x86_64::*;
    debug_assert!(v.len() >= BLOCK);
    let p = v.as_ptr();
    let x = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let m = x
        .iter()
        .fold(_mm256_setzero_ps(), |m, &x| _mm256_max_ps(m, _mm256_and_ps(x, abs)));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let q = x.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, id)));
    // i32 → i16 → i8 packs interleave 128-bit lanes; the permute puts the 32 values back in order.
    let w01 = _mm256_packs_epi32(q[0], q[1]);
    let w23 = _mm256_packs_epi32(q[2], q[3]);
    let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(b.q.as_mut_ptr() as *mut __m256i, bytes);
    // w01 holds quants 0..16 (as i16), w23 quants 16..32.
    let hsum = |v: __m256i| {
        let v = _mm256_madd_epi16(v, _mm256_set1_epi16(1));
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b00_00_00_01)))
    };
    let lo = hsum(w01);
    let sum = lo + hsum(w23);
    b.d = d;
    b.isum = sum;
    b.isum_lo = lo;
    b.s = d * sum as f32;
}

/// A raw output pointer shared by the pool's workers, each writing its own rows.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: workers write disjoint ranges (see `matmul`), and the pool joins them before the buffer is read.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Weight rows per kernel tile (each activation block is loaded once per tile).
const TILE_W: usize = 8;
/// Activation rows per kernel tile in a prefill (each weight block is unpacked once per tile).
const TILE_A: usize = 4;

/// `y = x Wᵀ`: `w` holds `out` rows of `t` blocks, `x` is `[rows, inp]`; returns `[rows, out]`.
///
/// # Panics
/// When `inp` is not a multiple of [`BLOCK`] or the slices' lengths disagree with the shape (callers check
/// both when they build the weight).
pub fn matmul(t: BlockType, w: &[u8], out: usize, inp: usize, x: &[f32], rows: usize) -> Vec<f32> {
    matmul_with(tile_fn(t), t, w, out, inp, x, rows)
}

fn matmul_with(kernel: TileFn, t: BlockType, w: &[u8], out: usize, inp: usize, x: &[f32], rows: usize) -> Vec<f32> {
    assert!(inp.is_multiple_of(BLOCK), "{inp} columns are not whole blocks");
    assert_eq!(w.len(), out * t.row_bytes(inp), "weight bytes");
    assert_eq!(x.len(), rows * inp, "activation length");
    let act = quantize_activations(x, inp);
    let nb = inp / BLOCK;
    let rb = t.row_bytes(inp);
    // Output-major scratch [out, rows]: each work item owns whole weight rows (a group of TILE_W).
    let mut scratch = vec![0f32; out * rows];
    let dst = SyncPtr(scratch.as_mut_ptr());
    let groups = out.div_ceil(TILE_W);
    let run = |range: std::ops::Range<usize>| {
        for g in range {
            let j = g * TILE_W;
            let nw = (out - j).min(TILE_W);
            let wrows = &w[j * rb..(j + nw) * rb];
            // SAFETY: group `g` alone writes rows j..j + nw of the scratch, which has out·rows elements.
            let ys = unsafe { std::slice::from_raw_parts_mut(dst.get().add(j * rows), nw * rows) };
            let mut r = 0;
            while r < rows {
                let na = (rows - r).min(TILE_A);
                let mut res = [[0f32; TILE_A]; TILE_W];
                kernel(wrows, rb, nw, &act[r * nb..(r + na) * nb], nb, na, &mut res);
                for (jj, rr) in res.iter().enumerate().take(nw) {
                    ys[jj * rows + r..jj * rows + r + na].copy_from_slice(&rr[..na]);
                }
                r += na;
            }
        }
    };
    // (candle's spinning barrier pool measured the same as rayon on SmolLM2 decode: the step is bound by the
    // kernels and the serial work between them, not wake-ups.)
    super::par_ranges(groups, run);
    if rows == 1 {
        return scratch;
    }
    super::transpose(&scratch, out, rows)
}

/// Dequantizes one row of `t` blocks into `dst` (`dst.len()` elements).
pub fn dequantize_row(t: BlockType, src: &[u8], dst: &mut [f32]) {
    for (b, d) in src.chunks_exact(t.block_bytes()).zip(dst.chunks_exact_mut(BLOCK)) {
        let (scale, min, q) = unpack(t, b);
        for (o, &q) in d.iter_mut().zip(&q) {
            *o = scale * t.value(q) as f32 + min;
        }
    }
}

/// `values` (`rows × cols`) quantized to `t` blocks by candle's port of ggml's reference quantizers, for tests.
#[cfg(test)]
pub(crate) fn ggml_blocks(t: BlockType, values: &[f32], cols: usize) -> Vec<u8> {
    use candle_core::quantized::{GgmlDType as G, QTensor};
    let ty = match t {
        BlockType::Q4_0 => G::Q4_0,
        BlockType::Q4_1 => G::Q4_1,
        BlockType::Q5_0 => G::Q5_0,
        BlockType::Q5_1 => G::Q5_1,
        BlockType::Q8_0 => G::Q8_0,
    };
    let x = candle_core::Tensor::from_slice(values, (values.len() / cols, cols), &candle_core::Device::Cpu).unwrap();
    QTensor::quantize(&x, ty).unwrap().data().unwrap().into_owned()
}

/// A block's scale, offset and quants (unsigned, before the zero point; Q8_0's as their two's complement).
fn unpack(t: BlockType, b: &[u8]) -> (f32, f32, [u8; BLOCK]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut q = [0u8; BLOCK];
    if t == BlockType::Q8_0 {
        q.copy_from_slice(&b[2..34]);
        return (d, 0.0, q);
    }
    let (m, mut at) = if t.has_min() {
        (f16::from_le_bytes([b[2], b[3]]).to_f32(), 4)
    } else {
        (0.0, 2)
    };
    let qh = if matches!(t, BlockType::Q5_0 | BlockType::Q5_1) {
        at += 4;
        u32::from_le_bytes([b[at - 4], b[at - 3], b[at - 2], b[at - 1]])
    } else {
        0
    };
    for j in 0..16 {
        q[j] = b[at + j] & 0xF | (((qh >> j) & 1) << 4) as u8;
        q[j + 16] = b[at + j] >> 4 | (((qh >> (j + 16)) & 1) << 4) as u8;
    }
    (d, m, q)
}

/// A tile kernel: `res[j][r]` = dot of weight row `j < nw` (rows `rb` bytes apart in `w`) with activation row
/// `r < na` (rows `nb` blocks apart in `act`).
type TileFn = fn(&[u8], usize, usize, &[ActBlock], usize, usize, &mut [[f32; TILE_A]; TILE_W]);

/// The instruction sets the tile kernels are written for, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

/// The instruction sets this CPU runs, in order (the last is used).
fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if super::has_avx2_fma() {
            v.push(Isa::Avx2);
        }
        if has_vnni() {
            v.push(Isa::Vnni);
        }
    }
    v
}

fn tile_fn(t: BlockType) -> TileFn {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    tile_fn_for(t, *BEST.get_or_init(|| *isas().last().expect("portable")))
}

fn tile_fn_for(t: BlockType, isa: Isa) -> TileFn {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! pick {
            ($m:ident) => {
                match t {
                    BlockType::Q4_0 => |w, rb, nw, a, nb, na, res| unsafe { $m::tile::<0>(w, rb, nw, a, nb, na, res) },
                    BlockType::Q4_1 => |w, rb, nw, a, nb, na, res| unsafe { $m::tile::<1>(w, rb, nw, a, nb, na, res) },
                    BlockType::Q5_0 => |w, rb, nw, a, nb, na, res| unsafe { $m::tile::<2>(w, rb, nw, a, nb, na, res) },
                    BlockType::Q5_1 => |w, rb, nw, a, nb, na, res| unsafe { $m::tile::<3>(w, rb, nw, a, nb, na, res) },
                    BlockType::Q8_0 => |w, rb, nw, a, nb, na, res| unsafe { $m::tile::<4>(w, rb, nw, a, nb, na, res) },
                }
            };
        }
        match isa {
            Isa::Vnni => return pick!(vnni),
            Isa::Avx2 => return pick!(avx2),
            Isa::Portable => {}
        }
    }
    let _ = isa;
    match t {
        BlockType::Q4_0 => |w, rb, nw, a, nb, na, res| tile_portable(BlockType::Q4_0, w, rb, nw, a, nb, na, res),
        BlockType::Q4_1 => |w, rb, nw, a, nb, na, res| tile_portable(BlockType::Q4_1, w, rb, nw, a, nb, na, res),
        BlockType::Q5_0 => |w, rb, nw, a, nb, na, res| tile_portable(BlockType::Q5_0, w, rb, nw, a, nb, na, res),
        BlockType::Q5_1 => |w, rb, nw, a, nb, na, res| tile_portable(BlockType::Q5_1, w, rb, nw, a, nb, na, res),
        BlockType::Q8_0 => |w, rb, nw, a, nb, na, res| tile_portable(BlockType::Q8_0, w, rb, nw, a, nb, na, res),
    }
}

/// AVX-512 VNNI with 256-bit vectors (`vpdpbusd`: one instruction per 32-byte dot product, no saturation).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[allow(clippy::too_many_arguments)]
fn tile_portable(
    t: BlockType,
    w: &[u8],
    rb: usize,
    nw: usize,
    act: &[ActBlock],
    nb: usize,
    na: usize,
    res: &mut [[f32; TILE_A]; TILE_W],
) {
    for (j, rj) in res.iter_mut().enumerate().take(nw) {
        for (r, v) in rj.iter_mut().enumerate().take(na) {
            *v = dot_portable(t, &w[j * rb..(j + 1) * rb], &act[r * nb..(r + 1) * nb]);
        }
    }
}

/// The reference dot product (also the fallback without AVX2).
fn dot_portable(t: BlockType, w: &[u8], act: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, a) in w.chunks_exact(t.block_bytes()).zip(act) {
        let (d, m, q) = unpack(t, b);
        let isum: i32 = q.iter().zip(&a.q).map(|(&w, &x)| t.value(w) * x as i32).sum();
        acc += d * a.d * isum as f32 + m * a.s;
    }
    acc
}

/// The x86 tile kernels, one module per instruction set: `$features` enabled, `$dot(u, s, acc)` adding the
/// dot products of 4-byte groups of unsigned `u` and signed `s` bytes to `acc`'s 8 i32 lanes.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($name:ident, $features:literal, $vnni:literal, $dot:expr) => {
        mod $name {
            use super::{ActBlock, BlockType, TILE_A, TILE_W};
            use std::arch::x86_64::*;

            const TYPES: [BlockType; 5] = [
                BlockType::Q4_0,
                BlockType::Q4_1,
                BlockType::Q5_0,
                BlockType::Q5_1,
                BlockType::Q8_0,
            ];

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn f16_at(p: *const u8) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    (p as *const u16).read_unaligned() as i32,
                )))
            }

            /// 32 nibbles → 32 bytes (low nibbles first, then high), as in a ggml 4-bit block.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn nibbles(p: *const u8) -> __m256i {
                let v = _mm_loadu_si128(p as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
                _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
            }

            /// Bit `j` of `qh` → byte `j` = 0x10 if set, else 0.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn high_bits(qh: u32) -> __m256i {
                let shuf = _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0x0000_0000_0000_0000,
                );
                let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
                let mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfeu64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi64x(-1));
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_hadd_ps(s, s);
                _mm_cvtss_f32(_mm_hadd_ps(s, s))
            }

            /// The unsigned quants of one block, the weight's scale and its per-block correction `c` (the
            /// dot product is `d_w d_x Σ u·x + c · s_x`, `s_x = d_x Σ x`): `m − zero · d`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn unpack<const T: usize>(b: *const u8) -> (__m256i, f32, f32) {
                let t = TYPES[T];
                let d = f16_at(b);
                match t {
                    BlockType::Q8_0 => {
                        let q = _mm256_loadu_si256(b.add(2) as *const __m256i);
                        if $vnni {
                            // q + 128 as unsigned bytes; the 128 · Σx it adds is corrected through `c`.
                            (_mm256_xor_si256(q, _mm256_set1_epi8(-128)), d, -128.0 * d)
                        } else {
                            (q, d, 0.0)
                        }
                    }
                    BlockType::Q4_0 => (nibbles(b.add(2)), d, -8.0 * d),
                    BlockType::Q4_1 => (nibbles(b.add(4)), d, f16_at(b.add(2))),
                    BlockType::Q5_0 => {
                        let qh = (b.add(2) as *const u32).read_unaligned();
                        (_mm256_or_si256(nibbles(b.add(6)), high_bits(qh)), d, -16.0 * d)
                    }
                    BlockType::Q5_1 => {
                        let qh = (b.add(4) as *const u32).read_unaligned();
                        (
                            _mm256_or_si256(nibbles(b.add(8)), high_bits(qh)),
                            d,
                            f16_at(b.add(2)),
                        )
                    }
                }
            }

            /// Σ over 4-byte groups of u·x (i32 lanes); Q8_0 without VNNI takes `u` signed (sign trick).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dot_block<const T: usize>(u: __m256i, x: __m256i) -> __m256i {
                if !$vnni && TYPES[T] == BlockType::Q8_0 {
                    let ones = _mm256_set1_epi16(1);
                    return _mm256_madd_epi16(
                        _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(x, u)),
                        ones,
                    );
                }
                $dot(u, x)
            }

            /// See [`super::TileFn`].
            ///
            /// # Safety
            /// Requires the module's CPU features; `w` holds `nw` rows of `rb` bytes, `act` `na` rows of `nb`
            /// blocks.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub unsafe fn tile<const T: usize>(
                w: &[u8],
                rb: usize,
                nw: usize,
                act: &[ActBlock],
                nb: usize,
                na: usize,
                res: &mut [[f32; TILE_A]; TILE_W],
            ) {
                debug_assert!(w.len() >= nw * rb && act.len() >= na * nb);
                if nw == TILE_W && na == TILE_A {
                    full::<T, TILE_W, TILE_A>(w.as_ptr(), rb, act.as_ptr(), nb, res);
                } else if nw == TILE_W && na == 1 {
                    full::<T, TILE_W, 1>(w.as_ptr(), rb, act.as_ptr(), nb, res);
                } else {
                    for j in 0..nw {
                        for r in 0..na {
                            let mut one = [[0f32; TILE_A]; TILE_W];
                            full::<T, 1, 1>(w.as_ptr().add(j * rb), rb, act.as_ptr().add(r * nb), nb, &mut one);
                            res[j][r] = one[0][0];
                        }
                    }
                }
            }

            /// A full `NW × NA` tile: per block, each weight block is unpacked once and each activation block
            /// loaded once.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn full<const T: usize, const NW: usize, const NA: usize>(
                w: *const u8,
                rb: usize,
                act: *const ActBlock,
                nb: usize,
                res: &mut [[f32; TILE_A]; TILE_W],
            ) {
                let bb = TYPES[T].block_bytes();
                let mut acc = [[_mm256_setzero_ps(); NA]; NW];
                let mut corr = [[0f32; NA]; NW];
                for i in 0..nb {
                    let mut xs = [_mm256_setzero_si256(); NA];
                    let mut dx = [0f32; NA];
                    let mut sx = [0f32; NA];
                    for r in 0..NA {
                        let a = &*act.add(r * nb + i);
                        xs[r] = _mm256_loadu_si256(a.q.as_ptr() as *const __m256i);
                        dx[r] = a.d;
                        sx[r] = a.s;
                    }
                    for j in 0..NW {
                        let (u, d, c) = unpack::<T>(w.add(j * rb + i * bb));
                        for r in 0..NA {
                            let p = _mm256_cvtepi32_ps(dot_block::<T>(u, xs[r]));
                            acc[j][r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * dx[r]), acc[j][r]);
                            corr[j][r] += c * sx[r];
                        }
                    }
                }
                for j in 0..NW {
                    for r in 0..NA {
                        res[j][r] = hsum(acc[j][r]) + corr[j][r];
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
x86_kernels!(avx2, "avx2,fma,f16c", false, |u, x| _mm256_madd_epi16(
    _mm256_maddubs_epi16(u, x),
    _mm256_set1_epi16(1)
));
#[cfg(target_arch = "x86_64")]
x86_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    |u, x| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
);

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: [BlockType; 5] = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q8_0,
    ];

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::testing::XorShift::new(seed).symmetric_vec(n, 1.0, 0.1)
    }

    /// The SIMD dot product equals the portable one, and both equal the product of the dequantized weight with
    /// the dequantized activations (what the integer arithmetic stands for).
    #[test]
    fn dot_products_agree_with_dequantized_arithmetic() {
        let (out, inp) = (37, 128);
        for t in TYPES {
            let w = values(out * inp, 1);
            let blocks = ggml_blocks(t, &w, inp);
            for rows in [1, 3, 9] {
                let x = values(rows * inp, 2);
                let act = quantize_activations(&x, inp);
                let y = matmul(t, &blocks, out, inp, &x, rows);
                let mut wd = vec![0f32; inp];
                for o in 0..out {
                    dequantize_row(t, &blocks[o * t.row_bytes(inp)..(o + 1) * t.row_bytes(inp)], &mut wd);
                    for r in 0..rows {
                        let a = &act[r * inp / BLOCK..(r + 1) * inp / BLOCK];
                        let xd: Vec<f32> = a
                            .iter()
                            .flat_map(|b| b.q.iter().map(move |&q| b.d * q as f32))
                            .collect();
                        let want: f32 = wd.iter().zip(&xd).map(|(a, b)| a * b).sum();
                        let portable = dot_portable(t, &blocks[o * t.row_bytes(inp)..(o + 1) * t.row_bytes(inp)], a);
                        let got = y[r * out + o];
                        assert!(
                            (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                            "{t:?} {o} {r}: {got} vs {want}"
                        );
                        assert!(
                            (portable - want).abs() < 1e-3 * (1.0 + want.abs()),
                            "{t:?}: {portable} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The SIMD activation quantizer gives the portable one's quants and sums.
    #[test]
    fn activation_quantizers_agree() {
        let v = values(4 * BLOCK, 5);
        for blk in v.chunks(BLOCK) {
            let mut fast = ActBlock::default();
            quantize_block(blk, &mut fast);
            let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
            let d = amax / 127.0;
            let q: Vec<i8> = blk.iter().map(|&x| (x * (1.0 / d)).round_ties_even() as i8).collect();
            assert_eq!(fast.q.to_vec(), q);
            assert_eq!(fast.isum, q.iter().map(|&q| q as i32).sum::<i32>());
            assert_eq!(fast.isum_lo, q[..16].iter().map(|&q| q as i32).sum::<i32>());
            assert_eq!(fast.d, d);
        }
    }

    /// Quantizing (ggml's reference quantizers) and dequantizing (ours) loses at most half a quantization step
    /// (plus f16 rounding of the scale).
    #[test]
    fn quantize_round_trips_within_a_step() {
        for t in TYPES {
            let v = values(4 * BLOCK, 3);
            let b = ggml_blocks(t, &v, v.len());
            let mut back = vec![0f32; v.len()];
            dequantize_row(t, &b, &mut back);
            let levels = match t {
                BlockType::Q4_0 | BlockType::Q4_1 => 15.0,
                BlockType::Q5_0 | BlockType::Q5_1 => 31.0,
                BlockType::Q8_0 => 254.0,
            };
            let step = 2.2 / levels;
            for (a, b) in v.iter().zip(&back) {
                assert!((a - b).abs() <= step * 0.51 + 1e-3, "{t:?}: {a} → {b}");
            }
        }
    }
}
