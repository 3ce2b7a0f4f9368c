//! Q4_0, Q4_1 and Q8_0 weights repacked eight rows at a time, for AVX-512 VNNI.
//!
//! [`super::quant`] dots one weight row with one activation row, so every 32-element block ends in a
//! horizontal sum. Here eight rows are interleaved (as llama.cpp's `repack.cpp` does for Q4_0): for a group of
//! 8 rows and one block index, the 8 scales are contiguous, then the quants so that 4 consecutive bytes of a
//! 32-byte vector belong to one row. `vpdpbusd` of such a vector with 4 activation bytes broadcast to every lane
//! then adds each row's partial dot product to its own lane: the 8 lanes *are* the 8 outputs, the scales are a
//! vector, and no horizontal sum is left.
//!
//! Group layout, per block index `i` (`gb` bytes, the same total as the 8 original blocks):
//! - Q4_0: `d[8]` (f16), then 4 × 32 quant bytes; Q4_1: `d[8]`, `m[8]`, then 4 × 32.
//!   Vector `k` holds bytes `4k..4k+4` of each row's 16 nibble bytes: low nibbles are elements `4k..4k+4`,
//!   high nibbles elements `16+4k..16+4k+4`.
//! - Q8_0: `d[8]`, then 8 × 32 bytes; vector `k` holds each row's quants `4k..4k+4`, stored `q ^ 0x80` (= q + 128
//!   as an unsigned byte, which `vpdpbusd` needs; the 128 · Σx it adds is subtracted through the scales).
//! - Q5_0: `d[8]`, 8 × u32 high-bit masks, then the 4 × 32 nibble bytes as for Q4; Q5_1: `d[8]`, `m[8]`, masks,
//!   nibbles. Mask `k` has bit `4r + p` set when element `p` of nibble vector `k` (low nibbles for `k < 4`, high
//!   nibbles of vector `k − 4` otherwise) of row `r` has its fifth bit; `vpmovm2b` turns it into bytes.

use super::quant::{ActBlock, BlockType, BLOCK};
use rayon::prelude::*;

/// Rows per group.
pub const ROWS: usize = 8;

/// Whether this CPU runs the packed kernels (every format with a packed form: the 32-element block formats,
/// Q4_K and Q6_K).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::quant::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Bytes of one group block: 8 × the original block.
pub const fn group_block_bytes(t: BlockType) -> usize {
    ROWS * t.block_bytes()
}

/// Repacks `out` rows (a multiple of [`ROWS`]) of `inp` columns from ggml's row-major blocks, the groups
/// split over the rayon pool (repacking is part of loading a model).
pub fn pack(t: BlockType, src: &[u8], out: usize, inp: usize) -> Vec<u8> {
    assert!(out.is_multiple_of(ROWS) && inp.is_multiple_of(BLOCK));
    let (nb, bb, gb) = (inp / BLOCK, t.block_bytes(), group_block_bytes(t));
    let rb = nb * bb;
    let mut dst = vec![0u8; src.len()];
    dst.par_chunks_mut(nb * gb).enumerate().for_each(|(g, dg)| {
        for i in 0..nb {
            let d = &mut dg[i * gb..(i + 1) * gb];
            for r in 0..ROWS {
                let b = &src[(g * ROWS + r) * rb + i * bb..][..bb];
                d[2 * r..2 * r + 2].copy_from_slice(&b[0..2]);
                match t {
                    BlockType::Q4_0 => {
                        for k in 0..4 {
                            d[16 + 32 * k + 4 * r..][..4].copy_from_slice(&b[2 + 4 * k..2 + 4 * k + 4]);
                        }
                    }
                    BlockType::Q4_1 => {
                        d[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&b[2..4]);
                        for k in 0..4 {
                            d[32 + 32 * k + 4 * r..][..4].copy_from_slice(&b[4 + 4 * k..4 + 4 * k + 4]);
                        }
                    }
                    BlockType::Q8_0 => {
                        for k in 0..8 {
                            for p in 0..4 {
                                d[16 + 32 * k + 4 * r + p] = b[2 + 4 * k + p] ^ 0x80;
                            }
                        }
                    }
                    BlockType::Q5_0 | BlockType::Q5_1 => {
                        let (hdr, qs) = if t == BlockType::Q5_1 {
                            d[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&b[2..4]);
                            (32, 4)
                        } else {
                            (16, 2)
                        };
                        let qh = u32::from_le_bytes([b[qs], b[qs + 1], b[qs + 2], b[qs + 3]]);
                        for k in 0..8 {
                            let mut m = u32::from_le_bytes([
                                d[hdr + 4 * k],
                                d[hdr + 4 * k + 1],
                                d[hdr + 4 * k + 2],
                                d[hdr + 4 * k + 3],
                            ]);
                            for p in 0..4 {
                                m |= ((qh >> element(k, p)) & 1) << (4 * r + p);
                            }
                            d[hdr + 4 * k..hdr + 4 * k + 4].copy_from_slice(&m.to_le_bytes());
                        }
                        for k in 0..4 {
                            d[hdr + 32 + 32 * k + 4 * r..][..4].copy_from_slice(&b[qs + 4 + 4 * k..qs + 8 + 4 * k]);
                        }
                    }
                }
            }
        }
    });
    dst
}

