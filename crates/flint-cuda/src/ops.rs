//! Typed launches of Flint's kernels over raw device addresses. Each wrapper's parameters follow
//! its kernel's signature in `kernels/*.cu`; shapes are checked by the callers that own the buffers.

use crate::gpu::{Gpu, arg};
use crate::{Result, error::shape};

/// Dynamic shared memory of the prefill attention kernel (mirrors `PrefillSmem` in attention.cuh).
pub fn prefill_smem_bytes(head_dim: usize) -> u32 {
    let (tq, tk) = (64usize, 64usize);
    let ldh = head_dim + 8;
    let q = 2 * tq * ldh;
    let kv = 2 * tk * ldh;
    let s = 4 * tq * (tk + 4);
    let p = 2 * tq * (tk + 8);
    let o = 4 * tq * (head_dim + 4);
    (q + 2 * kv + s + p + o + 4 * 3 * tq) as u32
}

/// Head dimensions the attention kernels are built for.
pub fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 64 || head_dim == 128 {
        Ok(())
    } else {
        Err(shape("attention", format!("head_dim {head_dim}: the CUDA kernels support 64 and 128")))
    }
}

pub fn embedding(gpu: &Gpu, tokens: u64, table: u64, out: u64, n: usize, hidden: usize, vocab: usize) -> Result<()> {
    embedding_shard(gpu, tokens, table, out, n, hidden, vocab, 0)
}

/// [`embedding`] from a table holding rows `first..first + vocab` of the whole vocabulary
/// (vocab-parallel): tokens outside that range get zero rows, to be summed over the ranks.
pub fn embedding_shard(
    gpu: &Gpu,
    tokens: u64,
    table: u64,
    out: u64,
    n: usize,
    hidden: usize,
    vocab: usize,
    first: usize,
) -> Result<()> {
    let (hidden, vocab, first) = (hidden as i32, vocab as i32, first as i32);
    gpu.launch(
        "flint_embedding",
        (n as u32, 1, 1),
        128,
        0,
        &mut [arg(&tokens), arg(&table), arg(&out), arg(&hidden), arg(&vocab), arg(&first)],
    )
}

/// `out[r, v] = in[v / part, r, v % part]` for `v < vocab`: logits `[rows, part]` gathered from
/// every rank (`[world, rows, part]`) back into `[rows, vocab]` rows (f32).
pub fn unshard_rows(gpu: &Gpu, input: u64, out: u64, rows: usize, part: usize, vocab: usize) -> Result<()> {
    let total = rows * vocab;
    let blocks = total.div_ceil(256).clamp(1, 4 * gpu.sm_count() as usize) as u32;
    let (rows, part, vocab) = (rows as i32, part as i32, vocab as i32);
    gpu.launch(
        "flint_unshard_rows",
        (blocks, 1, 1),
        256,
        0,
        &mut [arg(&input), arg(&out), arg(&rows), arg(&part), arg(&vocab)],
    )
}

/// `residual += add` (when `add != 0`), `out = rms_norm(residual) * weight`; rows of `hidden`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    gpu: &Gpu,
    residual: u64,
    add: u64,
    weight: u64,
    out: u64,
    n: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    let hidden = hidden as i32;
    gpu.launch(
        "flint_add_rms_norm",
        (n as u32, 1, 1),
        256,
        0,
        &mut [arg(&residual), arg(&add), arg(&weight), arg(&out), arg(&hidden), arg(&eps)],
    )
}

#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write(
    gpu: &Gpu,
    qkv: u64,
    bias: u64,
    positions: u64,
    inv_freq: u64,
    slots: u64,
    k_cache: u64,
    v_cache: u64,
    n: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
) -> Result<()> {
    let (h, kv, d) = (n_heads as i32, n_kv as i32, head_dim as i32);
    gpu.launch(
        "flint_rope_kv_write",
        (n as u32, (n_heads + n_kv + 1) as u32, 1),
        64,
        0,
        &mut [
            arg(&qkv),
            arg(&bias),
            arg(&positions),
            arg(&inv_freq),
            arg(&slots),
            arg(&k_cache),
            arg(&v_cache),
            arg(&h),
            arg(&kv),
            arg(&d),
        ],
    )
}

/// [`rope_kv_write`] into an FP8 cache: keys and values as E4M3 codes with one scale per (slot,
/// KV head) in `k_scales` / `v_scales` (`[n_blocks, block_size, n_kv]` f32). `head_dim` even,
/// at most 256.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write_fp8(
    gpu: &Gpu,
    qkv: u64,
    bias: u64,
    positions: u64,
    inv_freq: u64,
    slots: u64,
    cache: [u64; 4],
    n: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
) -> Result<()> {
    if head_dim > 256 || !head_dim.is_multiple_of(2) {
        return Err(shape("rope_kv_write_fp8", format!("head_dim {head_dim}: even, at most 256")));
    }
    let [k_cache, v_cache, k_scales, v_scales] = cache;
    let (h, kv, d) = (n_heads as i32, n_kv as i32, head_dim as i32);
    gpu.launch(
        "flint_rope_kv_write_fp8",
        (n as u32, (n_heads + 2 * n_kv) as u32, 1),
        64,
        0,
        &mut [
            arg(&qkv),
            arg(&bias),
            arg(&positions),
            arg(&inv_freq),
            arg(&slots),
            arg(&k_cache),
            arg(&v_cache),
            arg(&k_scales),
            arg(&v_scales),
            arg(&h),
            arg(&kv),
            arg(&d),
        ],
    )
}

pub fn silu_mul(gpu: &Gpu, gate_up: u64, out: u64, n: usize, ff: usize) -> Result<()> {
    let total = n * ff / 8;
    let blocks = total.div_ceil(256).min(gpu.sm_count() as usize * 16).max(1) as u32;
    let (n, ff) = (n as i32, ff as i32);
    gpu.launch("flint_silu_mul", (blocks, 1, 1), 256, 0, &mut [arg(&gate_up), arg(&out), arg(&n), arg(&ff)])
}

/// Fills `n` bf16 values with uniform noise of standard deviation `std` around `mean`.
pub fn fill_uniform(gpu: &Gpu, out: u64, n: usize, seed: u64, mean: f32, std: f32) -> Result<()> {
    let blocks = n.div_ceil(256).min(gpu.sm_count() as usize * 32).max(1) as u32;
    let n = n as u64;
    gpu.launch(
        "flint_fill_uniform",
        (blocks, 1, 1),
        256,
        0,
        &mut [arg(&out), arg(&n), arg(&seed), arg(&mean), arg(&std)],
    )
}

