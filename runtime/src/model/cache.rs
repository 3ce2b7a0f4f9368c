//! KV caches: one per layer, each with its own length (ragged across layers).
//!
//! A layer's cache holds K/V for the tokens that **executed** attention at that layer, at their original
//! positions. For dense layers and `mlp` skipping that is every token; for `layer` skipping it is only the
//! routed-in tokens (`dlo-method.md` §8.2), so cached decoding equals full recomputation.
//!
//! Storage is a growable `[batch, kv_heads, capacity, head_dim]` buffer written in place. Every sequence of a
//! batch shares the slot count; a slot a sequence did not fill (padding, or a token it skipped while another
//! sequence executed) is marked invalid and masked out of attention.

use super::blocked::Keys;
use candle_core::{DType, Device, Result, Tensor};

/// Additive mask value for a hidden slot: finite, so that a query with no visible key (padding) gets a
/// uniform average instead of NaN, which could otherwise leak into other rows through later layers.
pub const MASKED: f32 = -1e30;

/// K/V and slot metadata for one layer.
#[derive(Debug, Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// Position id of each slot, `[batch][slot]`.
    pos: Vec<Vec<u32>>,
    /// Whether each slot holds a real token, `[batch][slot]`.
    valid: Vec<Vec<bool>>,
    /// Growth stops doubling at this many slots (the model's context), 0 for no limit; a cache can still
    /// grow past it (a batch's slots can outnumber its positions), then by doubling again.
    soft_cap: usize,
    /// Storage dtype of K/V (`None`: the dtype they arrive in). K/V are converted on the way in and back to the
    /// arriving dtype on the way out.
    dtype: Option<DType>,
}

impl LayerCache {
    /// The dtype K/V are stored in, once the cache holds any.
    pub fn storage_dtype(&self) -> Option<DType> {
        self.k.as_ref().map(Tensor::dtype)
    }

    /// Number of slots in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no slots.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of valid (attendable) tokens of sequence `b`.
    pub fn valid_tokens(&self, b: usize) -> usize {
        self.valid.get(b).map_or(0, |v| v.iter().filter(|x| **x).count())
    }

    /// Appends `k`, `v: [b, kv_heads, t, head_dim]` with per-slot positions and validity (`b*t`, row-major),
    /// and returns the full K and V (`[b, kv_heads, len, head_dim]`) in `k`'s dtype.
    pub fn append(&mut self, k: &Tensor, v: &Tensor, pos: &[u32], valid: &[bool]) -> Result<(Tensor, Tensor)> {
        let in_dt = k.dtype();
        let (k, v) = self.append_stored(k, v, pos, valid)?;
        if k.dtype() == in_dt {
            return Ok((k, v));
        }
        Ok((k.to_dtype(in_dt)?, v.to_dtype(in_dt)?))
    }

