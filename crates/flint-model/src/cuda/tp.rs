//! Tensor parallelism on the GPUs of this machine: one [`CudaLlama`] shard per GPU, each on its
//! own thread of a [`TpGroup`], communicating through NCCL.

use std::sync::Arc;

use flint_comm::{Communicator, LocalComm, NcclAbort, NcclComm, NcclId, ReduceOp};
use flint_cuda::Gpu;
use flint_tensor::DType;

use super::llama::{CudaLlama, CudaLlamaOptions, StepOutput};
use crate::tp::{RankInfo, RankModel, TpGroup};
use crate::{Error, ForwardBatch, ModelConfig, ModelSource, Result, Shard};

/// One GPU's rank: its [`CudaLlama`] shard (rank 0 reads the logits back; the others only
/// wait for their step to finish).
#[derive(Debug)]
pub struct CudaRank {
    pub model: CudaLlama,
    abort: NcclAbort,
}

impl RankModel for CudaRank {
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>> {
        if self.model.shard().rank == 0 {
            return self.model.forward(batch);
        }
        match self.model.step_quiet(batch, None)? {
            StepOutput::Logits(l) => Ok(l),
            StepOutput::Tokens(t) => Ok(t.iter().map(|&x| x as f32).collect()),
        }
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
        let abort = self.abort.clone();
        Some(Arc::new(move || abort.abort()))
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

impl TpGroup {
    /// `world` ranks on GPUs `0..world` of this machine, one NCCL communicator among them; each
    /// rank loads its shard.
    pub fn cuda(config: ModelConfig, world: usize, options: CudaLlamaOptions, weights: GroupWeights) -> Result<Self> {
        Shard::check(world, &config)?;
        let id = NcclId::new()?;
        let c = config.clone();
        // The ranks meet on the host before NCCL: a rank that fails to open its GPU or to load
        // aborts this group, and the others stop with an error instead of waiting in NCCL.
        let hosts = LocalComm::members(world, std::time::Duration::from_secs(900));
        Self::spawn(world, 0, config, move |rank| {
            let host = hosts.take(rank)?;
            let built = (|| {
                let gpu = Gpu::new(rank)?;
                tracing::debug!(rank, "GPU open");
                host.barrier()?;
                let comm = NcclComm::new(Arc::clone(&gpu), rank, world, &id)?;
                tracing::debug!(rank, "NCCL joined");
                let abort = comm.abort_handle();
                let agree = |n: usize| -> Result<usize> {
                    tracing::debug!(rank, n, "loaded; agreeing on KV blocks");
                    let mut v = [n.min(u32::MAX as usize) as u32];
                    Communicator::<[u32]>::all_reduce(&host, &mut v[..], ReduceOp::Min)?;
                    Ok(v[0] as usize)
                };
                let model = match &weights {
                    GroupWeights::Checkpoint(source) => {
                        CudaLlama::load_tp(Arc::clone(&gpu), source, c.clone(), options.clone(), comm, &agree)?
                    }
                    GroupWeights::Random(seed) => {
                        CudaLlama::random_tp(Arc::clone(&gpu), c.clone(), options.clone(), *seed, comm, &agree)?
                    }
                };
                Ok::<_, Error>((gpu, model, abort))
            })();
            let (gpu, model, abort) = match built {
                Ok(b) => b,
                Err(e) => {
                    host.abort();
                    return Err(e);
                }
            };
            let info = RankInfo {
                device: format!("cuda:{} ({})", gpu.ordinal(), gpu.name()),
                dtype: if options.fp8 { DType::F8E4M3 } else { DType::BF16 },
                kv_bytes_per_token: model.kv_bytes_per_token(),
                fixed_limits: Some((model.n_blocks(), model.block_size(), options.max_batch_tokens, options.max_seqs)),
                max_seq_len: options.max_seq_len,
            };
            Ok((Box::new(CudaRank { model, abort }) as Box<dyn RankModel>, info))
        })
    }
}
