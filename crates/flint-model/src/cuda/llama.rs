//! `CudaLlama`: a Llama-family model in BF16 on one GPU.
//!
//! Everything is sized up front: weights, the paged KV cache and a workspace for the largest
//! step. A step's metadata (tokens, positions, slots, block tables, sampling parameters) goes to
//! the device in one copy into a fixed layout; decode steps replay a CUDA graph captured once per
//! batch-size bucket, so a decode step is: one copy in, one graph launch, one copy of the sampled
//! tokens (or logits) out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::ops::Range;

use flint_comm::{CommType, Communicator, DeviceSlice, NcclComm, P2pAllReduce, P2pLink, ReduceOp};
use flint_cuda::gemm::{Gemm, GemmOut};
use flint_cuda::ops::{self, DeviceSampling, Epilogue, GEMV_MAX_M, PagedKv};
use flint_cuda::{DeviceBuffer, Gpu, Graph, Staging, gib};
use half::bf16;
use rayon::prelude::*;

use crate::{Error, ForwardBatch, ModelConfig, ModelSource, Result, Shard, rope_inv_freq};

/// Every sequence of the batch brings exactly one new token.
fn is_decode_only(batch: &ForwardBatch) -> bool {
    batch.query_starts().windows(2).all(|w| w[1] - w[0] == 1)
}

fn shape(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Cuda(flint_cuda::error::shape(op, detail))
}

fn unsupported(message: impl Into<String>) -> Error {
    Error::Cuda(flint_cuda::Error::Unsupported(message.into()))
}

fn out_of_memory(what: String, need: usize, free: usize) -> Error {
    Error::Cuda(flint_cuda::Error::OutOfMemory { what, need_gib: gib(need), free_gib: gib(free) })
}

/// Most tokens of a step whose O and down GEMVs quantize their inputs themselves
/// ([`CudaLlamaOptions::fuse_fp8_quantization`]). The kernel takes two, but on one H100
/// (Llama-3.1-8B, `flint bench --fp8-quantization both`) the fused step was 1.025x faster at one
/// token and 0.992x at two.
pub const FUSED_QUANTIZATION_MAX_TOKENS: usize = 1;

/// Most tokens of a step whose O and down GEMVs run the norm after them as their tail
/// ([`CudaLlamaOptions::fuse_norm_tail`]). The kernel takes two (`ops::NORM_TAIL_MAX_M`; a
/// 512-thread block normalises them side by side), but on one H100 (Llama-3.1-8B FP8) the fused
/// step was 1.024x faster than the norm kernels at one token and, at two, 0.968x with the rows one
/// after the other and still 0.995x with them side by side
/// (`bench/results/2026-12-07-h100-llama-3.1-8b-norm-tail-rows-6c88e39.md`), so two-token steps
/// keep the norm kernels.
pub const NORM_TAIL_MAX_TOKENS: usize = 1;

/// Sizes chosen at load time.
#[derive(Clone, Debug)]
pub struct CudaLlamaOptions {
    /// Most tokens in one step (a prefill chunk plus decodes).
    pub max_batch_tokens: usize,
    /// Most sequences in one step (the largest decode batch).
    pub max_seqs: usize,
    /// Longest sequence (prompt plus output).
    pub max_seq_len: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// KV blocks; `None`: what `kv_memory_fraction` of the free memory after weights and
    /// workspace holds.
    pub n_blocks: Option<usize>,
    pub kv_memory_fraction: f64,
    /// Capture decode steps in CUDA graphs.
    pub graphs: bool,
    /// Largest token count that runs the GEMV kernel rather than cuBLASLt (1..=8).
    pub gemv_max_m: usize,
    /// FP8 (E4M3) linear layers: weights with a scale per output channel, activations with a
    /// dynamic scale per token; FP8 tensor-core GEMV up to 8 tokens, cuBLASLt FP8 above.
    /// Embedding, norms and LM head stay BF16.
    pub fp8: bool,
    /// FP8 (E4M3) KV cache: keys and values as codes with one f32 scale per (position, KV head),
    /// quantized where they are written, read by both attention kernels. Half the cache's bytes
    /// per position (plus 4 per head for the scale), so nearly twice the positions.
    pub kv_fp8: bool,
    /// Tensor parallel: reduce small steps (up to 64 rows) with the peer-to-peer one-shot
    /// all-reduce fused with the residual add and RMSNorm, where the GPUs reach each other;
    /// NCCL otherwise. (BF16 models; FP8 ones use NCCL.)
    pub p2p_all_reduce: bool,
    /// How the peer-to-peer all-reduce moves data (a flag barrier and remote loads, or pushed
    /// values and sentinels).
    pub p2p_link: P2pLink,
    /// FP8 decode steps of one token: the O and down GEMVs quantize their bf16 inputs
    /// themselves, from the amax that the attention and the SwiGLU GEMV publish, instead of a
    /// quantization kernel before each (the same codes either way).
    pub fuse_fp8_quantization: bool,
    /// Decode-only steps: the decode attention ropes each token's queries and writes its new
    /// key and value into the cache itself, instead of a RoPE + KV-write kernel before it (the
    /// same values and cache bytes either way; one kernel less per layer). On by default: 1.02x on
    /// the BF16 Llama-3.1-8B preset at batches 1 to 8 on an H100, 1.00x to 1.01x in FP8
    /// (`bench/results/2026-12-07-h100-llama-3.1-8b-decode-fusion-2880a1e.md`).
    pub fuse_rope_attention: bool,
    /// Single-GPU FP8 steps of one token ([`NORM_TAIL_MAX_TOKENS`]): the O and down GEMVs end
    /// with the residual add + RMSNorm + quantize of their output, run by their last block,
    /// instead of a norm kernel after each (the same residual, codes and scales either way; two
    /// kernels less per layer). On by default: 1.024x on the FP8 Llama-3.1-8B preset at batch 1
    /// on an H100 (`bench/results/2026-12-07-h100-llama-3.1-8b-decode-fusion-2880a1e.md`).
    pub fuse_norm_tail: bool,
    /// With [`Self::fuse_norm_tail`] and [`Self::fuse_fp8_quantization`] on a one-token step:
    /// that norm split over the O or down GEMV and the GEMV after it (`ops::SplitNorm`) instead of
    /// the first one's last block running it after every other block. Each block adds its rows
    /// into the residual and leaves their sum of squares and max; the next GEMV finishes the
    /// norm and quantizes the normed residual itself, so no block waits for another. The same
    /// residual; codes of an RMS and scale that can differ from the norm kernel's in the last
    /// bits (their sums run in another order), the same bits from run to run. On by default: the
    /// FP8 Llama-3.1-8B preset's batch-1 step took 3.581 ms against the tail's 3.631 on an H100
    /// (`bench/results/2026-12-07-h100-llama-3.1-8b-split-norm-871f191.md`).
    pub split_norm: bool,
}

impl Default for CudaLlamaOptions {
    fn default() -> Self {
        CudaLlamaOptions {
            max_batch_tokens: 2048,
            max_seqs: 128,
            max_seq_len: 4096,
            block_size: 16,
            n_blocks: None,
            kv_memory_fraction: 0.9,
            graphs: true,
            gemv_max_m: 2,
            fp8: false,
            kv_fp8: false,
            p2p_all_reduce: true,
            p2p_link: P2pLink::Flags,
            fuse_fp8_quantization: true,
            fuse_rope_attention: true,
            fuse_norm_tail: true,
            split_norm: true,
        }
    }
}

/// A tensor-parallel rank's links: NCCL among the group's GPUs and, where every pair of them
/// reaches the other peer to peer, the one-shot all-reduce that small steps use instead
/// (fused with the residual add and RMSNorm after it).
#[derive(Debug)]
pub struct TpLink {
    pub nccl: NcclComm,
    pub p2p: Option<P2pAllReduce>,
}

impl From<NcclComm> for TpLink {
    fn from(nccl: NcclComm) -> Self {
        TpLink { nccl, p2p: None }
    }
}

/// A pipeline stage's link: NCCL among the stages (rank = stage index), and the layers this
/// stage holds. The first stage also holds the embedding, the last the norm and LM head; a
/// stage receives the residual stream and the pending MLP output from the one before it.
#[derive(Debug)]
pub struct StageLink {
    pub nccl: NcclComm,
    pub layers: Range<usize>,
}

/// How one model instance takes part in a parallel group (both `None`: one GPU alone).
#[derive(Debug, Default)]
pub struct Parallel {
    pub tp: Option<TpLink>,
    pub stage: Option<StageLink>,
}

/// This instance's pipeline stage.
#[derive(Debug)]
struct Stage {
    comm: Mutex<NcclComm>,
    index: usize,
    count: usize,
    layers: Range<usize>,
}

impl Stage {
    fn first(stage: &Option<Stage>) -> bool {
        stage.as_ref().is_none_or(|s| s.index == 0)
    }

    fn last(stage: &Option<Stage>) -> bool {
        stage.as_ref().is_none_or(|s| s.index + 1 == s.count)
    }
}

/// A host sampler's draw as the device kernel takes it.
fn device_sampling(d: &crate::Draw) -> DeviceSampling {
    DeviceSampling {
        temperature: d.temperature,
        top_k: d.top_k.min(i32::MAX as u32) as i32,
        top_p: d.top_p,
        min_p: d.min_p,
        u: d.u,
    }
}

/// What a step returns: sampled tokens when device sampling was asked for, else logits.
#[derive(Clone, Debug)]
pub enum StepOutput {
    Tokens(Vec<u32>),
    Logits(Vec<f32>),
    /// Draws where some rows are sampled on the host: row by row, a drawn token id (as f32) or
    /// a host row's logits ([`crate::drawn_output_len`]).
    Rows(Vec<f32>),
}

/// A linear layer's weight: BF16, or E4M3 codes with a scale per row.
struct Weight {
    data: DeviceBuffer,
    scales: Option<DeviceBuffer>,
}

impl Weight {
    fn ptr(&self) -> u64 {
        self.data.ptr()
    }

    fn scales(&self) -> u64 {
        self.scales.as_ref().map_or(0, DeviceBuffer::ptr)
    }

    /// Bytes a step reads: the weight and its scales.
    fn bytes(&self) -> usize {
        self.data.bytes() + self.scales.as_ref().map_or(0, DeviceBuffer::bytes)
    }
}

struct Layer {
    attn_norm: DeviceBuffer,
    qkv: Weight,
    qkv_bias: Option<DeviceBuffer>,
    o: Weight,
    mlp_norm: DeviceBuffer,
    gate_up: Weight,
    down: Weight,
}

/// Byte offsets of each metadata array inside the one metadata buffer.
#[derive(Clone, Copy, Debug)]
struct MetaLayout {
    tokens: usize,
    positions: usize,
    slots: usize,
    token_seq: usize,
    query_starts: usize,
    context_lens: usize,
    tile_seq: usize,
    tile_start: usize,
    logit_rows: usize,
    tables: usize,
    sampling: usize,
    bytes: usize,
}

impl MetaLayout {
    fn new(max_tokens: usize, max_seqs: usize, max_tiles: usize, max_blocks: usize) -> Self {
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let start = at;
            at = (at + bytes).next_multiple_of(256);
            start
        };
        let tokens = take(4 * max_tokens);
        let positions = take(4 * max_tokens);
        let slots = take(4 * max_tokens);
        let token_seq = take(4 * max_tokens);
        let query_starts = take(4 * (max_seqs + 1));
        let context_lens = take(4 * max_seqs);
        let tile_seq = take(4 * max_tiles);
        let tile_start = take(4 * max_tiles);
        let logit_rows = take(4 * max_seqs);
        let tables = take(4 * max_seqs * max_blocks);
        let sampling = take(std::mem::size_of::<DeviceSampling>() * max_seqs);
        MetaLayout {
            tokens,
            positions,
            slots,
            token_seq,
            query_starts,
            context_lens,
            tile_seq,
            tile_start,
            logit_rows,
            tables,
            sampling,
            bytes: at,
        }
    }
}