/// The element of a row that byte `p` of nibble vector `k` holds (`k < 4`: low nibbles of bytes `4k..4k+4`,
/// else the high nibbles of bytes `4(k−4)..`).
const fn element(k: usize, p: usize) -> usize {
    if k < 4 {
        4 * k + p
    } else {
        16 + 4 * (k - 4) + p
    }
}

/// Bytes of a `[out, inp]` weight of ggml type `t` in its packed layout, or `None` when `t` has none or the
/// shape is not whole groups (`out` a multiple of [`ROWS`], `inp` of the type's block).
pub fn packed_len(t: candle_core::quantized::GgmlDType, out: usize, inp: usize) -> Option<usize> {
    use candle_core::quantized::GgmlDType as G;
    if !out.is_multiple_of(ROWS) || !inp.is_multiple_of(t.block_size()) {
        return None;
    }
    let groups = out / ROWS * (inp / t.block_size());
    match t {
        G::Q4K => Some(groups * Q4K_GROUP_BLOCK),
        G::Q6K => Some(groups * Q6K_GROUP_BLOCK),
        _ => BlockType::of(t).map(|bt| groups * group_block_bytes(bt)),
    }
}

/// Row-major ggml blocks of a `[out, inp]` weight in the packed layout ([`pack`], [`pack_q4k`], [`pack_q6k`]).
/// Panics unless [`packed_len`] accepts the shape.
pub fn pack_any(t: candle_core::quantized::GgmlDType, rows: &[u8], out: usize, inp: usize) -> Vec<u8> {
    use candle_core::quantized::GgmlDType as G;
    match t {
        G::Q4K => pack_q4k(rows, out, inp),
        G::Q6K => pack_q6k(rows, out, inp),
        _ => pack(BlockType::of(t).expect("a type with a packed layout"), rows, out, inp),
    }
}

/// The inverse of [`pack_any`]: packed weights back in ggml's row-major blocks, the rows split over the rayon
/// pool.
pub fn unpack_any(t: candle_core::quantized::GgmlDType, packed: &[u8], out: usize, inp: usize) -> Vec<u8> {
    use candle_core::quantized::GgmlDType as G;
    let rb = inp / t.block_size() * t.type_size();
    let mut dst = vec![0u8; out * rb];
    dst.par_chunks_mut(rb).enumerate().for_each(|(row, d)| match t {
        G::Q4K => unpack_row_q4k(packed, row, inp, d),
        G::Q6K => unpack_row_q6k(packed, row, inp, d),
        _ => unpack_row(
            BlockType::of(t).expect("a type with a packed layout"),
            packed,
            row,
            inp,
            d,
        ),
    });
    dst
}

/// Row `row` of packed weights (`inp` columns) back in ggml's block layout (for embedding lookups).
pub fn unpack_row(t: BlockType, packed: &[u8], row: usize, inp: usize, dst: &mut [u8]) {
    let (nb, bb, gb) = (inp / BLOCK, t.block_bytes(), group_block_bytes(t));
    let (g, r) = (row / ROWS, row % ROWS);
    for i in 0..nb {
        let d = &packed[(g * nb + i) * gb..][..gb];
        let b = &mut dst[i * bb..(i + 1) * bb];
        b[0..2].copy_from_slice(&d[2 * r..2 * r + 2]);
        match t {
            BlockType::Q4_0 => {
                for k in 0..4 {
                    b[2 + 4 * k..2 + 4 * k + 4].copy_from_slice(&d[16 + 32 * k + 4 * r..][..4]);
                }
            }
            BlockType::Q4_1 => {
                b[2..4].copy_from_slice(&d[16 + 2 * r..16 + 2 * r + 2]);
                for k in 0..4 {
                    b[4 + 4 * k..4 + 4 * k + 4].copy_from_slice(&d[32 + 32 * k + 4 * r..][..4]);
                }
            }
            BlockType::Q8_0 => {
                for k in 0..8 {
                    for p in 0..4 {
                        b[2 + 4 * k + p] = d[16 + 32 * k + 4 * r + p] ^ 0x80;
                    }
                }
            }
            BlockType::Q5_0 | BlockType::Q5_1 => {
                let (hdr, qs) = if t == BlockType::Q5_1 {
                    b[2..4].copy_from_slice(&d[16 + 2 * r..16 + 2 * r + 2]);
                    (32, 4)
                } else {
                    (16, 2)
                };
                let mut qh = 0u32;
                for k in 0..8 {
                    let m = u32::from_le_bytes([
                        d[hdr + 4 * k],
                        d[hdr + 4 * k + 1],
                        d[hdr + 4 * k + 2],
                        d[hdr + 4 * k + 3],
                    ]);
                    for p in 0..4 {
                        qh |= ((m >> (4 * r + p)) & 1) << element(k, p);
                    }
                }
                b[qs..qs + 4].copy_from_slice(&qh.to_le_bytes());
                for k in 0..4 {
                    b[qs + 4 + 4 * k..qs + 8 + 4 * k].copy_from_slice(&d[hdr + 32 + 32 * k + 4 * r..][..4]);
                }
            }
        }
    }
}

