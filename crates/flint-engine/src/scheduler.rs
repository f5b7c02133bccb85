//! Continuous (in-flight) batching: every step mixes running decodes with chunks of prompts
//! under a token budget, over a paged KV cache with prefix reuse.
//!
//! Policy:
//! - running sequences are served first, oldest first; a sequence still in its prompt gets a
//!   chunk of what the budget leaves after one token for every later decode;
//! - waiting sequences are admitted first come, first served, while the budget, the running
//!   limit and the free blocks allow; a request that does not fit stops admission (no
//!   overtaking, so no starvation);
//! - when a running sequence needs a block and none is free, the most recently arrived running
//!   sequence is preempted: its blocks are released and it waits, first in line by arrival, to
//!   be recomputed. The oldest sequence can therefore always progress: no livelock;
//! - a request whose prompt and output cannot fit the whole cache is refused when submitted;
//! - on a pipeline of P stages, up to P steps are in flight, each over its own sequences (about
//!   a P-th of them), so that every stage works while the next step's tokens are sampled: a
//!   step is submitted for the sequences not in flight, and the oldest step is finished
//!   (sampled, streamed) before a new one is submitted. Sequences in flight are never
//!   preempted; a sequence short of blocks waits for the steps in flight to finish first.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use flint_model::{ForwardBatch, Logits};
use serde::Serialize;

use crate::blocks::{BlockHash, BlockManager};
use crate::detok::StreamDecoder;
use crate::generate::{Executor, Submitted};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::{Error, FinishReason, Result, Tokenizer};

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub n_blocks: usize,
    /// Most tokens run in one step (prompt chunks and decodes together).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; more are refused as overload.
    pub max_waiting: usize,
}

/// A validated, tokenized request, ready to schedule.
#[derive(Clone, Debug)]
pub struct PreparedRequest {
    pub prompt_ids: Vec<u32>,
    /// New tokens to generate at most (already clamped to the model's context).
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Report each token's log-probability with this many alternatives; `None`: no logprobs.
    pub logprobs: Option<usize>,
}

/// The log-probability of a generated token and of the most likely alternatives, under the
/// model's raw distribution (before penalties and temperature).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// `(token_id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Prompt and completion token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a request's stream receives, in order: deltas, then exactly one `Finished` or `Error`.
#[derive(Clone, Debug)]
pub enum StreamEvent {
    /// New tokens and the text they complete (empty while a character or a possible stop
    /// string is incomplete).
    Delta {
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        stop_string: Option<String>,
        usage: Usage,
        seed: u64,
        /// Seconds from submission to the first token, and from the first token to the last.
        time_to_first_token_s: f64,
        decode_s: f64,
    },
    Error(String),
}

/// Receives a request's events; returns `false` once nobody listens (the request is cancelled).
pub type Sink<'a> = Box<dyn FnMut(StreamEvent) -> bool + Send + 'a>;

/// Counts for metrics and health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SchedulerStats {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    pub preemptions: u64,
    pub prefix_hit_tokens: u64,
    /// Steps finished.
    pub steps: u64,
    /// Microseconds spent in [`Scheduler::step`] waiting for the model (running a step, or
    /// collecting one in flight), and the rest of it (scheduling, sampling, streaming): the
    /// host's share of a step, which the GPUs wait for unless a pipeline keeps steps in flight.
    pub model_wait_us: u64,
    pub host_us: u64,
    /// Steps that drew some rows' tokens where the logits are and brought the logits of others
    /// (penalties, log-probabilities) to the host.
    pub mixed_draw_steps: u64,
}

struct Sequence<'a> {
    arrival: u64,
    tokens: Vec<u32>,
    n_prompt: usize,
    /// Positions whose keys and values are in the cache.
    n_computed: usize,
    blocks: Vec<u32>,
    /// Leading blocks registered in the prefix cache, and the hash of the last of them.
    n_hashed: usize,
    last_hash: Option<BlockHash>,
    max_new_tokens: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    ignore_eos: bool,
    logprobs: Option<usize>,
    sink: Sink<'a>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    first_token_at: Option<Instant>,
    /// The step computing this sequence's next positions, while a pipeline runs it.
    in_flight: Option<u64>,
}