struct Workspace {
    meta: DeviceBuffer,
    residual: DeviceBuffer,
    normed: DeviceBuffer,
    qkv: DeviceBuffer,
    attn: DeviceBuffer,
    proj: DeviceBuffer,
    gate_up: DeviceBuffer,
    act: DeviceBuffer,
    gathered: DeviceBuffer,
    logits: DeviceBuffer,
    /// Tensor parallel: every rank's LM-head rows, all-gathered (`[world, rows, vocab_part]`).
    logits_parts: DeviceBuffer,
    part_o: DeviceBuffer,
    part_ml: DeviceBuffer,
    /// A step's top-k candidates per logit row (`[max_seqs, 2 * MAX_CANDIDATES]` f32), when
    /// the batch asks for them instead of the logits.
    candidates: DeviceBuffer,
    /// Tensor parallel: every rank's candidates of its vocabulary part, all-gathered
    /// (`[world, rows, 2k]`) instead of the logits.
    candidate_parts: DeviceBuffer,
    /// Split counters of the decode attention (`[tokens, n_kv]` u32, zero between launches).
    split_counters: DeviceBuffer,
    /// The arrival counter of an FP8 GEMV's norm tail (one u32, zero between launches; the
    /// GEMVs with a tail run one after another).
    norm_counter: DeviceBuffer,
    /// The partials of a split norm (`[GEMV_FP8_QUANTIZING_MAX_M, hidden / 16]` pairs of f32;
    /// written by the O or down GEMV, read by the GEMV after it).
    norm_partials: DeviceBuffer,
    sampled: DeviceBuffer,
    /// FP8 activations of the next linear layer and their per-token scales (FP8 models).
    xq: DeviceBuffer,
    xs: DeviceBuffer,
    /// FP8 models: the amax slots (`[2, GEMV_FP8_MAX_M, AMAX_SLOTS]` f32, zero between uses) that
    /// the attention output and the SwiGLU output publish for the O and down GEMVs, which then
    /// quantize their bf16 inputs themselves (see `Self::fused_quantization`).
    amax: DeviceBuffer,
}

/// What one tensor-parallel rank computes (everything, on one GPU).
#[derive(Clone, Debug)]
struct Local {
    shard: Shard,
    n_heads: usize,
    n_kv: usize,
    ff: usize,
    /// Vocabulary rows of the embedding and LM head.
    vocab: Range<usize>,
    /// Rows each rank's embedding and LM head hold (zero rows past the vocabulary).
    vocab_part: usize,
}

impl Local {
    fn new(c: &ModelConfig, shard: Shard) -> Self {
        Local {
            shard,
            n_heads: shard.heads(c).len(),
            n_kv: shard.kv_heads(c).len(),
            ff: shard.ffn(c).len(),
            vocab: shard.vocab(c),
            vocab_part: shard.vocab_part(c),
        }
    }
}

/// A host-side step plan: what goes into the metadata buffer and how kernels are sized.
struct Plan {
    n_tokens: usize,
    n_tiles: usize,
    /// Leading tokens whose attention is the decode kernel's (one query each): every (padded)
    /// token of a decode-only step, the leading single-token sequences of a mixed one.
    decode_rows: usize,
    n_logit_rows: usize,
    logit_rows_identity: bool,
    /// Each logit row's top `k` instead of its logits (host sampling from candidates).
    candidates: Option<usize>,
    /// (byte offset in the metadata buffer, bytes): only what this step uses.
    regions: Vec<(usize, Vec<u8>)>,
}

/// Decode batch sizes that get a CUDA graph; a batch runs in the smallest bucket that holds it.
const BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512];

struct State {
    graphs: HashMap<usize, Graph>,
    /// Page-locked staging for step metadata: copied to the device asynchronously, in stream
    /// order before the step's kernels. Rewritten only after the previous step was read back.
    staging: Staging,
}

/// A Llama-family model on one GPU in BF16.
pub struct CudaLlama {
    gpu: Arc<Gpu>,
    gemm: Gemm,
    config: ModelConfig,
    local: Local,
    /// The tensor-parallel group's communicator (none on one GPU).
    comm: Option<Mutex<NcclComm>>,
    /// The peer-to-peer all-reduce of the tensor-parallel group, for steps that fit it.
    p2p: Option<P2pAllReduce>,
    /// The pipeline stage (none: every layer here).
    stage: Option<Stage>,
    options: CudaLlamaOptions,
    /// The embedding (first stage; the last too when it is the LM head).
    embed: Option<DeviceBuffer>,
    lm_head: Option<DeviceBuffer>,
    /// The final norm (last stage).
    norm: Option<DeviceBuffer>,
    layers: Vec<Layer>,
    inv_freq: DeviceBuffer,
    k_cache: DeviceBuffer,
    v_cache: DeviceBuffer,
    /// Per-row scales of an FP8 cache (empty for BF16).
    k_scales: DeviceBuffer,
    v_scales: DeviceBuffer,
    n_blocks: usize,
    max_blocks: usize,
    max_tiles: usize,
    max_splits: usize,
    /// Decode attention blocks the GPU holds at once (`Self::splits_for`).
    decode_resident: usize,
    layout: MetaLayout,
    ws: Workspace,
    state: Mutex<State>,
}

impl Drop for CudaLlama {
    fn drop(&mut self) {
        // NCCL does not destroy a communicator while CUDA graphs that captured its operations
        // exist: the graphs go first, then the communicator.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.graphs.clear();
        drop(state);
        if let Err(e) = self.gpu.synchronize() {
            tracing::warn!("synchronizing before dropping the model: {e}");
        }
        drop(self.comm.take());
        drop(self.stage.take());
    }
}

impl std::fmt::Debug for CudaLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaLlama({} layers on {:?}, rank {} of {})",
            self.layers.len(),
            self.gpu,
            self.local.shard.rank,
            self.local.shard.world
        )
    }
}

/// Where weights come from.
enum WeightSource<'a> {
    Checkpoint(&'a ModelSource),
    Random(u64),
}

// A step's candidates are picked on the device.
const _: () = assert!(crate::MAX_CANDIDATES <= ops::MAX_TOP_K);

/// Bytes of one cache row (a position's keys, or its values, on `n_kv` heads): BF16 values, or
/// E4M3 codes and one f32 scale per head.
fn kv_row_bytes(n_kv: usize, head_dim: usize, fp8: bool) -> usize {
    if fp8 { n_kv * (head_dim + 4) } else { bf16_bytes(n_kv * head_dim) }
}

fn bf16_bytes(n: usize) -> usize {
    2 * n
}

impl CudaLlama {
    /// Loads `source`'s weights, converted to BF16, onto `gpu`.
    pub fn load(gpu: Arc<Gpu>, source: &ModelSource, config: ModelConfig, options: CudaLlamaOptions) -> Result<Self> {
        Self::build(gpu, WeightSource::Checkpoint(source), config, options, Parallel::default(), None)
    }

    /// Loads rank `comm.rank()`'s shard of `source` for tensor parallelism over `comm`'s group
    /// (see [`Shard`]): every rank of the group loads its own and runs every step. The ranks'
    /// KV caches must hold the same blocks: `agree_blocks(n)` gets this rank's count and returns
    /// the group's (the smallest), exchanged outside NCCL so that a rank that failed to load
    /// cannot leave the others waiting in a collective.
    ///
    /// `parallel` may also make it a pipeline stage (its layers only, see [`StageLink`]).
    pub fn load_parallel(
        gpu: Arc<Gpu>,
        source: &ModelSource,
        config: ModelConfig,
        options: CudaLlamaOptions,
        parallel: Parallel,
        agree_blocks: &dyn Fn(usize) -> Result<usize>,
    ) -> Result<Self> {
        Self::build(gpu, WeightSource::Checkpoint(source), config, options, parallel, Some(agree_blocks))
    }

    /// [`CudaLlama::random`] for one rank of a parallel group: each tensor-parallel rank's
    /// weights come from `seed` and its rank; a pipeline stage's layers are those of the whole
    /// model with the same seed.
    pub fn random_parallel(
        gpu: Arc<Gpu>,
        config: ModelConfig,
        options: CudaLlamaOptions,
        seed: u64,
        parallel: Parallel,
        agree_blocks: &dyn Fn(usize) -> Result<usize>,
    ) -> Result<Self> {
        Self::build(gpu, WeightSource::Random(seed), config, options, parallel, Some(agree_blocks))
    }

    /// A model of `config`'s shapes with random weights (uniform, standard deviation 0.02, as the
    /// reference initialisation; norms one), generated on the device from `seed`.
    pub fn random(gpu: Arc<Gpu>, config: ModelConfig, options: CudaLlamaOptions, seed: u64) -> Result<Self> {
        Self::build(gpu, WeightSource::Random(seed), config, options, Parallel::default(), None)
    }

