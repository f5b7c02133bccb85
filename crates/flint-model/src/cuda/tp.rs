//! Tensor parallelism on the GPUs of this machine: one [`CudaLlama`] shard per GPU, each on its
//! own thread of a [`TpGroup`], communicating through NCCL.

use std::sync::Arc;

use flint_comm::{Communicator, LocalComm, NcclAbort, NcclComm, NcclId, P2pAllReduce, ReduceOp};
use flint_cuda::Gpu;
use flint_tensor::DType;

use super::llama::{CudaLlama, CudaLlamaOptions, Parallel, StageLink, TpLink};
use crate::tp::{RankInfo, RankModel, TpGroup};
use crate::{Error, ForwardBatch, ModelConfig, ModelSource, Result, Shard};

/// One GPU's rank: its [`CudaLlama`] (a tensor-parallel shard, a pipeline stage, or both).
/// The output rank reads the logits back; the others only wait for their step to finish. A
/// pipeline stage runs each step's batch as `micro_batches` pieces in turn, so the stages work
/// on different pieces at once.
#[derive(Debug)]
pub struct CudaRank {
    pub model: CudaLlama,
    aborts: Vec<NcclAbort>,
    output: bool,
    micro_batches: usize,
    /// Every rank of the group, met before the model is dropped: a rank's peer-to-peer buffers
    /// must outlive the other ranks' last reads of them.
    host: Option<LocalComm>,
}

impl Drop for CudaRank {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            if let Err(e) = self.model.gpu().synchronize() {
                tracing::warn!("synchronizing before leaving the group: {e}");
            }
            if let Err(e) = host.barrier() {
                tracing::warn!("leaving the group: {e}");
            }
        }
    }
}

impl RankModel for CudaRank {
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>> {
        // A whole step goes as it is; only pipeline stages cut it (no copy of the batch per step).
        let split;
        let parts: &[ForwardBatch] = if self.micro_batches > 1 {
            split = batch.split(self.micro_batches);
            &split
        } else {
            std::slice::from_ref(batch)
        };
        let mut logits = Vec::new();
        for part in parts {
            if self.output {
                // Whole logits after the all-gather, or (when the batch asks) only their top k,
                // picked on the GPU.
                logits.extend(self.model.forward(part)?);
            } else {
                self.model.step_quiet(part, None)?;
            }
        }
        Ok(logits)
    }

    fn new_kv_cache(&mut self, n_blocks: usize, block_size: usize) -> Result<()> {
        if block_size != self.model.block_size() || n_blocks > self.model.n_blocks() {
            return Err(Error::Sharding(format!(
                "the rank's KV cache holds {} blocks of {}; asked for {n_blocks} of {block_size}",
                self.model.n_blocks(),
                self.model.block_size()
            )));
        }
        Ok(())
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn aborter(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        let aborts = self.aborts.clone();
        Some(Arc::new(move || aborts.iter().for_each(NcclAbort::abort)))
    }
}

/// Where a CUDA group's weights come from.
#[derive(Clone, Debug)]
pub enum GroupWeights {
    Checkpoint(Arc<ModelSource>),
    /// Random weights from this seed (each rank its own).
    Random(u64),
}

/// Runs `f` with rank `r`'s [`CudaRank`] (on rank `r`'s thread); an error on a CPU rank.
pub fn with_cuda_rank<R>(model: &mut dyn RankModel, f: impl FnOnce(&mut CudaRank) -> Result<R>) -> Result<R> {
    match model.as_any().downcast_mut::<CudaRank>() {
        Some(rank) => f(rank),
        None => Err(Error::Sharding("this job runs on CUDA ranks only".to_string())),
    }
}

/// Loads a rank's part of the model on `gpu`; the ranks agree on the KV block count (the
/// smallest any can hold) through `host`, outside NCCL.
fn load_rank(
    gpu: &Arc<Gpu>,
    weights: &GroupWeights,
    config: &ModelConfig,
    options: &CudaLlamaOptions,
    parallel: Parallel,
    host: &dyn Communicator<[u32]>,
) -> Result<CudaLlama> {
    let agree = |n: usize| -> Result<usize> {
        tracing::debug!(rank = host.rank(), n, "loaded; agreeing on KV blocks");
        let mut v = [n.min(u32::MAX as usize) as u32];
        host.all_reduce(&mut v[..], ReduceOp::Min)?;
        Ok(v[0] as usize)
    };
    let (g, c, o) = (Arc::clone(gpu), config.clone(), options.clone());
    match weights {
        GroupWeights::Checkpoint(source) => CudaLlama::load_parallel(g, source, c, o, parallel, &agree),
        GroupWeights::Random(seed) => CudaLlama::random_parallel(g, c, o, *seed, parallel, &agree),
    }
}

/// What a CUDA rank reports to its group.
fn rank_info(gpu: &Gpu, model: &CudaLlama, options: &CudaLlamaOptions) -> RankInfo {
    RankInfo {
        device: format!("cuda:{} ({})", gpu.ordinal(), gpu.name()),
        dtype: if options.fp8 { DType::F8E4M3 } else { DType::BF16 },
        kv_bytes_per_token: model.kv_bytes_per_token(),
        fixed_limits: Some((model.n_blocks(), model.block_size(), options.max_batch_tokens, options.max_seqs)),
        max_seq_len: options.max_seq_len,
        draws_on_device: model.config().vocab_size <= crate::MAX_DRAW_VOCAB,
    }
}

/// Most rows a step may have to use the peer-to-peer all-reduce (decode batches).
pub const P2P_MAX_ROWS: usize = 64;

impl TpGroup {
    /// `world` ranks on GPUs `0..world` of this machine, one NCCL communicator among them; each
    /// rank loads its shard.
    pub fn cuda(config: ModelConfig, world: usize, options: CudaLlamaOptions, weights: GroupWeights) -> Result<Self> {
        let layers = 0..config.n_layers;
        Self::cuda_stages(config, world, vec![layers], 1, options, weights)
    }

