//! The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2): pre-norm decoder blocks with RMSNorm,
//! rotary embeddings, grouped-query attention and a SwiGLU MLP, over any [`Backend`].

use std::ops::Range;

use flint_comm::{Communicator, ReduceOp};
use flint_quant::{Fp8Format, Fp8Matrix, Granularity, ScaleRule};
use flint_tensor::{AttentionBatch, Backend, DType, Shape, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::draw::Draw;
use crate::shard::{Shard, slice_cols, slice_rows};
use crate::source::{HostTensor, ModelSource};
use crate::{Error, Result};

/// Progress of a weight load: bytes of weights loaded so far and in all.
#[derive(Clone, Copy, Debug)]
pub struct LoadProgress {
    pub loaded_bytes: usize,
    pub total_bytes: usize,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o_proj: Tensor,
    mlp_norm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

/// FP8 emulation of a model on a backend that computes in f32/bf16: weights, activations and the
/// KV cache rounded to E4M3 values with the scales an FP8 engine would use, so the accuracy of
/// FP8 serving can be measured (and GPU FP8 kernels checked) on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fp8Spec {
    /// Quantize the decoder blocks' linear weights at this granularity (`None`: leave them, e.g.
    /// when they come from an FP8 checkpoint and already are FP8 values).
    pub weights: Option<Granularity>,
    /// Quantize the inputs of those linear layers with a dynamic scale per token.
    pub activations: bool,
    /// Store keys and values as E4M3 with a scale per token and KV head.
    pub kv_cache: bool,
    /// How each weight group's scale is chosen (activations and the KV cache always take their
    /// largest magnitude, as the GPU computes them on the fly).
    pub weight_scales: ScaleRule,
}

impl Fp8Spec {
    /// What Flint's FP8 GPU path does: per-channel weights, per-token activations, FP8 KV.
    pub const SERVING: Fp8Spec = Fp8Spec {
        weights: Some(Granularity::Channel),
        activations: true,
        kv_cache: true,
        weight_scales: ScaleRule::Max,
    };

    pub fn is_active(&self) -> bool {
        self.weights.is_some() || self.activations || self.kv_cache
    }
}

/// Candidates' order: highest logit first, ties to the lower id.
fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Appends one row of `k` candidates (`cands` sorted, at most `k`), padded with (-1, NaN).
fn push_candidate_row(out: &mut Vec<f32>, cands: &[(u32, f32)], k: usize) {
    for &(id, l) in cands {
        out.extend([id as f32, l]);
    }
    for _ in cands.len()..k {
        out.extend([-1.0, f32::NAN]);
    }
}

/// The (id, logit) pairs of one row of candidates, padding left out.
pub fn candidate_pairs(row: &[f32]) -> impl Iterator<Item = (u32, f32)> + '_ {
    row.chunks_exact(2).filter(|p| !p[1].is_nan()).map(|p| (p[0] as u32, p[1]))
}

/// Each row's `k` most likely entries of `logits` (`[rows, width]`, row-major), as `[rows, 2k]`:
/// `k` pairs (token id + `id_offset`, logit) per row, best first, ties to the lower id, NaN
/// never taken; rows with fewer than `k` entries are padded with (-1, NaN). Ids travel as f32,
/// exact below 2^24.
pub fn top_candidates(logits: &[f32], width: usize, id_offset: usize, k: usize) -> Vec<f32> {
    let rows = logits.len().checked_div(width).unwrap_or(0);
    let mut out = Vec::with_capacity(rows * 2 * k);
    for row in logits.chunks_exact(width.max(1)).take(rows) {
        let mut cands: Vec<(u32, f32)> =
            row.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| ((i + id_offset) as u32, l)).collect();
        if cands.len() > k {
            cands.select_nth_unstable_by(k - 1, by_logit);
            cands.truncate(k);
        }
        cands.sort_unstable_by(by_logit);
        push_candidate_row(&mut out, &cands, k);
    }
    out
}

/// Merges several ranks' [`top_candidates`] lists of the same rows (each `[rows, 2k]`) into the
/// rows' overall top `k`, in the same order and layout; an id in more than one list (ranks that
/// all hold the whole vocabulary) counts once.
pub fn merge_candidates(lists: &[&[f32]], k: usize) -> Result<Vec<f32>> {
    let len = lists.first().map_or(0, |l| l.len());
    if k == 0 || !len.is_multiple_of(2 * k) || lists.iter().any(|l| l.len() != len) {
        return Err(Error::Sharding(format!(
            "candidate lists of lengths {:?} for {k} per row",
            lists.iter().map(|l| l.len()).collect::<Vec<_>>()
        )));
    }
    let rows = len / (2 * k);
    let mut out = Vec::with_capacity(len);
    for r in 0..rows {
        let mut cands: Vec<(u32, f32)> =
            lists.iter().flat_map(|l| candidate_pairs(&l[r * 2 * k..(r + 1) * 2 * k])).collect();
        cands.sort_unstable_by(by_logit);
        cands.dedup_by_key(|c| c.0);
        cands.truncate(k);
        push_candidate_row(&mut out, &cands, k);
    }
    Ok(out)
}

/// A loaded Llama-family model on one backend.
#[derive(Debug)]
pub struct Llama {
    config: ModelConfig,
    shard: Shard,
    dtype: DType,
    fp8: Fp8Spec,
    /// Global indices of the decoder layers held (all of them, or a pipeline stage's).
    layer_range: Range<usize>,
    /// On the part holding the first layer.
    embed_tokens: Option<Tensor>,
    layers: Vec<Layer>,
    /// Final norm and LM head: on the part holding the last layer.
    norm: Option<Tensor>,
    lm_head: Option<Tensor>,
    rope_inv_freq: Tensor,
}