    fn build(
        gpu: Arc<Gpu>,
        weights: WeightSource<'_>,
        config: ModelConfig,
        options: CudaLlamaOptions,
        parallel: Parallel,
        agree_blocks: Option<&dyn Fn(usize) -> Result<usize>>,
    ) -> Result<Self> {
        let c = config.clone();
        let (comm, p2p) = match parallel.tp {
            Some(TpLink { nccl, p2p }) => (Some(nccl), p2p),
            None => (None, None),
        };
        let stage = match parallel.stage {
            None => None,
            Some(StageLink { nccl, layers }) => {
                if layers.is_empty() || layers.end > c.n_layers {
                    return Err(Error::Sharding(format!("stage layers {layers:?} of a {}-layer model", c.n_layers)));
                }
                if nccl.gpu().ordinal() != gpu.ordinal() {
                    return Err(Error::Sharding(format!(
                        "stage {} communicates on GPU {} but loads on GPU {}",
                        nccl.rank(),
                        nccl.gpu().ordinal(),
                        gpu.ordinal()
                    )));
                }
                Some(Stage { index: nccl.rank(), count: nccl.world_size(), comm: Mutex::new(nccl), layers })
            }
        };
        let layer_range = stage.as_ref().map_or(0..c.n_layers, |s| s.layers.clone());
        let n_local = layer_range.len();
        let (first, last) = (Stage::first(&stage), Stage::last(&stage));
        let shard = match &comm {
            Some(comm) => Shard::new(comm.rank(), comm.world_size())?,
            None => Shard::SINGLE,
        };
        Shard::check(shard.world, &c)?;
        if let Some(comm) = &comm
            && comm.gpu().ordinal() != gpu.ordinal()
        {
            return Err(Error::Sharding(format!(
                "rank {} communicates on GPU {} but loads on GPU {}",
                shard.rank,
                comm.gpu().ordinal(),
                gpu.ordinal()
            )));
        }
        let local = Local::new(&c, shard);
        ops::check_head_dim(c.head_dim)?;
        if c.n_heads / c.n_kv_heads > 8 {
            return Err(unsupported(format!(
                "{} query heads per KV head: the decode kernel handles groups of up to 8",
                c.n_heads / c.n_kv_heads
            )));
        }
        if !c.hidden_size.is_multiple_of(8) || !local.ff.is_multiple_of(8) {
            return Err(unsupported(format!(
                "hidden size {} and each rank's MLP columns {} must be multiples of 8",
                c.hidden_size, local.ff
            )));
        }
        if options.max_seqs == 0 || options.max_batch_tokens < options.max_seqs || options.block_size == 0 {
            return Err(unsupported(format!(
                "max_batch_tokens {} must be at least max_seqs {} (> 0), block_size positive",
                options.max_batch_tokens, options.max_seqs
            )));
        }
        let (h, ff, vp) = (c.hidden_size, local.ff, local.vocab_part);
        let q_dim = local.n_heads * c.head_dim;
        let kv_dim = local.n_kv * c.head_dim;
        let qkv_w = q_dim + 2 * kv_dim;

        // Check this rank's weights fit before touching them.
        let (free, total) = gpu.memory()?;
        let linear_params = n_local * (h * qkv_w + q_dim * h + 3 * h * ff);
        let tables =
            usize::from(first || (last && c.tie_word_embeddings)) + usize::from(last && !c.tie_word_embeddings);
        let other_params = vp * h * tables + (2 * n_local + 1) * h;
        let weight_bytes = if options.fp8 {
            bf16_bytes(other_params) + linear_params + 4 * n_local * (qkv_w + 2 * h + 2 * ff)
        } else {
            bf16_bytes(other_params + linear_params)
        };
        if weight_bytes > free {
            let kind = if options.fp8 { "FP8" } else { "BF16" };
            return Err(out_of_memory(format!("{} {kind} weights", c.architecture.as_str()), weight_bytes, free));
        }
        tracing::info!(device = gpu.name(), total_gib = gib(total), weights_gib = gib(weight_bytes), "loading");

        let weights = match weights {
            // Each rank its own random weights.
            WeightSource::Random(seed) => WeightSource::Random(seed ^ ((shard.rank as u64) << 48)),
            w => w,
        };
        let loader = Loader { gpu: &gpu, config: &c, weights, fp8: options.fp8 };
        let hd = c.head_dim;
        let (heads, kv_heads, ffn) = (shard.heads(&c), shard.kv_heads(&c), shard.ffn(&c));
        let q_rows = Take::Rows(heads.start * hd..heads.end * hd);
        let kv_rows = Take::Rows(kv_heads.start * hd..kv_heads.end * hd);
        let ffn_rows = Take::Rows(ffn.clone());
        let vocab_rows = Take::Rows(local.vocab.clone());
        let (full_q, full_kv, full_ff, v) = (c.n_heads * hd, c.n_kv_heads * hd, c.intermediate_size, c.vocab_size);
        let lm_head = if !last || c.tie_word_embeddings {
            None
        } else {
            loader.optional_padded("lm_head.weight", v, h, &vocab_rows, vp, 7)?
        };
        let embed = if first || (last && lm_head.is_none()) {
            Some(loader.padded("model.embed_tokens.weight", v, h, &vocab_rows, vp, 1)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(n_local);
        for i in layer_range.clone() {
            let p = format!("model.layers.{i}");
            let (q, k, vn) =
                (format!("{p}.self_attn.q_proj"), format!("{p}.self_attn.k_proj"), format!("{p}.self_attn.v_proj"));
            let (qw, kw, vw) = (format!("{q}.weight"), format!("{k}.weight"), format!("{vn}.weight"));
            let qkv = loader.linear(
                &[
                    Part { name: &qw, rows: full_q, take: q_rows.clone() },
                    Part { name: &kw, rows: full_kv, take: kv_rows.clone() },
                    Part { name: &vw, rows: full_kv, take: kv_rows.clone() },
                ],
                h,
                (i as u64) * 16 + 2,
            )?;
            let qkv_bias = if c.attention_bias {
                let (qb, kb, vb) = (format!("{q}.bias"), format!("{k}.bias"), format!("{vn}.bias"));
                loader.bias(
                    &[
                        Part { name: &qb, rows: full_q, take: q_rows.clone() },
                        Part { name: &kb, rows: full_kv, take: kv_rows.clone() },
                        Part { name: &vb, rows: full_kv, take: kv_rows.clone() },
                    ],
                    (i as u64) * 16 + 3,
                )?
            } else {
                None
            };
            let (ow, gw, uw, dw) = (
                format!("{p}.self_attn.o_proj.weight"),
                format!("{p}.mlp.gate_proj.weight"),
                format!("{p}.mlp.up_proj.weight"),
                format!("{p}.mlp.down_proj.weight"),
            );
            let o_cols = match &q_rows {
                Take::Rows(r) => Take::Cols(r.clone()),
                other => other.clone(),
            };
            layers.push(Layer {
                attn_norm: loader.norm(&format!("{p}.input_layernorm.weight"), h)?,
                qkv,
                qkv_bias,
                o: loader.linear(&[Part { name: &ow, rows: h, take: o_cols }], full_q, (i as u64) * 16 + 4)?,
                mlp_norm: loader.norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up: loader.linear(
                    &[
                        Part { name: &gw, rows: full_ff, take: ffn_rows.clone() },
                        Part { name: &uw, rows: full_ff, take: ffn_rows.clone() },
                    ],
                    h,
                    (i as u64) * 16 + 5,
                )?,
                down: loader.linear(
                    &[Part { name: &dw, rows: h, take: Take::Cols(ffn.clone()) }],
                    full_ff,
                    (i as u64) * 16 + 6,
                )?,
            });
        }
        let norm = if last { Some(loader.norm("model.norm.weight", h)?) } else { None };
        let inv_freq = gpu.upload(&rope_inv_freq(&c))?;

        // Workspace for the largest step.
        let max_tokens = options.max_batch_tokens;
        let max_seqs = options.max_seqs;
        let max_blocks = options.max_seq_len.div_ceil(options.block_size);
        let max_tiles = max_tokens.div_ceil(64) + max_seqs;
        let max_splits = options.max_seq_len.div_ceil(32).clamp(1, ops::MAX_DECODE_SPLITS);
        let decode_resident = ops::attention_decode_resident_blocks(&gpu, c.head_dim, options.kv_fp8)?;
        let layout = MetaLayout::new(max_tokens, max_seqs, max_tiles, max_blocks);
        let part_rows =
            (1..=max_seqs).map(|b| b * Self::splits_for(decode_resident, local.n_kv, b, max_splits)).max().unwrap_or(1);
        let ws = Workspace {
            meta: gpu.zeros(layout.bytes)?,
            residual: gpu.alloc(bf16_bytes(max_tokens * h))?,
            normed: gpu.alloc(bf16_bytes(max_tokens * h))?,
            qkv: gpu.alloc(bf16_bytes(max_tokens * qkv_w))?,
            attn: gpu.alloc(bf16_bytes(max_tokens * q_dim))?,
            proj: gpu.alloc(bf16_bytes(max_tokens * h))?,
            gate_up: gpu.alloc(bf16_bytes(max_tokens * 2 * ff))?,
            act: gpu.alloc(bf16_bytes(max_tokens * ff))?,
            gathered: gpu.alloc(bf16_bytes(max_seqs.max(BUCKETS[0]) * h))?,
            logits: gpu.alloc(4 * max_seqs * v)?,
            logits_parts: gpu.alloc(if shard.is_single() { 0 } else { 4 * max_seqs * vp * shard.world })?,
            part_o: gpu.alloc(4 * part_rows * local.n_heads * c.head_dim)?,
            part_ml: gpu.alloc(4 * part_rows * local.n_heads * 2)?,
            split_counters: gpu.zeros(4 * max_tokens * local.n_kv)?,
            norm_counter: gpu.zeros(4)?,
            norm_partials: gpu.zeros(8 * ops::GEMV_FP8_QUANTIZING_MAX_M * ops::split_norm_parts(h))?,
            candidates: gpu.alloc(4 * max_seqs * 2 * crate::MAX_CANDIDATES)?,
            candidate_parts: gpu.alloc(if shard.is_single() {
                0
            } else {
                4 * shard.world * max_seqs * 2 * crate::MAX_CANDIDATES
            })?,
            sampled: gpu.alloc(4 * max_seqs)?,
            xq: gpu.alloc(if options.fp8 { max_tokens * h.max(ff).max(q_dim) } else { 0 })?,
            xs: gpu.alloc(4 * max_tokens)?,
            amax: gpu.zeros(if options.fp8 { 4 * 2 * ops::GEMV_FP8_MAX_M * ops::AMAX_SLOTS } else { 0 })?,
        };

        let gemm = Gemm::new(&gpu)?;
        if options.fp8 {
            gemm.reserve_fp8(&gpu, max_tokens * (2 * ff).max(qkv_w).max(h))?;
        }

        // The KV cache takes what is left.
        let block_bytes = n_local * options.block_size * kv_row_bytes(local.n_kv, c.head_dim, options.kv_fp8);
        let n_blocks = match options.n_blocks {
            Some(n) => n,
            None => {
                let (free, _) = gpu.memory()?;
                ((free as f64 * options.kv_memory_fraction) as usize / (2 * block_bytes)).min(1 << 22)
            }
        };
        // Every rank of a group must index the same blocks: take the smallest cache.
        let n_blocks = match agree_blocks {
            None => n_blocks,
            Some(agree) => agree(n_blocks)?,
        };
        if n_blocks < max_blocks.min(2) {
            let (free, _) = gpu.memory()?;
            return Err(out_of_memory("the KV cache".into(), 2 * block_bytes * max_blocks, free));
        }
        let positions = n_blocks * n_local * options.block_size;
        let (code_bytes, scale_bytes) = if options.kv_fp8 { (kv_dim, 4 * local.n_kv) } else { (bf16_bytes(kv_dim), 0) };
        let k_cache = gpu.zeros(positions * code_bytes)?;
        let v_cache = gpu.zeros(positions * code_bytes)?;
        let k_scales = gpu.zeros(positions * scale_bytes)?;
        let v_scales = gpu.zeros(positions * scale_bytes)?;
        let fp8_tag = if options.kv_fp8 { "fp8_" } else { "" };
        gpu.set_max_dynamic_smem(
            &format!("flint_attention_prefill_{fp8_tag}{}", c.head_dim),
            ops::prefill_smem_bytes(c.head_dim),
        )?;
        gpu.synchronize()?;
        let staging = gpu.staging(layout.bytes)?;
        let kv_dtype = if options.kv_fp8 { "fp8" } else { "bf16" };
        tracing::info!(
            n_blocks,
            block_size = options.block_size,
            kv_dtype,
            kv_gib = gib(2 * n_blocks * block_bytes),
            "KV cache"
        );
        Ok(CudaLlama {
            gpu,
            gemm,
            config,
            local,
            comm: comm.map(Mutex::new),
            p2p,
            stage,
            options,
            embed,
            lm_head,
            norm,
            layers,
            inv_freq,
            k_cache,
            v_cache,
            k_scales,
            v_scales,
            n_blocks,
            max_blocks,
            max_tiles,
            max_splits,
            decode_resident,
            layout,
            ws,
            state: Mutex::new(State { graphs: HashMap::new(), staging }),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn options(&self) -> &CudaLlamaOptions {
        &self.options
    }

    /// KV blocks in the cache.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    pub fn block_size(&self) -> usize {
        self.options.block_size
    }

    /// Bytes of weights one step reads when every matrix is read once (the gathered embedding
    /// rows aside): the numerator of the decode roofline.
    pub fn weight_bytes_per_step(&self) -> usize {
        let per_layer =
            self.layers.first().map_or(0, |l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes());
        let head = if self.is_last_stage() { self.head().map_or(0, DeviceBuffer::bytes) } else { 0 };
        self.layers.len() * per_layer + head
    }

    /// Bytes of KV cache one step's attention reads for sequences of these context lengths.
    pub fn kv_bytes_read(&self, context_lens: &[usize]) -> usize {
        context_lens.iter().sum::<usize>() * self.kv_bytes_per_token()
    }

    /// This model's tensor-parallel rank ([`Shard::SINGLE`] on one GPU).
    pub fn shard(&self) -> Shard {
        self.local.shard
    }

    /// Bytes of KV cache per position on this GPU.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers.len() * kv_row_bytes(self.local.n_kv, self.config.head_dim, self.options.kv_fp8)
    }

    /// The LM head (the embedding when tied); on the last stage only.
    fn head(&self) -> Option<&DeviceBuffer> {
        self.lm_head.as_ref().or(self.embed.as_ref())
    }

    /// Whether this instance embeds the tokens (the first pipeline stage, or no pipeline).
    pub fn is_first_stage(&self) -> bool {
        Stage::first(&self.stage)
    }

    /// Whether this instance computes logits (the last pipeline stage, or no pipeline).
    pub fn is_last_stage(&self) -> bool {
        Stage::last(&self.stage)
    }

    /// Sends (`send`) or receives the residual stream and the pending MLP output of `n` rows to
    /// the next stage or from the one before, on the stream.
    fn stage_transfer(&self, send: bool, n: usize) -> Result<()> {
        let Some(stage) = &self.stage else { return Ok(()) };
        let comm = stage.comm.lock().unwrap_or_else(|p| p.into_inner());
        let len = n * self.config.hidden_size;
        for buf in [&self.ws.residual, &self.ws.proj] {
            let mut slice = DeviceSlice::new(buf.ptr(), len, CommType::Bf16);
            if send {
                comm.send(&slice, stage.index + 1)?;
            } else {
                comm.recv(&mut slice, stage.index - 1)?;
            }
        }
        Ok(())
    }

    /// Sums `len` BF16 values at `ptr` over the tensor-parallel ranks, in place, on the stream.
    fn all_reduce(&self, ptr: u64, len: usize) -> Result<()> {
        let Some(comm) = &self.comm else { return Ok(()) };
        let comm = comm.lock().unwrap_or_else(|p| p.into_inner());
        comm.all_reduce(&mut DeviceSlice::new(ptr, len, CommType::Bf16), ReduceOp::Sum)?;
        Ok(())
    }

    /// Decode attention splits of each (token, KV head) for a batch: as many as keep every block
    /// of the launch resident at once (`resident`, ops::attention_decode_resident_blocks), at
    /// most `max_splits`. A second wave would double the step's attention time: at batch 8 of
    /// the 8B preset, 5 splits (320 blocks of 256 threads, 264 resident) were 3% slower per
    /// BF16 step than the 128-thread kernel.
    fn splits_for(resident: usize, n_kv: usize, batch: usize, max_splits: usize) -> usize {
        (resident / (batch * n_kv).max(1)).clamp(1, max_splits)
    }

    fn bucket_for(&self, n: usize) -> usize {
        BUCKETS.iter().copied().find(|&b| b >= n && b <= self.options.max_seqs).unwrap_or(n)
    }

    /// Checks a batch against the sizes chosen at load and lays out its metadata.
    fn plan(&self, batch: &ForwardBatch, sampling: Option<&[DeviceSampling]>, pad_to: usize) -> Result<Plan> {
        let n = batch.n_tokens();
        let s = batch.n_seqs();
        let o = &self.options;
        if n == 0 {
            return Err(shape("forward", "no tokens to run"));
        }
        if batch.block_size() != o.block_size {
            return Err(shape(
                "forward",
                format!("block size {} (the cache has {})", batch.block_size(), o.block_size),
            ));
        }
        if pad_to > o.max_batch_tokens || s > o.max_seqs {
            return Err(shape(
                "forward",
                format!(
                    "{n} tokens of {s} sequences (at most {} tokens, {} sequences)",
                    o.max_batch_tokens, o.max_seqs
                ),
            ));
        }
        let rows = batch.logit_rows();
        if rows.len() > o.max_seqs {
            return Err(shape("forward", format!("{} logit rows (at most {})", rows.len(), o.max_seqs)));
        }
        if let Some(&t) = batch.tokens().iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(shape("forward", format!("token id {t} outside the vocabulary of {}", self.config.vocab_size)));
        }
        let limit = o.max_seq_len.min(self.config.max_position_embeddings);
        if let Some(&len) = batch.context_lens().iter().find(|&&l| l as usize > limit) {
            return Err(shape("forward", format!("a sequence of {len} positions (at most {limit})")));
        }
        for table in batch.block_tables() {
            if let Some(&b) = table.iter().find(|&&b| b as usize >= self.n_blocks) {
                return Err(shape("forward", format!("block {b} outside the cache of {}", self.n_blocks)));
            }
        }
        if let Some(params) = sampling
            && params.len() != rows.len()
        {
            return Err(shape("sample", format!("{} parameter rows for {} logit rows", params.len(), rows.len())));
        }

        let qs = batch.query_starts();
        let decode_only = is_decode_only(batch);
        // The leading sequences with one query token each (the scheduler puts running decodes
        // first) go through the split-K decode kernel; only the rest (prompt chunks) are cut into
        // prefill tiles, where a lone query would fill 1 of a tile's 64 rows.
        let decode_seqs = if decode_only { s } else { (0..s).take_while(|&i| qs[i + 1] - qs[i] == 1).count() };
        let mut tile_seq = Vec::new();
        let mut tile_start = Vec::new();
        if !decode_only {
            for i in decode_seqs..s {
                let mut t = qs[i];
                while t < qs[i + 1] {
                    tile_seq.push(i as i32);
                    tile_start.push(t);
                    t += 64;
                }
            }
        }
        if tile_seq.len() > self.max_tiles {
            return Err(shape("forward", format!("{} attention tiles (at most {})", tile_seq.len(), self.max_tiles)));
        }
        let l = &self.layout;
        let mut meta: Vec<(usize, Vec<u8>)> = Vec::with_capacity(12);
        let put = |meta: &mut Vec<(usize, Vec<u8>)>, at: usize, bytes: &[u8]| {
            if !bytes.is_empty() {
                meta.push((at, bytes.to_vec()));
            }
        };
        let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let i32s = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        // Padding rows (graph buckets): token 0 at position 0, no KV write, no sequence.
        let mut tokens = batch.tokens().to_vec();
        let mut positions = batch.positions().to_vec();
        let mut slots = batch.slots().to_vec();
        let mut token_seq: Vec<i32> = Vec::with_capacity(pad_to);
        for i in 0..s {
            for _ in qs[i]..qs[i + 1] {
                token_seq.push(i as i32);
            }
        }
        tokens.resize(pad_to, 0);
        positions.resize(pad_to, 0);
        slots.resize(pad_to, u32::MAX);
        token_seq.resize(pad_to, -1);
        put(&mut meta, l.tokens, &u32s(&tokens));
        put(&mut meta, l.positions, &u32s(&positions));
        put(&mut meta, l.slots, &u32s(&slots));
        put(&mut meta, l.token_seq, &i32s(&token_seq));
        put(&mut meta, l.query_starts, &u32s(qs));
        put(&mut meta, l.context_lens, &u32s(batch.context_lens()));
        put(&mut meta, l.tile_seq, &i32s(&tile_seq));
        put(&mut meta, l.tile_start, &u32s(&tile_start));
        let logit_rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        put(&mut meta, l.logit_rows, &u32s(&logit_rows));
        let mut tables = vec![0u32; s * self.max_blocks];
        for (i, t) in batch.block_tables().iter().enumerate() {
            if t.len() > self.max_blocks {
                return Err(shape(
                    "forward",
                    format!("a block table of {} blocks (at most {})", t.len(), self.max_blocks),
                ));
            }
            tables[i * self.max_blocks..][..t.len()].copy_from_slice(t);
        }
        put(&mut meta, l.tables, &u32s(&tables));
        let logit_rows_identity = rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r);
        // Rows the LM head and the sampler run over: every (padded) token, or the gathered rows.
        let sampled_rows = if logit_rows_identity { pad_to } else { rows.len() };
        if let Some(params) = sampling {
            let mut p = params.to_vec();
            p.resize(sampled_rows, DeviceSampling::GREEDY);
            // SAFETY: DeviceSampling is repr(C) plain data.
            let bytes = unsafe {
                std::slice::from_raw_parts(p.as_ptr() as *const u8, p.len() * std::mem::size_of::<DeviceSampling>())
            };
            put(&mut meta, l.sampling, bytes);
        }
        Ok(Plan {
            regions: meta,
            n_tokens: pad_to,
            n_tiles: tile_seq.len(),
            decode_rows: if decode_only { pad_to } else { decode_seqs },
            n_logit_rows: rows.len(),
            logit_rows_identity,
            candidates: if sampling.is_some() { None } else { batch.candidates() },
        })
    }

    /// Copies a plan's metadata to the device, asynchronously, ahead of the step's kernels.
    fn upload(&self, state: &mut State, plan: &Plan) -> Result<()> {
        for (at, bytes) in &plan.regions {
            self.gpu.upload_staged(&mut state.staging, *at, bytes, self.ws.meta.at(*at))?;
        }
        Ok(())
    }

    /// `y[m, n] = x . W^T` in bf16: the GEMV up to the model's GEMV batch, cuBLASLt above.
    /// `l2`: the projection follows a latency-bound kernel, so a GEMV may ask its first weights
    /// into L2 while that kernel runs (`ops::gemv_l2`).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        x: u64,
        w: &DeviceBuffer,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        out: GemmOut,
        l2: bool,
    ) -> Result<()> {
        if m <= self.options.gemv_max_m.min(GEMV_MAX_M) {
            let e = if out == GemmOut::F32 { Epilogue::F32 } else { Epilogue::Bf16 };
            Ok(ops::gemv_l2(&self.gpu, x, w.ptr(), y, m, n, k, e, l2)?)
        } else {
            Ok(self.gemm.matmul(&self.gpu, x, w.ptr(), y, m, n, k, out)?)
        }
    }