/// What the GEMV writes: see `GemvEpilogue` in gemv.cuh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    Bf16 = 0,
    SwiGlu = 1,
    F32 = 2,
}

/// Most rows the GEMV takes at once.
pub const GEMV_MAX_M: usize = 8;
const GEMV_WARPS: usize = 8;

/// Loads in flight per lane (1, 2 or 4 chunks of 256 elements) for a GEMV over `k`: the one
/// whose chunks spread most evenly over the four warps that share a row pair (measured on an
/// H200: a K of 2048 at four loads leaves two of the warps idle), the larger on a tie.
pub fn gemv_unroll(k: usize) -> usize {
    let steps = |u: usize| {
        let chunks = k / (u * 256);
        let tail = (k - chunks * u * 256).div_ceil(256);
        chunks.div_ceil(4) * u + tail.div_ceil(4)
    };
    [4, 2, 1].into_iter().min_by_key(|&u| steps(u)).unwrap_or(4)
}

/// `y[m, n] = x[m, k] . w[n, k]^T` for `m <= 8`; with `SwiGlu`, `w` has `2n` rows (gate, then up).
pub fn gemv(gpu: &Gpu, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize, epilogue: Epilogue) -> Result<()> {
    gemv_l2(gpu, x, w, y, m, n, k, epilogue, false)
}

/// [`gemv`]; with `l2_prefetch` (for a GEMV that follows a latency-bound kernel, while DRAM
/// idles) its first blocks ask their weights into L2 before they wait, within the launch
/// tuning's budget ([`crate::LaunchTuning::l2_prefetch_budget`]).
#[allow(clippy::too_many_arguments)]
pub fn gemv_l2(
    gpu: &Gpu,
    x: u64,
    w: u64,
    y: u64,
    m: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
    l2_prefetch: bool,
) -> Result<()> {
    if m == 0 || m > GEMV_MAX_M || !k.is_multiple_of(8) {
        return Err(shape("gemv", format!("m = {m} (1..=8), k = {k} (a multiple of 8)")));
    }
    let name = format!("flint_gemv_{m}_u{}", gemv_unroll(k));
    let (ni, ki, e, l2) = (n as i32, k as i32, epilogue as i32, i32::from(l2_prefetch));
    // Four warps share a row pair (two plain rows, or gate j with up j), splitting K.
    let pairs = if epilogue == Epilogue::SwiGlu { n } else { n.div_ceil(2) };
    gpu.launch(
        &name,
        (pairs.div_ceil(GEMV_WARPS / 4) as u32, 1, 1),
        (32 * GEMV_WARPS) as u32,
        0,
        &mut [arg(&x), arg(&w), arg(&y), arg(&ni), arg(&ki), arg(&e), arg(&l2)],
    )
}

/// Paged-attention buffers shared by the decode and prefill kernels.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv {
    /// BF16 values, or E4M3 codes when the scales are given.
    pub k_cache: u64,
    pub v_cache: u64,
    /// FP8 cache: one f32 scale per (slot, KV head) of each cache, `[n_blocks, block_size, n_kv]`
    /// (value = code * scale); 0 for a BF16 cache.
    pub k_scales: u64,
    pub v_scales: u64,
    pub block_tables: u64,
    pub max_blocks: usize,
    pub block_size: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl PagedKv {
    fn fp8(&self) -> Result<bool> {
        match (self.k_scales, self.v_scales) {
            (0, 0) => Ok(false),
            (k, v) if k != 0 && v != 0 => Ok(true),
            _ => Err(shape("attention", "an FP8 cache needs both the key and the value scales")),
        }
    }

    /// The attention kernel `flint_attention_{kind}_[fp8_]{head_dim}` for this cache.
    fn kernel(&self, kind: &str) -> Result<String> {
        check_head_dim(self.head_dim)?;
        Ok(format!("flint_attention_{kind}_{}{}", if self.fp8()? { "fp8_" } else { "" }, self.head_dim))
    }
}

/// Most splits of one decode attention launch (mirrors `kMaxSplits` in attention.cuh).
pub const MAX_DECODE_SPLITS: usize = 32;

/// Threads of a decode attention block (mirrors `kDecodeThreads` in attention.cuh).
const DECODE_THREADS: u32 = 256;

/// Scratch of the split-K decode attention: `part_o` holds `n_tokens * n_heads * n_splits *
/// head_dim` f32, `part_ml` `n_tokens * n_heads * n_splits * 2` f32, `counters` `n_tokens * n_kv`
/// u32, zero before the first launch (each launch leaves them zero).
#[derive(Clone, Copy, Debug)]
pub struct DecodeScratch {
    pub part_o: u64,
    pub part_ml: u64,
    pub counters: u64,
}

/// The step's RoPE and KV-cache write, folded into [`attention_decode`]: its `q` is then the raw
/// fused QKV output `[n_tokens, (n_heads + 2 n_kv) * head_dim]` (as [`rope_kv_write`] takes it,
/// left unchanged), each token's query heads are roped in the kernel, and its new key and value
/// go into the cache at `slots[t]` (0xffffffff: none), exactly as [`rope_kv_write`] (or
/// [`rope_kv_write_fp8`]) would write them. Only for steps in which each token is its sequence's
/// only new one: no block then reads a position another block writes.
#[derive(Clone, Copy, Debug)]
pub struct DecodeRope {
    /// The QKV bias `[(n_heads + 2 n_kv) * head_dim]` bf16, or 0.
    pub bias: u64,
    pub inv_freq: u64,
    pub slots: u64,
}

/// Decode attention blocks the whole GPU holds at once (for a cache of `head_dim` and the given
/// element type): the fused-RoPE kernel's occupancy (the larger of the two) times the SMs. A
/// launch of more blocks runs in waves, so callers size their splits to stay within it.
pub fn attention_decode_resident_blocks(gpu: &Gpu, head_dim: usize, fp8: bool) -> Result<usize> {
    check_head_dim(head_dim)?;
    let name = format!("flint_attention_decode_rope_{}{head_dim}", if fp8 { "fp8_" } else { "" });
    let per_sm = gpu.function(&name)?.occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, 0, None)?;
    Ok(per_sm.max(1) as usize * gpu.sm_count() as usize)
}