/// What a pipeline stage starts from.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    /// The batch's tokens (the first stage).
    Tokens,
    /// The residual stream and the last MLP output (not yet added), `[n_tokens, hidden]` each,
    /// from the previous stage.
    Hidden { residual: &'a [f32], pending: &'a [f32] },
}

/// What a pipeline stage hands on.
#[derive(Debug)]
pub enum StageOutput {
    /// The last stage's logits `[batch.logit_rows().len(), vocab]`.
    Logits(Tensor),
    /// For the next stage (see [`StageInput::Hidden`]).
    Hidden { residual: Vec<f32>, pending: Vec<f32> },
}

/// Paged key/value storage for every layer: per layer, keys and values of shape
/// `[n_blocks, block_size, n_kv_heads, head_dim]`. Which blocks belong to which sequence is the
/// caller's business (the engine's block manager); the model only reads the block tables of a
/// [`ForwardBatch`].
#[derive(Debug)]
pub struct PagedKvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    n_blocks: usize,
    block_size: usize,
}

impl PagedKvCache {
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
}

/// Whose logits a sequence in a [`ForwardBatch`] wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that does not end the prompt).
    None,
    /// The last new token's.
    Last,
    /// Every new token's.
    All,
}

/// One step's work: the new tokens of several sequences, back to back, with where their keys and
/// values go in the paged cache and whose logits are wanted.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ForwardBatch {
    block_size: usize,
    tokens: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    query_starts: Vec<u32>,
    context_lens: Vec<u32>,
    tables: Vec<Vec<u32>>,
    logit_rows: Vec<usize>,
    /// Instead of full logits, each logit row's `k` most likely tokens (see
    /// [`ForwardBatch::set_candidates`]).
    #[serde(default)]
    candidates: Option<usize>,
    /// Instead of logits, each logit row's token drawn by the device, or for `None` rows their
    /// logits (see [`ForwardBatch::set_draws`]).
    #[serde(default)]
    draws: Option<Vec<Option<Draw>>>,
}

/// Most candidates per row a step may ask for instead of full logits.
pub const MAX_CANDIDATES: usize = 256;

impl ForwardBatch {
    pub fn new(block_size: usize) -> Self {
        ForwardBatch {
            block_size,
            tokens: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            query_starts: vec![0],
            context_lens: Vec::new(),
            tables: Vec::new(),
            logit_rows: Vec::new(),
            candidates: None,
            draws: None,
        }
    }

    /// Asks for each logit row's `k` most likely tokens instead of its full logits: a rank
    /// holding part of the vocabulary returns its part's top `k` (see [`top_candidates`]) without
    /// gathering the rest, and a group merges its ranks' lists ([`merge_candidates`]). `None`:
    /// full logits.
    pub fn set_candidates(&mut self, k: Option<usize>) -> Result<()> {
        if let Some(k) = k
            && !(1..=MAX_CANDIDATES).contains(&k)
        {
            return Err(Error::Backend(flint_tensor::Error::ShapeMismatch {
                op: "forward_batch",
                detail: format!("{k} candidates per row (1..={MAX_CANDIDATES})"),
            }));
        }
        self.candidates = k;
        Ok(())
    }

    /// What [`ForwardBatch::set_candidates`] asked for.
    pub fn candidates(&self) -> Option<usize> {
        self.candidates
    }

    /// Asks for each logit row's token, drawn on the device with that row's [`Draw`], instead of
    /// its logits; rows whose draw is `None` (sampled on the host: penalties, log-probabilities)
    /// still get their logits. The step returns the rows in order, each the token id as one f32
    /// or a `None` row's `vocab` logits ([`crate::drawn_output_len`]). One entry per logit row
    /// (set after the sequences are pushed); not with candidates. Runtimes that draw say so
    /// (`RankInfo::draws_on_device`); the CPU reference model refuses such a batch (the engine
    /// applies draws to its logits with [`crate::apply_draws`]). `None`: logits.
    pub fn set_draws(&mut self, draws: Option<Vec<Option<Draw>>>) -> Result<()> {
        if let Some(d) = &draws {
            let why = if d.len() != self.logit_rows.len() {
                Some(format!("{} draws for {} logit rows", d.len(), self.logit_rows.len()))
            } else if self.candidates.is_some() {
                Some("draws and candidates together".to_string())
            } else {
                d.iter().flatten().find(|d| !d.is_valid()).map(|d| format!("an invalid draw {d:?}"))
            };
            if let Some(detail) = why {
                return Err(Error::Backend(flint_tensor::Error::ShapeMismatch { op: "forward_batch", detail }));
            }
        }
        self.draws = draws;
        Ok(())
    }

    /// What [`ForwardBatch::set_draws`] asked for.
    pub fn draws(&self) -> Option<&[Option<Draw>]> {
        self.draws.as_deref()
    }