impl Sequence<'_> {
    fn n_generated(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }

    fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.n_prompt, completion_tokens: self.n_generated() }
    }

    fn finish(&mut self, reason: FinishReason, stop_string: Option<String>) {
        let now = Instant::now();
        let first = self.first_token_at.unwrap_or(now);
        let event = StreamEvent::Finished {
            reason,
            stop_string,
            usage: self.usage(),
            seed: self.sampler.seed(),
            time_to_first_token_s: (first - self.submitted).as_secs_f64(),
            decode_s: (now - first).as_secs_f64(),
        };
        (self.sink)(event);
    }
}

/// The batching scheduler. Owns the block manager and every request's state; the caller owns
/// the model, the backend and the KV storage and hands them to [`Scheduler::step`].
pub struct Scheduler<'a> {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence<'a>>,
    /// Sorted by arrival.
    running: Vec<Sequence<'a>>,
    next_arrival: u64,
    stop_ids: BTreeSet<u32>,
    preemptions: u64,
    prefix_hit_tokens: u64,
    /// Steps submitted and not yet finished, oldest first.
    in_flight: VecDeque<InFlight>,
    next_step: u64,
    steps: u64,
    mixed_draw_steps: u64,
    model_wait: std::time::Duration,
    host: std::time::Duration,
}

/// A submitted step: what it computes for whom, and the model's handle on it.
struct InFlight {
    planned: Planned,
    step: Submitted,
}

/// What a step computes for whom.
struct Planned {
    id: u64,
    /// `(arrival, new tokens)` per sequence, in batch order.
    plan: Vec<(u64, usize)>,
    /// Per sequence of `plan`: whether the step returns a row for it.
    wants_logits: Vec<bool>,
    /// Each row's `k` most likely tokens came back instead of its logits.
    candidates: Option<usize>,
    /// Per row (in order), when the step drew on the device: whether that row's token came back
    /// (drawn) instead of its logits (a row sampled on the host).
    drawn: Option<Vec<bool>>,
}

impl std::fmt::Debug for Scheduler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("config", &self.config).field("stats", &self.stats()).finish()
    }
}