/// Split-K decode attention of `n_tokens` query tokens (one position each) into
/// `out [n_tokens, n_heads, head_dim]`: the split of each (token, KV head) that finishes last
/// merges them all. With `out_amax` (else 0), each token's amax of `out` is also published into
/// its [`AMAX_SLOTS`] there (for [`Fp8Input::Bf16`]; at most [`GEMV_FP8_MAX_M`] tokens then).
/// With `rope`, the kernel also ropes the queries and writes the new keys and values
/// ([`DecodeRope`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    gpu: &Gpu,
    kv: &PagedKv,
    q: u64,
    q_stride: usize,
    token_seq: u64,
    positions: u64,
    scratch: &DecodeScratch,
    out: u64,
    out_amax: u64,
    rope: Option<&DecodeRope>,
    n_tokens: usize,
    n_splits: usize,
) -> Result<()> {
    if out_amax != 0 && n_tokens > GEMV_FP8_MAX_M {
        return Err(shape("attention", format!("{n_tokens} tokens publishing an amax (at most {GEMV_FP8_MAX_M})")));
    }
    let qkv_width = (kv.n_heads + 2 * kv.n_kv) * kv.head_dim;
    if rope.is_some() && q_stride < qkv_width {
        return Err(shape("attention", format!("a fused-RoPE q stride of {q_stride} (the QKV row is {qkv_width})")));
    }
    let name = kv.kernel(if rope.is_some() { "decode_rope" } else { "decode" })?;
    if !kv.n_heads.is_multiple_of(kv.n_kv) || kv.n_heads / kv.n_kv > 8 {
        return Err(shape("attention", format!("{} heads over {} KV heads: groups of at most 8", kv.n_heads, kv.n_kv)));
    }
    if !(1..=MAX_DECODE_SPLITS).contains(&n_splits) {
        return Err(shape("attention", format!("{n_splits} splits (1..={MAX_DECODE_SPLITS})")));
    }
    let qs = q_stride as i32;
    let (maxb, h, nkv, bs) = (kv.max_blocks as i32, kv.n_heads as i32, kv.n_kv as i32, kv.block_size as i32);
    let (bias, inv_freq, slots) = rope.map_or((0u64, 0u64, 0u64), |r| (r.bias, r.inv_freq, r.slots));
    let mut args = vec![
        arg(&q),
        arg(&qs),
        arg(&kv.k_cache),
        arg(&kv.v_cache),
        arg(&kv.k_scales),
        arg(&kv.v_scales),
        arg(&kv.block_tables),
        arg(&maxb),
        arg(&token_seq),
        arg(&positions),
        arg(&scratch.part_o),
        arg(&scratch.part_ml),
        arg(&scratch.counters),
        arg(&out),
        arg(&out_amax),
        arg(&h),
        arg(&nkv),
        arg(&bs),
        arg(&kv.scale),
    ];
    if rope.is_some() {
        args.extend([arg(&bias), arg(&inv_freq), arg(&slots)]);
    }
    gpu.launch(&name, (n_tokens as u32, kv.n_kv as u32, n_splits as u32), DECODE_THREADS, 0, &mut args)
}

/// Flash-attention prefill over `n_tiles` tiles of up to 64 query tokens (see attention.cuh).
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill(
    gpu: &Gpu,
    kv: &PagedKv,
    q: u64,
    q_stride: usize,
    query_starts: u64,
    context_lens: u64,
    tile_seq: u64,
    tile_start: u64,
    out: u64,
    n_tiles: usize,
) -> Result<()> {
    let name = kv.kernel("prefill")?;
    let smem = prefill_smem_bytes(kv.head_dim);
    gpu.set_max_dynamic_smem(&name, smem)?;
    let qs = q_stride as i32;
    let (maxb, h, nkv, bs) = (kv.max_blocks as i32, kv.n_heads as i32, kv.n_kv as i32, kv.block_size as i32);
    gpu.launch(
        &name,
        (n_tiles as u32, kv.n_heads as u32, 1),
        128,
        smem,
        &mut [
            arg(&q),
            arg(&qs),
            arg(&kv.k_cache),
            arg(&kv.v_cache),
            arg(&kv.k_scales),
            arg(&kv.v_scales),
            arg(&kv.block_tables),
            arg(&maxb),
            arg(&query_starts),
            arg(&context_lens),
            arg(&tile_seq),
            arg(&tile_start),
            arg(&out),
            arg(&h),
            arg(&nkv),
            arg(&bs),
            arg(&kv.scale),
        ],
    )
}

/// Per-row sampling parameters, laid out as `SamplingParams` in sampling.cuh: the host
/// sampler's settings and its uniform draw for this token (`flint_engine::Sampler` picks the
/// same token from the same logits and draw).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeviceSampling {
    /// `<= 0`: greedy.
    pub temperature: f32,
    /// `<= 0`: off.
    pub top_k: i32,
    /// `>= 1`: off.
    pub top_p: f32,
    /// `<= 0`: off.
    pub min_p: f32,
    /// Uniform in `[0, 1)`: where the inverse transform lands in the kept mass.
    pub u: f64,
}

impl DeviceSampling {
    /// Greedy (argmax, the lowest id on ties).
    pub const GREEDY: DeviceSampling = DeviceSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0 };
}

/// Dynamic shared memory of `flint_sample` (mirrors `kSampleSmemBytes` in sampling.cuh).
const SAMPLE_SMEM_BYTES: u32 = 32 * 256 * 8;

/// Samples one token per row of `logits [n_rows, vocab]` (f32) into `out` (u32), with
/// `params [n_rows]` ([`DeviceSampling`]). Launch: one block of 1024 threads per row, 64 KB of
/// dynamic shared memory; `vocab` below 2^31.
pub fn sample(gpu: &Gpu, logits: u64, vocab: usize, params: u64, out: u64, n_rows: usize) -> Result<()> {
    if vocab == 0 || vocab > i32::MAX as usize {
        return Err(crate::Error::Unsupported(format!("sampling over a vocabulary of {vocab}")));
    }
    let v = vocab as i32;
    gpu.set_max_dynamic_smem("flint_sample", SAMPLE_SMEM_BYTES)?;
    gpu.launch(
        "flint_sample",
        (n_rows as u32, 1, 1),
        1024,
        SAMPLE_SMEM_BYTES,
        &mut [arg(&logits), arg(&v), arg(&params), arg(&out)],
    )
}

/// Most candidates per row of [`top_candidates`] (mirrors `kMaxTopK` in sampling.cuh).
pub const MAX_TOP_K: usize = 256;

