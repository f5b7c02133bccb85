//! Requests and their results, and `Engine`: a model, its tokenizer and its backend, which
//! validates and tokenizes requests and runs them through the [`Scheduler`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use flint_model::cuda::CudaLlama;
use flint_model::{ForwardBatch, Llama, ModelConfig, ModelSource, PagedKvCache, TpGroup};
use flint_tensor::{Backend, DType};
use serde::Serialize;

use crate::sampler::SamplingParams;
use crate::scheduler::{PreparedRequest, Scheduler, SchedulerConfig, StreamEvent, TokenLogprob, Usage};
use crate::{ChatMessage, Error, Result, Tokenizer};

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Text used as is (a BOS is added when the tokenizer adds one).
    Raw(String),
    /// A conversation rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids used as is.
    TokenIds(Vec<u32>),
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Most new tokens to generate (at least 1).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability with this many alternatives; `None`
    /// reports no log-probabilities.
    pub logprobs: Option<usize>,
}

/// Most alternatives a request may ask log-probabilities for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The client cancelled or went away.
    Cancelled,
}

/// The result of a generation.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    /// Generated text, without the stop string or EOS that ended it.
    pub text: String,
    /// Generated ids, including the EOS token when one ended the generation.
    pub token_ids: Vec<u32>,
    pub prompt_token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// The stop string that ended generation, if one did.
    pub stop_string: Option<String>,
    /// The sampling seed used.
    pub seed: u64,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    pub timings: Timings,
}

/// Wall-clock timings of one generation.
#[derive(Clone, Debug, Serialize)]
pub struct Timings {
    /// Time to the first token (prefill and the first sample).
    pub prefill_ms: f64,
    /// Time from the first to the last generated token.
    pub decode_ms: f64,
    /// Tokens generated after the first, per second of decode time.
    pub decode_tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
}

/// Where a model runs.
#[derive(Debug)]
pub enum Runtime {
    /// A [`Llama`] over a [`Backend`] (the CPU reference); KV caches are made per use.
    Backend { backend: Box<dyn Backend>, model: Box<Llama> },
    /// The CUDA runner, which owns its KV cache (sized at load).
    Cuda(Box<CudaLlama>),
    /// A model split over tensor-parallel ranks, each on its own thread with its own cache.
    Parallel(Box<TpGroup>),
}

/// The KV storage a scheduler's block tables index.
#[derive(Debug)]
pub enum KvStore {
    Backend(PagedKvCache),
    /// Blocks `0..n_blocks` of the CUDA runner's own cache.
    Cuda {
        n_blocks: usize,
        block_size: usize,
    },
    /// Blocks `0..n_blocks` of every tensor-parallel rank's cache (`cache_id`: which of the
    /// group's caches, for CPU ranks, which keep one at a time; 0 for caches fixed at load).
    Parallel {
        n_blocks: usize,
        block_size: usize,
        cache_id: u64,
    },
}

/// A step started by [`Executor::submit`].
#[derive(Debug)]
pub enum Submitted {
    /// Run already (one device, or a failure before it started): its logits.
    Done(Result<Vec<f32>>),
    /// In a pipeline's stages.
    InFlight(flint_model::StepTicket),
}

/// Runs forward passes of one engine over one KV store: what [`Scheduler::step`] drives.
#[derive(Debug)]
pub struct Executor<'a> {
    runtime: &'a Runtime,
    kv: &'a KvStore,
}

