//! `CpuBackend`: the reference implementation of every backend operation.

use std::sync::Arc;

use flint_tensor::{AttentionBatch, Backend, DType, Device, Error, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::CpuStorage;

/// Below this many multiply-adds a matrix product runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// The CPU backend. It owns no memory beyond the tensors it hands out.
///
/// [`CpuBackend::new`] computes every row of every op on its own, one dot product per output,
/// so a sequence's logits are bit for bit the same whatever else is in its batch.
/// [`CpuBackend::blocked`] runs products of 8 or more rows (linear layers, and the attention of
/// sequences with 8 or more new tokens) as blocked GEMMs, several times faster for prompts and
/// whole-text scoring; their sums are added in another order, so a row may then differ in the
/// last bits with the size of its batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    blocked: bool,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { blocked: false }
    }

    /// The same math with blocked GEMMs for products of many rows (see the type's notes).
    pub fn blocked() -> Self {
        CpuBackend { blocked: true }
    }
}

fn storage<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a CpuStorage> {
    t.storage().as_any().downcast_ref::<CpuStorage>().ok_or(Error::WrongDevice {
        op,
        expected: Device::Cpu,
        found: t.device(),
    })
}

fn new_tensor(shape: Shape, data: Vec<f32>) -> Tensor {
    debug_assert_eq!(shape.elem_count(), data.len());
    Tensor::from_storage(shape, DType::F32, Arc::new(CpuStorage::new(data)))
}

fn mismatch(op: &'static str, detail: String) -> Error {
    Error::ShapeMismatch { op, detail }
}

/// With [`CpuBackend::blocked`], from this many tokens a linear layer runs as a blocked GEMM;
/// below, as one dot product per output (a GEMM would repack the whole weight for a few rows).
const GEMM_MIN_TOKENS: usize = 8;

/// An output buffer's start, shared by the threads of one op, each of which writes elements no
/// other writes.
#[derive(Clone, Copy)]
struct DisjointOut(*mut f32);

// SAFETY: the pointer is only written through by parts that own disjoint elements of a buffer
// that outlives them (see `linear` and `attention`).
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// With [`CpuBackend::blocked`], from this many new tokens of a sequence its attention runs as
/// two GEMMs per head.
const ATTENTION_GEMM_MIN_TOKENS: usize = 8;

/// An operand of [`gemm`]: its values, row stride and column stride, so a transposed or strided
/// matrix needs no copy.
type Operand<'a> = (&'a [f32], usize, usize);

/// `c[i * rsc + j * csc] = alpha * (a * b)[i, j]` for an `[m, k]` `a` and a `[k, n]` `b` (`c` given
/// as (start, row stride, column stride)); `a`'s and `b`'s bounds are checked here.
///
/// # Safety
/// `c` must be valid for writes at every `i * rsc + j * csc` (i < m, j < n), and nothing else may
/// read or write those elements during the call.
unsafe fn gemm_to(
    [m, k, n]: [usize; 3],
    alpha: f32,
    a: Operand<'_>,
    b: Operand<'_>,
    (c, rsc, csc): (*mut f32, usize, usize),
) {
    let within = |rows: usize, cols: usize, (v, rs, cs): Operand<'_>| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < v.len()
    };
    assert!(within(m, k, a) && within(k, n, b), "gemm: operands too short");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element sgemm reads, a[i * rs + l * cs] for i < m, l < k and b's likewise,
    // is within its slice (checked above); the caller vouches for the writes.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.0.as_ptr(),
            a.1 as isize,
            a.2 as isize,
            b.0.as_ptr(),
            b.1 as isize,
            b.2 as isize,
            0.0,
            c,
            rsc as isize,
            csc as isize,
        );
    }
}

/// `out[m, n] = alpha * a[m, k] * b[k, n]`, `out` row-major.
fn gemm(m: usize, k: usize, n: usize, alpha: f32, a: Operand<'_>, b: Operand<'_>, out: &mut [f32]) {
    assert_eq!(out.len(), m * n, "gemm: output of {m} x {n}");
    // SAFETY: out[i * n + j] is within `out`, which is borrowed mutably and so aliases neither
    // input.
    unsafe { gemm_to([m, k, n], alpha, a, b, (out.as_mut_ptr(), n, 1)) }
}