/// Each row's `k` most likely entries of `logits` (`rows` rows of `width` f32, `ld` apart) into
/// `out` (`[rows, 2k]` f32): (id + `id_offset`, logit) pairs, best first, ties to the lower id,
/// NaN never taken, padded with (-1, NaN), as `flint_model::top_candidates` on the host.
#[allow(clippy::too_many_arguments)]
pub fn top_candidates(
    gpu: &Gpu,
    logits: u64,
    rows: usize,
    width: usize,
    ld: usize,
    id_offset: usize,
    k: usize,
    out: u64,
) -> Result<()> {
    if width > ld {
        return Err(shape("top_candidates", format!("rows of {width} entries {ld} apart")));
    }
    if !(1..=MAX_TOP_K).contains(&k) || width + id_offset >= 1 << 24 {
        return Err(shape(
            "top_candidates",
            format!("k = {k} (1..={MAX_TOP_K}), ids up to {} (below 2^24)", width + id_offset),
        ));
    }
    let (w, ld, off, k) = (width as i32, ld as i32, id_offset as i32, k as i32);
    gpu.launch(
        "flint_top_candidates",
        (rows as u32, 1, 1),
        1024,
        0,
        &mut [arg(&logits), arg(&w), arg(&ld), arg(&off), arg(&k), arg(&out)],
    )
}

// ---- FP8 (E4M3): value = code * scale, one scale per row ----------------------------------

/// `out[r] = codes of x[r] / scale[r]` with `scale[r] = amax(x[r]) / 448`: bf16 `[rows, cols]` to
/// FP8 with a scale per row (per token for activations, per output channel for weights).
pub fn quantize_rows(gpu: &Gpu, x: u64, out: u64, scales: u64, rows: usize, cols: usize) -> Result<()> {
    if !cols.is_multiple_of(8) {
        return Err(shape("quantize_rows", format!("{cols} columns (a multiple of 8)")));
    }
    let cols = cols as i32;
    gpu.launch("flint_quantize_rows", (rows as u32, 1, 1), 256, 0, &mut [arg(&x), arg(&out), arg(&scales), arg(&cols)])
}

/// [`add_rms_norm`] whose normalised rows come out as FP8 codes with a scale per row.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_fp8(
    gpu: &Gpu,
    residual: u64,
    add: u64,
    weight: u64,
    out: u64,
    scales: u64,
    n: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    let hidden = hidden as i32;
    gpu.launch(
        "flint_add_rms_norm_fp8",
        (n as u32, 1, 1),
        256,
        0,
        &mut [arg(&residual), arg(&add), arg(&weight), arg(&out), arg(&scales), arg(&hidden), arg(&eps)],
    )
}

/// SwiGLU of a fused `[n, 2 ff]` gate/up output, quantized to FP8 with a scale per token.
pub fn silu_mul_fp8(gpu: &Gpu, gate_up: u64, out: u64, scales: u64, n: usize, ff: usize) -> Result<()> {
    let ff = ff as i32;
    gpu.launch("flint_silu_mul_fp8", (n as u32, 1, 1), 256, 0, &mut [arg(&gate_up), arg(&out), arg(&scales), arg(&ff)])
}

/// Most tokens the FP8 GEMV takes (the N of its tensor-core tile).
pub const GEMV_FP8_MAX_M: usize = 8;

/// Output of the FP8 GEMV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Epilogue {
    /// bf16 `[m, n]`.
    Bf16 = 0,
    /// W is `[gate; up]` (`2n` rows); `y[m, j] = silu(gate_j) * up_j`, bf16 `[m, n]`.
    SwiGlu = 1,
}

/// Whether the FP8 GEMV takes an `[n, k]` weight (`n` output rows, per epilogue).
pub fn gemv_fp8_fits(n: usize, k: usize, epilogue: Fp8Epilogue) -> bool {
    let rows = if epilogue == Fp8Epilogue::SwiGlu { 8 } else { 16 };
    k.is_multiple_of(64) && n.is_multiple_of(rows) && n > 0
}

/// How the FP8 GEMV splits its work: `split_k` warps share a 16-row tile (8 of a block's warps,
/// so `8 / split_k` tiles per block), each taking every `split_k`-th chunk of `unroll` 64-byte
/// steps of K per lane; with `prefetch`, a warp loads its next chunk before multiplying the
/// current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8GemvConfig {
    pub split_k: usize,
    pub unroll: usize,
    pub prefetch: bool,
}

impl Fp8GemvConfig {
    /// Every compiled variant (kernels/fp8.cu): 4 and 8 warps per tile with 2 or 4 steps per
    /// chunk, 16 and 32 warps per tile with 1 or 2; each with and without prefetch.
    pub const ALL: [Fp8GemvConfig; 16] = {
        let mut all = [Fp8GemvConfig { split_k: 4, unroll: 2, prefetch: false }; 16];
        let mut i = 0;
        while i < 16 {
            let wide = i >= 8;
            all[i] = Fp8GemvConfig {
                split_k: [4, 8, 16, 32][i / 4],
                unroll: if wide { [1, 2][i / 2 % 2] } else { [2, 4][i / 2 % 2] },
                prefetch: i % 2 == 1,
            };
            i += 1;
        }
        all
    };

    /// Warps per block (mirrors `f8_block_warps`): eight, holding 8 / split_k tiles, or one tile's.
    pub fn block_warps(&self) -> usize {
        self.split_k.max(8)
    }

    /// The variant for an `[n, k]` weight, by its number of 16-row tiles (`n / 8` for SwiGLU),
    /// from the per-projection tables of `bench::gemv_rates` (Llama-3.1-8B, one token): at 256
    /// tiles (o, down) too few warps stream with eight per tile, and sixteen with one 64-byte
    /// step each is fastest (`bench/results/2026-11-22-h100-llama-3.1-8b-fp8-gemv.json`: 0.67 and
    /// 0.85 of the copy bandwidth, against 0.61 and 0.80); above, eight warps with two steps: at
    /// 384 tiles (qkv) since that table (0.71), and at 1792 (gate/up) since the L2-prefetching
    /// kernels, where in four H100 runs of 2026-12-06 and one H200 run it beat the four steps
    /// picked before (H100: 40.8 to 44.9 us against 42.5 to 46.9). Every variant prefetches
    /// its next chunk. The choice depends on the shape alone (no timing at start-up), so a
    /// shape always runs one kernel and one summation order.
    pub fn for_shape(n: usize, _k: usize, epilogue: Fp8Epilogue) -> Self {
        let tiles = if epilogue == Fp8Epilogue::SwiGlu { n / 8 } else { n / 16 };
        let (split_k, unroll) = match tiles {
            0..=320 => (16, 1),
            _ => (8, 2),
        };
        Fp8GemvConfig { split_k, unroll, prefetch: true }
    }