    /// `tp * stages.len()` ranks on GPUs `0..` of this machine: rank `stage * tp + t` holds TP
    /// shard `t` of layers `stages[stage]` (the first stage also the embedding, the last the norm
    /// and LM head) and hands its activations to rank `t` of the next stage; each step runs as
    /// `micro_batches` pieces. The output rank is the last stage's first.
    pub fn cuda_stages(
        config: ModelConfig,
        tp: usize,
        stages: Vec<std::ops::Range<usize>>,
        micro_batches: usize,
        options: CudaLlamaOptions,
        weights: GroupWeights,
    ) -> Result<Self> {
        Shard::check(tp, &config)?;
        let pp = stages.len();
        let world = tp * pp;
        if pp == 0 || stages.last().map(|r| r.end) != Some(config.n_layers) || world > flint_cuda::device_count() {
            return Err(Error::Sharding(format!(
                "{tp} x {pp} ranks over layer stages {stages:?} of {} layers on a machine with {} GPUs",
                config.n_layers,
                flint_cuda::device_count()
            )));
        }
        let tp_ids = (0..pp).map(|_| NcclId::new()).collect::<std::result::Result<Vec<_>, _>>()?;
        let pp_ids = (0..tp).map(|_| NcclId::new()).collect::<std::result::Result<Vec<_>, _>>()?;
        let c = config.clone();
        // The ranks meet on the host before NCCL: a rank that fails to open its GPU or to load
        // aborts this group, and the others stop with an error instead of waiting in NCCL.
        let timeout = std::time::Duration::from_secs(900);
        let hosts = LocalComm::members(world, timeout);
        // Per stage, its TP ranks' host links (peer-to-peer buffer addresses).
        let stage_hosts: Vec<_> = (0..pp).map(|_| LocalComm::members(tp, timeout)).collect();
        // Met when the group is dropped (a short wait: a rank that is gone does not come back).
        let leaving = LocalComm::members(world, std::time::Duration::from_secs(30));
        let micro_batches = if pp > 1 { micro_batches.max(1) } else { 1 };
        Self::spawn(world, (pp - 1) * tp, config, move |rank| {
            let (stage, t) = (rank / tp, rank % tp);
            let host = hosts.take(rank)?;
            let stage_host = stage_hosts[stage].take(t)?;
            let leave = leaving.take(rank)?;
            let built = (|| {
                let gpu = Gpu::new(rank)?;
                tracing::debug!(rank, "GPU open");
                host.barrier()?;
                let mut aborts = Vec::new();
                let tp_link = if tp > 1 {
                    let nccl = NcclComm::new(Arc::clone(&gpu), t, tp, &tp_ids[stage])?;
                    aborts.push(nccl.abort_handle());
                    let p2p = if options.p2p_all_reduce {
                        let rows = P2P_MAX_ROWS.min(options.max_batch_tokens);
                        let capacity = 2 * rows * c.hidden_size;
                        match P2pAllReduce::new(Arc::clone(&gpu), &stage_host, capacity, options.p2p_link) {
                            Ok(p) => Some(p),
                            Err(e) => {
                                // Every rank of the stage gets an error (the others an abort).
                                stage_host.abort();
                                tracing::warn!(rank, "no peer-to-peer all-reduce, NCCL only: {e}");
                                None
                            }
                        }
                    } else {
                        None
                    };
                    Some(TpLink { nccl, p2p })
                } else {
                    None
                };
                let stage_link = if pp > 1 {
                    let nccl = NcclComm::new(Arc::clone(&gpu), stage, pp, &pp_ids[t])?;
                    aborts.push(nccl.abort_handle());
                    Some(StageLink { nccl, layers: stages[stage].clone() })
                } else {
                    None
                };
                tracing::debug!(rank, "NCCL joined");
                let parallel = Parallel { tp: tp_link, stage: stage_link };
                let model = load_rank(&gpu, &weights, &c, &options, parallel, &host)?;
                Ok::<_, Error>((gpu, model, aborts))
            })();
            let (gpu, model, aborts) = match built {
                Ok(b) => b,
                Err(e) => {
                    host.abort();
                    return Err(e);
                }
            };
            let info = rank_info(&gpu, &model, &options);
            let output = rank == (pp - 1) * tp;
            let rank_model = CudaRank { model, aborts, output, micro_batches, host: Some(leave) };
            Ok((Box::new(rank_model) as Box<dyn RankModel>, info))
        })
        .map(|group| group.with_pipeline_stages(pp))
    }
}

/// Where a rank of a job over several processes sits: `tp` ranks per pipeline stage, the
/// stages' layer ranges, and how many micro-batches a step is cut into (pipelines only).
#[derive(Clone, Debug)]
pub struct NodeLayout {
    pub tp: usize,
    pub stages: Vec<std::ops::Range<usize>>,
    pub micro_batches: usize,
}

impl NodeLayout {
    pub fn world(&self) -> usize {
        self.tp * self.stages.len()
    }