/// Rounds `x` to the nearest value representable in `dtype` (round-to-nearest-even).
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let tail: f32 = chunks_a.remainder().iter().zip(chunks_b.remainder()).map(|(x, y)| x * y).sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let pairs = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn upload_f32(&self, data: &[f32], shape: Shape, dtype: DType) -> Result<Tensor> {
        if data.len() != shape.elem_count() {
            return Err(Error::DataLength { op: "upload_f32", len: data.len(), shape });
        }
        if !dtype.is_plain_float() {
            return Err(Error::UnsupportedDType { op: "upload_f32", dtype, device: Device::Cpu });
        }
        let values =
            if dtype == DType::F32 { data.to_vec() } else { data.iter().map(|&x| round_to(dtype, x)).collect() };
        Ok(Tensor::from_storage(shape, dtype, Arc::new(CpuStorage::new(values))))
    }

    fn zeros(&self, shape: Shape, dtype: DType) -> Result<Tensor> {
        if !dtype.is_plain_float() {
            return Err(Error::UnsupportedDType { op: "zeros", dtype, device: Device::Cpu });
        }
        let n = shape.elem_count();
        Ok(Tensor::from_storage(shape, dtype, Arc::new(CpuStorage::new(vec![0.0; n]))))
    }

    fn to_f32_vec(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        Ok(storage("to_f32_vec", tensor)?.read().clone())
    }

    fn embedding(&self, table: &Tensor, token_ids: &[u32]) -> Result<Tensor> {
        let [vocab, hidden] = *table.dims() else {
            return Err(mismatch("embedding", format!("table must be [vocab, hidden], got {}", table.shape())));
        };
        let data = storage("embedding", table)?.read();
        let mut out = Vec::with_capacity(token_ids.len() * hidden);
        for &id in token_ids {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::OutOfRange { op: "embedding", index: id, limit: vocab });
            }
            out.extend_from_slice(&data[id * hidden..(id + 1) * hidden]);
        }
        Ok(new_tensor(Shape::from([token_ids.len(), hidden]), out))
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let (n_rows, n_cols) = x.shape().as_rows();
        let data = storage("gather_rows", x)?.read();
        let mut out = Vec::with_capacity(rows.len() * n_cols);
        for &r in rows {
            if r >= n_rows {
                return Err(Error::OutOfRange { op: "gather_rows", index: r, limit: n_rows });
            }
            out.extend_from_slice(&data[r * n_cols..(r + 1) * n_cols]);
        }
        Ok(new_tensor(Shape::from([rows.len(), n_cols]), out))
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let (_, hidden) = x.shape().as_rows();
        if weight.dims() != [hidden] {
            return Err(mismatch("rms_norm", format!("x {} with weight {}", x.shape(), weight.shape())));
        }
        let xs = storage("rms_norm", x)?.read();
        let w = storage("rms_norm", weight)?.read();
        let mut out = vec![0.0; xs.len()];
        if hidden > 0 {
            out.par_chunks_mut(hidden).zip(xs.par_chunks(hidden)).for_each(|(o, row)| rms_norm_row(row, &w, eps, o));
        }
        Ok(new_tensor(x.shape().clone(), out))
    }

    fn add_rms_norm(&self, residual: &Tensor, x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let sum = self.add(residual, x)?;
        let normed = self.rms_norm(&sum, weight, eps)?;
        Ok((sum, normed))
    }

    fn linear(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (n_tokens, in_features) = x.shape().as_rows();
        let [out_features, w_in] = *weight.dims() else {
            return Err(mismatch("linear", format!("weight must be [out, in], got {}", weight.shape())));
        };
        if w_in != in_features {
            return Err(mismatch("linear", format!("x {} with weight {}", x.shape(), weight.shape())));
        }
        if let Some(b) = bias
            && b.dims() != [out_features]
        {
            return Err(mismatch("linear", format!("bias {} for {out_features} outputs", b.shape())));
        }
        let xs = storage("linear", x)?.read();
        let w = storage("linear", weight)?.read();
        let bias_data = bias.map(|b| storage("linear", b).map(|s| s.read())).transpose()?;
        let parallel = n_tokens * in_features * out_features >= PARALLEL_MIN_WORK;
        let mut out = vec![0.0f32; n_tokens * out_features];
        if self.blocked && n_tokens >= GEMM_MIN_TOKENS && in_features > 0 {
            // A blocked f32 GEMM (runtime-detected SIMD), split over output features: each part
            // writes its own columns of `out`. Every output is the same sum over in_features
            // whatever the split, so the result does not depend on the thread count.
            let rows = if parallel {
                out_features.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(16)
            } else {
                out_features
            };
            let dst = DisjointOut(out.as_mut_ptr());
            let part = |p: usize| {
                let f0 = p * rows;
                let m = rows.min(out_features - f0);
                // SAFETY: gemm_to writes out[t * out_features + f0 + i] (t < n_tokens, i < m):
                // inside `out` (n_tokens * out_features values), and only the columns f0..f0 + m,
                // which no other part touches.
                unsafe {
                    gemm_to(
                        [m, in_features, n_tokens],
                        1.0,
                        (&w[f0 * in_features..], in_features, 1),
                        (&xs, 1, in_features),
                        (dst.at(f0), 1, out_features),
                    );
                }
            };
            if parallel {
                (0..out_features.div_ceil(rows)).into_par_iter().for_each(part);
            } else {
                (0..out_features.div_ceil(rows)).for_each(part);
            }
        } else if n_tokens > 0 && in_features > 0 {
            // One dot product per output, laid out [out_features, n_tokens] so that each weight
            // row is read once for every token, then transposed.
            let mut out_t = vec![0.0f32; out_features * n_tokens];
            let compute = |(o, w_row): (&mut [f32], &[f32])| {
                for (t, slot) in o.iter_mut().enumerate() {
                    *slot = dot(&xs[t * in_features..(t + 1) * in_features], w_row);
                }
            };
            if parallel {
                out_t.par_chunks_mut(n_tokens).zip(w.par_chunks(in_features)).with_min_len(16).for_each(compute);
            } else {
                out_t.chunks_mut(n_tokens).zip(w.chunks(in_features)).for_each(compute);
            }
            for (f, col) in out_t.chunks(n_tokens).enumerate() {
                for (t, &v) in col.iter().enumerate() {
                    out[t * out_features + f] = v;
                }
            }
        }
        if let Some(b) = &bias_data {
            for row in out.chunks_mut(out_features) {
                row.iter_mut().zip(b.iter()).for_each(|(o, b)| *o += b);
            }
        }
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_features;
        }
        Ok(new_tensor(Shape::new(dims), out))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if a.shape() != b.shape() {
            return Err(mismatch("add", format!("{} + {}", a.shape(), b.shape())));
        }
        let xa = storage("add", a)?.read();
        let xb = storage("add", b)?.read();
        let out = xa.iter().zip(xb.iter()).map(|(p, q)| p + q).collect();
        Ok(new_tensor(a.shape().clone(), out))
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if gate.shape() != up.shape() {
            return Err(mismatch("silu_mul", format!("gate {} with up {}", gate.shape(), up.shape())));
        }
        let g = storage("silu_mul", gate)?.read();
        let u = storage("silu_mul", up)?.read();
        let out = g.iter().zip(u.iter()).map(|(&g, &u)| silu(g) * u).collect();
        Ok(new_tensor(gate.shape().clone(), out))
    }

    fn rope(&self, x: &Tensor, positions: &[u32], inv_freq: &Tensor) -> Result<Tensor> {
        let [n_tokens, n_heads, head_dim] = *x.dims() else {
            return Err(mismatch("rope", format!("x must be [n_tokens, n_heads, head_dim], got {}", x.shape())));
        };
        let half = head_dim / 2;
        if head_dim % 2 != 0 || inv_freq.dims() != [half] {
            return Err(mismatch("rope", format!("head_dim {head_dim} with inv_freq {}", inv_freq.shape())));
        }
        if positions.len() != n_tokens {
            return Err(mismatch("rope", format!("{} positions for {n_tokens} tokens", positions.len())));
        }
        let xs = storage("rope", x)?.read();
        let freqs = storage("rope", inv_freq)?.read();
        let mut out = vec![0.0f32; xs.len()];
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        for (t, &pos) in positions.iter().enumerate() {
            for i in 0..half {
                let angle = pos as f32 * freqs[i];
                cos[i] = angle.cos();
                sin[i] = angle.sin();
            }
            for h in 0..n_heads {
                let base = (t * n_heads + h) * head_dim;
                let (x1, x2) = xs[base..base + head_dim].split_at(half);
                let (o1, o2) = out[base..base + head_dim].split_at_mut(half);
                for i in 0..half {
                    o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                    o2[i] = x2[i] * cos[i] + x1[i] * sin[i];
                }
            }
        }
        Ok(new_tensor(x.shape().clone(), out))
    }

    fn write_kv(&self, cache: &Tensor, values: &Tensor, slots: &[u32]) -> Result<()> {
        let [n_blocks, block_size, n_kv_heads, head_dim] = *cache.dims() else {
            return Err(mismatch(
                "write_kv",
                format!("cache must be [n_blocks, block_size, n_kv_heads, head_dim], got {}", cache.shape()),
            ));
        };
        let [n_tokens, v_heads, v_dim] = *values.dims() else {
            return Err(mismatch(
                "write_kv",
                format!("values must be [n_tokens, n_kv_heads, head_dim], got {}", values.shape()),
            ));
        };
        if (v_heads, v_dim) != (n_kv_heads, head_dim) || slots.len() != n_tokens {
            return Err(mismatch(
                "write_kv",
                format!("values {} with {} slots into cache {}", values.shape(), slots.len(), cache.shape()),
            ));
        }
        let n_slots = n_blocks * block_size;
        if let Some(&slot) = slots.iter().find(|&&s| s as usize >= n_slots) {
            return Err(Error::OutOfRange { op: "write_kv", index: slot as usize, limit: n_slots });
        }
        if Arc::ptr_eq(cache.storage(), values.storage()) {
            return Err(mismatch("write_kv", "values alias the cache".to_string()));
        }
        let src = storage("write_kv", values)?.read();
        let mut dst = storage("write_kv", cache)?.write();
        let row = n_kv_heads * head_dim;
        let cache_dtype = cache.dtype();
        for (t, &slot) in slots.iter().enumerate() {
            let slot = slot as usize;
            for (d, s) in dst[slot * row..(slot + 1) * row].iter_mut().zip(&src[t * row..(t + 1) * row]) {
                *d = round_to(cache_dtype, *s);
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        batch: &AttentionBatch,
        softmax_scale: f32,
    ) -> Result<Tensor> {
        let [n_tokens, n_heads, head_dim] = *q.dims() else {
            return Err(mismatch("attention", format!("q must be [n_tokens, n_heads, head_dim], got {}", q.shape())));
        };
        let [n_blocks, block_size, n_kv_heads, kv_dim] = *k_cache.dims() else {
            return Err(mismatch(
                "attention",
                format!("k_cache must be [n_blocks, block_size, n_kv_heads, head_dim], got {}", k_cache.shape()),
            ));
        };
        if v_cache.shape() != k_cache.shape() || kv_dim != head_dim || block_size != batch.block_size {
            return Err(mismatch(
                "attention",
                format!(
                    "q {} with k_cache {}, v_cache {} and block size {}",
                    q.shape(),
                    k_cache.shape(),
                    v_cache.shape(),
                    batch.block_size
                ),
            ));
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(mismatch("attention", format!("{n_heads} query heads over {n_kv_heads} kv heads")));
        }
        batch.validate("attention", n_blocks)?;
        if batch.n_tokens() != n_tokens {
            return Err(mismatch("attention", format!("batch has {} tokens, q has {n_tokens}", batch.n_tokens())));
        }
        // For every query token: its sequence and its position.
        let mut token_seq = vec![(0usize, 0usize); n_tokens];
        for s in 0..batch.n_seqs() {
            let (start, end) = (batch.query_starts[s] as usize, batch.query_starts[s + 1] as usize);
            let first_pos = batch.context_lens[s] as usize - (end - start);
            for (i, slot) in token_seq[start..end].iter_mut().enumerate() {
                *slot = (s, first_pos + i);
            }
        }
        let group = n_heads / n_kv_heads;
        let qs = storage("attention", q)?.read();
        let ks = storage("attention", k_cache)?.read();
        let vs = storage("attention", v_cache)?.read();
        let kv_row = n_kv_heads * head_dim;
        let seq_rows = |seq: usize| batch.query_starts[seq + 1] as usize - batch.query_starts[seq] as usize;
        let blocked = |seq: usize| self.blocked && seq_rows(seq) >= ATTENTION_GEMM_MIN_TOKENS;
        let mut out = vec![0.0f32; qs.len()];
        // One query at a time (every token, or with `blocked` those of sequences with few new
        // tokens: decode rows).
        out.par_chunks_mut(head_dim).enumerate().for_each(|(idx, o)| {
            let t = idx / n_heads;
            let h = idx % n_heads;
            let kv_h = h / group;
            let (seq, pos) = token_seq[t];
            if blocked(seq) {
                return;
            }
            let blocks = batch.blocks_of(seq);
            let row_of =
                |p: usize| (blocks[p / block_size] as usize * block_size + p % block_size) * kv_row + kv_h * head_dim;
            let q_vec = &qs[idx * head_dim..(idx + 1) * head_dim];
            let mut scores: Vec<f32> =
                (0..=pos).map(|p| dot(q_vec, &ks[row_of(p)..row_of(p) + head_dim]) * softmax_scale).collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut denom = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            for (p, &w) in scores.iter().enumerate() {
                let v = &vs[row_of(p)..row_of(p) + head_dim];
                let w = w / denom;
                for (acc, &val) in o.iter_mut().zip(v) {
                    *acc += w * val;
                }
            }
        });
        // With `blocked`, sequences with many new tokens (prefill chunks): per query head, scores for all of
        // the sequence's queries as one product with its gathered keys, a causal softmax per
        // row, then one product with its values.
        let long: Vec<usize> = (0..batch.n_seqs()).filter(|&seq| blocked(seq)).collect();
        // Each long sequence's keys and values, per KV head, gathered once out of the blocks.
        let gathered: Vec<(Vec<f32>, Vec<f32>)> = long
            .par_iter()
            .flat_map_iter(|&seq| (0..n_kv_heads).map(move |kv_h| (seq, kv_h)))
            .map(|(seq, kv_h)| {
                let (ctx, blocks) = (batch.context_lens[seq] as usize, batch.blocks_of(seq));
                let (mut k, mut v) = (Vec::with_capacity(ctx * head_dim), Vec::with_capacity(ctx * head_dim));
                for p in 0..ctx {
                    let r = (blocks[p / block_size] as usize * block_size + p % block_size) * kv_row + kv_h * head_dim;
                    k.extend_from_slice(&ks[r..r + head_dim]);
                    v.extend_from_slice(&vs[r..r + head_dim]);
                }
                (k, v)
            })
            .collect();
        let dst = DisjointOut(out.as_mut_ptr());
        let row_stride = n_heads * head_dim;
        (0..long.len() * n_heads).into_par_iter().for_each(|task| {
            let (i_seq, h) = (task / n_heads, task % n_heads);
            let seq = long[i_seq];
            let (k, v) = &gathered[i_seq * n_kv_heads + h / group];
            let (start, rows) = (batch.query_starts[seq] as usize, seq_rows(seq));
            let ctx = batch.context_lens[seq] as usize;
            let first_pos = ctx - rows;
            // Query i of this head: qs[((start + i) * n_heads + h) * head_dim ..][..head_dim].
            let at = (start * n_heads + h) * head_dim;
            let mut scores = vec![0.0f32; rows * ctx];
            gemm(rows, head_dim, ctx, softmax_scale, (&qs[at..], row_stride, 1), (k, 1, head_dim), &mut scores);
            for (i, row) in scores.chunks_mut(ctx).enumerate() {
                let (live, masked) = row.split_at_mut(first_pos + i + 1);
                let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut denom = 0.0f32;
                for s in live.iter_mut() {
                    *s = (*s - max).exp();
                    denom += *s;
                }
                live.iter_mut().for_each(|s| *s /= denom);
                masked.fill(0.0);
            }
            // SAFETY: gemm_to writes out[at + i * row_stride + c] (i < rows, c < head_dim): this
            // sequence's rows, this head's values, inside `out` (q's length), which no other
            // task writes and nothing reads until every task is done.
            unsafe {
                gemm_to([rows, ctx, head_dim], 1.0, (&scores, ctx, 1), (v, head_dim, 1), (dst.at(at), row_stride, 1));
            }
        });
        Ok(new_tensor(q.shape().clone(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(b: &CpuBackend, data: &[f32], dims: &[usize]) -> Tensor {
        b.upload_f32(data, Shape::from(dims), DType::F32).expect("valid tensor")
    }

    #[test]
    fn linear_matches_hand_computed() {
        let b = CpuBackend::new();
        let x = t(&b, &[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let w = t(&b, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]);
        let bias = t(&b, &[0.5, 0.0, -1.0], &[3]);
        let y = b.linear(&x, &w, Some(&bias)).expect("linear");
        assert_eq!(y.dims(), [2, 3]);
        assert_eq!(b.to_f32_vec(&y).expect("read"), vec![1.5, 2.0, 2.0, 3.5, 4.0, 6.0]);
    }

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let b = CpuBackend::new();
        let x = t(&b, &[3.0; 4], &[1, 4]);
        let w = t(&b, &[1.0, 2.0, 3.0, 4.0], &[4]);
        let y = b.to_f32_vec(&b.rms_norm(&x, &w, 0.0).expect("norm")).expect("read");
        for (got, want) in y.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((got - want).abs() < 1e-6);
        }
    }

    fn one_sequence(n_new: u32, context: u32, blocks: Vec<u32>, block_size: usize) -> AttentionBatch {
        AttentionBatch {
            block_size,
            query_starts: vec![0, n_new],
            context_lens: vec![context],
            max_blocks_per_seq: blocks.len(),
            block_tables: blocks,
        }
    }

    /// A batch of a prefill chunk past a prefix (13 new of 29), a decode row, a chunk from the
    /// start (9 of 9) and a 7-token chunk, over shuffled blocks, against causal attention in f64:
    /// the per-query path for all of them, and with `blocked` the two-GEMM path for the longer
    /// chunks.
    #[test]
    fn attention_matches_f64_on_both_paths() {
        for b in [CpuBackend::new(), CpuBackend::blocked()] {
            let (n_heads, n_kv, d, bs) = (6, 2, 16, 4);
            let seqs: [(u32, u32); 4] = [(13, 29), (1, 20), (9, 9), (7, 11)];
            let max_blocks = 8;
            let n_blocks = seqs.len() * max_blocks;
            let mut order: Vec<u32> = (0..n_blocks as u32).collect();
            order.reverse();
            order.rotate_left(5);
            let mut query_starts = vec![0u32];
            for (n_new, _) in seqs {
                query_starts.push(query_starts.last().unwrap() + n_new);
            }
            let batch = AttentionBatch {
                block_size: bs,
                query_starts,
                context_lens: seqs.iter().map(|s| s.1).collect(),
                block_tables: order.clone(),
                max_blocks_per_seq: max_blocks,
            };
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            };
            let n_tokens = batch.n_tokens();
            let qv: Vec<f32> = (0..n_tokens * n_heads * d).map(|_| 2.0 * next()).collect();
            let cache_len = n_blocks * bs * n_kv * d;
            let kv: Vec<f32> = (0..cache_len).map(|_| next()).collect();
            let vv: Vec<f32> = (0..cache_len).map(|_| next()).collect();
            let dims = [n_blocks, bs, n_kv, d];
            let scale = 0.25;
            let got = b
                .to_f32_vec(
                    &b.attention(
                        &t(&b, &qv, &[n_tokens, n_heads, d]),
                        &t(&b, &kv, &dims),
                        &t(&b, &vv, &dims),
                        &batch,
                        scale,
                    )
                    .unwrap(),
                )
                .unwrap();
            for (seq, &(n_new, ctx)) in seqs.iter().enumerate() {
                let blocks = batch.blocks_of(seq);
                let row = |p: usize, kvh: usize| ((blocks[p / bs] as usize * bs + p % bs) * n_kv + kvh) * d;
                for i in 0..n_new as usize {
                    let tok = batch.query_starts[seq] as usize + i;
                    let pos = (ctx - n_new) as usize + i;
                    for h in 0..n_heads {
                        let qrow = &qv[(tok * n_heads + h) * d..][..d];
                        let kvh = h / (n_heads / n_kv);
                        let logits: Vec<f64> = (0..=pos)
                            .map(|p| {
                                scale as f64 * (0..d).map(|c| qrow[c] as f64 * kv[row(p, kvh) + c] as f64).sum::<f64>()
                            })
                            .collect();
                        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                        let sum: f64 = w.iter().sum();
                        for c in 0..d {
                            let want: f64 = (0..=pos).map(|p| w[p] / sum * vv[row(p, kvh) + c] as f64).sum();
                            let g = got[(tok * n_heads + h) * d + c] as f64;
                            assert!(
                                (g - want).abs() < 1e-5,
                                "seq {seq} token {i} head {h} dim {c}: {g} against {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_over_one_key_returns_its_value() {
        let b = CpuBackend::new();
        let q = t(&b, &[1.0, 0.0, 0.0, 1.0], &[1, 2, 2]);
        let k = b.zeros(Shape::from([2, 2, 1, 2]), DType::F32).expect("zeros");
        let v = b.zeros(Shape::from([2, 2, 1, 2]), DType::F32).expect("zeros");
        // The sequence lives in block 1, so its first position is slot 2.
        b.write_kv(&k, &t(&b, &[0.3, 0.7], &[1, 1, 2]), &[2]).expect("write k");
        b.write_kv(&v, &t(&b, &[5.0, -2.0], &[1, 1, 2]), &[2]).expect("write v");
        let batch = one_sequence(1, 1, vec![1], 2);
        let out = b.to_f32_vec(&b.attention(&q, &k, &v, &batch, 1.0).expect("attn")).expect("read");
        assert_eq!(out, vec![5.0, -2.0, 5.0, -2.0]);
    }

    /// The same keys and values give the same output whatever blocks hold them.
    #[test]
    fn attention_does_not_depend_on_block_placement() {
        let b = CpuBackend::new();
        let (n_kv, hd, ctx) = (2usize, 4usize, 7usize);
        let keys: Vec<f32> = (0..ctx * n_kv * hd).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
        let vals: Vec<f32> = (0..ctx * n_kv * hd).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2).collect();
        let q = t(&b, &(0..3 * 4 * hd).map(|i| (i % 5) as f32 * 0.1).collect::<Vec<_>>(), &[3, 4, hd]);
        let run = |blocks: Vec<u32>| {
            let k = b.zeros(Shape::from([8, 2, n_kv, hd]), DType::F32).expect("zeros");
            let v = b.zeros(Shape::from([8, 2, n_kv, hd]), DType::F32).expect("zeros");
            let slots: Vec<u32> = (0..ctx).map(|p| blocks[p / 2] * 2 + (p % 2) as u32).collect();
            b.write_kv(&k, &t(&b, &keys, &[ctx, n_kv, hd]), &slots).expect("k");
            b.write_kv(&v, &t(&b, &vals, &[ctx, n_kv, hd]), &slots).expect("v");
            let batch = one_sequence(3, ctx as u32, blocks, 2);
            b.to_f32_vec(&b.attention(&q, &k, &v, &batch, 0.5).expect("attn")).expect("read")
        };
        assert_eq!(run(vec![0, 1, 2, 3]), run(vec![7, 2, 5, 0]));
    }

    #[test]
    fn attention_rejects_bad_block_tables() {
        let b = CpuBackend::new();
        let q = t(&b, &[1.0; 4], &[1, 2, 2]);
        let k = b.zeros(Shape::from([2, 2, 1, 2]), DType::F32).expect("zeros");
        let batch = one_sequence(1, 3, vec![0, 9], 2);
        assert!(matches!(b.attention(&q, &k, &k, &batch, 1.0), Err(Error::OutOfRange { .. })));
        let batch = one_sequence(2, 1, vec![0], 2);
        assert!(b.attention(&q, &k, &k, &batch, 1.0).is_err());
        assert!(b.write_kv(&k, &t(&b, &[1.0, 2.0], &[1, 1, 2]), &[4]).is_err());
    }

    #[test]
    fn shape_errors_are_reported_not_panicked() {
        let b = CpuBackend::new();
        let x = t(&b, &[1.0; 6], &[2, 3]);
        let w = t(&b, &[1.0; 4], &[2, 2]);
        assert!(matches!(b.linear(&x, &w, None), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(b.embedding(&w, &[5]), Err(Error::OutOfRange { .. })));
        assert!(b.upload_f32(&[1.0], Shape::from([2]), DType::F32).is_err());
    }

    proptest! {
        #[test]
        fn dot_matches_naive_sum(v in proptest::collection::vec(-4.0f32..4.0, 0..100)) {
            let w: Vec<f32> = v.iter().map(|x| x * 0.5 - 1.0).collect();
            let naive: f64 = v.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
            prop_assert!((dot(&v, &w) as f64 - naive).abs() < 1e-3);
        }

        /// Both backends' `linear` (one dot per output; with `blocked`, the GEMM from
        /// GEMM_MIN_TOKENS tokens), serial and split over threads, against an f64 sum; every row
        /// of a batch bit for bit that token computed alone, or close to it with `blocked`.
        #[test]
        fn linear_matches_an_f64_product_on_both_paths(
            n_tokens in 1usize..40,
            in_features in 1usize..70,
            out_features in 1usize..300,
            seed in 0u64..1000,
        ) {
          for b in [CpuBackend::new(), CpuBackend::blocked()] {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            };
            let xs: Vec<f32> = (0..n_tokens * in_features).map(|_| next()).collect();
            let ws: Vec<f32> = (0..out_features * in_features).map(|_| next()).collect();
            let bias: Vec<f32> = (0..out_features).map(|_| next()).collect();
            let y = b
                .to_f32_vec(&b.linear(&t(&b, &xs, &[n_tokens, in_features]), &t(&b, &ws, &[out_features, in_features]),
                    Some(&t(&b, &bias, &[out_features])))
                .unwrap())
                .unwrap();
            for tok in 0..n_tokens {
                let row = &xs[tok * in_features..(tok + 1) * in_features];
                let alone = b
                    .to_f32_vec(&b.linear(&t(&b, row, &[1, in_features]), &t(&b, &ws, &[out_features, in_features]),
                        Some(&t(&b, &bias, &[out_features])))
                    .unwrap())
                    .unwrap();
                for f in 0..out_features {
                    let w_row = &ws[f * in_features..(f + 1) * in_features];
                    let exact: f64 =
                        bias[f] as f64 + row.iter().zip(w_row).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>();
                    let got = y[tok * out_features + f];
                    prop_assert!((got as f64 - exact).abs() < 1e-4 * (1.0 + in_features as f64).sqrt(),
                        "token {tok} output {f}: {got} against {exact}");
                    if b.blocked {
                        prop_assert!((got - alone[f]).abs() < 1e-4 * (1.0 + in_features as f32).sqrt());
                    } else {
                        prop_assert_eq!(got.to_bits(), alone[f].to_bits(), "token {} output {}", tok, f);
                    }
                }
            }
          }
        }

        #[test]
        fn rope_preserves_pair_norms(
            x in proptest::collection::vec(-2.0f32..2.0, 8),
            pos in 0u32..5000,
        ) {
            let b = CpuBackend::new();
            let inv_freq = t(&b, &[1.0, 0.01], &[2]);
            let y = b.to_f32_vec(&b.rope(&t(&b, &x, &[1, 2, 4]), &[pos], &inv_freq).unwrap()).unwrap();
            for head in 0..2 {
                for i in 0..2 {
                    let (a, c) = (x[head * 4 + i], x[head * 4 + i + 2]);
                    let (ya, yc) = (y[head * 4 + i], y[head * 4 + i + 2]);
                    prop_assert!(((a * a + c * c) - (ya * ya + yc * yc)).abs() < 1e-4);
                }
            }
        }
    }
}