    /// The variants compiled with a [`NormTail`] or a [`SplitNorm`] (either half) as well: those
    /// [`Self::for_shape`] picks for a plain output of up to 320 tiles and above.
    pub const NORM_TAIL: [Fp8GemvConfig; 2] = [
        Fp8GemvConfig { split_k: 16, unroll: 1, prefetch: true },
        Fp8GemvConfig { split_k: 8, unroll: 2, prefetch: true },
    ];

    /// `s{split_k}_u{unroll}_p{0|1}`, as in the kernel's name.
    pub fn label(&self) -> String {
        format!("s{}_u{}_p{}", self.split_k, self.unroll, u8::from(self.prefetch))
    }

    fn kernel(&self, input: &Fp8Input, after: &str) -> String {
        let q = match input {
            Fp8Input::Codes { .. } => "",
            Fp8Input::Bf16 { .. } => "q",
            Fp8Input::Normed { .. } => "n",
        };
        format!("flint_gemv_fp8{q}{after}_{}", self.label())
    }
}

/// Floats per token of an amax publication (mirrors `kAmaxSlots` in e4m3.cuh): a producer maxes
/// `|value|` into them, the row's amax is their maximum. A slot area must be zero before its
/// producer runs.
pub const AMAX_SLOTS: usize = 32;

/// Most tokens of an [`Fp8Input::Bf16`] GEMV (mirrors `kF8QMaxM` in fp8.cuh): every warp
/// converts the activation of its chunks, a cost that grows with the tokens and past two
/// outweighs the quantization kernel it saves.
pub const GEMV_FP8_QUANTIZING_MAX_M: usize = 2;

/// The activation input of the FP8 GEMV.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fp8Input {
    /// E4M3 codes `[m, k]` with an f32 scale per token.
    Codes { x: u64, scales: u64 },
    /// The bf16 activation `[m, k]` (`m <= GEMV_FP8_QUANTIZING_MAX_M`) and its producer's amax
    /// slots (`[m, AMAX_SLOTS]` f32): the GEMV quantizes it per token itself, to the codes
    /// [`quantize_rows`] would give.
    Bf16 { x: u64, amax: u64 },
    /// The residual `[m, k]` (bf16, `m <= GEMV_FP8_QUANTIZING_MAX_M`) whose RMSNorm a GEMV with
    /// [`Fp8Gemv::split_norm`] began: the GEMV finishes it from `norm`'s partials and quantizes
    /// the normed rows itself ([`SplitNorm`]).
    Normed { residual: u64, norm: SplitNorm },
}

/// The add + RMSNorm + quantize between two FP8 GEMVs, split over both (mirrors
/// `Fp8SplitNorm`), in place of a [`NormTail`] that the first one's last block runs after every
/// other block. The first GEMV ([`Fp8Gemv::split_norm`], plain epilogue, `y` the residual) adds
/// its output into the residual (as [`add_rms_norm_fp8`] adds) and leaves, per token and 16-row
/// tile, the sum of squares of the new residual and its max of `|residual * weight|` in
/// `partials` (`[m, n_parts]` pairs of f32, `n_parts` its tiles, [`split_norm_parts`]); the next
/// GEMV ([`Fp8Input::Normed`]) sums them in a fixed order and quantizes
/// `bf16(weight * bf16(residual * r))`, `r = 1 / sqrt(sum / k + eps)`, the values of the norm
/// kernel, with the scale `r * max / 448`. Run to run the same bits; against the norm kernel the
/// sum's order and so `r` can differ in the last bit, and the scale slightly (the kernel's is
/// the max after the bf16 roundings, up to 2^-7 above: such a value saturates at 448).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SplitNorm {
    pub weight: u64,
    pub partials: u64,
    pub n_parts: i32,
    pub eps: f32,
}

/// The partials a [`SplitNorm`] of an `n`-wide output has per token (its 16-row tiles).
pub fn split_norm_parts(n: usize) -> usize {
    n / 16
}

/// One FP8 GEMV: `y[m, n] = (x codes . W codes^T) * x_scale[m] * w_scale[n]`.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Gemv {
    pub input: Fp8Input,
    /// FP8 `[n, k]` (or `[2n, k]` for SwiGLU) with an f32 scale per row.
    pub w: u64,
    pub w_scale: u64,
    /// bf16 `[m, n]`.
    pub y: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub epilogue: Fp8Epilogue,
    /// SwiGLU: amax slots (`[m, AMAX_SLOTS]`, zero) that receive the output's amax per token, for
    /// a GEMV taking it as [`Fp8Input::Bf16`] next; 0 for none.
    pub publish_amax: u64,
    /// `[m, AMAX_SLOTS]` f32 that the GEMV zeroes (another activation's slots, read by a kernel
    /// that has finished); 0 for none. Never the input's own slots.
    pub clear_amax: u64,
    /// The GEMV follows a latency-bound kernel: its first blocks may ask their weights into L2
    /// before they wait, within the launch tuning's budget (as [`gemv_l2`]).
    pub l2_prefetch: bool,
    /// The add + RMSNorm + quantize of the output, run by the GEMV's last block
    /// ([`NormTail`]); `None` leaves it to [`add_rms_norm_fp8`].
    pub norm_tail: Option<NormTail>,
    /// The first half of a [`SplitNorm`] after the output: `y` is then the residual, which the
    /// output is added into. Not with a `norm_tail`.
    pub split_norm: Option<SplitNorm>,
}

/// Most tokens of a GEMV with a [`NormTail`] (mirrors `kNormTailMaxM` in fp8.cuh): its last
/// block normalises one row per 256 threads side by side (two in the 512-thread variant), the
/// rest after them.
pub const NORM_TAIL_MAX_M: usize = 2;
/// Widest output a [`NormTail`] takes (mirrors `kNormTailMaxHidden`).
pub const NORM_TAIL_MAX_HIDDEN: usize = 8192;

/// What [`add_rms_norm_fp8`] would do after an FP8 GEMV of plain epilogue, done by that GEMV's
/// last block once every block has written `y` (mirrors `Fp8NormTail`): `residual += y`, then
/// the normalised rows as FP8 codes `[m, n]` with a scale per row, bit for bit those of the
/// kernel. `counter`: a u32, zero before the launch and zero again after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NormTail {
    pub residual: u64,
    pub weight: u64,
    pub codes: u64,
    pub scales: u64,
    pub counter: u64,
    pub eps: f32,
}