    /// The rank whose output is the group's: the last stage's first.
    pub fn output_rank(&self) -> usize {
        (self.stages.len().max(1) - 1) * self.tp
    }

    /// Checks that rank 0 of `host` lays the ranks out as this one does: the same world size can
    /// hide a different `--tp` x `--pp` (or other stage bounds), whose ranks would then wait
    /// forever in NCCL calls that never match. Every rank calls it before any NCCL call.
    pub fn check_agreed<C: Communicator<[u32]> + ?Sized>(&self, host: &C, rank: usize) -> Result<()> {
        let mut shape = [self.tp as u32, self.stages.len() as u32, 0, 0];
        for (i, r) in self.stages.iter().enumerate() {
            shape[2] = shape[2].wrapping_mul(31).wrapping_add(r.start as u32 ^ ((i as u32) << 16));
            shape[3] = shape[3].wrapping_mul(31).wrapping_add(r.end as u32);
        }
        let mine = shape;
        host.broadcast(&mut shape[..], 0)?;
        if shape != mine {
            return Err(Error::Sharding(format!(
                "rank {rank}: node 0 lays the ranks out as --tp {} x --pp {} (or over other stages), this node as \
                 --tp {} x --pp {} over stages {:?}: start every node with the same flags",
                shape[0],
                shape[1],
                self.tp,
                self.stages.len(),
                self.stages
            )));
        }
        Ok(())
    }
}

impl CudaRank {
    /// Rank `rank` of a job over several processes ([`crate::remote::Nodes`]) laid out as
    /// `layout` (`tp` ranks per pipeline stage, as [`TpGroup::cuda_stages`] in one process), on
    /// this process's GPU `local_gpu`: joins the ranks' host group ([`flint_comm::TcpComm`] at
    /// the master address), gets the NCCL unique ids of its stage's tensor-parallel group and of
    /// its pipeline (the ranks of its TP index) from rank 0 through it, and loads its part (the
    /// ranks agree on the KV block count through the host group). NCCL all-reduces only: the
    /// peer-to-peer kernel needs every GPU in one process.
    pub fn for_node(
        config: &ModelConfig,
        layout: &NodeLayout,
        rank: usize,
        local_gpu: usize,
        nodes: &crate::remote::Nodes,
        options: &CudaLlamaOptions,
        weights: &GroupWeights,
    ) -> Result<(Self, RankInfo)> {
        let (tp, pp, world) = (layout.tp, layout.stages.len(), layout.world());
        Shard::check(tp, config)?;
        if pp == 0 || layout.stages.last().map(|r| r.end) != Some(config.n_layers) || rank >= world {
            return Err(Error::Sharding(format!(
                "rank {rank} of {tp} x {pp} ranks over layer stages {:?} of {} layers",
                layout.stages, config.n_layers
            )));
        }
        let host = flint_comm::TcpComm::join(&nodes.master_addr, rank, world, nodes.timeout)?;
        let built = (|| {
            layout.check_agreed(&host, rank)?;
            let gpu = Gpu::new(local_gpu)?;
            // Every group's NCCL id from rank 0, as 32 words each: the stages' TP groups, then
            // the TP indices' pipelines.
            let n_ids = if tp > 1 { pp } else { 0 } + if pp > 1 { tp } else { 0 };
            let mut words = vec![0u32; 32 * n_ids];
            if rank == 0 {
                for chunk in words.chunks_exact_mut(32) {
                    let id = NcclId::new()?;
                    for (w, b) in chunk.iter_mut().zip(id.0.chunks_exact(4)) {
                        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
            }
            Communicator::<[u32]>::broadcast(&host, &mut words[..], 0)?;
            let id = |i: usize| {
                let mut id = [0u8; 128];
                for (b, w) in id.chunks_exact_mut(4).zip(&words[32 * i..32 * (i + 1)]) {
                    b.copy_from_slice(&w.to_le_bytes());
                }
                NcclId(id)
            };
            let (stage, t) = (rank / tp, rank % tp);
            let mut aborts = Vec::new();
            // Every rank joins its TP group first, then its pipeline: each group's members
            // call the same sequence, so no group waits on one that cannot start.
            let tp_link = if tp > 1 {
                let nccl = NcclComm::new(Arc::clone(&gpu), t, tp, &id(stage))?;
                aborts.push(nccl.abort_handle());
                Some(TpLink { nccl, p2p: None })
            } else {
                None
            };
            let stage_link = if pp > 1 {
                let first = if tp > 1 { pp } else { 0 };
                let nccl = NcclComm::new(Arc::clone(&gpu), stage, pp, &id(first + t))?;
                aborts.push(nccl.abort_handle());
                Some(StageLink { nccl, layers: layout.stages[stage].clone() })
            } else {
                None
            };
            let parallel = Parallel { tp: tp_link, stage: stage_link };
            let model = load_rank(&gpu, weights, config, options, parallel, &host)?;
            Ok::<_, Error>((gpu, model, aborts))
        })();
        let (gpu, model, aborts) = match built {
            Ok(b) => b,
            Err(e) => {
                host.abort();
                return Err(e);
            }
        };
        let info = rank_info(&gpu, &model, options);
        let micro_batches = if pp > 1 { layout.micro_batches.max(1) } else { 1 };
        let output = rank == layout.output_rank();
        Ok((CudaRank { model, aborts, output, micro_batches, host: None }, info))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn layout(tp: usize, stages: &[std::ops::Range<usize>]) -> NodeLayout {
        NodeLayout { tp, stages: stages.to_vec(), micro_batches: 2 }
    }

    /// Ranks agree when every node was started alike, and one whose flags differ (same world
    /// size, other --tp x --pp, or other stage bounds) is told so instead of hanging.
    #[test]
    fn nodes_must_agree_on_the_layout() {
        let run = |layouts: Vec<NodeLayout>| -> Vec<Result<()>> {
            let comms = LocalComm::group(layouts.len(), Duration::from_secs(20));
            std::thread::scope(|s| {
                let handles: Vec<_> = comms
                    .into_iter()
                    .zip(layouts)
                    .enumerate()
                    .map(|(rank, (comm, l))| s.spawn(move || l.check_agreed(&comm, rank)))
                    .collect();
                handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
            })
        };
        let same = layout(2, &[0..15, 15..30]);
        assert!(run(vec![same.clone(); 4]).iter().all(|r| r.is_ok()));
        for other in [
            layout(4, std::slice::from_ref(&(0..30))),
            layout(1, &[0..8, 8..15, 15..23, 23..30]),
            layout(2, &[0..14, 14..30]),
        ] {
            let results = run(vec![same.clone(), same.clone(), other.clone(), same.clone()]);
            for (rank, r) in results.iter().enumerate() {
                if rank == 2 {
                    let e = r.as_ref().expect_err("a node with other flags").to_string();
                    assert!(e.contains("start every node with the same flags"), "{other:?}: {e}");
                } else {
                    assert!(r.is_ok(), "rank {rank} with rank 0's layout: {r:?}");
                }
            }
        }
    }
}