    /// `y[m, rows] = x . W^T` from the FP8 activations in `xq`/`xs`: the FP8 GEMV up to 8 tokens,
    /// cuBLASLt FP8 above. `SwiGlu` (GEMV only) applies the activation to a fused gate/up weight.
    /// `l2` as for [`Self::linear`]. With `tail` (GEMV only, see [`Self::norm_tail`]), the GEMV's
    /// last block also does the residual add + RMSNorm + quantize of its output.
    #[allow(clippy::too_many_arguments)]
    fn linear_fp8(
        &self,
        w: &Weight,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        epilogue: ops::Fp8Epilogue,
        l2: bool,
        tail: Option<ops::NormTail>,
    ) -> Result<()> {
        let (g, ws) = (&*self.gpu, &self.ws);
        if m <= ops::GEMV_FP8_MAX_M && ops::gemv_fp8_fits(n, k, epilogue) {
            let op = ops::Fp8Gemv {
                l2_prefetch: l2,
                norm_tail: tail,
                ..ops::Fp8Gemv::codes(ws.xq.ptr(), ws.xs.ptr(), w.ptr(), w.scales(), y, m, n, k, epilogue)
            };
            return Ok(ops::run_gemv_fp8(g, None, &op)?);
        }
        if epilogue == ops::Fp8Epilogue::SwiGlu {
            return Err(shape("gemv_fp8", "SwiGLU is fused only into the GEMV"));
        }
        if tail.is_some() {
            return Err(shape("gemv_fp8", "the norm tail runs only in the GEMV"));
        }
        Ok(self.gemm.matmul_fp8(g, ws.xq.ptr(), ws.xs.ptr(), w.ptr(), w.scales(), y, m, n, k)?)
    }