impl Fp8Gemv {
    /// A GEMV of FP8 codes with nothing published or cleared.
    #[allow(clippy::too_many_arguments)]
    pub fn codes(
        x: u64,
        x_scale: u64,
        w: u64,
        w_scale: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Fp8Epilogue,
    ) -> Self {
        Fp8Gemv {
            input: Fp8Input::Codes { x, scales: x_scale },
            w,
            w_scale,
            y,
            m,
            n,
            k,
            epilogue,
            publish_amax: 0,
            clear_amax: 0,
            l2_prefetch: false,
            norm_tail: None,
            split_norm: None,
        }
    }
}

/// `y[m, n] = (x codes . W codes^T) * x_scale[m] * w_scale[n]` on FP8 tensor cores, for
/// `m <= 8` tokens: x FP8 `[m, k]`, W FP8 `[n, k]` (or `[2n, k]` for SwiGLU), scales f32.
#[allow(clippy::too_many_arguments)]
pub fn gemv_fp8(
    gpu: &Gpu,
    x: u64,
    x_scale: u64,
    w: u64,
    w_scale: u64,
    y: u64,
    m: usize,
    n: usize,
    k: usize,
    epilogue: Fp8Epilogue,
) -> Result<()> {
    run_gemv_fp8(gpu, None, &Fp8Gemv::codes(x, x_scale, w, w_scale, y, m, n, k, epilogue))
}

/// Runs one FP8 GEMV with `config` (benchmarks compare them), or the shape's own variant
/// ([`Fp8GemvConfig::for_shape`]).
pub fn run_gemv_fp8(gpu: &Gpu, config: Option<Fp8GemvConfig>, op: &Fp8Gemv) -> Result<()> {
    let Fp8Gemv {
        input,
        w,
        w_scale,
        y,
        m,
        n,
        k,
        epilogue,
        publish_amax,
        clear_amax,
        l2_prefetch,
        norm_tail,
        split_norm,
    } = *op;
    let config = config.unwrap_or_else(|| Fp8GemvConfig::for_shape(n, k, epilogue));
    if m == 0 || m > GEMV_FP8_MAX_M || !gemv_fp8_fits(n, k, epilogue) {
        return Err(shape(
            "gemv_fp8",
            format!("m = {m} (1..=8), n = {n} (a multiple of 16, or 8 for SwiGLU), k = {k} (a multiple of 64)"),
        ));
    }
    if !Fp8GemvConfig::ALL.contains(&config) {
        return Err(shape("gemv_fp8", format!("no compiled variant {config:?}")));
    }
    if !matches!(input, Fp8Input::Codes { .. }) && m > GEMV_FP8_QUANTIZING_MAX_M {
        return Err(shape("gemv_fp8", format!("m = {m} tokens of a bf16 input (at most {GEMV_FP8_QUANTIZING_MAX_M})")));
    }
    if publish_amax != 0 && epilogue != Fp8Epilogue::SwiGlu {
        return Err(shape("gemv_fp8", "only the SwiGLU epilogue publishes an amax"));
    }
    if norm_tail.is_some() && split_norm.is_some() {
        return Err(shape("gemv_fp8", "a norm tail or a split norm, not both"));
    }
    if let Some(tail) = &norm_tail {
        if !norm_tail_fits(m, n, epilogue) {
            return Err(shape(
                "gemv_fp8",
                format!(
                    "a norm tail needs the plain epilogue, m <= {NORM_TAIL_MAX_M} and n <= {NORM_TAIL_MAX_HIDDEN} \
                     (m = {m}, n = {n}, {epilogue:?})"
                ),
            ));
        }
        if !Fp8GemvConfig::NORM_TAIL.contains(&config) {
            return Err(shape("gemv_fp8", format!("no compiled variant {config:?} with a norm tail")));
        }
        if tail.counter == 0 || tail.residual == 0 || tail.weight == 0 || tail.codes == 0 || tail.scales == 0 {
            return Err(shape("gemv_fp8", "a norm tail needs its residual, weight, codes, scales and counter"));
        }
    }
    if let Some(split) = &split_norm {
        if epilogue != Fp8Epilogue::Bf16 || m > GEMV_FP8_QUANTIZING_MAX_M {
            return Err(shape(
                "gemv_fp8",
                format!(
                    "a split norm needs the plain epilogue and m <= {GEMV_FP8_QUANTIZING_MAX_M} (m = {m}, {epilogue:?})"
                ),
            ));
        }
        if split.n_parts as usize != split_norm_parts(n) {
            return Err(shape(
                "gemv_fp8",
                format!("a split norm of {n} outputs has {} partials, not {}", split_norm_parts(n), split.n_parts),
            ));
        }
    }
    // A normed input's split norm (the second half).
    let normed = match input {
        Fp8Input::Normed { norm, .. } => Some(norm),
        _ => None,
    };
    if let Some(norm) = normed
        && norm.n_parts as usize != split_norm_parts(k)
    {
        return Err(shape(
            "gemv_fp8",
            format!("a normed input of {k} values has {} partials, not {}", split_norm_parts(k), norm.n_parts),
        ));
    }
    for (what, split) in [("split norm", split_norm), ("normed input", normed)] {
        let Some(split) = split else { continue };
        if !Fp8GemvConfig::NORM_TAIL.contains(&config) {
            return Err(shape("gemv_fp8", format!("no compiled variant {config:?} with a {what}")));
        }
        if split.weight == 0 || split.partials == 0 || split.n_parts <= 0 {
            return Err(shape("gemv_fp8", format!("a {what} needs its weight, partials and their count")));
        }
    }
    let (x, x_aux) = match input {
        Fp8Input::Codes { x, scales } => (x, scales),
        Fp8Input::Bf16 { x, amax } => {
            if amax == clear_amax || amax == 0 {
                return Err(shape("gemv_fp8", "a bf16 input needs amax slots that the GEMV does not clear"));
            }
            (x, amax)
        }
        Fp8Input::Normed { residual, .. } => (residual, 0),
    };
    let after = match (norm_tail, split_norm) {
        (Some(_), _) => "_norm",
        (None, Some(_)) => "_split",
        (None, None) => "",
    };
    let split = split_norm.or(normed).unwrap_or_default();
    let tiles = if epilogue == Fp8Epilogue::SwiGlu { n / 8 } else { n / 16 };
    let (mi, ni, ki, e, l2) = (m as i32, n as i32, k as i32, epilogue as i32, i32::from(l2_prefetch));
    let tail = norm_tail.unwrap_or_default();
    gpu.launch(
        &config.kernel(&input, after),
        (tiles.div_ceil(config.block_warps() / config.split_k) as u32, 1, 1),
        32 * config.block_warps() as u32,
        0,
        &mut [
            arg(&x),
            arg(&x_aux),
            arg(&w),
            arg(&w_scale),
            arg(&y),
            arg(&mi),
            arg(&ni),
            arg(&ki),
            arg(&e),
            arg(&publish_amax),
            arg(&clear_amax),
            arg(&l2),
            arg(&tail),
            arg(&split),
        ],
    )
}

