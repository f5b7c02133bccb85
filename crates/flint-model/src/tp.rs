//! Running a tensor-parallel group: one thread per rank, each owning its shard of the model,
//! its KV cache and its communicator; the caller sees one model.
//!
//! Every step goes to every rank (the same [`ForwardBatch`]); the ranks meet in their
//! collectives, and the output rank's output (rank 0, or a pipeline's last stage) is the
//! group's. Steps may be submitted before earlier ones finish ([`TpGroup::submit`],
//! [`TpGroup::collect`]): every rank takes them in order, so a pipeline's stages work on
//! different steps at once. A request every rank refuses the same way (a bad batch, no cache)
//! is refused before any collective and leaves the group serving; a rank that fails inside a
//! step aborts its communicator, so the others fail too instead of waiting, and the group
//! reports the first failing rank's error (it is unusable from then on).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use flint_comm::{Communicator, LocalComm, TcpComm};
use flint_tensor::{Backend, DType};

use crate::{Error, ForwardBatch, Llama, ModelConfig, ModelSource, PagedKvCache, Result, Shard};

/// What one rank of a group does.
pub trait RankModel: Send {
    /// Runs one step; returns the logits `[batch.logit_rows().len(), vocab]` (the output rank's are used).
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>>;

    /// Makes (or checks) the KV cache the next steps' block tables index.
    fn new_kv_cache(&mut self, n_blocks: usize, block_size: usize) -> Result<()>;

    /// The rank as `Any`, for [`TpGroup::run_on_all`] jobs that need its concrete type.
    fn as_any(&mut self) -> &mut dyn std::any::Any;

    /// Something any thread may call to make this rank's pending and later collectives fail
    /// (for ranks whose collectives have no timeout of their own, like NCCL's).
    fn aborter(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        None
    }
}

/// How long the ranks still running get to answer after one rank failed, before the group
/// aborts their communicators (a rank failing alone leaves the others waiting in a collective;
/// ranks refusing a bad step all answer at once).
const STRAGGLER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Work for every rank: called with the rank and its model; the output rank's values are returned.
pub type RankJob = Arc<dyn Fn(usize, &mut dyn RankModel) -> Result<Vec<f32>> + Send + Sync>;

/// What the group reports about itself (the output rank's view).
#[derive(Clone, Debug)]
pub struct RankInfo {
    /// Device of the rank (`cpu`, `cuda:0 (NVIDIA H200)`).
    pub device: String,
    pub dtype: DType,
    /// KV cache bytes per position on one rank (for a group: the most any rank needs).
    pub kv_bytes_per_token: usize,
    /// (KV blocks, block size, tokens per step, sequences per step) fixed at load, if any.
    pub fixed_limits: Option<(usize, usize, usize, usize)>,
    /// Longest sequence a rank was sized for.
    pub max_seq_len: usize,
    /// Whether the rank draws tokens on its device when a batch asks ([`ForwardBatch::set_draws`]).
    pub draws_on_device: bool,
}

impl RankInfo {
    /// A CPU rank's information: its backend's device, the model's KV bytes, caches sized per
    /// use (no fixed limits), the model's whole context.
    pub fn cpu(backend: &dyn Backend, model: &Llama, dtype: DType) -> Self {
        RankInfo {
            device: backend.device().to_string(),
            dtype,
            kv_bytes_per_token: model.kv_bytes_per_token(),
            fixed_limits: None,
            max_seq_len: model.config().max_position_embeddings,
            draws_on_device: false,
        }
    }
}

enum Command {
    Forward(Arc<ForwardBatch>),
    NewKvCache(usize, usize),
    Run(RankJob),
}