    /// Whether a step of `m` tokens runs its gate/up projection through the fused FP8 GEMV.
    fn fp8_gate_up_gemv(&self, m: usize) -> bool {
        m <= ops::GEMV_FP8_MAX_M && ops::gemv_fp8_fits(self.local.ff, self.config.hidden_size, ops::Fp8Epilogue::SwiGlu)
    }

    /// Whether an FP8 step of `plan` skips the two per-token quantization kernels of each layer:
    /// a decode-only step (the decode attention writes every row of the attention output) of at
    /// most [`FUSED_QUANTIZATION_MAX_TOKENS`] tokens whose O, gate/up and down projections all run as GEMVs. The attention
    /// publishes its output's amax into slot area A and the SwiGLU GEMV into B; the O GEMV
    /// quantizes from A and zeroes B (read last by the previous down GEMV), the down GEMV
    /// quantizes from B and zeroes A (read by this layer's O GEMV), so each area is zero again
    /// before its producer's next launch, in this step or the next fused one; an unfused step
    /// touches neither.
    fn fused_quantization(&self, plan: &Plan) -> bool {
        plan.n_tiles == 0 && plan.decode_rows == plan.n_tokens && self.fused_quantization_fits(plan.n_tokens)
    }

    /// Whether the decode attention ropes the queries and writes the new keys and values itself
    /// ([`CudaLlamaOptions::fuse_rope_attention`]): a decode-only step, where every token is its
    /// sequence's only new one and the decode kernel runs them all.
    fn rope_in_attention(&self, plan: &Plan) -> bool {
        self.options.fuse_rope_attention && plan.n_tiles == 0 && plan.decode_rows == plan.n_tokens
    }

    /// The model and shape conditions of [`Self::fused_quantization`] for a decode step of `n`
    /// tokens.
    fn fused_quantization_fits(&self, n: usize) -> bool {
        let (c, lo) = (&self.config, &self.local);
        let q_dim = lo.n_heads * c.head_dim;
        self.options.fp8
            && self.options.fuse_fp8_quantization
            && n <= FUSED_QUANTIZATION_MAX_TOKENS
            && self.fp8_gate_up_gemv(n)
            && ops::gemv_fp8_fits(c.hidden_size, q_dim, ops::Fp8Epilogue::Bf16)
            && ops::gemv_fp8_fits(c.hidden_size, lo.ff, ops::Fp8Epilogue::Bf16)
    }

    /// The FP8 GEMV `y = x W^T` of `w` on `input`, with nothing published, cleared, prefetched or
    /// normalised (callers set those with struct update syntax).
    #[allow(clippy::too_many_arguments)]
    fn fp8_gemv(
        &self,
        input: ops::Fp8Input,
        w: &Weight,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        epilogue: ops::Fp8Epilogue,
    ) -> ops::Fp8Gemv {
        let codes = ops::Fp8Gemv::codes(0, 0, w.ptr(), w.scales(), y, m, n, k, epilogue);
        ops::Fp8Gemv { input, ..codes }
    }

    /// Whether the O and down GEMVs of an FP8 step of `n` tokens run the residual add +
    /// RMSNorm + quantize after them as their tail ([`CudaLlamaOptions::fuse_norm_tail`]): one
    /// GPU (an all-reduce comes between the projection and the norm otherwise), at most
    /// [`NORM_TAIL_MAX_TOKENS`], and both projections run as FP8 GEMVs.
    fn norm_tail(&self, n: usize) -> bool {
        let (c, lo) = (&self.config, &self.local);
        let bf16_epi = ops::Fp8Epilogue::Bf16;
        self.options.fp8
            && self.options.fuse_norm_tail
            && self.comm.is_none()
            && self.p2p.is_none()
            && n <= NORM_TAIL_MAX_TOKENS
            && ops::norm_tail_fits(n, c.hidden_size, bf16_epi)
            && ops::gemv_fp8_fits(c.hidden_size, lo.n_heads * c.head_dim, bf16_epi)
            && ops::gemv_fp8_fits(c.hidden_size, lo.ff, bf16_epi)
    }

    /// Enqueues the whole forward pass (and sampling) of a planned step; no host synchronisation.
    fn enqueue(&self, plan: &Plan, sample: bool) -> Result<()> {
        self.enqueue_marked(plan, sample, &mut |_| Ok(()))
    }

