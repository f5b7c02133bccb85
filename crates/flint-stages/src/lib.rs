//! Pipeline parallelism: the decoder layers split into stages, each stage on its own ranks,
//! activations handed from stage to stage with [`Communicator`] send/recv, and a step's batch
//! cut into micro-batches so that every stage works while the others do.
//!
//! A stage may itself be tensor-parallel (TP x PP): rank `stage * tp + t` holds TP shard `t` of
//! the stage's layers and hands its activations to rank `t` of the next stage (every TP rank
//! holds the whole hidden state after its all-reduces). The group runs as a
//! [`flint_model::TpGroup`] whose output rank is the last stage's first rank, so the engine and
//! its scheduler drive it like any other model: requests join and leave between steps, and
//! each step's sequences flow through the stages as micro-batches.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use flint_comm::{Communicator, LocalComm, Members};
use flint_model::{
    ForwardBatch, Llama, ModelConfig, ModelSource, PagedKvCache, RankInfo, RankModel, Shard, StageInput, StageOutput,
    TpGroup,
};
use flint_tensor::{Backend, DType};

/// Errors of stage planning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pipeline: {0}")]
    Plan(String),
    #[error(transparent)]
    Model(#[from] flint_model::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which decoder layers each stage runs, and what each stage costs.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    pub stages: Vec<Range<usize>>,
    /// Estimated cost of each stage (weights read per step, in parameters).
    pub costs: Vec<f64>,
}

impl StagePlan {
    /// Stages of contiguous layers that minimise the costliest stage, from a cost per layer and
    /// the extra cost of the first stage (the embedding lookup) and the last (the final norm and
    /// the LM head). Every stage gets at least one layer.
    pub fn from_costs(layer_costs: &[f64], first_extra: f64, last_extra: f64, n_stages: usize) -> Result<Self> {
        let n = layer_costs.len();
        if n_stages == 0 || n_stages > n {
            return Err(Error::Plan(format!("{n_stages} stages for {n} layers (each stage needs a layer)")));
        }
        let prefix: Vec<f64> = std::iter::once(0.0)
            .chain(layer_costs.iter().scan(0.0, |acc, &c| {
                *acc += c;
                Some(*acc)
            }))
            .collect();
        let cost = |from: usize, to: usize, stage: usize| {
            prefix[to] - prefix[from]
                + if stage == 0 { first_extra } else { 0.0 }
                + if stage + 1 == n_stages { last_extra } else { 0.0 }
        };
        // best[s][i]: the smallest possible costliest stage when stages 0..s cover layers 0..i.
        let mut best = vec![vec![f64::INFINITY; n + 1]; n_stages + 1];
        let mut cut = vec![vec![0usize; n + 1]; n_stages + 1];
        best[0][0] = 0.0;
        for s in 1..=n_stages {
            for i in s..=n - (n_stages - s) {
                for j in (s - 1)..i {
                    let v = best[s - 1][j].max(cost(j, i, s - 1));
                    if v < best[s][i] {
                        best[s][i] = v;
                        cut[s][i] = j;
                    }
                }
            }
        }
        let mut stages = vec![0..0; n_stages];
        let mut end = n;
        for s in (1..=n_stages).rev() {
            let start = cut[s][end];
            stages[s - 1] = start..end;
            end = start;
        }
        let costs = stages.iter().enumerate().map(|(s, r)| cost(r.start, r.end, s)).collect();
        Ok(StagePlan { stages, costs })
    }

    /// A plan for `config` estimated from the weights each stage reads per step: a decoder layer's
    /// parameters, the LM head's on the last stage (the embedding is a row lookup).
    pub fn balanced(config: &ModelConfig, n_stages: usize) -> Result<Self> {
        let c = config;
        let h = c.hidden_size as f64;
        let (q, kv) = ((c.n_heads * c.head_dim) as f64, (c.n_kv_heads * c.head_dim) as f64);
        let layer = h * (2.0 * q + 2.0 * kv) + 3.0 * h * c.intermediate_size as f64;
        let head = c.vocab_size as f64 * h;
        Self::from_costs(&vec![layer; c.n_layers], 0.0, head, n_stages)
    }