    /// [`Self::append`], returning views of the cache in its storage dtype ([`Self::storage_dtype`]): for
    /// kernels that read an f16/bf16 cache as it is ([`super::blocked::attend`]) instead of converting all of
    /// it at every step.
    pub fn append_stored(&mut self, k: &Tensor, v: &Tensor, pos: &[u32], valid: &[bool]) -> Result<(Tensor, Tensor)> {
        let (b, kvh, t, hd) = k.dims4()?;
        let store = self.dtype.unwrap_or(k.dtype());
        let need = self.len + t;
        let cap = self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0));
        if need > cap {
            let doubled = match self.soft_cap {
                0 => 2 * cap,
                c if need <= c => (2 * cap).min(c),
                _ => 2 * cap,
            };
            let new_cap = need.max(doubled).max(64);
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((b, kvh, new_cap, hd), store, like.device())?;
                if let Some(old) = old {
                    if self.len > 0 {
                        buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
        }
        let (kb, vb) = (self.k.as_ref().expect("allocated"), self.v.as_ref().expect("allocated"));
        kb.slice_set(&k.to_dtype(store)?.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.to_dtype(store)?.contiguous()?, 2, self.len)?;
        if self.pos.len() != b {
            self.pos = vec![Vec::new(); b];
            self.valid = vec![Vec::new(); b];
        }
        for i in 0..b {
            self.pos[i].extend_from_slice(&pos[i * t..(i + 1) * t]);
            self.valid[i].extend_from_slice(&valid[i * t..(i + 1) * t]);
        }
        self.len = need;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }

    /// A cache whose sequence `i` is a copy of sequence `rows[i]` of this one (rows may repeat): one
    /// prefix computed once, then continued several ways. The copy holds exactly the used slots.
    pub fn select_rows(&self, rows: &[usize]) -> Result<LayerCache> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Ok(LayerCache {
                soft_cap: self.soft_cap,
                ..Default::default()
            });
        };
        let n = self.pos.len();
        if let Some(bad) = rows.iter().find(|&&r| r >= n) {
            candle_core::bail!("row {bad} of a cache holding {n} sequences");
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            k.device(),
        )?;
        let pick = |t: &Tensor| t.narrow(2, 0, self.len)?.contiguous()?.index_select(&idx, 0);
        fn meta<T: Clone>(v: &[Vec<T>], rows: &[usize]) -> Vec<Vec<T>> {
            rows.iter().map(|&r| v[r].clone()).collect()
        }
        Ok(LayerCache {
            k: Some(pick(k)?),
            v: Some(pick(v)?),
            len: self.len,
            pos: meta(&self.pos, rows),
            valid: meta(&self.valid, rows),
            soft_cap: self.soft_cap,
            dtype: self.dtype,
        })
    }

    /// Positions and validity of sequence `b`'s slots, for [`super::blocked::attend`].
    pub fn keys(&self, b: usize) -> Keys<'_> {
        Keys {
            pos: &self.pos[b],
            valid: &self.valid[b],
        }
    }

    /// Additive attention mask `[b, 1, 1, t, len]` (0 or [`MASKED`]) for queries at `q_pos` (`b*t`): a query sees
    /// valid slots at positions ≤ its own. `None` when it would hide nothing.
    pub fn mask(&self, q_pos: &[u32], b: usize, t: usize, dtype: DType, dev: &Device) -> Result<Option<Tensor>> {
        // Single-token decode over a cache of valid, earlier tokens hides nothing: no mask needed.
        let hides_nothing = t == 1
            && (0..b).all(|bi| self.valid[bi].iter().all(|v| *v) && self.pos[bi].iter().all(|&p| p <= q_pos[bi]));
        if hides_nothing {
            return Ok(None);
        }
        let key = |bi: usize, s: usize| self.valid[bi][s].then_some(self.pos[bi][s]);
        build_mask(b, t, self.len, q_pos, key, dtype, dev).map(Some)
    }
}

/// Additive attention mask `[b, 1, 1, tq, tk]`: query (bi, i) at `q_pos[bi*tq+i]` sees key slot s iff
/// `key(bi, s)` is `Some(pos)` with `pos ≤` the query's position.
pub fn build_mask(
    b: usize,
    tq: usize,
    tk: usize,
    q_pos: &[u32],
    key: impl Fn(usize, usize) -> Option<u32>,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; b * tq * tk];
    for bi in 0..b {
        for qi in 0..tq {
            let qp = q_pos[bi * tq + qi];
            let row = &mut m[(bi * tq + qi) * tk..(bi * tq + qi + 1) * tk];
            for (s, slot) in row.iter_mut().enumerate() {
                if key(bi, s).is_none_or(|kp| kp > qp) {
                    *slot = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, 1, tq, tk), dev)?.to_dtype(dtype)
}

/// The KV caches of all layers of a model, for one batch of sequences.
#[derive(Debug)]
pub struct Cache {
    /// One cache per decoder layer.
    pub layers: Vec<LayerCache>,
}

impl Cache {
    /// Empty caches for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self::with_soft_cap(n_layers, 0)
    }

    /// Empty caches whose growth stops doubling at `slots` (normally the model's context length), so that a
    /// long prompt does not leave room for nearly twice the context.
    pub fn with_soft_cap(n_layers: usize, slots: usize) -> Self {
        Cache {
            layers: (0..n_layers)
                .map(|_| LayerCache {
                    soft_cap: slots,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// These caches storing K/V as `dtype` (`None`: as computed), e.g. f16 to halve their memory.
    pub fn with_dtype(mut self, dtype: Option<DType>) -> Self {
        for l in &mut self.layers {
            l.dtype = dtype;
        }
        self
    }

    /// Caches whose sequence `i` continues sequence `rows[i]` of these ([`LayerCache::select_rows`]).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Cache> {
        Ok(Cache {
            layers: self.layers.iter().map(|l| l.select_rows(rows)).collect::<Result<_>>()?,
        })
    }

    /// Tokens held per layer for sequence `b` (differs across layers under `layer` skipping).
    pub fn lengths(&self, b: usize) -> Vec<usize> {
        self.layers.iter().map(|l| l.valid_tokens(b)).collect()
    }
}