/// Log-softmax of `logits` at `token` and the `top` most likely entries.
fn logprobs_of(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max as f64 + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln();
    let lp = |id: u32| (logits[id as usize] as f64 - log_sum) as f32;
    let mut best: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(best.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if top > 0 && top < best.len() {
        best.select_nth_unstable_by(top - 1, by_logit);
    }
    best.truncate(top);
    best.sort_unstable_by(by_logit);
    TokenLogprob { token_id: token, logprob: lp(token), top: best.into_iter().map(|id| (id, lp(id))).collect() }
}

impl<'a> Scheduler<'a> {
    /// A scheduler; `stop_ids` end generation unless a request ignores EOS.
    pub fn new(config: SchedulerConfig, stop_ids: BTreeSet<u32>) -> Result<Self> {
        if config.block_size == 0 || config.n_blocks == 0 || config.max_batch_tokens == 0 || config.max_running == 0 {
            return Err(Error::InvalidRequest(format!("scheduler limits must be positive: {config:?}")));
        }
        // Every running sequence must get its decode token each step, or the newest would starve.
        if config.max_batch_tokens < config.max_running {
            return Err(Error::InvalidRequest(format!(
                "max_batch_tokens ({}) must be at least max_running ({})",
                config.max_batch_tokens, config.max_running
            )));
        }
        Ok(Scheduler {
            blocks: BlockManager::new(config.n_blocks, config.block_size),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            stop_ids,
            preemptions: 0,
            prefix_hit_tokens: 0,
            in_flight: VecDeque::new(),
            next_step: 0,
            steps: 0,
            mixed_draw_steps: 0,
            model_wait: std::time::Duration::ZERO,
            host: std::time::Duration::ZERO,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Positions the whole cache holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.config.n_blocks * self.config.block_size
    }

    /// Queues a request. Refuses it when the queue is full or it could never fit the cache.
    pub fn add(&mut self, request: PreparedRequest, sink: Sink<'a>, cancel: Arc<AtomicBool>) -> Result<()> {
        let capacity = self.kv_capacity_tokens();
        let n_prompt = request.prompt_ids.len();
        if n_prompt >= capacity {
            return Err(Error::PromptTooLong { prompt_tokens: n_prompt, context: capacity });
        }
        if n_prompt + request.max_new_tokens > capacity {
            return Err(Error::InvalidRequest(format!(
                "max_tokens: a prompt of {n_prompt} tokens plus {} new tokens exceeds the KV cache of {capacity} tokens",
                request.max_new_tokens
            )));
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(Error::Overloaded(format!("{} requests are already waiting", self.waiting.len())));
        }
        let sampler = Sampler::new(request.sampling, &request.prompt_ids)?;
        let n_prompt = request.prompt_ids.len();
        self.waiting.push_back(Sequence {
            arrival: self.next_arrival,
            tokens: request.prompt_ids,
            n_prompt,
            n_computed: 0,
            blocks: Vec::new(),
            n_hashed: 0,
            last_hash: None,
            max_new_tokens: request.max_new_tokens,
            sampler,
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&request.stop),
            ignore_eos: request.ignore_eos,
            logprobs: request.logprobs,
            sink,
            cancel,
            submitted: Instant::now(),
            first_token_at: None,
            in_flight: None,
        });
        self.next_arrival += 1;
        Ok(())
    }

    /// Whether any request is waiting or running, or a step is in flight.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.in_flight.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_blocks_total: self.blocks.n_blocks(),
            kv_blocks_used: self.blocks.n_used(),
            kv_blocks_cached: self.blocks.n_cached(),
            preemptions: self.preemptions,
            prefix_hit_tokens: self.prefix_hit_tokens,
            steps: self.steps,
            model_wait_us: self.model_wait.as_micros() as u64,
            host_us: self.host.as_micros() as u64,
            mixed_draw_steps: self.mixed_draw_steps,
        }
    }

    fn release_blocks(blocks: &mut BlockManager, seq: &mut Sequence<'_>) {
        for b in seq.blocks.drain(..) {
            blocks.release(b);
        }
        seq.n_computed = 0;
        seq.n_hashed = 0;
        seq.last_hash = None;
    }

    /// Finishes every request whose client went away or asked to stop, freeing its blocks.
    fn reap_cancelled(&mut self) {
        let blocks = &mut self.blocks;
        let mut reap = |seq: &mut Sequence<'_>| {
            let cancelled = seq.cancel.load(Ordering::Relaxed);
            if cancelled {
                Self::release_blocks(blocks, seq);
                seq.finish(FinishReason::Cancelled, None);
            }
            !cancelled
        };
        self.running.retain_mut(&mut reap);
        self.waiting.retain_mut(&mut reap);
    }

    /// Cancels every request (shutdown past its grace period).
    pub fn cancel_all(&mut self) {
        for seq in self.running.iter().chain(self.waiting.iter()) {
            seq.cancel.store(true, Ordering::Relaxed);
        }
        self.reap_cancelled();
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        Self::release_blocks(&mut self.blocks, &mut seq);
        self.preemptions += 1;
        tracing::debug!(arrival = seq.arrival, "preempted for recompute");
        let at = self.waiting.iter().position(|w| w.arrival > seq.arrival).unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.config.block_size)
    }

    /// Picks this step's work: `(arrival, new tokens)` per sequence, in running order, among
    /// the sequences no step in flight holds, at most `max_seqs` of them.
    fn schedule(&mut self, max_seqs: usize) -> Vec<(u64, usize)> {
        let mut plan = Vec::new();
        let mut budget = self.config.max_batch_tokens;
        let pipelined = !self.in_flight.is_empty();
        let mut i = 0;
        while i < self.running.len() && budget > 0 && plan.len() < max_seqs {
            if self.running[i].in_flight.is_some() {
                i += 1;
                continue;
            }
            let later_decodes = self.running[i + 1..]
                .iter()
                .filter(|s| s.in_flight.is_none() && s.tokens.len() - s.n_computed == 1)
                .count()
                .min(max_seqs - plan.len() - 1);
            let seq = &self.running[i];
            let remaining = seq.tokens.len() - seq.n_computed;
            let n_new = if remaining == 1 { 1 } else { remaining.min(budget.saturating_sub(later_decodes).max(1)) };
            let need = self.blocks_for(seq.n_computed + n_new).saturating_sub(seq.blocks.len());
            while self.blocks.n_available() < need {
                // The newest sequence no step holds.
                match (i + 1..self.running.len()).rev().find(|&j| self.running[j].in_flight.is_none()) {
                    Some(j) => self.preempt(j),
                    None => break,
                }
            }
            if self.blocks.n_available() < need {
                if pipelined {
                    // The steps in flight free blocks or let this sequence's turn come again.
                    break;
                }
                self.preempt(i);
                continue;
            }
            let seq = &mut self.running[i];
            for _ in 0..need {
                seq.blocks.push(self.blocks.allocate().expect("availability was checked"));
            }
            plan.push((seq.arrival, n_new));
            budget -= n_new;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.config.max_running && plan.len() < max_seqs {
            let Some(seq) = self.waiting.front_mut() else { break };
            if seq.blocks.is_empty() {
                let (blocks, last_hash) = self.blocks.match_prefix(&seq.tokens);
                seq.n_computed = blocks.len() * self.config.block_size;
                seq.n_hashed = blocks.len();
                seq.last_hash = last_hash;
                seq.blocks = blocks;
            }
            let n_new = (seq.tokens.len() - seq.n_computed).min(budget);
            let need = (seq.n_computed + n_new).div_ceil(self.config.block_size).saturating_sub(seq.blocks.len());
            if self.blocks.n_available() < need {
                Self::release_blocks(&mut self.blocks, seq);
                break;
            }
            for _ in 0..need {
                seq.blocks.push(self.blocks.allocate().expect("availability was checked"));
            }
            let seq = self.waiting.pop_front().expect("front exists");
            self.prefix_hit_tokens += seq.n_computed as u64;
            if seq.n_computed > 0 {
                tracing::debug!(arrival = seq.arrival, reused = seq.n_computed, "prefix cache hit");
            }
            let at = self.running.iter().position(|r| r.arrival > seq.arrival).unwrap_or(self.running.len());
            plan.push((seq.arrival, n_new));
            budget -= n_new;
            self.running.insert(at, seq);
        }
        plan
    }

    fn index_of(&self, arrival: u64) -> Option<usize> {
        self.running.binary_search_by_key(&arrival, |s| s.arrival).ok()
    }

    /// Runs one step: schedules, runs the model once over the batch, samples, streams, and
    /// retires finished requests. Does nothing when there is no work. On a pipeline
    /// ([`Executor::pipeline_depth`] above 1), first submits steps for the sequences no step
    /// holds until that many are in flight, then finishes the oldest.
    pub fn step(&mut self, executor: &Executor<'_>, tokenizer: &Tokenizer) -> Result<()> {
        let start = Instant::now();
        let waited_before = self.model_wait;
        let out = self.step_inner(executor, tokenizer);
        self.host += start.elapsed().saturating_sub(self.model_wait - waited_before);
        out
    }

    fn step_inner(&mut self, executor: &Executor<'_>, tokenizer: &Tokenizer) -> Result<()> {
        self.reap_cancelled();
        let depth = executor.pipeline_depth().max(1);
        while self.in_flight.len() < depth && self.submit(executor, depth)? {}
        match self.in_flight.pop_front() {
            Some(InFlight { planned, step }) => {
                let t = Instant::now();
                let logits = executor.collect(step);
                self.model_wait += t.elapsed();
                self.steps += 1;
                self.finish_step(planned, logits, tokenizer)
            }
            None => Ok(()),
        }
    }

    /// Steps submitted and not yet finished.
    pub fn steps_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Schedules a step and submits it; false when there is nothing to run.
    fn submit(&mut self, executor: &Executor<'_>, depth: usize) -> Result<bool> {
        // A pipeline's steps share the sequences: each takes about a depth-th of them, so that
        // all of them are in flight at once.
        let max_seqs = if depth > 1 {
            let active = (self.running.len() + self.waiting.len()).min(self.config.max_running);
            active.div_ceil(depth).max(1)
        } else {
            usize::MAX
        };
        let plan = self.schedule(max_seqs);
        if plan.is_empty() {
            return Ok(false);
        }
        let mut batch = ForwardBatch::new(self.config.block_size);
        let mut wants_logits = Vec::with_capacity(plan.len());
        for &(arrival, n_new) in &plan {
            let seq = &self.running[self.index_of(arrival).expect("planned sequences run")];
            let end = seq.n_computed + n_new;
            let logits = if end == seq.tokens.len() { Logits::Last } else { Logits::None };
            wants_logits.push(logits == Logits::Last);
            batch.push_sequence(&seq.tokens[seq.n_computed..end], seq.n_computed, &seq.blocks, logits)?;
        }
        // Where the runtime picks candidates on the device (a GPU, or ranks that split the
        // vocabulary) and every sampled row can pick from its most likely tokens alone, only
        // those cross between ranks and to the host.
        let candidates = if executor.picks_candidates() {
            let mut need = Some(0usize);
            for (&(arrival, _), &wants) in plan.iter().zip(&wants_logits) {
                if !wants {
                    continue;
                }
                let seq = &self.running[self.index_of(arrival).expect("planned sequences run")];
                need = match (need, seq.logprobs, seq.sampler.candidates_needed()) {
                    (Some(n), None, Some(k)) => Some(n.max(k)),
                    _ => None,
                };
            }
            need.filter(|&k| (1..=flint_model::MAX_CANDIDATES).contains(&k))
        } else {
            None
        };
        batch.set_candidates(candidates)?;
        // Otherwise, where the runtime can draw on the device, each row whose sampler allows it
        // (no penalties, no log-probabilities) is drawn there with its settings and next uniform
        // draw: one value crosses instead of the vocabulary. The other rows' logits come back
        // for the host, so that one such request does not bring every row's logits with it.
        let drawable = |s: &Scheduler<'_>, arrival: u64| {
            let seq = &s.running[s.index_of(arrival).expect("planned sequences run")];
            seq.logprobs.is_none() && seq.sampler.draws_on_device()
        };
        let draw = candidates.is_none()
            && executor.draws_on_device()
            && plan.iter().zip(&wants_logits).any(|(&(arrival, _), &wants)| wants && drawable(self, arrival));
        let mut drawn = None;
        if draw {
            let mut draws = Vec::with_capacity(plan.len());
            for (&(arrival, _), &wants) in plan.iter().zip(&wants_logits) {
                if wants {
                    let i = self.index_of(arrival).expect("planned sequences run");
                    let seq = &mut self.running[i];
                    draws.push(if seq.logprobs.is_none() { seq.sampler.device_draw() } else { None });
                }
            }
            self.mixed_draw_steps += u64::from(draws.iter().any(Option::is_none));
            drawn = Some(draws.iter().map(Option::is_some).collect());
            batch.set_draws(Some(draws))?;
        }
        let id = self.next_step;
        self.next_step += 1;
        for &(arrival, _) in &plan {
            let i = self.index_of(arrival).expect("planned sequences run");
            self.running[i].in_flight = Some(id);
        }
        // One device runs the step here; a pipeline only hands it to its ranks.
        let t = Instant::now();
        let step = executor.submit(&batch);
        self.model_wait += t.elapsed();
        self.in_flight.push_back(InFlight { planned: Planned { id, plan, wants_logits, candidates, drawn }, step });
        Ok(true)
    }

    /// Takes a finished step's logits: samples, streams, and retires finished requests (those
    /// cancelled meanwhile are gone already).
    fn finish_step(&mut self, planned: Planned, output: Result<Vec<f32>>, tokenizer: &Tokenizer) -> Result<()> {
        let Planned { id, plan, wants_logits, candidates, drawn } = planned;
        let n_rows = wants_logits.iter().filter(|w| **w).count();
        // Where each row's values start in the output, and how many it has.
        let mut spans = Vec::with_capacity(n_rows);
        let output = output.and_then(|l| {
            let fixed =
                |width: usize, spans: &mut Vec<(usize, usize)>| spans.extend((0..n_rows).map(|r| (r * width, width)));
            match (candidates, &drawn) {
                (Some(k), _) if l.len() != n_rows * 2 * k => Err(Error::Internal(format!(
                    "the model returned {} values for {n_rows} rows of {k} candidates",
                    l.len()
                ))),
                (Some(k), _) => {
                    fixed(2 * k, &mut spans);
                    Ok(l)
                }
                (None, Some(drawn)) => {
                    let n_drawn = drawn.iter().filter(|&&d| d).count();
                    let n_host = drawn.len() - n_drawn;
                    let vocab = l.len().checked_sub(n_drawn).and_then(|v| v.checked_div(n_host)).unwrap_or(0);
                    if drawn.len() != n_rows || l.len() != n_drawn + n_host * vocab || (n_host > 0 && vocab == 0) {
                        return Err(Error::Internal(format!(
                            "the model returned {} values for {n_drawn} drawn rows and {n_host} rows of logits",
                            l.len()
                        )));
                    }
                    let mut at = 0;
                    for &d in drawn {
                        let width = if d { 1 } else { vocab };
                        spans.push((at, width));
                        at += width;
                    }
                    Ok(l)
                }
                (None, None) => {
                    fixed(l.len().checked_div(n_rows).unwrap_or(0), &mut spans);
                    Ok(l)
                }
            }
        });
        // The step's sequences that are still here (a cancelled one was reaped meanwhile).
        let mine =
            |s: &Scheduler<'_>, arrival: u64| s.index_of(arrival).filter(|&i| s.running[i].in_flight == Some(id));
        let mut logits = match output {
            Ok(l) => l,
            Err(e) => {
                // The step failed as a whole: fail its requests, keep serving the others.
                tracing::error!(error = %e, "model step failed");
                for &(arrival, _) in &plan {
                    if let Some(i) = mine(self, arrival) {
                        let mut seq = self.running.remove(i);
                        Self::release_blocks(&mut self.blocks, &mut seq);
                        (seq.sink)(StreamEvent::Error(format!("model step failed: {e}")));
                    }
                }
                return Ok(());
            }
        };
        let mut host =
            self.sample_host_rows(id, &plan, &wants_logits, &drawn, candidates.is_some(), &spans, &mut logits);
        let mut row = 0;
        let mut finished = Vec::new();
        for (&(arrival, n_new), wants) in plan.iter().zip(wants_logits) {
            // This sequence's row of the output, if it has one.
            let this_row = wants.then_some(row);
            row += usize::from(wants);
            let Some(i) = mine(self, arrival) else { continue };
            let seq = &mut self.running[i];
            seq.in_flight = None;
            seq.n_computed += n_new;
            let full_blocks = seq.n_computed / self.config.block_size;
            while seq.n_hashed < full_blocks {
                let b = seq.n_hashed;
                let tokens = &seq.tokens[b * self.config.block_size..(b + 1) * self.config.block_size];
                seq.last_hash = Some(self.blocks.register_full(seq.blocks[b], seq.last_hash, tokens));
                seq.n_hashed += 1;
            }
            let Some(r) = this_row else { continue };
            // Sampling applies penalties in place: keep the raw row only when logprobs are asked.
            let (start, width) = spans[r];
            let logit_row = &mut logits[start..start + width];
            let (raw, sampled) = match host.get_mut(r).and_then(Option::take) {
                Some(done) => done,
                None => {
                    let raw = seq.logprobs.map(|top| (top, logit_row.to_vec()));
                    (raw, Self::sample_row(seq, r, &drawn, candidates.is_some(), logit_row))
                }
            };
            let token = match sampled {
                Ok(t) => t,
                Err(e) => {
                    (seq.sink)(StreamEvent::Error(e.to_string()));
                    finished.push(arrival);
                    continue;
                }
            };
            let logprobs = raw.map(|(top, r)| vec![logprobs_of(&r, token, top)]).unwrap_or_default();
            seq.tokens.push(token);
            seq.first_token_at.get_or_insert_with(Instant::now);
            match Self::advance(seq, tokenizer, &self.stop_ids, token, logprobs) {
                Ok(Some((reason, stop_string))) => {
                    seq.finish(reason, stop_string);
                    finished.push(arrival);
                }
                Ok(None) => {}
                Err(e) => {
                    (seq.sink)(StreamEvent::Error(e.to_string()));
                    finished.push(arrival);
                }
            }
        }
        for arrival in finished {
            if let Some(i) = self.index_of(arrival) {
                let mut seq = self.running.remove(i);
                Self::release_blocks(&mut self.blocks, &mut seq);
            }
        }
        Ok(())
    }

    /// One row's token: the device's draw, a pick among its candidates, or one sampled from its
    /// logits on the host (penalties applied in place).
    fn sample_row(
        seq: &mut Sequence<'_>,
        r: usize,
        drawn: &Option<Vec<bool>>,
        candidates: bool,
        logit_row: &mut [f32],
    ) -> Result<u32> {
        if drawn.as_ref().is_some_and(|d| d[r]) {
            drawn_token(logit_row[0]).inspect(|&t| seq.sampler.accept_drawn(t))
        } else if candidates {
            let cands: Vec<(u32, f32)> = flint_model::candidate_pairs(logit_row).collect();
            seq.sampler.sample_candidates(&cands)
        } else {
            seq.sampler.sample(logit_row)
        }
    }

    /// The rows of a step sampled from full logits on the host, where there are several: each
    /// row's sampler and logits are its own, so they run in parallel (a vocabulary's sort is
    /// milliseconds), with the results the loop in `finish_step` would get row by row.
    /// Indexed by row; `None` (or no entry: nothing ran here) where the loop samples the row
    /// itself.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn sample_host_rows(
        &mut self,
        id: u64,
        plan: &[(u64, usize)],
        wants_logits: &[bool],
        drawn: &Option<Vec<bool>>,
        candidates: bool,
        spans: &[(usize, usize)],
        logits: &mut [f32],
    ) -> Vec<Option<(Option<(usize, Vec<f32>)>, Result<u32>)>> {
        use rayon::prelude::*;
        if candidates {
            return Vec::new();
        }
        // Rows on the host, with the running index of their sequence.
        let mut rows = Vec::new();
        let mut row = 0;
        for (&(arrival, _), &wants) in plan.iter().zip(wants_logits) {
            if !wants {
                continue;
            }
            let r = row;
            row += 1;
            let on_host = drawn.as_ref().is_none_or(|d| !d[r]);
            // The sequences the loop will sample (still here, this step's).
            let mine = self.index_of(arrival).filter(|&i| self.running[i].in_flight == Some(id));
            if let Some(i) = mine.filter(|_| on_host && r < spans.len()) {
                rows.push((i, r));
            }
        }
        if rows.len() < 2 {
            return Vec::new();
        }
        // Disjoint borrows: each row's logits and its sequence's sampler.
        let mut slices: Vec<Option<&mut [f32]>> = Vec::with_capacity(spans.len());
        let mut rest = logits;
        let mut at = 0;
        for &(start, width) in spans {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - at);
            let (this, tail) = tail.split_at_mut(width);
            slices.push(Some(this));
            rest = tail;
            at = start + width;
        }
        let mut by_index: Vec<Option<usize>> = vec![None; self.running.len()];
        for &(i, r) in &rows {
            by_index[i] = Some(r);
        }
        let mut work: Vec<(usize, &mut Sampler, Option<usize>, &mut [f32])> = self
            .running
            .iter_mut()
            .zip(&by_index)
            .filter_map(|(seq, r)| {
                let r = (*r)?;
                Some((r, &mut seq.sampler, seq.logprobs, slices[r].take()?))
            })
            .collect();
        let done: Vec<(usize, Option<(usize, Vec<f32>)>, Result<u32>)> = work
            .par_iter_mut()
            .map(|(r, sampler, logprobs, row)| {
                let raw = logprobs.map(|top| (top, row.to_vec()));
                (*r, raw, sampler.sample(row))
            })
            .collect();
        let mut out: Vec<Option<_>> = (0..spans.len()).map(|_| None).collect();
        for (r, raw, sampled) in done {
            out[r] = Some((raw, sampled));
        }
        out
    }

    /// Streams a newly sampled token and says whether the sequence is done.
    fn advance(
        seq: &mut Sequence<'_>,
        tokenizer: &Tokenizer,
        stop_ids: &BTreeSet<u32>,
        token: u32,
        logprobs: Vec<TokenLogprob>,
    ) -> Result<Option<(FinishReason, Option<String>)>> {
        let mut text = String::new();
        let mut done = None;
        if !seq.ignore_eos && stop_ids.contains(&token) {
            done = Some((FinishReason::Stop, None));
        } else {
            let piece = seq.decoder.push(tokenizer, token)?;
            let scan = seq.stops.push(&piece);
            text.push_str(&scan.emit);
            if scan.matched.is_some() {
                done = Some((FinishReason::Stop, scan.matched));
            } else if seq.n_generated() >= seq.max_new_tokens {
                done = Some((FinishReason::Length, None));
            }
        }
        if let Some((_, None)) = &done {
            // Flush what the decoder and the stop matcher held back.
            let tail = seq.decoder.finish(tokenizer)?;
            let scan = seq.stops.push(&tail);
            text.push_str(&scan.emit);
            if scan.matched.is_some() {
                done = Some((FinishReason::Stop, scan.matched));
            } else {
                text.push_str(&seq.stops.finish());
            }
        }
        let alive = (seq.sink)(StreamEvent::Delta { text, token_ids: vec![token], logprobs });
        if !alive {
            seq.cancel.store(true, Ordering::Relaxed);
        }
        Ok(done)
    }
}

/// A drawn row's value: the token id the device picked, as f32.
fn drawn_token(v: f32) -> Result<u32> {
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as usize) < flint_model::MAX_DRAW_VOCAB {
        Ok(v as u32)
    } else {
        Err(Error::Internal(format!("the device drew {v}, which is no token id")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_would_starve_decodes_are_refused() {
        let config = |max_batch_tokens, max_running| SchedulerConfig {
            block_size: 16,
            n_blocks: 8,
            max_batch_tokens,
            max_running,
            max_waiting: 8,
        };
        let err = Scheduler::new(config(8, 16), BTreeSet::new()).expect_err("8 tokens cannot serve 16 decodes");
        assert!(err.to_string().contains("max_running"), "{err}");
        assert!(Scheduler::new(config(16, 16), BTreeSet::new()).is_ok());
        assert!(Scheduler::new(config(16, 0), BTreeSet::new()).is_err());
    }
}