    pub fn n_stages(&self) -> usize {
        self.stages.len()
    }
}

/// A CPU pipeline (optionally tensor-parallel per stage) over `LocalComm`: `tp * plan.n_stages()`
/// rank threads, each loading its stage's layers (its TP shard of them) onto `backend()`.
/// `micro_batches` is how many pieces each step's batch is cut into (at most its sequences).
pub fn pipeline_cpu(
    source: Arc<ModelSource>,
    config: ModelConfig,
    tp: usize,
    plan: StagePlan,
    micro_batches: usize,
    dtype: DType,
    backend: impl Fn() -> Box<dyn Backend> + Send + Sync + 'static,
) -> Result<TpGroup> {
    Shard::check(tp, &config)?;
    let pp = plan.n_stages();
    if pp == 0 || plan.stages.last().map(|r| r.end) != Some(config.n_layers) {
        return Err(Error::Plan(format!("the plan {:?} does not cover {} layers", plan.stages, config.n_layers)));
    }
    let timeout = Duration::from_secs(600);
    // One TP group per stage, one PP group per TP index.
    let tp_groups: Vec<Members> = (0..pp).map(|_| LocalComm::members(tp, timeout)).collect();
    let pp_groups: Vec<Members> = (0..tp).map(|_| LocalComm::members(pp, timeout)).collect();
    let c = config.clone();
    let micro_batches = micro_batches.max(1);
    let group = TpGroup::spawn(tp * pp, (pp - 1) * tp, config, move |rank| {
        let (stage, t) = (rank / tp, rank % tp);
        let tp_comm = tp_groups[stage].take(t)?;
        let pp_comm = pp_groups[t].take(stage)?;
        let backend = backend();
        let layers = plan.stages[stage].clone();
        let shard = Shard::new(t, tp)?;
        let model = Llama::load_part(&source, c.clone(), backend.as_ref(), dtype, shard, layers, &mut |_| {})?;
        let info = RankInfo::cpu(backend.as_ref(), &model, dtype);
        let rank_model =
            StageRank { backend, model, tp_comm, pp_comm, stage, n_stages: pp, micro_batches, cache: None };
        Ok((Box::new(rank_model) as Box<dyn RankModel>, info))
    })?;
    Ok(group.with_pipeline_stages(pp))
}

/// A GPU pipeline (optionally tensor-parallel per stage) on GPUs `0..tp * plan.n_stages()` of
/// this machine, over NCCL: rank `stage * tp + t` on GPU `stage * tp + t` loads its stage's
/// layers (its TP shard of them); activations go to the next stage with NCCL send/recv (captured
/// in the decode graphs) and each step runs as `micro_batches` pieces.
pub fn pipeline_cuda(
    config: ModelConfig,
    tp: usize,
    plan: StagePlan,
    micro_batches: usize,
    options: flint_model::cuda::CudaLlamaOptions,
    weights: flint_model::cuda::GroupWeights,
) -> Result<TpGroup> {
    if plan.stages.last().map(|r| r.end) != Some(config.n_layers) {
        return Err(Error::Plan(format!("the plan {:?} does not cover {} layers", plan.stages, config.n_layers)));
    }
    Ok(TpGroup::cuda_stages(config, tp, plan.stages, micro_batches, options, weights)?)
}

/// One rank of a pipeline stage.
struct StageRank {
    backend: Box<dyn Backend>,
    model: Llama,
    /// Among the stage's TP ranks.
    tp_comm: LocalComm,
    /// Among the stages, for this TP index (rank = stage).
    pp_comm: LocalComm,
    stage: usize,
    n_stages: usize,
    micro_batches: usize,
    cache: Option<PagedKvCache>,
}