/// Whether an FP8 GEMV of `m` tokens and `n` outputs can run a [`NormTail`].
pub fn norm_tail_fits(m: usize, n: usize, epilogue: Fp8Epilogue) -> bool {
    epilogue == Fp8Epilogue::Bf16
        && (1..=NORM_TAIL_MAX_M).contains(&m)
        && n <= NORM_TAIL_MAX_HIDDEN
        && n.is_multiple_of(8)
}

/// Most ranks of a peer-to-peer all-reduce (mirrors `kArMaxRanks` in allreduce.cuh).
pub const AR_MAX_RANKS: usize = 8;
/// Most blocks of a peer-to-peer all-reduce launch (mirrors `kArMaxBlocks`); each rank's flag
/// area holds `AR_MAX_BLOCKS * AR_MAX_RANKS` u32 and its counters `AR_MAX_BLOCKS`.
pub const AR_MAX_BLOCKS: usize = 64;

/// Blocks per row of the clustered fused kernel (mirrors `kArCluster`).
pub const AR_CLUSTER: usize = 8;

/// The peer-readable buffers of one all-reduce: every rank's input and flag area (mirrors
/// `ArPeers`). Unused ranks are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ArPeers {
    pub data: [u64; AR_MAX_RANKS],
    pub flags: [u64; AR_MAX_RANKS],
}

/// `out = sum over ranks of peers.data[r]` (`len` bf16, a multiple of 8), one-shot over
/// peer-to-peer loads in `blocks` blocks (at most [`AR_MAX_BLOCKS`]).
pub fn ar_sum(
    gpu: &Gpu,
    peers: &ArPeers,
    counter: u64,
    out: u64,
    len: usize,
    rank: usize,
    world: usize,
    blocks: usize,
) -> Result<()> {
    if !len.is_multiple_of(8) || blocks == 0 || blocks > AR_MAX_BLOCKS || world > AR_MAX_RANKS || rank >= world {
        return Err(shape("ar_sum", format!("{len} values, {blocks} blocks, rank {rank} of {world}")));
    }
    let (n8, rank, world) = ((len / 8) as u64, rank as i32, world as i32);
    gpu.launch(
        "flint_ar_sum",
        (blocks as u32, 1, 1),
        512,
        0,
        &mut [arg(peers), arg(&counter), arg(&out), arg(&n8), arg(&rank), arg(&world)],
    )
}

/// Where [`ar_add_rms_norm`] puts the normalised rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormOut {
    /// bf16 `[n, hidden]`.
    Bf16(u64),
    /// FP8 codes `[n, hidden]` with a scale per row (`[n]` f32), as [`add_rms_norm_fp8`].
    Fp8 { codes: u64, scales: u64 },
}

/// For each of `n` rows: `residual += sum over ranks of peers.data[r]` (bf16), then
/// `out = rms_norm(residual) * weight` ([`add_rms_norm`], or [`add_rms_norm_fp8`] for FP8
/// output, after an all-reduce, in one kernel).
pub fn ar_add_rms_norm(
    gpu: &Gpu,
    peers: &ArPeers,
    counter: u64,
    residual: u64,
    weight: u64,
    out: NormOut,
    n: usize,
    hidden: usize,
    eps: f32,
    rank: usize,
    world: usize,
) -> Result<()> {
    if world > AR_MAX_RANKS || rank >= world {
        return Err(shape("ar_add_rms_norm", format!("rank {rank} of {world}")));
    }
    launch_ar_norm(gpu, ArLink::Flags { peers, counter }, residual, weight, out, n, hidden, eps, rank, world)
}

/// The parameters that lead an all-reduce kernel's: the link's buffers.
enum ArLink<'a> {
    Flags { peers: &'a ArPeers, counter: u64 },
    Lamport(&'a ArLamport),
}

/// Launches the fused all-reduce + residual add + RMSNorm kernel of `link`.
#[allow(clippy::too_many_arguments)]
fn launch_ar_norm(
    gpu: &Gpu,
    link: ArLink,
    residual: u64,
    weight: u64,
    out: NormOut,
    n: usize,
    hidden: usize,
    eps: f32,
    rank: usize,
    world: usize,
) -> Result<()> {
    if !hidden.is_multiple_of(8) {
        return Err(shape("ar_add_rms_norm", format!("hidden {hidden}")));
    }
    let (prefix, max_threads) = match link {
        ArLink::Flags { .. } => ("flint_ar", 1024),
        ArLink::Lamport(_) => ("flint_arl", ARL_MAX_THREADS),
    };
    // Up to one row per cluster (of AR_CLUSTER blocks) where a row splits into them evenly;
    // more rows go one per block (measured: at 64 rows of 8192 eight clusters are slower).
    let vectors = hidden / 8;
    let clustered = n <= AR_MAX_BLOCKS / AR_CLUSTER
        && vectors.is_multiple_of(AR_CLUSTER)
        && (32..=max_threads).contains(&(vectors / AR_CLUSTER));
    let (name, blocks, threads) = if clustered {
        let clusters = n.clamp(1, AR_MAX_BLOCKS / AR_CLUSTER);
        (format!("{prefix}_add_rms_norm_cluster"), clusters * AR_CLUSTER, (vectors / AR_CLUSTER).next_multiple_of(32))
    } else {
        (
            format!("{prefix}_add_rms_norm"),
            n.clamp(1, AR_MAX_BLOCKS),
            vectors.next_multiple_of(32).clamp(128, max_threads),
        )
    };
    let (n, hidden, rank, world) = (n as i32, hidden as i32, rank as i32, world as i32);
    let (rows, codes, scales) = match out {
        NormOut::Bf16(rows) => (rows, 0u64, 0u64),
        NormOut::Fp8 { codes, scales } => (0, codes, scales),
    };
    let mut args = match &link {
        ArLink::Flags { peers, counter } => vec![arg(*peers), arg(counter)],
        ArLink::Lamport(lamport) => vec![arg(*lamport)],
    };
    args.extend([
        arg(&residual),
        arg(&weight),
        arg(&rows),
        arg(&codes),
        arg(&scales),
        arg(&n),
        arg(&hidden),
        arg(&eps),
        arg(&rank),
        arg(&world),
    ]);
    gpu.launch(&name, (blocks as u32, 1, 1), threads as u32, 0, &mut args)
}

/// The push link's buffers of one all-reduce (mirrors `ArLamport` in allreduce.cuh): this
/// rank's input, every rank's receive area (`[3 slots][world senders][cap8 vectors of 8 bf16]`,
/// filled with [`AR_LAMPORT_EMPTY`] when allocated) and this GPU's call state (two u32, zeroed).
/// Unused ranks are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ArLamport {
    pub input: u64,
    pub recv: [u64; AR_MAX_RANKS],
    pub state: u64,
    pub cap8: u64,
}