    /// Adds a sequence whose first `n_cached` positions are already in the blocks of
    /// `block_table`, and whose `new_tokens` follow them. The table must cover every position.
    pub fn push_sequence(
        &mut self,
        new_tokens: &[u32],
        n_cached: usize,
        block_table: &[u32],
        logits: Logits,
    ) -> Result<()> {
        let context = n_cached + new_tokens.len();
        let needed = context.div_ceil(self.block_size);
        if new_tokens.is_empty() || block_table.len() < needed {
            return Err(Error::Backend(flint_tensor::Error::ShapeMismatch {
                op: "forward_batch",
                detail: format!(
                    "{} new tokens after {n_cached} cached need {needed} blocks, the table has {}",
                    new_tokens.len(),
                    block_table.len()
                ),
            }));
        }
        let first_row = self.tokens.len();
        for (i, &token) in new_tokens.iter().enumerate() {
            let pos = n_cached + i;
            self.tokens.push(token);
            self.positions.push(pos as u32);
            self.slots
                .push(block_table[pos / self.block_size] * self.block_size as u32 + (pos % self.block_size) as u32);
        }
        match logits {
            Logits::None => {}
            Logits::Last => self.logit_rows.push(self.tokens.len() - 1),
            Logits::All => self.logit_rows.extend(first_row..self.tokens.len()),
        }
        self.query_starts.push(self.tokens.len() as u32);
        self.context_lens.push(context as u32);
        self.tables.push(block_table[..needed].to_vec());
        Ok(())
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn n_seqs(&self) -> usize {
        self.context_lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Rows of the logits the forward pass returns, in order: token-axis indices.
    pub fn logit_rows(&self) -> &[usize] {
        &self.logit_rows
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Every sequence's new tokens, back to back.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Each token's position in its sequence.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Each token's KV-cache slot: block * block_size + row.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// Offsets of each sequence's first token, and the total at the end (`n_seqs + 1` entries).
    pub fn query_starts(&self) -> &[u32] {
        &self.query_starts
    }

    /// Each sequence's length after this step.
    pub fn context_lens(&self) -> &[u32] {
        &self.context_lens
    }

    /// Each sequence's block table, covering its context.
    pub fn block_tables(&self) -> &[Vec<u32>] {
        &self.tables
    }

    /// Splits the batch by sequences into at most `parts` batches of about equal token counts,
    /// in order (micro-batches of a pipeline). Logit rows follow their sequences.
    pub fn split(&self, parts: usize) -> Vec<ForwardBatch> {
        let s = self.n_seqs();
        let parts = parts.clamp(1, s.max(1));
        let total = self.tokens.len();
        let mut out = Vec::with_capacity(parts);
        let mut seq = 0;
        for p in 0..parts {
            let start = seq;
            // At least one sequence, leaving one for every later part; then up to the
            // cumulative token share of parts 0..=p.
            let max_end = s - (parts - p - 1);
            let target = total * (p + 1) / parts;
            seq += 1;
            while seq < max_end && (self.query_starts[seq] as usize) < target {
                seq += 1;
            }
            if p + 1 == parts {
                seq = s;
            }
            let mut b = ForwardBatch::new(self.block_size);
            for i in start..seq {
                let (from, to) = (self.query_starts[i] as usize, self.query_starts[i + 1] as usize);
                let first_row = b.tokens.len();
                b.tokens.extend_from_slice(&self.tokens[from..to]);
                b.positions.extend_from_slice(&self.positions[from..to]);
                b.slots.extend_from_slice(&self.slots[from..to]);
                b.query_starts.push(b.tokens.len() as u32);
                b.context_lens.push(self.context_lens[i]);
                b.tables.push(self.tables[i].clone());
                b.logit_rows.extend(
                    self.logit_rows.iter().filter(|&&r| (from..to).contains(&r)).map(|&r| r - from + first_row),
                );
            }
            b.candidates = self.candidates;
            if let Some(draws) = &self.draws {
                let first = self.logit_rows.iter().position(|&r| r >= self.query_starts[start] as usize);
                let first = first.unwrap_or(self.logit_rows.len());
                b.draws = Some(draws[first..first + b.logit_rows.len()].to_vec());
            }
            out.push(b);
        }
        out
    }

    fn attention_batch(&self) -> AttentionBatch {
        let max_blocks_per_seq = self.tables.iter().map(Vec::len).max().unwrap_or(0);
        let mut block_tables = vec![0u32; self.tables.len() * max_blocks_per_seq];
        for (s, table) in self.tables.iter().enumerate() {
            block_tables[s * max_blocks_per_seq..][..table.len()].copy_from_slice(table);
        }
        AttentionBatch {
            block_size: self.block_size,
            query_starts: self.query_starts.clone(),
            context_lens: self.context_lens.clone(),
            block_tables,
            max_blocks_per_seq,
        }
    }
}

/// A single sequence's cache: paged storage with a fixed identity block table, for callers that
/// run one sequence at a time (tests, simple tools).
#[derive(Debug)]
pub struct KvCache {
    paged: PagedKvCache,
    table: Vec<u32>,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// Positions held so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position; the memory is kept for the next sequence.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Tokens per block of a single-sequence [`KvCache`].
const SINGLE_SEQUENCE_BLOCK: usize = 16;

/// Inverse rotary frequencies `1 / theta^(2i/d)`, with the config's scaling applied, computed
/// in f32 as the Hugging Face reference does.
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / config.rope_theta.powf((2 * i) as f32 / d as f32)).collect();
    match &config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear(factor) => base.iter().map(|f| f / factor).collect(),
        RopeScaling::FreqFactors(factors) => base.iter().zip(factors).map(|(f, s)| f / s).collect(),
        RopeScaling::Llama3(s) => {
            let old = s.original_max_position_embeddings as f32;
            let low_freq_wavelen = old / s.low_freq_factor;
            let high_freq_wavelen = old / s.high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

fn expect_dims(name: &str, t: &HostTensor, expected: &[usize]) -> Result<()> {
    if t.dims != expected {
        return Err(Error::WeightShape { name: name.to_string(), got: t.dims.clone(), expected: expected.to_vec() });
    }
    Ok(())
}

/// Which part of a stored matrix a rank loads.
#[derive(Clone, Debug)]
enum Part {
    All,
    Rows(Range<usize>),
    Cols(Range<usize>),
}

struct Loader<'a> {
    source: &'a ModelSource,
    config: &'a ModelConfig,
    backend: &'a dyn Backend,
    dtype: DType,
    loaded_bytes: usize,
    total_bytes: usize,
    progress: &'a mut dyn FnMut(LoadProgress),
}

impl Loader<'_> {
    /// Loads `part` of the weight `name` stored with `dims` (rows of a vector: its elements).
    fn optional_part(&mut self, name: &str, dims: &[usize], part: Part) -> Result<Option<Tensor>> {
        let Some(host) = self.source.tensor(name, self.config)? else { return Ok(None) };
        expect_dims(name, &host, dims)?;
        let cols = if dims.len() == 2 { dims[1] } else { 1 };
        let (data, local) = match part {
            Part::All => (host.data, dims.to_vec()),
            Part::Rows(r) => {
                let mut local = dims.to_vec();
                local[0] = r.len();
                (slice_rows(&host.data, cols, r), local)
            }
            Part::Cols(c) => (slice_cols(&host.data, cols, c.clone()), vec![dims[0], c.len()]),
        };
        // Norm weights and biases stay f32: they are tiny and every backend keeps them so.
        let dtype = if dims.len() == 1 { DType::F32 } else { self.dtype };
        let tensor = self.backend.upload_f32(&data, Shape::new(local), dtype)?;
        self.loaded_bytes += self.dtype.size_in_bytes(data.len());
        (self.progress)(LoadProgress { loaded_bytes: self.loaded_bytes, total_bytes: self.total_bytes });
        Ok(Some(tensor))
    }

    fn required(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.required_part(name, dims, Part::All)
    }

    fn required_part(&mut self, name: &str, dims: &[usize], part: Part) -> Result<Tensor> {
        self.optional_part(name, dims, part)?.ok_or_else(|| Error::MissingWeight {
            name: name.to_string(),
            source_name: self.source.path().display().to_string(),
        })
    }
}

impl Llama {
    /// Loads every weight of `source` onto `backend`, matrices in `dtype`.
    pub fn load(
        source: &ModelSource,
        config: ModelConfig,
        backend: &dyn Backend,
        dtype: DType,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        Self::load_shard(source, config, backend, dtype, Shard::SINGLE, progress)
    }

    /// Loads rank `shard.rank`'s part of `source`, every layer: [`Llama::load_part`] of all.
    pub fn load_shard(
        source: &ModelSource,
        config: ModelConfig,
        backend: &dyn Backend,
        dtype: DType,
        shard: Shard,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let all = 0..config.n_layers;
        Self::load_part(source, config, backend, dtype, shard, all, progress)
    }

    /// Loads rank `shard.rank`'s part (see [`Shard`]) of decoder layers `layers` (a pipeline
    /// stage; the embedding with the first layer, the final norm and LM head with the last).
    /// Run a whole model's ranks with [`Llama::forward_batch_tp`], stages with
    /// [`Llama::forward_stage`].
    pub fn load_part(
        source: &ModelSource,
        config: ModelConfig,
        backend: &dyn Backend,
        dtype: DType,
        shard: Shard,
        layer_range: Range<usize>,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let c = &config;
        Shard::check(shard.world, c)?;
        if layer_range.is_empty() || layer_range.end > c.n_layers {
            return Err(Error::Sharding(format!("layers {layer_range:?} of a model of {}", c.n_layers)));
        }
        let (first, last) = (layer_range.start == 0, layer_range.end == c.n_layers);
        let h = c.hidden_size;
        let hd = c.head_dim;
        let q_dim = c.n_heads * hd;
        let kv_dim = c.n_kv_heads * hd;
        let (heads, kv_heads, ffn, vocab) = (shard.heads(c), shard.kv_heads(c), shard.ffn(c), shard.vocab(c));
        let q_rows = heads.start * hd..heads.end * hd;
        let kv_rows = kv_heads.start * hd..kv_heads.end * hd;
        let total_bytes = dtype.size_in_bytes(c.n_parameters()) / shard.world;
        let mut ld = Loader { source, config: c, backend, dtype, loaded_bytes: 0, total_bytes, progress };

        // The LM head may be the embedding (tied): the last stage loads it then too.
        let embed_tokens = if first || (last && c.tie_word_embeddings) {
            Some(ld.required_part("model.embed_tokens.weight", &[c.vocab_size, h], Part::Rows(vocab.clone()))?)
        } else {
            None
        };
        // Not preallocated from the config: a corrupt file could claim any layer count.
        let mut layers = Vec::new();
        for i in layer_range.clone() {
            let p = format!("model.layers.{i}");
            let bias = |ld: &mut Loader<'_>, name: &str, n: usize, rows: &Range<usize>| -> Result<Option<Tensor>> {
                if !c.attention_bias {
                    return Ok(None);
                }
                ld.optional_part(&format!("{p}.self_attn.{name}.bias"), &[n], Part::Rows(rows.clone()))
            };
            let ff = c.intermediate_size;
            layers.push(Layer {
                attn_norm: ld.required(&format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj: ld.required_part(
                    &format!("{p}.self_attn.q_proj.weight"),
                    &[q_dim, h],
                    Part::Rows(q_rows.clone()),
                )?,
                k_proj: ld.required_part(
                    &format!("{p}.self_attn.k_proj.weight"),
                    &[kv_dim, h],
                    Part::Rows(kv_rows.clone()),
                )?,
                v_proj: ld.required_part(
                    &format!("{p}.self_attn.v_proj.weight"),
                    &[kv_dim, h],
                    Part::Rows(kv_rows.clone()),
                )?,
                q_bias: bias(&mut ld, "q_proj", q_dim, &q_rows)?,
                k_bias: bias(&mut ld, "k_proj", kv_dim, &kv_rows)?,
                v_bias: bias(&mut ld, "v_proj", kv_dim, &kv_rows)?,
                o_proj: ld.required_part(
                    &format!("{p}.self_attn.o_proj.weight"),
                    &[h, q_dim],
                    Part::Cols(q_rows.clone()),
                )?,
                mlp_norm: ld.required(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: ld.required_part(&format!("{p}.mlp.gate_proj.weight"), &[ff, h], Part::Rows(ffn.clone()))?,
                up_proj: ld.required_part(&format!("{p}.mlp.up_proj.weight"), &[ff, h], Part::Rows(ffn.clone()))?,
                down_proj: ld.required_part(&format!("{p}.mlp.down_proj.weight"), &[h, ff], Part::Cols(ffn.clone()))?,
            });
        }
        let (norm, lm_head) = if last {
            let norm = ld.required("model.norm.weight", &[h])?;
            let embed_rows = |ld: &mut Loader<'_>| {
                ld.required_part("model.embed_tokens.weight", &[c.vocab_size, h], Part::Rows(vocab.clone()))
            };
            let lm_head = if c.tie_word_embeddings {
                match &embed_tokens {
                    Some(t) => t.clone(),
                    None => embed_rows(&mut ld)?,
                }
            } else {
                match ld.optional_part("lm_head.weight", &[c.vocab_size, h], Part::Rows(vocab.clone()))? {
                    Some(t) => t,
                    // Some checkpoints declare untied embeddings but ship no head: use the embedding.
                    None => match &embed_tokens {
                        Some(t) => t.clone(),
                        None => embed_rows(&mut ld)?,
                    },
                }
            };
            (Some(norm), Some(lm_head))
        } else {
            (None, None)
        };
        let embed_tokens = if first { embed_tokens } else { None };

        let inv_freq = rope_inv_freq(c);
        let rope_inv_freq = backend.upload_f32(&inv_freq, Shape::from([inv_freq.len()]), DType::F32)?;

        // An FP8 checkpoint's weights are FP8 values already; its activations are quantized.
        let fp8 = Fp8Spec {
            weights: None,
            activations: source.quant_config().is_some(),
            kv_cache: false,
            ..Fp8Spec::default()
        };
        Ok(Llama { config, shard, dtype, fp8, layer_range, embed_tokens, layers, norm, lm_head, rope_inv_freq })
    }

    /// This model's tensor-parallel rank.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// Global indices of the decoder layers this part holds.
    pub fn layer_range(&self) -> Range<usize> {
        self.layer_range.clone()
    }

    /// (query heads, KV heads, MLP columns) this rank computes.
    fn local_dims(&self) -> (usize, usize, usize) {
        let c = &self.config;
        (self.shard.heads(c).len(), self.shard.kv_heads(c).len(), self.shard.ffn(c).len())
    }

    /// The FP8 emulation in effect.
    pub fn fp8(&self) -> Fp8Spec {
        self.fp8
    }

    /// Switches on FP8 emulation: quantizes the linear weights now (when `spec.weights` is set),
    /// activations and the KV cache from the next forward pass on.
    pub fn quantize_fp8(&mut self, backend: &dyn Backend, spec: Fp8Spec) -> Result<()> {
        if let Some(granularity) = spec.weights {
            let requantize = |t: &mut Tensor| -> Result<()> {
                let dims = t.shape().dims().to_vec();
                let (rows, cols) = (dims[0], dims[1]);
                let values = backend.to_f32_vec(t)?;
                let m = Fp8Matrix::quantize_with(&values, rows, cols, granularity, Fp8Format::E4M3, spec.weight_scales);
                // Kept in f32: `code * scale` exactly, as the FP8 kernels compute it.
                *t = backend.upload_f32(&m.dequantize(), Shape::new(dims.clone()), DType::F32)?;
                Ok(())
            };
            for l in &mut self.layers {
                for t in [
                    &mut l.q_proj,
                    &mut l.k_proj,
                    &mut l.v_proj,
                    &mut l.o_proj,
                    &mut l.gate_proj,
                    &mut l.up_proj,
                    &mut l.down_proj,
                ] {
                    requantize(t)?;
                }
            }
        }
        self.fp8 = Fp8Spec { weights: spec.weights.or(self.fp8.weights), ..spec };
        Ok(())
    }

    /// `t` with each group of `cols` values rounded to E4M3 under its own scale (when `on`).
    fn fake_quant(&self, backend: &dyn Backend, t: Tensor, cols: usize, on: bool) -> Result<Tensor> {
        if !on {
            return Ok(t);
        }
        let mut values = backend.to_f32_vec(&t)?;
        flint_quant::fp8::fake_quantize_rows(&mut values, cols, Fp8Format::E4M3);
        Ok(backend.upload_f32(&values, t.shape().clone(), t.dtype())?)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Paged KV storage of `n_blocks` blocks of `block_size` positions for every layer.
    pub fn new_paged_kv_cache(
        &self,
        backend: &dyn Backend,
        n_blocks: usize,
        block_size: usize,
    ) -> Result<PagedKvCache> {
        let shape = Shape::from([n_blocks, block_size, self.local_dims().1, self.config.head_dim]);
        let mut keys = Vec::with_capacity(self.layers.len());
        let mut values = Vec::with_capacity(self.layers.len());
        for _ in 0..self.layers.len() {
            keys.push(backend.zeros(shape.clone(), DType::F32)?);
            values.push(backend.zeros(shape.clone(), DType::F32)?);
        }
        Ok(PagedKvCache { keys, values, n_blocks, block_size })
    }

    /// Bytes of KV cache one position takes across all layers, as stored by
    /// [`Llama::new_paged_kv_cache`].
    pub fn kv_bytes_per_token(&self) -> usize {
        DType::F32.size_in_bytes(2 * self.layers.len() * self.local_dims().1 * self.config.head_dim)
    }

    /// A KV cache for one sequence of up to `capacity` positions (at most the model's context).
    pub fn new_kv_cache(&self, backend: &dyn Backend, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.min(self.config.max_position_embeddings);
        let n_blocks = capacity.div_ceil(SINGLE_SEQUENCE_BLOCK).max(1);
        let paged = self.new_paged_kv_cache(backend, n_blocks, SINGLE_SEQUENCE_BLOCK)?;
        Ok(KvCache { paged, table: (0..n_blocks as u32).collect(), capacity, len: 0 })
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys and values to `cache`,
    /// and returns logits `[n, vocab]`: for every token when `all_logits`, else for the last.
    pub fn forward(
        &self,
        backend: &dyn Backend,
        tokens: &[u32],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        if cache.len + tokens.len() > cache.capacity {
            return Err(Error::ContextOverflow { needed: cache.len + tokens.len(), capacity: cache.capacity });
        }
        let mut batch = ForwardBatch::new(cache.paged.block_size);
        let logits = if all_logits { Logits::All } else { Logits::Last };
        batch.push_sequence(tokens, cache.len, &cache.table, logits)?;
        let out = self.forward_batch(backend, &batch, &cache.paged)?;
        cache.len += tokens.len();
        Ok(out)
    }

    /// Runs one step for a batch of sequences: writes the new tokens' keys and values into
    /// `cache` at the batch's slots and returns logits `[batch.logit_rows().len(), vocab]`.
    ///
    /// Every row is computed independently of the others, so a sequence's logits do not depend
    /// on what else is in the batch.
    pub fn forward_batch(&self, backend: &dyn Backend, batch: &ForwardBatch, cache: &PagedKvCache) -> Result<Tensor> {
        if !self.shard.is_single() {
            return Err(Error::Sharding(format!(
                "rank {} of {} runs with forward_batch_tp and its communicator",
                self.shard.rank, self.shard.world
            )));
        }
        self.whole(self.forward_stage(backend, batch, cache, None, StageInput::Tokens)?)
    }

    fn whole(&self, out: StageOutput) -> Result<Tensor> {
        match out {
            StageOutput::Logits(t) => Ok(t),
            StageOutput::Hidden { .. } => Err(Error::Sharding(format!(
                "layers {:?} of {} are a pipeline stage: run it with forward_stage",
                self.layer_range, self.config.n_layers
            ))),
        }
    }

    /// Runs this part's layers for one step of a pipeline stage (every tensor-parallel rank of
    /// the stage with the same input): the last stage's logits, or the hidden state for the next.
    pub fn forward_stage(
        &self,
        backend: &dyn Backend,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
        comm: Option<&dyn Communicator<[f32]>>,
        input: StageInput<'_>,
    ) -> Result<StageOutput> {
        if comm.is_none() && !self.shard.is_single() {
            return Err(Error::Sharding(format!(
                "rank {} of {} runs with forward_batch_tp (or forward_stage) and its communicator",
                self.shard.rank, self.shard.world
            )));
        }
        if batch.draws().is_some() {
            return Err(Error::Backend(flint_tensor::Error::ShapeMismatch {
                op: "forward_batch",
                detail: "draws on the CPU reference, which returns logits (sample them on the host)".into(),
            }));
        }
        let c = &self.config;
        let (n_heads, n_kv_heads, ff) = self.local_dims();
        let n = batch.n_tokens();
        let attention = self.check_batch(batch, cache)?;
        let positions = &batch.positions;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let q_shape = Shape::from([n, n_heads, c.head_dim]);
        let kv_shape = Shape::from([n, n_kv_heads, c.head_dim]);
        let flat = |t: Tensor, shape: &Shape| {
            t.reshape(shape.clone()).ok_or_else(|| {
                Error::Backend(flint_tensor::Error::ShapeMismatch {
                    op: "forward",
                    detail: format!("reshape to {shape}"),
                })
            })
        };

        let hidden_shape = Shape::from([n, c.hidden_size]);
        let (mut residual, mut pending) = match (input, self.layer_range.start == 0) {
            (StageInput::Tokens, true) => (self.embed(backend, &batch.tokens, comm)?, None),
            (StageInput::Hidden { residual, pending }, false) => {
                if residual.len() != n * c.hidden_size || pending.len() != n * c.hidden_size {
                    return Err(Error::Sharding(format!(
                        "a stage got hidden states of {} and {} values for {n} tokens of {}",
                        residual.len(),
                        pending.len(),
                        c.hidden_size
                    )));
                }
                (
                    backend.upload_f32(residual, hidden_shape.clone(), DType::F32)?,
                    Some(backend.upload_f32(pending, hidden_shape.clone(), DType::F32)?),
                )
            }
            (StageInput::Tokens, false) => {
                return Err(Error::Sharding(format!(
                    "stage {:?} needs the previous stage's hidden states",
                    self.layer_range
                )));
            }
            (StageInput::Hidden { .. }, true) => {
                return Err(Error::Sharding("the first stage starts from tokens".to_string()));
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = match pending.take() {
                None => backend.rms_norm(&residual, &layer.attn_norm, c.rms_norm_eps)?,
                Some(mlp_out) => {
                    let (sum, normed) = backend.add_rms_norm(&residual, &mlp_out, &layer.attn_norm, c.rms_norm_eps)?;
                    residual = sum;
                    normed
                }
            };
            let (acts, kv8) = (self.fp8.activations, self.fp8.kv_cache);
            let normed = self.fake_quant(backend, normed, c.hidden_size, acts)?;
            let q = backend.linear(&normed, &layer.q_proj, layer.q_bias.as_ref())?;
            let k = backend.linear(&normed, &layer.k_proj, layer.k_bias.as_ref())?;
            let v = backend.linear(&normed, &layer.v_proj, layer.v_bias.as_ref())?;
            let q = backend.rope(&flat(q, &q_shape)?, positions, &self.rope_inv_freq)?;
            let k = backend.rope(&flat(k, &kv_shape)?, positions, &self.rope_inv_freq)?;
            let k = self.fake_quant(backend, k, c.head_dim, kv8)?;
            let v = self.fake_quant(backend, flat(v, &kv_shape)?, c.head_dim, kv8)?;
            backend.write_kv(&cache.keys[i], &k, &batch.slots)?;
            backend.write_kv(&cache.values[i], &v, &batch.slots)?;
            let attn = backend.attention(&q, &cache.keys[i], &cache.values[i], &attention, scale)?;
            let attn = flat(attn, &Shape::from([n, n_heads * c.head_dim]))?;
            let attn = self.fake_quant(backend, attn, n_heads * c.head_dim, acts)?;
            let o = backend.linear(&attn, &layer.o_proj, None)?;
            let o = self.all_reduce(backend, o, comm)?;

            let (sum, normed) = backend.add_rms_norm(&residual, &o, &layer.mlp_norm, c.rms_norm_eps)?;
            residual = sum;
            let normed = self.fake_quant(backend, normed, c.hidden_size, acts)?;
            let gate = backend.linear(&normed, &layer.gate_proj, None)?;
            let up = backend.linear(&normed, &layer.up_proj, None)?;
            let act = backend.silu_mul(&gate, &up)?;
            let act = self.fake_quant(backend, act, ff, acts)?;
            let down = backend.linear(&act, &layer.down_proj, None)?;
            pending = Some(self.all_reduce(backend, down, comm)?);
        }
        let Some(norm) = &self.norm else {
            let pending = pending.ok_or_else(|| Error::Sharding("a stage without layers".to_string()))?;
            return Ok(StageOutput::Hidden {
                residual: backend.to_f32_vec(&residual)?,
                pending: backend.to_f32_vec(&pending)?,
            });
        };
        if batch.logit_rows.is_empty() {
            let width = batch.candidates.map_or(c.vocab_size, |k| 2 * k);
            return Ok(StageOutput::Logits(backend.zeros(Shape::from([0, width]), DType::F32)?));
        }
        let hidden = match pending {
            Some(mlp_out) => backend.add_rms_norm(&residual, &mlp_out, norm, c.rms_norm_eps)?.1,
            None => backend.rms_norm(&residual, norm, c.rms_norm_eps)?,
        };
        let hidden = backend.gather_rows(&hidden, &batch.logit_rows)?;
        Ok(StageOutput::Logits(self.lm_head(backend, &hidden, comm, batch.candidates)?))
    }

    /// [`Llama::forward_batch`] for one rank of a tensor-parallel group: every rank calls it with
    /// the same batch and its own cache; each returns the full logits.
    pub fn forward_batch_tp(
        &self,
        backend: &dyn Backend,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
        comm: &dyn Communicator<[f32]>,
    ) -> Result<Tensor> {
        if comm.world_size() != self.shard.world || comm.rank() != self.shard.rank {
            return Err(Error::Sharding(format!(
                "rank {} of {} given the communicator of rank {} of {}",
                self.shard.rank,
                self.shard.world,
                comm.rank(),
                comm.world_size()
            )));
        }
        self.whole(self.forward_stage(backend, batch, cache, Some(comm), StageInput::Tokens)?)
    }

    /// Sums a row-parallel partial result over the ranks (nothing on one rank).
    fn all_reduce(&self, backend: &dyn Backend, t: Tensor, comm: Option<&dyn Communicator<[f32]>>) -> Result<Tensor> {
        let Some(comm) = comm else { return Ok(t) };
        let mut values = backend.to_f32_vec(&t)?;
        comm.all_reduce(&mut values, ReduceOp::Sum)?;
        Ok(backend.upload_f32(&values, t.shape().clone(), t.dtype())?)
    }

    /// Embedding rows of `tokens` from this rank's vocabulary rows, summed over the ranks.
    fn embed(&self, backend: &dyn Backend, tokens: &[u32], comm: Option<&dyn Communicator<[f32]>>) -> Result<Tensor> {
        let table = self.embed_tokens.as_ref().ok_or_else(|| Error::Sharding("this stage has no embedding".into()))?;
        let Some(comm) = comm else { return Ok(backend.embedding(table, tokens)?) };
        let vocab = self.shard.vocab(&self.config);
        let local: Vec<u32> =
            tokens.iter().map(|&t| if vocab.contains(&(t as usize)) { t - vocab.start as u32 } else { 0 }).collect();
        let rows = backend.embedding(table, &local)?;
        let h = self.config.hidden_size;
        let mut values = backend.to_f32_vec(&rows)?;
        for (row, &t) in values.chunks_exact_mut(h).zip(tokens) {
            if !vocab.contains(&(t as usize)) {
                row.fill(0.0);
            }
        }
        comm.all_reduce(&mut values, ReduceOp::Sum)?;
        Ok(backend.upload_f32(&values, rows.shape().clone(), rows.dtype())?)
    }

    /// Logits of `hidden` over the whole vocabulary: each rank's rows, gathered. With
    /// `candidates`, each row's `k` most likely tokens among this rank's rows instead
    /// (`[rows, 2k]`, see [`top_candidates`]), nothing gathered.
    fn lm_head(
        &self,
        backend: &dyn Backend,
        hidden: &Tensor,
        comm: Option<&dyn Communicator<[f32]>>,
        candidates: Option<usize>,
    ) -> Result<Tensor> {
        let head = self.lm_head.as_ref().ok_or_else(|| Error::Sharding("this stage has no LM head".into()))?;
        let local = backend.linear(hidden, head, None)?;
        if let Some(k) = candidates {
            let rows = hidden.shape().dims()[0];
            let vocab = self.shard.vocab(&self.config);
            let mine = backend.to_f32_vec(&local)?;
            let out = top_candidates(&mine, vocab.len(), vocab.start, k);
            return Ok(backend.upload_f32(&out, Shape::from([rows, 2 * k]), DType::F32)?);
        }
        let Some(comm) = comm else { return Ok(local) };
        let c = &self.config;
        let rows = hidden.shape().dims()[0];
        let part = self.shard.vocab_part(c);
        let mine = backend.to_f32_vec(&local)?;
        let width = self.shard.vocab(c).len();
        let mut all = vec![f32::NEG_INFINITY; self.shard.world * rows * part];
        let at = self.shard.rank * rows * part;
        for (r, row) in mine.chunks_exact(width.max(1)).take(rows).enumerate() {
            all[at + r * part..][..width].copy_from_slice(row);
        }
        comm.all_gather(&mut all)?;
        let mut logits = vec![0.0f32; rows * c.vocab_size];
        for (r, out) in logits.chunks_exact_mut(c.vocab_size).enumerate() {
            for (v, o) in out.iter_mut().enumerate() {
                let (rank, col) = (v / part, v % part);
                *o = all[rank * rows * part + r * part + col];
            }
        }
        Ok(backend.upload_f32(&logits, Shape::from([rows, c.vocab_size]), DType::F32)?)
    }

    /// Checks `batch` against `cache` and the model without computing anything; what
    /// [`Llama::forward_batch`] refuses, this refuses with the same error.
    pub fn check_batch(&self, batch: &ForwardBatch, cache: &PagedKvCache) -> Result<AttentionBatch> {
        let c = &self.config;
        let n = batch.n_tokens();
        if n == 0 {
            return Err(Error::Backend(flint_tensor::Error::ShapeMismatch {
                op: "forward",
                detail: "no tokens to run".to_string(),
            }));
        }
        if cache.block_size != batch.block_size || cache.keys.len() != self.layers.len() {
            return Err(Error::Backend(flint_tensor::Error::ShapeMismatch {
                op: "forward",
                detail: format!("batch block size {} with cache block size {}", batch.block_size, cache.block_size),
            }));
        }
        if let Some(&p) = batch.positions.iter().find(|&&p| p as usize >= c.max_position_embeddings) {
            return Err(Error::ContextOverflow { needed: p as usize + 1, capacity: c.max_position_embeddings });
        }
        let attention = batch.attention_batch();
        attention.validate("forward", cache.n_blocks)?;
        Ok(attention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Llama3RopeScaling;

    /// Values of `transformers`' `ROPE_INIT_FUNCTIONS["llama3"]` for the Llama-3.1-8B config.
    #[test]
    fn llama3_rope_scaling_matches_transformers() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 131072}"#;
        let mut config = ModelConfig::from_hf_json(json, "test").expect("valid");
        config.rope_scaling = RopeScaling::Llama3(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let inv = rope_inv_freq(&config);
        assert_eq!(inv.len(), 64);
        let want = [
            (0, 1.0),
            (10, 0.12868738174438477),
            (20, 0.016560440883040428),
            (30, 0.0013718936825171113),
            (40, 3.428102354519069e-05),
            (45, 1.2297638932068367e-05),
            (50, 4.411534519022098e-06),
            (63, 3.068925877869333e-07),
        ];
        for (i, w) in want {
            let rel = (inv[i] as f64 - w).abs() / w;
            assert!(rel < 1e-5, "inv_freq[{i}] = {} vs {w}", inv[i]);
        }
    }
}