impl Executor<'_> {
    /// Whether a step asking only for each row's most likely tokens
    /// ([`ForwardBatch::set_candidates`]) saves moving the logits: a GPU picks them on the device
    /// and reads back `2k` floats per row instead of the vocabulary, and ranks that split the
    /// vocabulary exchange those instead of gathering it. The CPU backend samples from its own
    /// logits in place.
    pub fn picks_candidates(&self) -> bool {
        matches!(self.runtime, Runtime::Parallel(_) | Runtime::Cuda(_))
    }

    /// Whether a step may ask for each row's token drawn where its logits are
    /// ([`ForwardBatch::set_draws`]) instead of its logits: one GPU, a group whose output rank
    /// draws on its GPU, or the CPU backend (which draws from its logits by the same rule,
    /// [`flint_model::apply_draws`], so that the scheduler runs the same path everywhere).
    pub fn draws_on_device(&self) -> bool {
        match self.runtime {
            Runtime::Cuda(model) => model.config().vocab_size <= flint_model::MAX_DRAW_VOCAB,
            Runtime::Parallel(group) => group.info().draws_on_device,
            Runtime::Backend { model, .. } => model.config().vocab_size <= flint_model::MAX_DRAW_VOCAB,
        }
    }

    /// How many steps are worth keeping in flight: a pipeline's stages (each works on its own
    /// step), 1 otherwise.
    pub fn pipeline_depth(&self) -> usize {
        match self.runtime {
            Runtime::Parallel(group) => group.pipeline_depth(),
            _ => 1,
        }
    }

    /// Starts one step: on parallel ranks, sends it to them and returns while it runs; on one
    /// device, runs it. Its logits come from [`Executor::collect`], in submission order.
    pub fn submit(&self, batch: &ForwardBatch) -> Submitted {
        match (self.runtime, self.kv) {
            (Runtime::Parallel(group), KvStore::Parallel { cache_id, .. }) => match group.submit_in(batch, *cache_id) {
                Ok(ticket) => Submitted::InFlight(ticket),
                Err(e) => Submitted::Done(Err(e.into())),
            },
            _ => Submitted::Done(self.forward(batch)),
        }
    }

    /// The logits of a submitted step (as [`Executor::forward`]'s).
    pub fn collect(&self, step: Submitted) -> Result<Vec<f32>> {
        match (step, self.runtime) {
            (Submitted::Done(out), _) => out,
            (Submitted::InFlight(ticket), Runtime::Parallel(group)) => Ok(group.collect(ticket)?),
            (Submitted::InFlight(_), _) => {
                Err(Error::Internal("a pipeline step collected from another runtime".into()))
            }
        }
    }

    /// Logits `[batch.logit_rows().len(), vocab]` of one step, on the host (or, for a batch with
    /// draws, the drawn tokens and host rows' logits: [`flint_model::drawn_output_len`]).
    pub fn forward(&self, batch: &ForwardBatch) -> Result<Vec<f32>> {
        match (self.runtime, self.kv) {
            (Runtime::Backend { backend, model }, KvStore::Backend(cache)) => match batch.draws() {
                None => {
                    let logits = model.forward_batch(backend.as_ref(), batch, cache)?;
                    Ok(backend.to_f32_vec(&logits)?)
                }
                Some(draws) => {
                    // The reference model returns logits; the draws are applied to them here.
                    let mut plain = batch.clone();
                    plain.set_draws(None)?;
                    let logits = backend.to_f32_vec(&model.forward_batch(backend.as_ref(), &plain, cache)?)?;
                    Ok(flint_model::apply_draws(draws, &logits, model.config().vocab_size))
                }
            },
            // The runner checks every block id against its cache; the store's share is never larger.
            (Runtime::Cuda(model), KvStore::Cuda { .. }) => {
                model.forward(batch).map_err(|e| Error::Device(e.to_string()))
            }
            (Runtime::Parallel(group), KvStore::Parallel { cache_id, .. }) => Ok(group.forward_in(batch, *cache_id)?),
            _ => Err(Error::Internal("a KV store used with another engine's runtime".to_string())),
        }
    }
}

/// A model, its tokenizer and the runtime it runs on: everything needed to generate.
#[derive(Debug)]
pub struct Engine {
    runtime: Runtime,
    config: ModelConfig,
    tokenizer: Tokenizer,
}

/// Tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

impl Engine {
    /// Loads the checkpoint at `source` onto `backend`.
    pub fn load(
        source: &ModelSource,
        backend: Box<dyn Backend>,
        dtype: DType,
        progress: &mut dyn FnMut(flint_model::LoadProgress),
    ) -> Result<Self> {
        let config = source.config()?;
        let tokenizer = Tokenizer::for_source(source, &config)?;
        let model = Llama::load(source, config.clone(), backend.as_ref(), dtype, progress)?;
        Ok(Engine { runtime: Runtime::Backend { backend, model: Box::new(model) }, config, tokenizer })
    }

    /// An engine over a model already on the GPU, with the checkpoint's tokenizer (or another).
    pub fn with_cuda(model: CudaLlama, tokenizer: Tokenizer) -> Self {
        let config = model.config().clone();
        Engine { runtime: Runtime::Cuda(Box::new(model)), config, tokenizer }
    }

    /// An engine over a tensor-parallel group, with the checkpoint's tokenizer (or another).
    pub fn with_group(group: TpGroup, tokenizer: Tokenizer) -> Self {
        let config = group.config().clone();
        Engine { runtime: Runtime::Parallel(Box::new(group)), config, tokenizer }
    }