/// The bf16 bits that mark a receive place as empty (-0; a sent -0 goes out as +0).
pub const AR_LAMPORT_EMPTY: u16 = 0x8000;

/// Most threads per block of the push-link kernels (their `__launch_bounds__`).
const ARL_MAX_THREADS: usize = 512;

fn check_lamport(op: &'static str, l: &ArLamport, values: usize, rank: usize, world: usize) -> Result<()> {
    if !values.is_multiple_of(8) || world > AR_MAX_RANKS || rank >= world || (values / 8) as u64 > l.cap8 {
        return Err(shape(op, format!("{values} values in places of {} vectors, rank {rank} of {world}", l.cap8)));
    }
    Ok(())
}

/// `out = sum over ranks of each rank's lamport.input` (`len` bf16, a multiple of 8), pushed
/// into the peers' receive areas, in `blocks` blocks (any number: the push link has no
/// per-block state).
pub fn arl_sum(
    gpu: &Gpu,
    lamport: &ArLamport,
    out: u64,
    len: usize,
    rank: usize,
    world: usize,
    blocks: usize,
) -> Result<()> {
    check_lamport("arl_sum", lamport, len, rank, world)?;
    if blocks == 0 {
        return Err(shape("arl_sum", "0 blocks".to_string()));
    }
    let (n8, rank, world) = ((len / 8) as u64, rank as i32, world as i32);
    gpu.launch(
        "flint_arl_sum",
        (blocks as u32, 1, 1),
        ARL_MAX_THREADS as u32,
        0,
        &mut [arg(lamport), arg(&out), arg(&n8), arg(&rank), arg(&world)],
    )
}

/// [`ar_add_rms_norm`] over the push link: each rank's `lamport.input` rows summed into
/// `residual`, then RMSNorm into `out`.
#[allow(clippy::too_many_arguments)]
pub fn arl_add_rms_norm(
    gpu: &Gpu,
    lamport: &ArLamport,
    residual: u64,
    weight: u64,
    out: NormOut,
    n: usize,
    hidden: usize,
    eps: f32,
    rank: usize,
    world: usize,
) -> Result<()> {
    check_lamport("arl_add_rms_norm", lamport, n * hidden, rank, world)?;
    launch_ar_norm(gpu, ArLink::Lamport(lamport), residual, weight, out, n, hidden, eps, rank, world)
}

#[cfg(test)]
mod tests {
    use super::gemv_unroll;

    /// Every kernel name the launchers can form is in the list the modules are checked against
    /// at start-up (a compiled kernel missing there cannot be launched).
    #[test]
    fn every_launchable_kernel_is_registered() {
        use super::{Fp8GemvConfig, Fp8Input, PagedKv, SplitNorm};
        let registered = |name: &str| crate::gpu::KERNEL_NAMES.contains(&name);
        let codes = Fp8Input::Codes { x: 0, scales: 0 };
        let bf16 = Fp8Input::Bf16 { x: 0, amax: 0 };
        let normed = Fp8Input::Normed { residual: 0, norm: SplitNorm::default() };
        for c in Fp8GemvConfig::ALL {
            for input in [codes, bf16] {
                assert!(registered(&c.kernel(&input, "")), "{} is not registered", c.kernel(&input, ""));
            }
        }
        for c in Fp8GemvConfig::NORM_TAIL {
            assert!(Fp8GemvConfig::ALL.contains(&c));
            for (input, after) in [(codes, "_norm"), (bf16, "_norm"), (codes, "_split"), (bf16, "_split"), (normed, "")]
            {
                assert!(registered(&c.kernel(&input, after)), "{} is not registered", c.kernel(&input, after));
            }
        }
        for (scales, head_dim) in [(0, 64), (0, 128), (8, 64), (8, 128)] {
            let kv = PagedKv {
                k_cache: 0,
                v_cache: 0,
                k_scales: scales,
                v_scales: scales,
                block_tables: 0,
                max_blocks: 1,
                block_size: 16,
                n_heads: 1,
                n_kv: 1,
                head_dim,
                scale: 1.0,
            };
            for kind in ["decode", "decode_rope", "prefill"] {
                let name = kv.kernel(kind).expect("name");
                assert!(registered(&name), "{name} is not registered");
            }
        }
    }

    /// Per-warp 256-element steps of a GEMV over `k` with `u` loads in flight (what the kernel
    /// does: full chunks round-robin over 4 warps, then the tail's steps).
    fn per_warp_steps(k: usize, u: usize) -> usize {
        let chunks = k / (u * 256);
        chunks.div_ceil(4) * u + (k - chunks * u * 256).div_ceil(256).div_ceil(4)
    }

    #[test]
    fn gemv_unroll_spreads_k_over_the_warps() {
        // A TP 4 shard of a 70B O projection (K 2048) at four loads would leave two warps idle.
        assert_eq!(gemv_unroll(2048), 2);
        assert_eq!(gemv_unroll(7168), 1);
        assert_eq!(gemv_unroll(4096), 4);
        assert_eq!(gemv_unroll(8192), 4);
        for k in (8..40_000).step_by(8) {
            let u = gemv_unroll(k);
            assert!([1, 2, 4].contains(&u));
            // Never more steps on the busiest warp than another choice, and the largest among equals.
            for other in [1, 2, 4] {
                assert!(per_warp_steps(k, u) <= per_warp_steps(k, other), "k {k}: {u} worse than {other}");
                if per_warp_steps(k, u) == per_warp_steps(k, other) {
                    assert!(u >= other, "k {k}: ties go to more loads in flight");
                }
            }
        }
    }
}