impl StageRank {
    fn run(&self, batch: &ForwardBatch, cache: &PagedKvCache) -> flint_model::Result<Vec<f32>> {
        let h = self.model.config().hidden_size;
        let tp: Option<&dyn Communicator<[f32]>> =
            if self.model.shard().is_single() { None } else { Some(&self.tp_comm) };
        let mut logits = Vec::new();
        for part in batch.split(self.micro_batches) {
            let n = part.n_tokens();
            let mut received = Vec::new();
            let input = if self.stage == 0 {
                StageInput::Tokens
            } else {
                received.resize(2 * n * h, 0.0f32);
                self.pp_comm.recv(&mut received[..], self.stage - 1)?;
                let (residual, pending) = received.split_at(n * h);
                StageInput::Hidden { residual, pending }
            };
            match self.model.forward_stage(self.backend.as_ref(), &part, cache, tp, input)? {
                StageOutput::Hidden { mut residual, pending } => {
                    residual.extend_from_slice(&pending);
                    self.pp_comm.send(&residual[..], self.stage + 1)?;
                }
                StageOutput::Logits(t) => logits.extend(self.backend.to_f32_vec(&t)?),
            }
        }
        Ok(logits)
    }
}

impl RankModel for StageRank {
    fn forward(&mut self, batch: &ForwardBatch) -> flint_model::Result<Vec<f32>> {
        let cache =
            self.cache.as_ref().ok_or_else(|| flint_model::Error::Sharding("no KV cache made yet".to_string()))?;
        // Refused the same way on every rank, before anything is sent.
        self.model.check_batch(batch, cache)?;
        let out = self.run(batch, cache);
        if out.is_err() {
            self.tp_comm.abort();
            self.pp_comm.abort();
        }
        debug_assert!(self.stage < self.n_stages);
        out
    }

    fn new_kv_cache(&mut self, n_blocks: usize, block_size: usize) -> flint_model::Result<()> {
        self.cache = None;
        self.cache = Some(self.model.new_paged_kv_cache(self.backend.as_ref(), n_blocks, block_size)?);
        Ok(())
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_layers_split_evenly_and_a_heavy_head_shortens_the_last_stage() {
        let plan = StagePlan::from_costs(&[1.0; 12], 0.0, 0.0, 3).expect("plan");
        assert_eq!(plan.stages, vec![0..4, 4..8, 8..12]);
        // The head costs three layers: the last stage takes fewer layers.
        let plan = StagePlan::from_costs(&[1.0; 12], 0.0, 3.0, 3).expect("plan");
        assert_eq!(plan.stages, vec![0..5, 5..10, 10..12]);
        assert_eq!(plan.costs, vec![5.0, 5.0, 5.0]);
        let plan = StagePlan::from_costs(&[1.0, 9.0, 1.0, 1.0], 0.0, 0.0, 2).expect("plan");
        assert_eq!(plan.stages, vec![0..2, 2..4]);
    }

    #[test]
    fn every_plan_covers_every_layer_once_and_is_no_worse_than_even_counts() {
        for n in 1..20usize {
            for p in 1..=n.min(6) {
                let costs: Vec<f64> = (0..n).map(|i| 1.0 + (i * 7 % 5) as f64).collect();
                let plan = StagePlan::from_costs(&costs, 0.5, 4.0, p).expect("plan");
                let covered: Vec<usize> = plan.stages.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(covered, (0..n).collect::<Vec<_>>());
                assert!(plan.stages.iter().all(|r| !r.is_empty()));
                let worst = plan.costs.iter().copied().fold(0.0, f64::max);
                // Even layer counts as a baseline.
                let even: Vec<Range<usize>> = (0..p).map(|s| s * n / p..(s + 1) * n / p).collect();
                let even_worst = even
                    .iter()
                    .enumerate()
                    .map(|(s, r)| {
                        costs[r.clone()].iter().sum::<f64>()
                            + if s == 0 { 0.5 } else { 0.0 }
                            + if s + 1 == p { 4.0 } else { 0.0 }
                    })
                    .fold(0.0, f64::max);
                assert!(worst <= even_worst + 1e-9, "{n} layers, {p} stages: {worst} > {even_worst}");
            }
        }
        assert!(StagePlan::from_costs(&[1.0; 3], 0.0, 0.0, 4).is_err());
    }
}