    /// [`Self::enqueue`], calling `mark(label)` after each operation (for per-kernel timing).
    fn enqueue_marked(
        &self,
        plan: &Plan,
        sample: bool,
        mark: &mut dyn FnMut(&'static str) -> Result<()>,
    ) -> Result<()> {
        let c = &self.config;
        let g = &*self.gpu;
        let ws = &self.ws;
        let l = &self.layout;
        let meta = |off: usize| ws.meta.at(off);
        let n = plan.n_tokens;
        let lo = &self.local;
        let (h, ff) = (c.hidden_size, lo.ff);
        let q_dim = lo.n_heads * c.head_dim;
        let kv_dim = lo.n_kv * c.head_dim;
        let qkv_w = q_dim + 2 * kv_dim;
        let layer_positions = self.n_blocks * self.options.block_size;
        let (layer_kv, layer_scales) = if self.options.kv_fp8 {
            (layer_positions * kv_dim, layer_positions * lo.n_kv * 4)
        } else {
            (layer_positions * kv_dim * 2, 0)
        };
        let eps = c.rms_norm_eps;

        // Small steps reduce over the peer-to-peer buffers: the O projection writes into slot 0
        // and the down projection into slot 1, and each all-reduce is fused with the residual
        // add + RMSNorm (and for FP8 models the per-token quantization) that follows it. Over
        // the flag link the embedding stays on NCCL, which also makes every rank finish the
        // previous step's reads before this step's first write; the lamport link's inputs are
        // never read by peers, so it takes the embedding too.
        let p2p = self.p2p.as_ref().filter(|p| 2 * n * h <= p.capacity());
        let first_stage = Stage::first(&self.stage);
        if first_stage {
            let (first, rows) = (lo.vocab.start, lo.vocab.len());
            let embed = self.embed.as_ref().map_or(0, DeviceBuffer::ptr);
            match p2p.filter(|p| p.link() == P2pLink::Lamport) {
                Some(p) => {
                    ops::embedding_shard(g, meta(l.tokens), embed, p.input(0), n, h, rows, first)?;
                    p.sum(0, ws.residual.ptr(), n * h)?;
                }
                None => {
                    ops::embedding_shard(g, meta(l.tokens), embed, ws.residual.ptr(), n, h, rows, first)?;
                    self.all_reduce(ws.residual.ptr(), n * h)?;
                }
            }
            mark("embedding")?;
        } else {
            self.stage_transfer(false, n)?;
            mark("stage_recv")?;
        }
        let fp8 = self.options.fp8;
        let fused = self.fused_quantization(plan);
        let rope_in_attention = self.rope_in_attention(plan);
        let slots = ops::GEMV_FP8_MAX_M * ops::AMAX_SLOTS;
        let (amax_attn, amax_act) = (ws.amax.ptr(), ws.amax.at(4 * slots));
        let (xq, xs) = (ws.xq.ptr(), ws.xs.ptr());
        let bf16_epi = ops::Fp8Epilogue::Bf16;
        let fp8_out = ops::NormOut::Fp8 { codes: xq, scales: xs };
        let (o_out, down_out) = match p2p {
            Some(p) => (p.input(0), p.input(1)),
            None => (ws.proj.ptr(), ws.proj.ptr()),
        };
        let norm_tail = self.norm_tail(n);
        let tail = |weight: u64| ops::NormTail {
            residual: ws.residual.ptr(),
            weight,
            codes: xq,
            scales: xs,
            counter: ws.norm_counter.ptr(),
            eps,
        };
        // The split norm (one-token fused steps): the O and down GEMVs add into the residual and
        // leave the partials of the norm that the next GEMV (gate/up, the next QKV) finishes.
        let split_norm = norm_tail && fused && self.options.split_norm;
        let split = |weight: u64| ops::SplitNorm {
            weight,
            partials: ws.norm_partials.ptr(),
            n_parts: ops::split_norm_parts(h) as i32,
            eps,
        };
        let normed = |weight: u64| ops::Fp8Input::Normed { residual: ws.residual.ptr(), norm: split(weight) };
        // The previous layer's down GEMV has already normalised this layer's input (its tail),
        // or begun to (a split norm).
        let mut normed_by_tail = false;
        let mut normed_by_split = false;
        for (i, layer) in self.layers.iter().enumerate() {
            // The pending down projection: none before the first layer; on a later stage the
            // received (already reduced) one.
            let add = if i == 0 && first_stage { 0 } else { ws.proj.ptr() };
            if fp8 {
                if !normed_by_tail && !normed_by_split {
                    match p2p {
                        Some(p) if i > 0 => {
                            p.add_rms_norm(1, ws.residual.ptr(), layer.attn_norm.ptr(), fp8_out, n, h, eps)?
                        }
                        _ => {
                            let (res, norm) = (ws.residual.ptr(), layer.attn_norm.ptr());
                            ops::add_rms_norm_fp8(g, res, add, norm, xq, xs, n, h, eps)?
                        }
                    }
                    mark("add_rms_norm")?;
                }
                if normed_by_split {
                    let op = ops::Fp8Gemv {
                        l2_prefetch: true,
                        ..self.fp8_gemv(normed(layer.attn_norm.ptr()), &layer.qkv, ws.qkv.ptr(), n, qkv_w, h, bf16_epi)
                    };
                    ops::run_gemv_fp8(g, None, &op)?;
                } else {
                    self.linear_fp8(&layer.qkv, ws.qkv.ptr(), n, qkv_w, h, bf16_epi, true, None)?;
                }
            } else {
                match p2p {
                    Some(p) if i > 0 => {
                        let out = ops::NormOut::Bf16(ws.normed.ptr());
                        p.add_rms_norm(1, ws.residual.ptr(), layer.attn_norm.ptr(), out, n, h, eps)?
                    }
                    _ => {
                        ops::add_rms_norm(g, ws.residual.ptr(), add, layer.attn_norm.ptr(), ws.normed.ptr(), n, h, eps)?
                    }
                }
                mark("add_rms_norm")?;
                self.linear(ws.normed.ptr(), &layer.qkv.data, ws.qkv.ptr(), n, qkv_w, h, GemmOut::Bf16, true)?;
            }
            mark("qkv_proj")?;
            let (k_cache, v_cache) = (self.k_cache.at(i * layer_kv), self.v_cache.at(i * layer_kv));
            let bias = layer.qkv_bias.as_ref().map_or(0, DeviceBuffer::ptr);
            let rope = ops::DecodeRope { bias, inv_freq: self.inv_freq.ptr(), slots: meta(l.slots) };
            let (k_scales, v_scales) = if self.options.kv_fp8 {
                (self.k_scales.at(i * layer_scales), self.v_scales.at(i * layer_scales))
            } else {
                (0, 0)
            };
            if !rope_in_attention {
                let (positions, slots, inv_freq) = (meta(l.positions), meta(l.slots), self.inv_freq.ptr());
                let (heads, kv_heads, hd) = (lo.n_heads, lo.n_kv, c.head_dim);
                if self.options.kv_fp8 {
                    let cache = [k_cache, v_cache, k_scales, v_scales];
                    ops::rope_kv_write_fp8(
                        g,
                        ws.qkv.ptr(),
                        bias,
                        positions,
                        inv_freq,
                        slots,
                        cache,
                        n,
                        heads,
                        kv_heads,
                        hd,
                    )?;
                } else {
                    ops::rope_kv_write(
                        g,
                        ws.qkv.ptr(),
                        bias,
                        positions,
                        inv_freq,
                        slots,
                        k_cache,
                        v_cache,
                        n,
                        heads,
                        kv_heads,
                        hd,
                    )?;
                }
                mark("rope_kv_write")?;
            }
            let kv = PagedKv {
                k_cache,
                v_cache,
                k_scales,
                v_scales,
                block_tables: meta(l.tables),
                max_blocks: self.max_blocks,
                block_size: self.options.block_size,
                n_heads: lo.n_heads,
                n_kv: lo.n_kv,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
            };
            if plan.decode_rows > 0 {
                let rows = plan.decode_rows;
                let splits = Self::splits_for(self.decode_resident, lo.n_kv, rows, self.max_splits);
                ops::attention_decode(
                    g,
                    &kv,
                    ws.qkv.ptr(),
                    qkv_w,
                    meta(l.token_seq),
                    meta(l.positions),
                    &ops::DecodeScratch {
                        part_o: ws.part_o.ptr(),
                        part_ml: ws.part_ml.ptr(),
                        counters: ws.split_counters.ptr(),
                    },
                    ws.attn.ptr(),
                    if fused { amax_attn } else { 0 },
                    rope_in_attention.then_some(&rope),
                    rows,
                    splits,
                )?;
            }
            if plan.n_tiles > 0 {
                ops::attention_prefill(
                    g,
                    &kv,
                    ws.qkv.ptr(),
                    qkv_w,
                    meta(l.query_starts),
                    meta(l.context_lens),
                    meta(l.tile_seq),
                    meta(l.tile_start),
                    ws.attn.ptr(),
                    plan.n_tiles,
                )?;
            }
            mark("attention")?;
            if fp8 {
                let next = self.layers.get(i + 1);
                let o_tail = (norm_tail && !split_norm).then(|| tail(layer.mlp_norm.ptr()));
                let down_tail = next.filter(|_| norm_tail && !split_norm).map(|next| tail(next.attn_norm.ptr()));
                let down_split = next.filter(|_| split_norm).map(|next| split(next.attn_norm.ptr()));
                if fused {
                    let input = ops::Fp8Input::Bf16 { x: ws.attn.ptr(), amax: amax_attn };
                    // A split norm adds the output into the residual itself.
                    let y = if split_norm { ws.residual.ptr() } else { o_out };
                    let op = ops::Fp8Gemv {
                        clear_amax: amax_act,
                        l2_prefetch: true,
                        norm_tail: o_tail,
                        split_norm: split_norm.then(|| split(layer.mlp_norm.ptr())),
                        ..self.fp8_gemv(input, &layer.o, y, n, h, q_dim, bf16_epi)
                    };
                    ops::run_gemv_fp8(g, None, &op)?;
                } else {
                    ops::quantize_rows(g, ws.attn.ptr(), xq, xs, n, q_dim)?;
                    mark("quantize")?;
                    self.linear_fp8(&layer.o, o_out, n, h, q_dim, bf16_epi, true, o_tail)?;
                }
                match p2p {
                    Some(p) => {
                        mark("o_proj")?;
                        p.add_rms_norm(0, ws.residual.ptr(), layer.mlp_norm.ptr(), fp8_out, n, h, eps)?;
                        mark("add_rms_norm")?;
                    }
                    None => {
                        self.all_reduce(ws.proj.ptr(), n * h)?;
                        mark("o_proj")?;
                        if o_tail.is_none() && !split_norm {
                            let (res, proj, norm) = (ws.residual.ptr(), ws.proj.ptr(), layer.mlp_norm.ptr());
                            ops::add_rms_norm_fp8(g, res, proj, norm, xq, xs, n, h, eps)?;
                            mark("add_rms_norm")?;
                        }
                    }
                }
                normed_by_tail = down_tail.is_some();
                normed_by_split = down_split.is_some();
                if fused {
                    let input = if split_norm {
                        normed(layer.mlp_norm.ptr())
                    } else {
                        ops::Fp8Input::Codes { x: xq, scales: xs }
                    };
                    let swiglu = ops::Fp8Epilogue::SwiGlu;
                    let op = ops::Fp8Gemv {
                        publish_amax: amax_act,
                        l2_prefetch: true,
                        ..self.fp8_gemv(input, &layer.gate_up, ws.act.ptr(), n, ff, h, swiglu)
                    };
                    ops::run_gemv_fp8(g, None, &op)?;
                    mark("gate_up_swiglu")?;
                    let input = ops::Fp8Input::Bf16 { x: ws.act.ptr(), amax: amax_act };
                    let y = if down_split.is_some() { ws.residual.ptr() } else { down_out };
                    let op = ops::Fp8Gemv {
                        clear_amax: amax_attn,
                        norm_tail: down_tail,
                        split_norm: down_split,
                        ..self.fp8_gemv(input, &layer.down, y, n, h, ff, bf16_epi)
                    };
                    ops::run_gemv_fp8(g, None, &op)?;
                } else if self.fp8_gate_up_gemv(n) {
                    self.linear_fp8(&layer.gate_up, ws.act.ptr(), n, ff, h, ops::Fp8Epilogue::SwiGlu, true, None)?;
                    mark("gate_up_swiglu")?;
                    ops::quantize_rows(g, ws.act.ptr(), xq, xs, n, ff)?;
                    mark("quantize")?;
                } else {
                    self.linear_fp8(&layer.gate_up, ws.gate_up.ptr(), n, 2 * ff, h, bf16_epi, true, None)?;
                    mark("gate_up_swiglu")?;
                    ops::silu_mul_fp8(g, ws.gate_up.ptr(), xq, xs, n, ff)?;
                    mark("swiglu_quantize")?;
                }
                if !fused {
                    self.linear_fp8(&layer.down, down_out, n, h, ff, bf16_epi, true, down_tail)?;
                }
                if p2p.is_none() {
                    self.all_reduce(ws.proj.ptr(), n * h)?;
                }
                mark("down_proj")?;
                continue;
            }
            self.linear(ws.attn.ptr(), &layer.o.data, o_out, n, h, q_dim, GemmOut::Bf16, true)?;
            match p2p {
                Some(p) => {
                    mark("o_proj")?;
                    let out = ops::NormOut::Bf16(ws.normed.ptr());
                    p.add_rms_norm(0, ws.residual.ptr(), layer.mlp_norm.ptr(), out, n, h, eps)?;
                }
                None => {
                    self.all_reduce(ws.proj.ptr(), n * h)?;
                    mark("o_proj")?;
                    ops::add_rms_norm(
                        g,
                        ws.residual.ptr(),
                        ws.proj.ptr(),
                        layer.mlp_norm.ptr(),
                        ws.normed.ptr(),
                        n,
                        h,
                        eps,
                    )?;
                }
            }
            mark("add_rms_norm")?;
            if n <= self.options.gemv_max_m.min(GEMV_MAX_M) {
                ops::gemv_l2(g, ws.normed.ptr(), layer.gate_up.ptr(), ws.act.ptr(), n, ff, h, Epilogue::SwiGlu, true)?;
            } else {
                self.gemm.matmul(
                    g,
                    ws.normed.ptr(),
                    layer.gate_up.ptr(),
                    ws.gate_up.ptr(),
                    n,
                    2 * ff,
                    h,
                    GemmOut::Bf16,
                )?;
                ops::silu_mul(g, ws.gate_up.ptr(), ws.act.ptr(), n, ff)?;
            }
            mark("gate_up_swiglu")?;
            self.linear(ws.act.ptr(), &layer.down.data, down_out, n, h, ff, GemmOut::Bf16, false)?;
            if p2p.is_none() {
                self.all_reduce(ws.proj.ptr(), n * h)?;
            }
            mark("down_proj")?;
        }
        if !Stage::last(&self.stage) {
            // The next stage gets the residual and the reduced pending down projection.
            if let Some(p) = p2p {
                p.sum(1, ws.proj.ptr(), n * h)?;
            }
            self.stage_transfer(true, n)?;
            mark("stage_send")?;
            return Ok(());
        }
        // With the peer-to-peer all-reduce the final one runs even without logits, so that a
        // step's all-reduces always end on slot 1 and the next step's begin on slot 0.
        if plan.n_logit_rows == 0 && p2p.is_none() {
            return Ok(());
        }
        let norm = self.norm.as_ref().map_or(0, DeviceBuffer::ptr);
        match p2p {
            Some(p) => p.add_rms_norm(1, ws.residual.ptr(), norm, ops::NormOut::Bf16(ws.normed.ptr()), n, h, eps)?,
            None => ops::add_rms_norm(g, ws.residual.ptr(), ws.proj.ptr(), norm, ws.normed.ptr(), n, h, eps)?,
        }
        mark("add_rms_norm")?;
        if plan.n_logit_rows == 0 {
            return Ok(());
        }
        let rows = plan.n_logit_rows;
        let hidden = if plan.logit_rows_identity {
            ws.normed.ptr()
        } else {
            // The embedding kernel is a row gather: rows `logit_rows` of `normed`.
            ops::embedding(g, meta(l.logit_rows), ws.normed.ptr(), ws.gathered.ptr(), rows, h, n)?;
            ws.gathered.ptr()
        };
        let rows_run = if plan.logit_rows_identity { n } else { rows };
        let head = self.head().ok_or_else(|| unsupported("the last stage has no LM head"))?;
        match (&self.comm, plan.candidates) {
            (None, k) => {
                self.linear(hidden, head, ws.logits.ptr(), rows_run, c.vocab_size, h, GemmOut::F32, true)?;
                if let Some(k) = k {
                    let (v, out) = (c.vocab_size, ws.candidates.ptr());
                    ops::top_candidates(g, ws.logits.ptr(), rows_run, v, v, 0, k, out)?;
                }
            }
            (Some(comm), Some(k)) => {
                // Each rank's top k of its vocabulary part (padding rows left out), gathered:
                // 2k floats per row and rank cross NVLink instead of the logits.
                let (vp, world, rank) = (lo.vocab_part, lo.shard.world, lo.shard.rank);
                let mine = ws.logits_parts.at(4 * rank * rows_run * vp);
                self.linear(hidden, head, mine, rows_run, vp, h, GemmOut::F32, true)?;
                let width = c.vocab_size.saturating_sub(rank * vp).min(vp);
                let part = rows_run * 2 * k;
                let out = ws.candidate_parts.at(4 * rank * part);
                ops::top_candidates(g, mine, rows_run, width, vp, rank * vp, k, out)?;
                let comm = comm.lock().unwrap_or_else(|p| p.into_inner());
                comm.all_gather(&mut DeviceSlice::new(ws.candidate_parts.ptr(), world * part, CommType::F32))?;
            }
            (Some(comm), None) => {
                // Each rank's vocabulary rows into its part of the gather buffer, gathered, then
                // laid out as whole rows.
                let (vp, world, rank) = (lo.vocab_part, lo.shard.world, lo.shard.rank);
                let mine = ws.logits_parts.at(4 * rank * rows_run * vp);
                self.linear(hidden, head, mine, rows_run, vp, h, GemmOut::F32, true)?;
                let comm = comm.lock().unwrap_or_else(|p| p.into_inner());
                let mut all = DeviceSlice::new(ws.logits_parts.ptr(), world * rows_run * vp, CommType::F32);
                comm.all_gather(&mut all)?;
                ops::unshard_rows(g, ws.logits_parts.ptr(), ws.logits.ptr(), rows_run, vp, c.vocab_size)?;
            }
        }
        mark("lm_head")?;
        if sample {
            ops::sample(g, ws.logits.ptr(), c.vocab_size, meta(l.sampling), ws.sampled.ptr(), rows_run)?;
            mark("sample")?;
        }
        Ok(())
    }

    /// Runs one step: writes the batch's keys and values into the cache and returns, for each of
    /// its logit rows, the sampled token (when `sampling` gives per-row parameters) or the logits
    /// `[rows, vocab]`.
    ///
    /// Decode-only batches replay a CUDA graph of their bucket (captured on first use).
    pub fn step(&self, batch: &ForwardBatch, sampling: Option<&[DeviceSampling]>) -> Result<StepOutput> {
        self.run_step(batch, sampling, true)
    }

    /// [`CudaLlama::step`] without reading anything back (it waits for the step to finish): what
    /// tensor-parallel ranks other than 0 run. Returns empty logits.
    pub fn step_quiet(&self, batch: &ForwardBatch, sampling: Option<&[DeviceSampling]>) -> Result<StepOutput> {
        self.run_step(batch, sampling, false)
    }

    fn run_step(
        &self,
        batch: &ForwardBatch,
        sampling: Option<&[DeviceSampling]>,
        read_back: bool,
    ) -> Result<StepOutput> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = batch.n_tokens();
        let decode_only = is_decode_only(batch);
        let logits_all_rows = batch.logit_rows().len() == n;
        let use_graph = self.options.graphs && decode_only && logits_all_rows && n <= self.options.max_seqs;
        let pad_to = if use_graph { self.bucket_for(n) } else { n };
        let plan = self.plan(batch, sampling, pad_to)?;
        self.upload(&mut state, &plan)?;
        let sample = sampling.is_some();
        if use_graph {
            // One graph per bucket, sampling or not, and candidates per row (0: the logits).
            let key = (pad_to * 2 + sample as usize) * (crate::MAX_CANDIDATES + 1) + plan.candidates.unwrap_or(0);
            if let std::collections::hash_map::Entry::Vacant(slot) = state.graphs.entry(key) {
                // Run once eagerly (plans cuBLASLt, loads everything), then capture.
                self.enqueue(&plan, sample)?;
                self.gpu.synchronize()?;
                let graph = self.gpu.capture(|| {
                    self.enqueue(&plan, sample).map_err(|e| match e {
                        Error::Cuda(c) => c,
                        other => flint_cuda::Error::Unsupported(other.to_string()),
                    })
                })?;
                slot.insert(graph);
            }
            state.graphs[&key].launch()?;
        } else {
            self.enqueue(&plan, sample)?;
        }
        let rows = batch.logit_rows().len();
        if !read_back {
            // The staging buffer is rewritten by the next step: its copy must be done.
            self.gpu.synchronize()?;
            return Ok(StepOutput::Logits(Vec::new()));
        }
        if sample {
            let mut tokens = vec![0u32; rows];
            self.gpu.read(self.ws.sampled.ptr(), &mut tokens)?;
            let host_rows = batch.draws().is_some_and(|d| d.iter().any(Option::is_none));
            if !host_rows {
                return Ok(StepOutput::Tokens(tokens));
            }
            // Rows sampled on the host get their logits (still in the workspace: the next step
            // waits for this lock), the others their drawn token.
            let vocab = self.config.vocab_size;
            let draws = batch.draws().unwrap_or_default();
            let mut out = Vec::with_capacity(crate::drawn_output_len(draws, vocab));
            for (i, (d, &t)) in draws.iter().zip(&tokens).enumerate() {
                if d.is_some() {
                    out.push(t as f32);
                } else {
                    let at = out.len();
                    out.resize(at + vocab, 0.0);
                    self.gpu.read(self.ws.logits.ptr() + (4 * i * vocab) as u64, &mut out[at..])?;
                }
            }
            Ok(StepOutput::Rows(out))
        } else if let Some(k) = plan.candidates {
            // Only each row's top k comes back (picked on the device); on a tensor-parallel
            // group every rank's list of its vocabulary part, merged here.
            match &self.comm {
                None => {
                    let mut cands = vec![0f32; rows * 2 * k];
                    self.gpu.read(self.ws.candidates.ptr(), &mut cands)?;
                    Ok(StepOutput::Logits(cands))
                }
                Some(_) => {
                    let rows_run = if plan.logit_rows_identity { plan.n_tokens } else { plan.n_logit_rows };
                    let (world, part) = (self.local.shard.world, rows_run * 2 * k);
                    let mut all = vec![0f32; world * part];
                    self.gpu.read(self.ws.candidate_parts.ptr(), &mut all)?;
                    let lists: Vec<&[f32]> = all.chunks_exact(part).map(|l| &l[..rows * 2 * k]).collect();
                    Ok(StepOutput::Logits(crate::merge_candidates(&lists, k)?))
                }
            }
        } else {
            let mut logits = vec![0f32; rows * self.config.vocab_size];
            self.gpu.read(self.ws.logits.ptr(), &mut logits)?;
            Ok(StepOutput::Logits(logits))
        }
    }