    /// On ranks that take steps in order (a pipeline, tensor-parallel ranks), how many steps the
    /// scheduler keeps in flight, each over its own sequences (by default a pipeline's stages);
    /// nothing to change on one device.
    pub fn set_steps_in_flight(&mut self, n: usize) {
        if let Runtime::Parallel(group) = &mut self.runtime {
            group.set_pipeline_depth(n);
        }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The device the model runs on, for messages and metadata (`cpu`, `cuda:0 (NVIDIA H200)`).
    pub fn device(&self) -> String {
        match &self.runtime {
            Runtime::Backend { backend, .. } => backend.device().to_string(),
            Runtime::Cuda(m) => format!("cuda:{} ({})", m.gpu().ordinal(), m.gpu().name()),
            Runtime::Parallel(g) if g.pipeline_stages() > 1 => format!(
                "{} x {} ({} pipeline stages of {} tensor-parallel ranks)",
                g.world_size(),
                g.info().device,
                g.pipeline_stages(),
                g.world_size() / g.pipeline_stages()
            ),
            Runtime::Parallel(g) => format!("{} x {} (tensor parallel)", g.world_size(), g.info().device),
        }
    }

    /// The weights' element type.
    pub fn dtype(&self) -> DType {
        match &self.runtime {
            Runtime::Backend { model, .. } => model.dtype(),
            Runtime::Cuda(_) => DType::BF16,
            Runtime::Parallel(g) => g.info().dtype,
        }
    }

    /// Bytes of KV cache per position.
    pub fn kv_bytes_per_token(&self) -> usize {
        match &self.runtime {
            Runtime::Backend { model, .. } => model.kv_bytes_per_token(),
            Runtime::Cuda(_) => {
                let c = &self.config;
                2 * 2 * c.n_layers * c.n_kv_heads * c.head_dim
            }
            Runtime::Parallel(g) => g.info().kv_bytes_per_token,
        }
    }

    /// Limits a runtime fixes at load: (KV blocks, block size, tokens per step, sequences per
    /// step). `None` for the CPU, which sizes its cache per use.
    pub fn fixed_limits(&self) -> Option<(usize, usize, usize, usize)> {
        match &self.runtime {
            Runtime::Backend { .. } => None,
            Runtime::Cuda(m) => {
                let o = m.options();
                Some((m.n_blocks(), m.block_size(), o.max_batch_tokens, o.max_seqs))
            }
            Runtime::Parallel(g) => g.info().fixed_limits,
        }
    }

    /// Longest sequence this engine runs: the model's context, or less where the GPU runtime
    /// was sized for less.
    pub fn context_len(&self) -> usize {
        match &self.runtime {
            Runtime::Backend { .. } => self.config.max_position_embeddings,
            Runtime::Cuda(m) => self.config.max_position_embeddings.min(m.options().max_seq_len),
            Runtime::Parallel(g) => self.config.max_position_embeddings.min(g.info().max_seq_len),
        }
    }

    /// The executor for steps over `kv`.
    pub fn executor<'a>(&'a self, kv: &'a KvStore) -> Executor<'a> {
        Executor { runtime: &self.runtime, kv }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model and backend of a CPU (backend) engine.
    pub fn backend_model(&self) -> Option<(&Llama, &dyn Backend)> {
        match &self.runtime {
            Runtime::Backend { backend, model } => Some((model.as_ref(), backend.as_ref())),
            Runtime::Cuda(_) | Runtime::Parallel(_) => None,
        }
    }

    /// Ids that end generation.
    pub fn stop_ids(&self) -> BTreeSet<u32> {
        self.tokenizer.stop_ids().clone()
    }

    /// Token ids of a prompt, as generation would feed them.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Raw(text) => self.tokenizer.encode(text, true)?,
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(Error::InvalidRequest("messages must not be empty".to_string()));
                }
                let text = self.tokenizer.apply_chat_template(messages)?;
                self.tokenizer.encode(&text, false)?
            }
            Prompt::TokenIds(ids) => {
                let vocab = self.config().vocab_size;
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(Error::InvalidRequest(format!(
                        "prompt_token_ids: id {bad} is outside the vocabulary of {vocab}"
                    )));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(Error::InvalidRequest("prompt is empty".to_string()));
        }
        Ok(ids)
    }

    /// Validates and tokenizes a request. `max_tokens` is clamped to the context left after the
    /// prompt.
    pub fn prepare(&self, request: &GenerateRequest) -> Result<PreparedRequest> {
        if request.max_tokens == 0 {
            return Err(Error::InvalidRequest("max_tokens must be at least 1".to_string()));
        }
        if let Some(n) = request.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::InvalidRequest(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}")));
        }
        request.sampling.validate()?;
        let prompt_ids = self.prompt_ids(&request.prompt)?;
        let context = self.context_len();
        if prompt_ids.len() >= context {
            return Err(Error::PromptTooLong { prompt_tokens: prompt_ids.len(), context });
        }
        Ok(PreparedRequest {
            max_new_tokens: request.max_tokens.min(context - prompt_ids.len()),
            prompt_ids,
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            ignore_eos: request.ignore_eos,
            logprobs: request.logprobs,
        })
    }

    /// Paged KV storage of `n_blocks` blocks of `block_size` positions: allocated on a backend,
    /// or a share of the CUDA runner's cache (at most what it holds, in its block size).
    pub fn new_kv_cache(&self, n_blocks: usize, block_size: usize) -> Result<KvStore> {
        match &self.runtime {
            Runtime::Backend { backend, model } => {
                Ok(KvStore::Backend(model.new_paged_kv_cache(backend.as_ref(), n_blocks, block_size)?))
            }
            Runtime::Cuda(m) => {
                if block_size != m.block_size() || n_blocks > m.n_blocks() {
                    return Err(Error::InvalidRequest(format!(
                        "the GPU's KV cache holds {} blocks of {} positions; asked for {n_blocks} of {block_size}",
                        m.n_blocks(),
                        m.block_size()
                    )));
                }
                Ok(KvStore::Cuda { n_blocks, block_size })
            }
            Runtime::Parallel(g) => match g.info().fixed_limits {
                None => {
                    let cache_id = g.new_kv_cache(n_blocks, block_size)?;
                    Ok(KvStore::Parallel { n_blocks, block_size, cache_id })
                }
                Some((have, size, _, _)) if block_size != size || n_blocks > have => {
                    Err(Error::InvalidRequest(format!(
                        "each rank's KV cache holds {have} blocks of {size} positions; asked for {n_blocks} of {block_size}"
                    )))
                }
                Some(_) => Ok(KvStore::Parallel { n_blocks, block_size, cache_id: 0 }),
            },
        }
    }

    /// Runs the scheduler until it has no work left.
    pub fn run_to_completion(&self, scheduler: &mut Scheduler<'_>, cache: &KvStore) -> Result<()> {
        while scheduler.has_work() {
            scheduler.step(&self.executor(cache), &self.tokenizer)?;
        }
        Ok(())
    }

    /// Block size and step limits for a single request of `n_positions` positions.
    fn single_request_limits(&self, n_positions: usize, prompt_len: usize) -> (usize, usize, usize) {
        match self.fixed_limits() {
            None => (DEFAULT_BLOCK_SIZE, n_positions.div_ceil(DEFAULT_BLOCK_SIZE), prompt_len.max(1)),
            Some((n_blocks, block_size, max_tokens, _)) => {
                (block_size, n_positions.div_ceil(block_size).min(n_blocks), prompt_len.clamp(1, max_tokens))
            }
        }
    }

    /// Generates for one request on the calling thread, calling `on_text` with each new piece of
    /// text as it is decoded.
    pub fn generate(&self, request: &GenerateRequest, on_text: &mut (dyn FnMut(&str) + Send)) -> Result<Generation> {
        let prepared = self.prepare(request)?;
        let prompt_token_ids = prepared.prompt_ids.clone();
        let n_positions = prepared.prompt_ids.len() + prepared.max_new_tokens;
        let (block_size, n_blocks, max_batch_tokens) = self.single_request_limits(n_positions, prompt_token_ids.len());
        let cache = self.new_kv_cache(n_blocks, block_size)?;
        let config = SchedulerConfig { block_size, n_blocks, max_batch_tokens, max_running: 1, max_waiting: 1 };
        let mut text = String::new();
        let mut token_ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut outcome = None;
        {
            let mut scheduler = Scheduler::new(config, self.stop_ids())?;
            let sink = Box::new(|event: StreamEvent| {
                match event {
                    StreamEvent::Delta { text: piece, token_ids: ids, logprobs: lp } => {
                        if !piece.is_empty() {
                            on_text(&piece);
                        }
                        text.push_str(&piece);
                        token_ids.extend(ids);
                        logprobs.extend(lp);
                    }
                    other => outcome = Some(other),
                }
                true
            });
            scheduler.add(prepared, sink, Arc::new(AtomicBool::new(false)))?;
            self.run_to_completion(&mut scheduler, &cache)?;
        }
        match outcome {
            Some(StreamEvent::Finished { reason, stop_string, usage, seed, time_to_first_token_s, decode_s }) => {
                let decoded_after_first = token_ids.len().saturating_sub(1);
                Ok(Generation {
                    text,
                    token_ids,
                    prompt_token_ids: prompt_token_ids.clone(),
                    finish_reason: reason,
                    stop_string,
                    seed,
                    usage,
                    logprobs,
                    timings: Timings {
                        prefill_ms: time_to_first_token_s * 1e3,
                        decode_ms: decode_s * 1e3,
                        decode_tokens_per_s: if decode_s > 0.0 { decoded_after_first as f64 / decode_s } else { 0.0 },
                        prompt_tokens_per_s: prompt_token_ids.len() as f64 / time_to_first_token_s.max(1e-9),
                    },
                })
            }
            Some(StreamEvent::Error(message)) => Err(Error::Internal(message)),
            _ => Err(Error::Internal("generation ended without a result".to_string())),
        }
    }
}