struct Worker {
    commands: Sender<Command>,
    replies: Receiver<Result<Vec<f32>>>,
    handle: Option<JoinHandle<()>>,
    aborter: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// The rank threads and how many steps were sent to them and answered.
struct Workers {
    list: Vec<Worker>,
    /// Steps (and other commands) sent to every rank, and answered by every rank: each rank
    /// answers in the order it was sent, so reply `n` of every rank belongs to command `n`.
    sent: u64,
    answered: u64,
}

/// A step sent to the ranks by [`TpGroup::submit`] and not yet collected: pass it to
/// [`TpGroup::collect`]. One dropped without being collected is skipped (its replies
/// discarded) by the next collect or command.
#[derive(Debug)]
#[must_use = "a submitted step's outputs come from TpGroup::collect"]
pub struct StepTicket {
    id: u64,
    candidates: Option<usize>,
}

/// A model split over `world` ranks, each on its own thread.
pub struct TpGroup {
    /// Locked while commands are sent and while replies are received (not between the two: a
    /// pipeline holds several steps in flight).
    workers: std::sync::Mutex<Workers>,
    /// Steps worth keeping in flight: the pipeline stages (1 for tensor parallelism alone).
    pipeline_depth: usize,
    /// Pipeline stages the ranks form (1 for tensor parallelism alone).
    stages: usize,
    world: usize,
    /// The rank whose outputs are the group's (0; a pipeline's last stage).
    output_rank: usize,
    /// Which [`TpGroup::new_kv_cache`] the ranks' caches come from.
    cache_id: std::sync::atomic::AtomicU64,
    config: ModelConfig,
    info: RankInfo,
}

impl std::fmt::Debug for TpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TpGroup({} ranks on {})", self.world, self.info.device)
    }
}

fn rank_gone(rank: usize) -> Error {
    Error::Sharding(format!("rank {rank}'s thread has exited"))
}