    /// Logits of a step (host sampling): `[rows, vocab]`, or `[rows, 2k]` candidates
    /// (`crate::top_candidates`' layout) when the batch asks for `k`, or each row's token drawn
    /// on the device (ids as f32; a `None` draw's row its logits) when it carries draws
    /// ([`ForwardBatch::set_draws`]).
    pub fn forward(&self, batch: &ForwardBatch) -> Result<Vec<f32>> {
        // Rows sampled on the host run the greedy draw (its token is not used).
        let params: Option<Vec<DeviceSampling>> = batch
            .draws()
            .map(|d| d.iter().map(|d| d.as_ref().map_or(DeviceSampling::GREEDY, device_sampling)).collect());
        if params.is_some() && self.config.vocab_size > crate::MAX_DRAW_VOCAB {
            return Err(unsupported("drawing tokens on the device from a vocabulary over 2^24 entries"));
        }
        match self.step(batch, params.as_deref())? {
            StepOutput::Logits(l) | StepOutput::Rows(l) => Ok(l),
            StepOutput::Tokens(t) => Ok(t.into_iter().map(|t| t as f32).collect()),
        }
    }

    /// Time per operation kind of one eager run of `batch` (events between kernels, so launch
    /// gaps are counted with the kernel that follows them): `(label, milliseconds)`, in order of
    /// first appearance, summed over layers.
    pub fn profile(&self, batch: &ForwardBatch, sampling: Option<&[DeviceSampling]>) -> Result<Vec<(String, f64)>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let plan = self.plan(batch, sampling, batch.n_tokens())?;
        self.upload(&mut state, &plan)?;
        let mut marks = Vec::new();
        let first = self.gpu.event()?;
        for _ in 0..2 {
            // The first pass warms up; the second is timed.
            marks.clear();
            self.gpu.synchronize()?;
            first.record(&self.gpu)?;
            self.enqueue_marked(&plan, sampling.is_some(), &mut |label| {
                let e = self.gpu.event()?;
                e.record(&self.gpu)?;
                marks.push((label, e));
                Ok(())
            })?;
            self.gpu.synchronize()?;
        }
        let mut out: Vec<(String, f64)> = Vec::new();
        let mut prev = &first;
        for (label, e) in &marks {
            let ms = prev.elapsed_ms(e)? as f64;
            match out.iter_mut().find(|(l, _)| l == label) {
                Some(entry) => entry.1 += ms,
                None => out.push((label.to_string(), ms)),
            }
            prev = e;
        }
        Ok(out)
    }

    /// The projections of a decode step of `n` tokens alone, as [`Self::enqueue`] launches them
    /// (the same kernels, variants and buffers, in layer order, then the LM head), with nothing
    /// in between and no L2 prefetch: the floor the step's GEMVs set, for the benchmark to set
    /// the whole step against. One GPU only; leaves the workspace's activations undefined (the
    /// next step recomputes them) and the amax slots as a step leaves them.
    pub fn enqueue_projections(&self, n: usize) -> Result<()> {
        if self.comm.is_some() || self.stage.is_some() {
            return Err(unsupported("the projection chain runs on one GPU"));
        }
        let (c, lo, ws) = (&self.config, &self.local, &self.ws);
        let (h, ff, q_dim) = (c.hidden_size, lo.ff, lo.n_heads * c.head_dim);
        let qkv_w = q_dim + 2 * lo.n_kv * c.head_dim;
        if n == 0 || n > self.options.gemv_max_m.min(GEMV_MAX_M) || n > self.options.max_seqs {
            return Err(shape("projection chain", format!("{n} tokens do not run as GEMVs")));
        }
        let slots = ops::GEMV_FP8_MAX_M * ops::AMAX_SLOTS;
        let (amax_attn, amax_act) = (ws.amax.ptr(), ws.amax.at(4 * slots));
        let bf16_epi = ops::Fp8Epilogue::Bf16;
        let fused = self.fused_quantization_fits(n);
        for layer in &self.layers {
            if !self.options.fp8 {
                self.linear(ws.normed.ptr(), &layer.qkv.data, ws.qkv.ptr(), n, qkv_w, h, GemmOut::Bf16, false)?;
                self.linear(ws.attn.ptr(), &layer.o.data, ws.proj.ptr(), n, h, q_dim, GemmOut::Bf16, false)?;
                let (x, w, y) = (ws.normed.ptr(), layer.gate_up.ptr(), ws.act.ptr());
                ops::gemv_l2(&self.gpu, x, w, y, n, ff, h, Epilogue::SwiGlu, false)?;
                self.linear(ws.act.ptr(), &layer.down.data, ws.proj.ptr(), n, h, ff, GemmOut::Bf16, false)?;
                continue;
            }
            self.linear_fp8(&layer.qkv, ws.qkv.ptr(), n, qkv_w, h, bf16_epi, false, None)?;
            if fused {
                let input = ops::Fp8Input::Bf16 { x: ws.attn.ptr(), amax: amax_attn };
                let op = self.fp8_gemv(input, &layer.o, ws.proj.ptr(), n, h, q_dim, bf16_epi);
                ops::run_gemv_fp8(&self.gpu, None, &ops::Fp8Gemv { clear_amax: amax_act, ..op })?;
                let input = ops::Fp8Input::Codes { x: ws.xq.ptr(), scales: ws.xs.ptr() };
                let op = self.fp8_gemv(input, &layer.gate_up, ws.act.ptr(), n, ff, h, ops::Fp8Epilogue::SwiGlu);
                ops::run_gemv_fp8(&self.gpu, None, &ops::Fp8Gemv { publish_amax: amax_act, ..op })?;
                let input = ops::Fp8Input::Bf16 { x: ws.act.ptr(), amax: amax_act };
                let op = self.fp8_gemv(input, &layer.down, ws.proj.ptr(), n, h, ff, bf16_epi);
                ops::run_gemv_fp8(&self.gpu, None, &ops::Fp8Gemv { clear_amax: amax_attn, ..op })?;
            } else {
                self.linear_fp8(&layer.o, ws.proj.ptr(), n, h, q_dim, bf16_epi, false, None)?;
                self.linear_fp8(&layer.gate_up, ws.act.ptr(), n, ff, h, ops::Fp8Epilogue::SwiGlu, false, None)?;
                self.linear_fp8(&layer.down, ws.proj.ptr(), n, h, ff, bf16_epi, false, None)?;
            }
        }
        let head = self.head().ok_or_else(|| unsupported("the model has no LM head"))?;
        self.linear(ws.normed.ptr(), head, ws.logits.ptr(), n, c.vocab_size, h, GemmOut::F32, false)
    }

    /// Captures [`Self::enqueue_projections`] in a CUDA graph.
    pub fn capture_projections(&self, n: usize) -> Result<flint_cuda::Graph> {
        let _state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.enqueue_projections(n)?;
        self.gpu.synchronize()?;
        Ok(self.gpu.capture(|| {
            self.enqueue_projections(n).map_err(|e| match e {
                Error::Cuda(c) => c,
                other => flint_cuda::Error::Unsupported(other.to_string()),
            })
        })?)
    }

    /// Number of CUDA graphs captured so far.
    pub fn n_graphs(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).graphs.len()
    }
}