/// `y = x Wᵀ` for packed `w` (`out` rows, `inp` columns) and activation blocks `act` (`rows` rows): returns
/// `[rows, out]`. The groups are split over the rayon pool.
pub fn matmul(t: BlockType, w: &[u8], out: usize, inp: usize, act: &[ActBlock], rows: usize) -> Vec<f32> {
    let nb = inp / BLOCK;
    matmul_groups(w, out, inp, act, rows, nb * group_block_bytes(t), |wg, a, na, res| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_groups` checked the CPU; `wg` is one group of `nb` blocks, `a` holds `na` rows.
        unsafe {
            match (t, na) {
                (BlockType::Q4_0, 1) => vnni::group::<0, 1>(wg, a, nb, res),
                (BlockType::Q4_0, _) => vnni::group::<0, 2>(wg, a, nb, res),
                (BlockType::Q4_1, 1) => vnni::group::<1, 1>(wg, a, nb, res),
                (BlockType::Q4_1, _) => vnni::group::<1, 2>(wg, a, nb, res),
                (BlockType::Q8_0, 1) => vnni::group::<2, 1>(wg, a, nb, res),
                (BlockType::Q8_0, _) => vnni::group::<2, 2>(wg, a, nb, res),
                (BlockType::Q5_0, 1) => vnni::group::<3, 1>(wg, a, nb, res),
                (BlockType::Q5_0, _) => vnni::group::<3, 2>(wg, a, nb, res),
                (BlockType::Q5_1, 1) => vnni::group::<4, 1>(wg, a, nb, res),
                (BlockType::Q5_1, _) => vnni::group::<4, 2>(wg, a, nb, res),
            }
        }
    })
}

/// The loop every packed product shares: 8-row groups of `gstride` bytes, `kernel(group, activations from row
/// r, na, res)` for 1 or 2 activation rows at a time (`res[k]` = the group's 8 outputs for row r + k), the
/// groups split over the rayon pool, each writing its own 8 columns of the `[rows, out]` result.
fn matmul_groups(
    w: &[u8],
    out: usize,
    inp: usize,
    act: &[ActBlock],
    rows: usize,
    gstride: usize,
    kernel: impl Fn(&[u8], &[ActBlock], usize, &mut [[f32; ROWS]; 2]) + Sync,
) -> Vec<f32> {
    assert!(available() && out.is_multiple_of(ROWS));
    let nb32 = inp / BLOCK;
    assert_eq!(w.len(), out / ROWS * gstride);
    assert_eq!(act.len(), rows * nb32);
    let mut y = vec![0f32; rows * out];
    let dst = Dst(y.as_mut_ptr());
    super::par_ranges(out / ROWS, |range| {
        for g in range {
            let wg = &w[g * gstride..(g + 1) * gstride];
            let mut r = 0;
            while r < rows {
                let na = (rows - r).min(2);
                let mut res = [[0f32; ROWS]; 2];
                kernel(wg, &act[r * nb32..], na, &mut res);
                for (k, row) in res.iter().enumerate().take(na) {
                    // SAFETY: group g alone writes columns g·8..g·8+8; the row index is below `rows`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst.get().add((r + k) * out + g * ROWS), ROWS);
                    }
                }
                r += na;
            }
        }
    });
    y
}

/// Elements of a Q4_K super block.
pub const QK_K: usize = 256;
/// Bytes of a ggml Q4_K block: `d`, `dmin` (f16), 12 bytes of 6-bit scales and mins, 128 nibble bytes.
const Q4K_BLOCK: usize = 144;
/// Bytes of a packed Q4_K group block: `d[8]`, `dmin[8]`, `sc[8 sub-blocks][8 rows]`, `m[8][8]` (u8), then per
/// sub-block the 4 × 32 nibble bytes of the Q4 layout above.
pub const Q4K_GROUP_BLOCK: usize = 16 + 16 + 64 + 64 + 8 * 128;

/// Scale and min (6 bits each) of sub-block `j` from a Q4_K block's 12 scale bytes (ggml's `get_scale_min_k4`).
fn scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}

/// The 12 scale bytes that [`scale_min`] decodes back to `sc`, `m`.
fn encode_scale_min(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut b = [0u8; 12];
    for j in 0..4 {
        b[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        b[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        b[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    b
}

/// Repacks `out` rows (a multiple of [`ROWS`]) of `inp` columns (a multiple of [`QK_K`]) of ggml Q4_K blocks.
pub fn pack_q4k(src: &[u8], out: usize, inp: usize) -> Vec<u8> {
    assert!(out.is_multiple_of(ROWS) && inp.is_multiple_of(QK_K));
    let nb = inp / QK_K;
    let rb = nb * Q4K_BLOCK;
    let mut dst = vec![0u8; out / ROWS * nb * Q4K_GROUP_BLOCK];
    dst.par_chunks_mut(nb * Q4K_GROUP_BLOCK)
        .enumerate()
        .for_each(|(g, dg)| {
            for i in 0..nb {
                let d = &mut dg[i * Q4K_GROUP_BLOCK..][..Q4K_GROUP_BLOCK];
                for r in 0..ROWS {
                    let b = &src[(g * ROWS + r) * rb + i * Q4K_BLOCK..][..Q4K_BLOCK];
                    d[2 * r..2 * r + 2].copy_from_slice(&b[0..2]);
                    d[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&b[2..4]);
                    for j in 0..8 {
                        let (sc, m) = scale_min(&b[4..16], j);
                        d[32 + 8 * j + r] = sc;
                        d[96 + 8 * j + r] = m;
                        // Sub-block j: nibbles of bytes 32·(j/2) .. +32, low for even j, high for odd.
                        let q = &b[16 + 32 * (j / 2)..][..32];
                        let nib = |e: usize| if j % 2 == 0 { q[e] & 0xF } else { q[e] >> 4 };
                        for k in 0..4 {
                            for p in 0..4 {
                                d[160 + 128 * j + 32 * k + 4 * r + p] = nib(4 * k + p) | (nib(16 + 4 * k + p) << 4);
                            }
                        }
                    }
                }
            }
        });
    dst
}

/// Row `row` of packed Q4_K weights back in ggml's block layout.
pub fn unpack_row_q4k(packed: &[u8], row: usize, inp: usize, dst: &mut [u8]) {
    let nb = inp / QK_K;
    let (g, r) = (row / ROWS, row % ROWS);
    for i in 0..nb {
        let d = &packed[(g * nb + i) * Q4K_GROUP_BLOCK..][..Q4K_GROUP_BLOCK];
        let b = &mut dst[i * Q4K_BLOCK..(i + 1) * Q4K_BLOCK];
        b[0..2].copy_from_slice(&d[2 * r..2 * r + 2]);
        b[2..4].copy_from_slice(&d[16 + 2 * r..16 + 2 * r + 2]);
        let sc: [u8; 8] = std::array::from_fn(|j| d[32 + 8 * j + r]);
        let m: [u8; 8] = std::array::from_fn(|j| d[96 + 8 * j + r]);
        b[4..16].copy_from_slice(&encode_scale_min(&sc, &m));
        for j in 0..8 {
            for k in 0..4 {
                for p in 0..4 {
                    let v = d[160 + 128 * j + 32 * k + 4 * r + p];
                    let (lo, hi) = (v & 0xF, v >> 4);
                    for (e, n) in [(4 * k + p, lo), (16 + 4 * k + p, hi)] {
                        let q = &mut b[16 + 32 * (j / 2) + e];
                        *q = if j % 2 == 0 {
                            (*q & 0xF0) | n
                        } else {
                            (*q & 0x0F) | (n << 4)
                        };
                    }
                }
            }
        }
    }
}

/// `y = x Wᵀ` for packed Q4_K `w` (`out` rows, `inp` columns) and 32-element activation blocks `act`.
pub fn matmul_q4k(w: &[u8], out: usize, inp: usize, act: &[ActBlock], rows: usize) -> Vec<f32> {
    let nb = inp / QK_K;
    matmul_groups(w, out, inp, act, rows, nb * Q4K_GROUP_BLOCK, |wg, a, na, res| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_groups` checked the CPU; `wg` is one group of `nb` super blocks.
        unsafe {
            if na == 1 {
                vnni::group_q4k::<1>(wg, a, nb, res)
            } else {
                vnni::group_q4k::<2>(wg, a, nb, res)
            }
        }
    })
}

/// Bytes of a ggml Q6_K block: `ql[128]`, `qh[64]`, `scales[16]` (i8), `d` (f16).
const Q6K_BLOCK: usize = 210;
/// Bytes of a packed Q6_K group block: `d[8]`, `sc[16 sub-blocks][8 rows]` (i8), then per 32-element block the
/// fifth- and sixth-bit masks of its 8 vectors (2 × 8 × u32) and its 4 × 32 nibble bytes (the Q4 layout).
pub const Q6K_GROUP_BLOCK: usize = 16 + 128 + 8 * (64 + 128);

/// The 6-bit quant (0..64, value `q − 32`) of element `e` of a Q6_K block (ggml's `dequantize_row_q6_K`).
fn q6_get(b: &[u8], e: usize) -> u8 {
    let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
    let (ql, qh) = (&b[64 * h..], &b[128 + 32 * h..]);
    let low = match j {
        0 => ql[l] & 0xF,
        1 => ql[l + 32] & 0xF,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    low | (((qh[l] >> (2 * j)) & 3) << 4)
}

/// Sets element `e` of a Q6_K block to the 6-bit quant `q` (the inverse of [`q6_get`]).
fn q6_set(b: &mut [u8], e: usize, q: u8) {
    let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
    let lo = q & 0xF;
    let li = 64 * h + l + if j % 2 == 1 { 32 } else { 0 };
    b[li] = if j < 2 {
        (b[li] & 0xF0) | lo
    } else {
        (b[li] & 0x0F) | (lo << 4)
    };
    let hi = 128 + 32 * h + l;
    b[hi] = (b[hi] & !(3 << (2 * j))) | ((q >> 4) << (2 * j));
}

/// Repacks `out` rows (a multiple of [`ROWS`]) of `inp` columns (a multiple of [`QK_K`]) of ggml Q6_K blocks.
pub fn pack_q6k(src: &[u8], out: usize, inp: usize) -> Vec<u8> {
    assert!(out.is_multiple_of(ROWS) && inp.is_multiple_of(QK_K));
    let nb = inp / QK_K;
    let rb = nb * Q6K_BLOCK;
    let mut dst = vec![0u8; out / ROWS * nb * Q6K_GROUP_BLOCK];
    dst.par_chunks_mut(nb * Q6K_GROUP_BLOCK)
        .enumerate()
        .for_each(|(g, dg)| {
            for i in 0..nb {
                let d = &mut dg[i * Q6K_GROUP_BLOCK..][..Q6K_GROUP_BLOCK];
                for r in 0..ROWS {
                    let b = &src[(g * ROWS + r) * rb + i * Q6K_BLOCK..][..Q6K_BLOCK];
                    d[2 * r..2 * r + 2].copy_from_slice(&b[208..210]);
                    for k in 0..16 {
                        d[16 + 8 * k + r] = b[192 + k];
                    }
                    for blk in 0..8 {
                        let o = 144 + 192 * blk;
                        for k in 0..8 {
                            let (mut m4, mut m5) = (
                                u32::from_le_bytes(d[o + 4 * k..o + 4 * k + 4].try_into().expect("4 bytes")),
                                u32::from_le_bytes(d[o + 32 + 4 * k..o + 32 + 4 * k + 4].try_into().expect("4 bytes")),
                            );
                            for p in 0..4 {
                                let q = q6_get(b, 32 * blk + element(k, p));
                                m4 |= (((q >> 4) & 1) as u32) << (4 * r + p);
                                m5 |= (((q >> 5) & 1) as u32) << (4 * r + p);
                            }
                            d[o + 4 * k..o + 4 * k + 4].copy_from_slice(&m4.to_le_bytes());
                            d[o + 32 + 4 * k..o + 32 + 4 * k + 4].copy_from_slice(&m5.to_le_bytes());
                        }
                        for k in 0..4 {
                            for p in 0..4 {
                                let lo = q6_get(b, 32 * blk + 4 * k + p) & 0xF;
                                let hi = q6_get(b, 32 * blk + 16 + 4 * k + p) & 0xF;
                                d[o + 64 + 32 * k + 4 * r + p] = lo | (hi << 4);
                            }
                        }
                    }
                }
            }
        });
    dst
}

/// Row `row` of packed Q6_K weights back in ggml's block layout.
pub fn unpack_row_q6k(packed: &[u8], row: usize, inp: usize, dst: &mut [u8]) {
    let nb = inp / QK_K;
    let (g, r) = (row / ROWS, row % ROWS);
    for i in 0..nb {
        let d = &packed[(g * nb + i) * Q6K_GROUP_BLOCK..][..Q6K_GROUP_BLOCK];
        let b = &mut dst[i * Q6K_BLOCK..(i + 1) * Q6K_BLOCK];
        b.fill(0);
        b[208..210].copy_from_slice(&d[2 * r..2 * r + 2]);
        for k in 0..16 {
            b[192 + k] = d[16 + 8 * k + r];
        }
        for blk in 0..8 {
            let o = 144 + 192 * blk;
            for k in 0..8 {
                let m4 = u32::from_le_bytes(d[o + 4 * k..o + 4 * k + 4].try_into().expect("4 bytes"));
                let m5 = u32::from_le_bytes(d[o + 32 + 4 * k..o + 32 + 4 * k + 4].try_into().expect("4 bytes"));
                for p in 0..4 {
                    let e = element(k, p);
                    let nib = d[o + 64 + 32 * (k % 4) + 4 * r + p];
                    let lo = if k < 4 { nib & 0xF } else { nib >> 4 };
                    let hi = (((m4 >> (4 * r + p)) & 1) | (((m5 >> (4 * r + p)) & 1) << 1)) as u8;
                    q6_set(b, 32 * blk + e, lo | (hi << 4));
                }
            }
        }
    }
}

/// `y = x Wᵀ` for packed Q6_K `w` (`out` rows, `inp` columns) and 32-element activation blocks `act`.
pub fn matmul_q6k(w: &[u8], out: usize, inp: usize, act: &[ActBlock], rows: usize) -> Vec<f32> {
    let nb = inp / QK_K;
    matmul_groups(w, out, inp, act, rows, nb * Q6K_GROUP_BLOCK, |wg, a, na, res| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_groups` checked the CPU; `wg` is one group of `nb` super blocks.
        unsafe {
            if na == 1 {
                vnni::group_q6k::<1>(wg, a, nb, res)
            } else {
                vnni::group_q6k::<2>(wg, a, nb, res)
            }
        }
    })
}

#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: workers write disjoint column ranges of `y` (see `matmul`), which outlives the parallel loop.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}
impl Dst {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::super::quant::{ActBlock, BlockType};
    use std::arch::x86_64::*;

    /// The block types of `group`'s `T` index.
    const TYPES: [BlockType; 5] = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q8_0,
        BlockType::Q5_0,
        BlockType::Q5_1,
    ];

    /// The 8 quant vectors of a Q4-layout sub-block: vectors `k` and `k + 4` are the low and high nibbles of the
    /// 32 bytes at `q + 32k`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn nibbles(q: *const u8) -> [__m256i; 8] {
        let mask = _mm256_set1_epi8(0x0F);
        let mut v = [_mm256_setzero_si256(); 8];
        for k in 0..4 {
            let p = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
            v[k] = _mm256_and_si256(p, mask);
            v[k + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
        }
        v
    }

    /// Each row's (lane's) dot products of the quant vectors `v` with the activation quants `x` (vector `k` with
    /// the 4 bytes `x[k]` broadcast), split into elements 0..16 (vectors 0..4) and 16..32 (vectors 4..8). Four
    /// independent accumulation chains: `vpdpbusd` has a 5-cycle latency.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot_halves(v: &[__m256i; 8], x: *const i32) -> (__m256i, __m256i) {
        let bc = |n: usize| _mm256_set1_epi32(x.add(n).read_unaligned());
        let z = _mm256_setzero_si256();
        let (mut l0, mut l1) = (_mm256_dpbusd_epi32(z, v[0], bc(0)), _mm256_dpbusd_epi32(z, v[1], bc(1)));
        let (mut h0, mut h1) = (_mm256_dpbusd_epi32(z, v[4], bc(4)), _mm256_dpbusd_epi32(z, v[5], bc(5)));
        l0 = _mm256_dpbusd_epi32(l0, v[2], bc(2));
        l1 = _mm256_dpbusd_epi32(l1, v[3], bc(3));
        h0 = _mm256_dpbusd_epi32(h0, v[6], bc(6));
        h1 = _mm256_dpbusd_epi32(h1, v[7], bc(7));
        (_mm256_add_epi32(l0, l1), _mm256_add_epi32(h0, h1))
    }

    /// Sets the bit `bit` (0x10, 0x20) in every byte of `v` whose bit in the per-vector masks at `masks` is set
    /// (mask `k`, bit `4r + p`, for byte `4r + p` of vector `k`): the fifth and sixth bits of Q5 and Q6 quants.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn add_bit(v: &mut [__m256i; 8], masks: *const u8, bit: i8) {
        let b = _mm256_set1_epi8(bit);
        let masks = masks as *const u32;
        for (k, vk) in v.iter_mut().enumerate() {
            let m = _mm256_movm_epi8(masks.add(k).read_unaligned());
            *vk = _mm256_or_si256(*vk, _mm256_and_si256(m, b));
        }
    }

    /// One activation block `a` against the quant vectors `v` of 8 rows whose values are `scale · u + c`:
    /// `acc += (Σ u·x) · scale · d_x` and `corr += c · s_x` (`s_x = d_x Σ x`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn step(acc: &mut __m256, corr: &mut __m256, v: &[__m256i; 8], a: &ActBlock, scale: __m256, c: __m256) {
        let s = dot(v, a.q.as_ptr() as *const i32);
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scale, _mm256_set1_ps(a.d)), *acc);
        *corr = _mm256_fmadd_ps(c, _mm256_set1_ps(a.s), *corr);
    }

    /// [`dot_halves`] summed: the whole 32-element block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot(v: &[__m256i; 8], x: *const i32) -> __m256i {
        let (lo, hi) = dot_halves(v, x);
        _mm256_add_epi32(lo, hi)
    }

    /// `T`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0, 3 = Q5_0, 4 = Q5_1; `NA` activation rows (1 or 2). `res[r][j]` = dot of row j of the
    /// group with activation row r.
    ///
    /// # Safety
    /// AVX-512 VNNI/VL/BW, AVX2, FMA and F16C; `w` holds `nb` group blocks, `act` `NA · nb` blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn group<const T: usize, const NA: usize>(
        w: &[u8],
        act: &[ActBlock],
        nb: usize,
        res: &mut [[f32; 8]; 2],
    ) {
        let gb = super::group_block_bytes(TYPES[T]);
        // Where the quant vectors start; Q5's high-bit masks sit just before them.
        let hdr: usize = match T {
            0 | 2 => 16,
            1 => 32,
            3 => 48,
            _ => 64,
        };
        debug_assert!(w.len() >= nb * gb && act.len() >= NA * nb);
        let zero: f32 = match T {
            0 => -8.0,
            2 => -128.0,
            3 => -16.0,
            _ => 0.0,
        };
        let mut acc = [_mm256_setzero_ps(); NA];
        let mut corr = [_mm256_setzero_ps(); NA];
        let wp = w.as_ptr();
        for i in 0..nb {
            let b = wp.add(i * gb);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(b as *const __m128i));
            let c = if T == 1 || T == 4 {
                _mm256_cvtph_ps(_mm_loadu_si128(b.add(16) as *const __m128i))
            } else {
                _mm256_mul_ps(d, _mm256_set1_ps(zero))
            };
            let q = b.add(hdr);
            // The 8 quant vectors: element groups 0..8 (4 elements each) of all 8 rows.
            let mut v = [_mm256_setzero_si256(); 8];
            if T == 2 {
                for (k, vk) in v.iter_mut().enumerate() {
                    *vk = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                }
            } else {
                v = nibbles(q);
                if T >= 3 {
                    add_bit(&mut v, q.sub(32), 0x10);
                }
            }
            for (r, (acc, corr)) in acc.iter_mut().zip(&mut corr).enumerate() {
                step(acc, corr, &v, &*act.as_ptr().add(r * nb + i), d, c);
            }
        }
        for r in 0..NA {
            _mm256_storeu_ps(res[r].as_mut_ptr(), _mm256_add_ps(acc[r], corr[r]));
        }
    }

    /// The dot products of 8 packed Q4_K rows with `NA` activation rows of 32-element blocks: per sub-block the
    /// Q4_1 arithmetic with scale `d · sc` and offset `−dmin · m`, both as 8-lane vectors.
    ///
    /// # Safety
    /// As [`group`]; `w` holds `nb` packed super blocks, `act` `NA · 8 · nb` blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn group_q4k<const NA: usize>(w: &[u8], act: &[ActBlock], nb: usize, res: &mut [[f32; 8]; 2]) {
        let gb = super::Q4K_GROUP_BLOCK;
        debug_assert!(w.len() >= nb * gb && act.len() >= NA * 8 * nb);
        let mut acc = [_mm256_setzero_ps(); NA];
        let mut corr = [_mm256_setzero_ps(); NA];
        let wp = w.as_ptr();
        for i in 0..nb {
            let b = wp.add(i * gb);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(b as *const __m128i));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(b.add(16) as *const __m128i));
            for j in 0..8 {
                let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    b.add(32 + 8 * j) as *const __m128i
                )));
                let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    b.add(96 + 8 * j) as *const __m128i
                )));
                let ws = _mm256_mul_ps(d, sc);
                let wm = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), dmin), mn);
                let v = nibbles(b.add(160 + 128 * j));
                for (r, (acc, corr)) in acc.iter_mut().zip(&mut corr).enumerate() {
                    step(acc, corr, &v, &*act.as_ptr().add(r * 8 * nb + 8 * i + j), ws, wm);
                }
            }
        }
        for r in 0..NA {
            _mm256_storeu_ps(res[r].as_mut_ptr(), _mm256_add_ps(acc[r], corr[r]));
        }
    }

    /// The dot products of 8 packed Q6_K rows with `NA` activation rows: per 32-element block, two 16-element
    /// halves with their own scale vectors `d · sc`, quants `q − 32` (the 32 · Σx subtracted per half).
    ///
    /// # Safety
    /// As [`group`]; `w` holds `nb` packed super blocks, `act` `NA · 8 · nb` blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn group_q6k<const NA: usize>(w: &[u8], act: &[ActBlock], nb: usize, res: &mut [[f32; 8]; 2]) {
        let gb = super::Q6K_GROUP_BLOCK;
        debug_assert!(w.len() >= nb * gb && act.len() >= NA * 8 * nb);
        let mut acc = [_mm256_setzero_ps(); NA];
        let wp = w.as_ptr();
        for i in 0..nb {
            let b = wp.add(i * gb);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(b as *const __m128i));
            for blk in 0..8 {
                let sc = |k: usize| {
                    _mm256_mul_ps(
                        d,
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            b.add(16 + 8 * k) as *const __m128i
                        ))),
                    )
                };
                let (s_lo, s_hi) = (sc(2 * blk), sc(2 * blk + 1));
                let o = b.add(144 + 192 * blk);
                let mut v = nibbles(o.add(64));
                add_bit(&mut v, o, 0x10);
                add_bit(&mut v, o.add(32), 0x20);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a = &*act.as_ptr().add(r * 8 * nb + 8 * i + blk);
                    let x = a.q.as_ptr() as *const i32;
                    let (l, h) = dot_halves(&v, x);
                    // Σ (q − 32)·x per half: subtract 32 · Σx of that half before scaling.
                    let lo = _mm256_sub_epi32(l, _mm256_set1_epi32(32 * a.isum_lo));
                    let hi = _mm256_sub_epi32(h, _mm256_set1_epi32(32 * (a.isum - a.isum_lo)));
                    let dx = _mm256_set1_ps(a.d);
                    *acc_r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(s_lo, dx), *acc_r);
                    *acc_r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(s_hi, dx), *acc_r);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            _mm256_storeu_ps(res[r].as_mut_ptr(), *acc_r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::{self, ggml_blocks, quantize_activations};
    use super::*;

    type Pack = fn(&[u8], usize, usize) -> Vec<u8>;
    type Unpack = fn(&[u8], usize, usize, &mut [u8]);
    type Product = fn(&[u8], usize, usize, &[ActBlock], usize) -> Vec<f32>;

    /// A packed k-quant unpacks to ggml's bytes, and its products equal candle's dequantized weights times the
    /// (dequantized) 8-bit activations.
    fn check_k(ty: candle_core::quantized::GgmlDType, block: usize, pack: Pack, unpack: Unpack, product: Product) {
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        let (out, inp) = (16, 512);
        let v = crate::testing::XorShift::new(5).symmetric_vec(out * inp, 1.0, 0.2);
        let t = Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, ty).unwrap();
        let bytes = q.data().unwrap().into_owned();
        let wd = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let packed = pack(&bytes, out, inp);
        let rb = inp / QK_K * block;
        let mut row = vec![0u8; rb];
        for r in 0..out {
            unpack(&packed, r, inp, &mut row);
            assert_eq!(row, bytes[r * rb..(r + 1) * rb], "{ty:?} row {r}");
        }
        assert_eq!(pack_any(ty, &bytes, out, inp), packed);
        assert_eq!(unpack_any(ty, &packed, out, inp), bytes, "{ty:?}: unpack inverts pack");
        assert_eq!(packed_len(ty, out, inp), Some(packed.len()));
        assert_eq!(packed_len(ty, out + 4, inp), None, "rows not whole groups");
        if !available() {
            return;
        }
        for rows in [1, 3] {
            let x = crate::testing::XorShift::new(6).symmetric_vec(rows * inp, 1.0, 0.0);
            let act = quantize_activations(&x, inp);
            let y = product(&packed, out, inp, &act, rows);
            for r in 0..rows {
                let xd: Vec<f32> = act[r * inp / BLOCK..(r + 1) * inp / BLOCK]
                    .iter()
                    .flat_map(|b| b.q.iter().map(move |&q| b.d * q as f32))
                    .collect();
                for (o, w) in wd.iter().enumerate() {
                    let want: f32 = w.iter().zip(&xd).map(|(a, b)| a * b).sum();
                    let got = y[r * out + o];
                    assert!(
                        (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "{ty:?} {r} {o}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn packed_q4k_is_exact() {
        check_k(
            candle_core::quantized::GgmlDType::Q4K,
            Q4K_BLOCK,
            pack_q4k,
            unpack_row_q4k,
            matmul_q4k,
        );
    }

    #[test]
    fn packed_q6k_is_exact() {
        check_k(
            candle_core::quantized::GgmlDType::Q6K,
            Q6K_BLOCK,
            pack_q6k,
            unpack_row_q6k,
            matmul_q6k,
        );
    }

    /// Packing is lossless (every row unpacks to its ggml bytes), and the packed kernel gives the row kernel's
    /// products, for 1, 2 and 5 activation rows.
    #[test]
    fn packed_products_equal_the_row_kernels() {
        let (out, inp) = (24, 96);
        use candle_core::quantized::GgmlDType as G;
        for (t, g) in [
            (BlockType::Q4_0, G::Q4_0),
            (BlockType::Q4_1, G::Q4_1),
            (BlockType::Q8_0, G::Q8_0),
            (BlockType::Q5_0, G::Q5_0),
            (BlockType::Q5_1, G::Q5_1),
        ] {
            let w = crate::testing::XorShift::new(3).symmetric_vec(out * inp, 1.0, 0.1);
            let rb = t.row_bytes(inp);
            let blocks = ggml_blocks(t, &w, inp);
            let packed = pack(t, &blocks, out, inp);
            let mut row = vec![0u8; rb];
            for r in 0..out {
                unpack_row(t, &packed, r, inp, &mut row);
                assert_eq!(row, blocks[r * rb..(r + 1) * rb], "{t:?} row {r}");
            }
            assert_eq!(pack_any(g, &blocks, out, inp), packed);
            assert_eq!(unpack_any(g, &packed, out, inp), blocks, "{t:?}: unpack inverts pack");
            assert_eq!(packed_len(g, out, inp), Some(blocks.len()));
            if !available() {
                continue;
            }
            for rows in [1, 2, 5] {
                let x = crate::testing::XorShift::new(4).symmetric_vec(rows * inp, 1.0, 0.0);
                let want = quant::matmul(t, &blocks, out, inp, &x, rows);
                let got = matmul(t, &packed, out, inp, &quantize_activations(&x, inp), rows);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{t:?} rows {rows}: {g} vs {w}");
                }
            }
        }
    }
}