impl TpGroup {
    /// Starts `world` rank threads; thread `r` builds its rank with `make(r)` (on that thread:
    /// device contexts and communicators are joined there) and then serves steps. Rank
    /// `output_rank`'s outputs (and information) are the group's.
    pub fn spawn<F>(world: usize, output_rank: usize, config: ModelConfig, make: F) -> Result<Self>
    where
        F: Fn(usize) -> Result<(Box<dyn RankModel>, RankInfo)> + Send + Sync + 'static,
    {
        if output_rank >= world {
            return Err(Error::Sharding(format!("output rank {output_rank} of {world}")));
        }
        let make = Arc::new(make);
        let mut workers = Vec::with_capacity(world);
        let mut built = Vec::with_capacity(world);
        for rank in 0..world {
            let (commands, command_rx) = channel::<Command>();
            let (reply_tx, replies) = channel::<Result<Vec<f32>>>();
            type Built = (RankInfo, Option<Arc<dyn Fn() + Send + Sync>>);
            let (info_tx, info_rx) = channel::<Result<Built>>();
            let make = make.clone();
            let handle = std::thread::Builder::new()
                .name(format!("flint-tp{rank}"))
                .spawn(move || {
                    let mut model = match make(rank) {
                        Ok((model, info)) => {
                            let _ = info_tx.send(Ok((info, model.aborter())));
                            model
                        }
                        Err(e) => {
                            let _ = info_tx.send(Err(e));
                            return;
                        }
                    };
                    tracing::debug!(rank, "rank ready");
                    while let Ok(command) = command_rx.recv() {
                        // No formatting on the step path unless debug logs are on.
                        let (what, tokens) = match &command {
                            Command::Forward(b) => ("forward", b.n_tokens()),
                            Command::NewKvCache(n, _) => ("new KV cache", *n),
                            Command::Run(_) => ("job", 0),
                        };
                        tracing::debug!(rank, what, tokens, "start");
                        let reply = match command {
                            Command::Forward(batch) => model.forward(&batch),
                            Command::NewKvCache(n, b) => model.new_kv_cache(n, b).map(|()| Vec::new()),
                            Command::Run(job) => job(rank, model.as_mut()),
                        };
                        tracing::debug!(rank, what, ok = reply.is_ok(), "done");
                        if reply_tx.send(reply).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Sharding(format!("cannot start rank {rank}'s thread: {e}")))?;
            workers.push(Worker { commands, replies, handle: Some(handle), aborter: None });
            built.push(info_rx);
        }
        let mut infos = Vec::with_capacity(world);
        let mut first_error = None;
        for (rank, rx) in built.into_iter().enumerate() {
            match rx.recv() {
                Ok(Ok((info, aborter))) => {
                    workers[rank].aborter = aborter;
                    infos.push(info);
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(Error::Sharding(format!("rank {rank}: {e}")));
                }
                Err(_) => {
                    first_error.get_or_insert(rank_gone(rank));
                }
            }
        }
        // Memory is sized per rank: report the rank that needs the most KV cache per position
        // (a pipeline's stages hold different layer counts).
        let kv_max = infos.iter().map(|i| i.kv_bytes_per_token).max().unwrap_or(0);
        let group_info =
            infos.get(output_rank).or(infos.first()).cloned().map(|i| RankInfo { kv_bytes_per_token: kv_max, ..i });
        let group = TpGroup {
            world: workers.len(),
            output_rank,
            workers: std::sync::Mutex::new(Workers { list: workers, sent: 0, answered: 0 }),
            pipeline_depth: 1,
            stages: 1,
            cache_id: std::sync::atomic::AtomicU64::new(0),
            config,
            info: group_info.unwrap_or(RankInfo {
                device: String::new(),
                dtype: DType::F32,
                kv_bytes_per_token: 0,
                fixed_limits: None,
                max_seq_len: 0,
                draws_on_device: false,
            }),
        };
        match first_error {
            Some(e) => Err(e),
            None => Ok(group),
        }
    }

    /// A CPU group over `LocalComm`: rank `r` loads its shard of `source` onto `backend(r)`.
    pub fn cpu(
        source: Arc<ModelSource>,
        config: ModelConfig,
        world: usize,
        dtype: DType,
        backend: impl Fn() -> Box<dyn Backend> + Send + Sync + 'static,
    ) -> Result<Self> {
        Shard::check(world, &config)?;
        let comms = LocalComm::members(world, std::time::Duration::from_secs(600));
        let c = config.clone();
        Self::spawn(world, 0, config, move |rank| {
            let comm = comms.take(rank)?;
            let backend = backend();
            let model =
                Llama::load_shard(&source, c.clone(), backend.as_ref(), dtype, Shard::new(rank, world)?, &mut |_| {})?;
            let info = RankInfo::cpu(backend.as_ref(), &model, dtype);
            let comm = Arc::new(comm);
            Ok((Box::new(CpuRank { backend, model, comm, cache: None }) as Box<dyn RankModel>, info))
        })
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn info(&self) -> &RankInfo {
        &self.info
    }

    /// Sends `command` to every rank: the output rank's values.
    fn broadcast(&self, command: impl Fn() -> Command) -> Result<Vec<f32>> {
        let mut all = self.broadcast_all(command)?;
        Ok(std::mem::take(&mut all[self.output_rank]))
    }

    /// Sends `command` to every rank: every rank's values, or the first failing rank's error.
    /// Steps still in flight are waited for first (their outputs are lost to their tickets).
    fn broadcast_all(&self, command: impl Fn() -> Command) -> Result<Vec<Vec<f32>>> {
        let mut workers = self.lock()?;
        let id = Self::send(&mut workers, command)?;
        Self::receive(&mut workers, id)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Workers>> {
        self.workers.lock().map_err(|_| Error::Sharding("a step panicked".to_string()))
    }

    /// Sends `command` to every rank; its number for [`TpGroup::receive`].
    fn send(workers: &mut Workers, command: impl Fn() -> Command) -> Result<u64> {
        for (rank, w) in workers.list.iter().enumerate() {
            w.commands.send(command()).map_err(|_| rank_gone(rank))?;
        }
        workers.sent += 1;
        Ok(workers.sent - 1)
    }

    /// Every rank's reply to command `id` (after discarding the replies to earlier commands
    /// nobody collected), or the first failing rank's error.
    fn receive(workers: &mut Workers, id: u64) -> Result<Vec<Vec<f32>>> {
        if id < workers.answered || id >= workers.sent {
            return Err(Error::Sharding(format!(
                "step {id} is not waiting for its outputs (steps {}..{} are)",
                workers.answered, workers.sent
            )));
        }
        while workers.answered < id {
            tracing::debug!(step = workers.answered, "discarding an uncollected step's outputs");
            let _ = Self::replies(&workers.list);
            workers.answered += 1;
        }
        let out = Self::replies(&workers.list);
        workers.answered += 1;
        out
    }

    /// One reply from every rank: their values, or the first failing rank's error.
    fn replies(workers: &[Worker]) -> Result<Vec<Vec<f32>>> {
        use std::sync::mpsc::RecvTimeoutError;
        let mut replies: Vec<Option<Result<Vec<f32>>>> = (0..workers.len()).map(|_| None).collect();
        let mut failed_at: Option<std::time::Instant> = None;
        let mut aborted = false;
        while replies.iter().any(Option::is_none) {
            for (rank, w) in workers.iter().enumerate() {
                if replies[rank].is_some() {
                    continue;
                }
                let reply = match w.replies.recv_timeout(std::time::Duration::from_millis(20)) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => Err(rank_gone(rank)),
                };
                if reply.is_err() {
                    failed_at.get_or_insert_with(std::time::Instant::now);
                }
                replies[rank] = Some(reply);
            }
            if let Some(t) = failed_at
                && !aborted
                && t.elapsed() > STRAGGLER_WAIT
            {
                tracing::error!(
                    "a rank failed and others are stuck in a collective: aborting the group's communicators"
                );
                workers.iter().filter_map(|w| w.aborter.as_ref()).for_each(|abort| abort());
                aborted = true;
            }
        }
        // A rank that failed on its own is reported first; the others only saw it abort.
        let mut first_error: Option<(usize, Error)> = None;
        let mut out = Vec::with_capacity(replies.len());
        for (rank, reply) in replies.into_iter().enumerate() {
            match reply {
                Some(Ok(v)) => out.push(v),
                None => return Err(rank_gone(rank)),
                Some(Err(e)) => {
                    let secondary = |e: &Error| {
                        matches!(e, Error::Comm(flint_comm::Error::Aborted(_))) || e.to_string().contains("aborted")
                    };
                    match &first_error {
                        None => first_error = Some((rank, e)),
                        Some((_, prev)) if secondary(prev) && !secondary(&e) => first_error = Some((rank, e)),
                        Some(_) => {}
                    }
                }
            }
        }
        match first_error {
            Some((rank, e)) => Err(Error::Sharding(format!("rank {rank}: {e}"))),
            None => Ok(out),
        }
    }

    /// How many steps are worth keeping in flight ([`TpGroup::submit`] before
    /// [`TpGroup::collect`]): the pipeline's stages, so that each works on its own step; 1
    /// without a pipeline.
    pub fn pipeline_depth(&self) -> usize {
        self.pipeline_depth
    }

    /// The same group, declaring that its ranks form `stages` pipeline stages (a step per stage
    /// in flight: [`TpGroup::pipeline_depth`]).
    pub fn with_pipeline_stages(mut self, stages: usize) -> Self {
        self.stages = stages.max(1);
        self.set_pipeline_depth(stages);
        self
    }

    /// Pipeline stages the ranks form (1 without a pipeline).
    pub fn pipeline_stages(&self) -> usize {
        self.stages
    }

    /// Sets how many steps are worth keeping in flight (at least 1).
    pub fn set_pipeline_depth(&mut self, depth: usize) {
        self.pipeline_depth = depth.max(1);
    }

    /// One step on every rank, over the caches of the latest [`TpGroup::new_kv_cache`]: the
    /// output rank's logits; with [`ForwardBatch::set_candidates`], the candidates of the ranks
    /// holding the LM head (the output rank's stage: ranks `output_rank..world`), merged, so
    /// that no rank gathers the whole vocabulary's logits.
    pub fn forward(&self, batch: &ForwardBatch) -> Result<Vec<f32>> {
        let ticket = self.submit(batch)?;
        self.collect(ticket)
    }

    /// Sends a step to every rank and returns at once: a pipeline's first stage starts it while
    /// the later stages still work on earlier steps. Its outputs (as [`TpGroup::forward`]'s)
    /// come from [`TpGroup::collect`]; steps finish in the order they were submitted, and each
    /// rank works on the KV blocks a step names in that order too, so a block that an earlier
    /// step still writes may be handed to a later step.
    pub fn submit(&self, batch: &ForwardBatch) -> Result<StepTicket> {
        let shared = Arc::new(batch.clone());
        let id = Self::send(&mut *self.lock()?, || Command::Forward(shared.clone()))?;
        Ok(StepTicket { id, candidates: batch.candidates() })
    }

    /// Waits for a submitted step: the output rank's logits (or merged candidates), or the
    /// first failing rank's error. Earlier steps not collected yet are waited for and dropped.
    pub fn collect(&self, ticket: StepTicket) -> Result<Vec<f32>> {
        let mut all = Self::receive(&mut *self.lock()?, ticket.id)?;
        match ticket.candidates {
            None => Ok(std::mem::take(&mut all[self.output_rank])),
            Some(k) => {
                // Ranks that return no rows (a CUDA rank other than the output rank) add nothing.
                let lists: Vec<&[f32]> =
                    all[self.output_rank..].iter().filter(|l| !l.is_empty()).map(Vec::as_slice).collect();
                if lists.is_empty() { Ok(Vec::new()) } else { crate::merge_candidates(&lists, k) }
            }
        }
    }

    /// [`TpGroup::submit`] over the caches `cache_id` names; an error if newer caches replaced
    /// them.
    pub fn submit_in(&self, batch: &ForwardBatch, cache_id: u64) -> Result<StepTicket> {
        self.check_cache(cache_id)?;
        self.submit(batch)
    }

    fn check_cache(&self, cache_id: u64) -> Result<()> {
        let current = self.cache_id.load(std::sync::atomic::Ordering::Acquire);
        if cache_id != current {
            return Err(Error::Sharding(format!(
                "KV cache {cache_id} was replaced by cache {current}: ranks keep one cache at a time"
            )));
        }
        Ok(())
    }

    /// [`TpGroup::forward`] over the caches `cache_id` names; an error if newer caches replaced
    /// them.
    pub fn forward_in(&self, batch: &ForwardBatch, cache_id: u64) -> Result<Vec<f32>> {
        self.check_cache(cache_id)?;
        self.forward(batch)
    }

    /// Runs `job` on every rank at once (each on its own thread, so jobs may meet in
    /// collectives): the output rank's values, or the first failing rank's error.
    pub fn run_on_all(&self, job: RankJob) -> Result<Vec<f32>> {
        self.broadcast(|| Command::Run(job.clone()))
    }

    /// Makes every rank's KV cache for the block tables of the next steps (replacing the
    /// previous ones) and returns its id.
    pub fn new_kv_cache(&self, n_blocks: usize, block_size: usize) -> Result<u64> {
        self.broadcast(|| Command::NewKvCache(n_blocks, block_size))?;
        Ok(self.cache_id.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1)
    }
}

impl Drop for TpGroup {
    fn drop(&mut self) {
        let workers = &mut self.workers.get_mut().unwrap_or_else(|p| p.into_inner()).list;
        for w in workers.iter_mut() {
            // Closing the channel ends the thread's loop.
            let (dead, _) = channel();
            drop(std::mem::replace(&mut w.commands, dead));
        }
        for w in workers.iter_mut() {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// A CPU rank's collectives: [`LocalComm`] among threads, [`TcpComm`] among processes.
pub trait CpuComm: Communicator<[f32]> + Sync + Send {
    /// Makes this rank's pending and later collectives fail (and so the other ranks').
    fn abort(&self);
}

impl CpuComm for LocalComm {
    fn abort(&self) {
        LocalComm::abort(self);
    }
}

impl CpuComm for TcpComm {
    fn abort(&self) {
        TcpComm::abort(self);
    }
}

/// A CPU rank: its shard of a [`Llama`], its backend and cache, and its communicator.
pub(crate) struct CpuRank {
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) model: Llama,
    pub(crate) comm: Arc<dyn CpuComm>,
    pub(crate) cache: Option<PagedKvCache>,
}

impl RankModel for CpuRank {
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>> {
        let cache = self.cache.as_ref().ok_or_else(|| Error::Sharding("no KV cache made yet".to_string()))?;
        self.model.check_batch(batch, cache)?;
        let logits = self
            .model
            .forward_batch_tp(self.backend.as_ref(), batch, cache, &*self.comm)
            .and_then(|l| Ok(self.backend.to_f32_vec(&l)?));
        if logits.is_err() {
            self.comm.abort();
        }
        logits
    }

    fn new_kv_cache(&mut self, n_blocks: usize, block_size: usize) -> Result<()> {
        self.cache = None;
        self.cache = Some(self.model.new_paged_kv_cache(self.backend.as_ref(), n_blocks, block_size)?);
        Ok(())
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn aborter(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        let comm = Arc::clone(&self.comm);
        Some(Arc::new(move || comm.abort()))
    }
}