/// Which part of a stored matrix (or vector) a rank loads.
#[derive(Clone, Debug)]
enum Take {
    Rows(Range<usize>),
    Cols(Range<usize>),
}

/// A stored weight of `rows` rows (whole), and the part of it this rank loads.
struct Part<'a> {
    name: &'a str,
    rows: usize,
    take: Take,
}

impl Part<'_> {
    fn local_rows(&self) -> usize {
        match &self.take {
            Take::Rows(r) => r.len(),
            Take::Cols(_) => self.rows,
        }
    }

    /// Columns this rank loads of a stored matrix of `cols` columns.
    fn local_cols(&self, cols: usize) -> usize {
        match &self.take {
            Take::Rows(_) => cols,
            Take::Cols(c) => c.len(),
        }
    }

    /// This rank's part of a row-major `[rows, cols]` matrix of `T`s.
    fn select<T: Copy>(&self, data: &[T], cols: usize) -> Vec<T> {
        match &self.take {
            Take::Rows(r) => data[r.start * cols..r.end * cols].to_vec(),
            Take::Cols(c) => data.chunks_exact(cols).flat_map(|row| row[c.clone()].iter().copied()).collect(),
        }
    }

    fn is_whole(&self, cols: usize) -> bool {
        match &self.take {
            Take::Rows(r) => r.start == 0 && r.end == self.rows,
            Take::Cols(c) => c.start == 0 && c.end == cols,
        }
    }
}

struct Loader<'a> {
    gpu: &'a Arc<Gpu>,
    config: &'a ModelConfig,
    weights: WeightSource<'a>,
    fp8: bool,
}

impl Loader<'_> {
    fn host(&self, name: &str, dims: &[usize]) -> Result<Option<Vec<f32>>> {
        let WeightSource::Checkpoint(source) = &self.weights else { return Ok(None) };
        let Some(t) = source.tensor(name, self.config)? else { return Ok(None) };
        if t.dims != dims {
            return Err(Error::WeightShape { name: name.to_string(), got: t.dims, expected: dims.to_vec() });
        }
        Ok(Some(t.data))
    }

    fn missing(&self, name: &str) -> Error {
        let source_name = match &self.weights {
            WeightSource::Checkpoint(s) => s.path().display().to_string(),
            WeightSource::Random(_) => "random weights".into(),
        };
        Error::MissingWeight { name: name.to_string(), source_name }
    }

    fn upload_bf16(&self, data: &[f32]) -> Result<DeviceBuffer> {
        let converted: Vec<bf16> = data.par_iter().map(|&x| bf16::from_f32(x)).collect();
        Ok(self.gpu.upload(&converted)?)
    }

    /// This rank's parts of stored `[rows, cols]` matrices, stacked by rows into one buffer of
    /// at least `min_rows` rows (rows past the parts are zero).
    fn stacked_padded(&self, parts: &[Part<'_>], cols: usize, min_rows: usize, seed: u64) -> Result<DeviceBuffer> {
        let rows: usize = parts.iter().map(Part::local_rows).sum();
        let local_cols = parts.first().map_or(cols, |p| p.local_cols(cols));
        let buf = if min_rows > rows {
            self.gpu.zeros(bf16_bytes(min_rows * local_cols))?
        } else {
            self.gpu.alloc(bf16_bytes(rows * local_cols))?
        };
        match &self.weights {
            WeightSource::Random(base) => {
                ops::fill_uniform(self.gpu, buf.ptr(), rows * local_cols, base ^ (seed << 20), 0.0, 0.02)?;
            }
            WeightSource::Checkpoint(source) => {
                let mut row = 0;
                for part in parts {
                    let expected = vec![part.rows, cols];
                    // BF16 safetensors go from the mapped file to the device (row slices without
                    // a copy on the host).
                    if let Some((dims, bytes)) = source.raw_bf16(part.name)? {
                        if dims != expected {
                            return Err(Error::WeightShape { name: part.name.to_string(), got: dims, expected });
                        }
                        let at = bf16_bytes(row * local_cols);
                        match &part.take {
                            _ if part.is_whole(cols) => self.gpu.write(&buf, at, bytes)?,
                            Take::Rows(r) => self.gpu.write(
                                &buf,
                                at,
                                &bytes[bf16_bytes(r.start * cols)..bf16_bytes(r.end * cols)],
                            )?,
                            Take::Cols(c) => {
                                let picked: Vec<u8> = bytes
                                    .chunks_exact(bf16_bytes(cols))
                                    .flat_map(|r| r[bf16_bytes(c.start)..bf16_bytes(c.end)].iter().copied())
                                    .collect();
                                self.gpu.write(&buf, at, &picked)?;
                            }
                        }
                    } else {
                        let data = self.host(part.name, &expected)?.ok_or_else(|| self.missing(part.name))?;
                        let data = if part.is_whole(cols) { data } else { part.select(&data, cols) };
                        let converted: Vec<bf16> = data.par_iter().map(|&x| bf16::from_f32(x)).collect();
                        self.gpu.write(&buf, bf16_bytes(row * local_cols), &converted)?;
                    }
                    row += part.local_rows();
                }
            }
        }
        Ok(buf)
    }

    fn stacked(&self, parts: &[Part<'_>], cols: usize, seed: u64) -> Result<DeviceBuffer> {
        self.stacked_padded(parts, cols, 0, seed)
    }

    /// A linear layer's weight (this rank's parts, stacked by rows): BF16, or for FP8 models
    /// E4M3 codes with a scale per row. FP8 checkpoints with per-tensor or per-channel scales are
    /// copied as stored; anything else (BF16 weights, block scales) is quantized per row on the
    /// device.
    fn linear(&self, parts: &[Part<'_>], cols: usize, seed: u64) -> Result<Weight> {
        if !self.fp8 {
            return Ok(Weight { data: self.stacked(parts, cols, seed)?, scales: None });
        }
        let rows: usize = parts.iter().map(Part::local_rows).sum();
        let local_cols = parts.first().map_or(cols, |p| p.local_cols(cols));
        let data = self.gpu.alloc(rows * local_cols)?;
        let scales = self.gpu.alloc(4 * rows)?;
        // Each part as stored, read once: FP8 codes and scales, or `None`.
        let stored: Vec<Option<flint_quant::Fp8Matrix>> = match &self.weights {
            WeightSource::Checkpoint(source) => {
                parts.iter().map(|p| source.fp8_tensor(p.name)).collect::<Result<_>>()?
            }
            WeightSource::Random(_) => parts.iter().map(|_| None).collect(),
        };
        if stored.iter().all(Option::is_none) {
            // The BF16 weights (the same random ones a BF16 model of this seed has), per row.
            let full = self.stacked(parts, cols, seed)?;
            ops::quantize_rows(self.gpu, full.ptr(), data.ptr(), scales.ptr(), rows, local_cols)?;
            return Ok(Weight { data, scales: Some(scales) });
        }
        let mut row = 0;
        for (i, (part, stored)) in parts.iter().zip(stored).enumerate() {
            let r = part.local_rows();
            match stored {
                Some(m)
                    if m.format == flint_quant::Fp8Format::E4M3
                        && matches!(
                            m.granularity,
                            flint_quant::Granularity::Tensor | flint_quant::Granularity::Channel
                        ) =>
                {
                    if (m.rows, m.cols) != (part.rows, cols) {
                        return Err(Error::WeightShape {
                            name: part.name.to_string(),
                            got: vec![m.rows, m.cols],
                            expected: vec![part.rows, cols],
                        });
                    }
                    let all_scales: Vec<f32> = (0..part.rows).map(|j| m.scale_at(j * cols)).collect();
                    let per_row = match &part.take {
                        Take::Rows(rr) => all_scales[rr.clone()].to_vec(),
                        Take::Cols(_) => all_scales,
                    };
                    self.gpu.write(&data, row * local_cols, &part.select(&m.codes, cols))?;
                    self.gpu.write(&scales, 4 * row, &per_row)?;
                }
                _ => {
                    let one = [Part { name: part.name, rows: part.rows, take: part.take.clone() }];
                    let bf = self.stacked(&one, cols, seed.wrapping_add(i as u64 * 0x9e37))?;
                    ops::quantize_rows(
                        self.gpu,
                        bf.ptr(),
                        data.at(row * local_cols),
                        scales.at(4 * row),
                        r,
                        local_cols,
                    )?;
                }
            }
            row += r;
        }
        Ok(Weight { data, scales: Some(scales) })
    }

    /// Rows `take` of the stored `[rows, cols]` matrix `name`, in a buffer of `min_rows` rows.
    fn padded(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        take: &Take,
        min_rows: usize,
        seed: u64,
    ) -> Result<DeviceBuffer> {
        self.stacked_padded(&[Part { name, rows, take: take.clone() }], cols, min_rows, seed)
    }

    fn optional_padded(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        take: &Take,
        min_rows: usize,
        seed: u64,
    ) -> Result<Option<DeviceBuffer>> {
        match &self.weights {
            WeightSource::Random(_) => self.padded(name, rows, cols, take, min_rows, seed).map(Some),
            WeightSource::Checkpoint(source) => {
                if source.raw_bf16(name)?.is_some() || source.tensor(name, self.config)?.is_some() {
                    return self.padded(name, rows, cols, take, min_rows, seed).map(Some);
                }
                Ok(None)
            }
        }
    }

    /// Norm weights: kept as f32 (the bf16 values, exactly) for the fused norm kernel.
    fn norm(&self, name: &str, n: usize) -> Result<DeviceBuffer> {
        let data = match &self.weights {
            WeightSource::Random(_) => vec![1.0f32; n],
            WeightSource::Checkpoint(_) => self.host(name, &[n])?.ok_or_else(|| self.missing(name))?,
        };
        let rounded: Vec<f32> = data.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        Ok(self.gpu.upload(&rounded)?)
    }

    /// This rank's elements of stored bias vectors, concatenated (absent ones are zeros).
    fn bias(&self, parts: &[Part<'_>], seed: u64) -> Result<Option<DeviceBuffer>> {
        let total: usize = parts.iter().map(Part::local_rows).sum();
        match &self.weights {
            WeightSource::Random(base) => {
                let buf = self.gpu.alloc(bf16_bytes(total))?;
                ops::fill_uniform(self.gpu, buf.ptr(), total, base ^ (seed << 20), 0.0, 0.02)?;
                Ok(Some(buf))
            }
            WeightSource::Checkpoint(_) => {
                let mut all = Vec::with_capacity(total);
                for part in parts {
                    match self.host(part.name, &[part.rows])? {
                        Some(d) => all.extend(part.select(&d, 1)),
                        None => all.extend(std::iter::repeat_n(0.0, part.local_rows())),
                    }
                }
                self.upload_bf16(&all).map(Some)
            }
        }
    }
}
