//! A one-shot all-reduce over peer-to-peer loads among the GPUs of one process, for the small
//! messages of decode steps (`kernels/allreduce.cu`): one kernel per all-reduce, optionally fused
//! with the residual add and RMSNorm that follow it, capturable in CUDA graphs.
//!
//! Each rank owns two peer-readable input buffers (slots 0 and 1): a producer writes its partial
//! result into [`P2pAllReduce::input`] of a slot, and the all-reduce reads every rank's buffer of
//! that slot. Consecutive all-reduces must alternate slots (see `allreduce.cuh` for why that
//! makes a second barrier unnecessary).

use std::sync::Arc;

use flint_cuda::ops::{self, AR_MAX_BLOCKS, AR_MAX_RANKS, ArPeers};
use flint_cuda::{DeviceBuffer, Gpu, PeerBuffer};

use crate::{Communicator, Error, Result};

/// One rank's side of the peer-to-peer all-reduce.
#[derive(Debug)]
pub struct P2pAllReduce {
    gpu: Arc<Gpu>,
    rank: usize,
    world: usize,
    inputs: [PeerBuffer; 2],
    _flags: PeerBuffer,
    counters: DeviceBuffer,
    peers: [ArPeers; 2],
}

impl P2pAllReduce {
    /// Sets up rank `host.rank()` of `host.world_size()` on `gpu` with input buffers of
    /// `capacity` bytes each; `host` (the ranks' host communicator, same process) carries the
    /// buffer addresses. Every rank gets the same answer: an error on all of them when any pair of
    /// GPUs has no peer-to-peer path.
    pub fn new(gpu: Arc<Gpu>, host: &dyn Communicator<[u32]>, capacity: usize) -> Result<Self> {
        let (rank, world) = (host.rank(), host.world_size());
        if !(2..=AR_MAX_RANKS).contains(&world) {
            return Err(Error::Size { op: "p2p all-reduce", detail: format!("{world} ranks (2 to {AR_MAX_RANKS})") });
        }
        // The ranks' GPUs (a pipeline stage's ranks are not GPUs 0..world).
        let mut ordinals = vec![0u32; world];
        ordinals[rank] = gpu.ordinal() as u32;
        host.all_gather(&mut ordinals)?;
        let mut ok = true;
        for &p in &ordinals {
            ok &= gpu.enable_peer_access(p as usize)?;
        }
        let capacity = capacity.next_multiple_of(16);
        let inputs = [gpu.alloc_peer(capacity)?, gpu.alloc_peer(capacity)?];
        let flags = gpu.alloc_peer(4 * AR_MAX_BLOCKS * AR_MAX_RANKS)?;
        let counters = gpu.zeros(4 * AR_MAX_BLOCKS)?;
        // Zeroed before any peer can learn the addresses and write flags into them.
        gpu.synchronize()?;
        // Per rank: ok, input 0, input 1, flags; addresses as (low, high) u32 halves.
        const FIELDS: usize = 7;
        let mut all = vec![0u32; world * FIELDS];
        let mine = &mut all[rank * FIELDS..(rank + 1) * FIELDS];
        mine[0] = u32::from(ok);
        for (i, ptr) in [inputs[0].ptr(), inputs[1].ptr(), flags.ptr()].into_iter().enumerate() {
            mine[1 + 2 * i] = ptr as u32;
            mine[2 + 2 * i] = (ptr >> 32) as u32;
        }
        host.all_gather(&mut all)?;
        let field = |r: usize, i: usize| {
            let at = r * FIELDS + 1 + 2 * i;
            u64::from(all[at]) | (u64::from(all[at + 1]) << 32)
        };
        if let Some(r) = (0..world).find(|&r| all[r * FIELDS] == 0) {
            return Err(Error::Size {
                op: "p2p all-reduce",
                detail: format!("rank {r}'s GPU cannot reach every other GPU peer to peer"),
            });
        }
        let mut peers = [ArPeers::default(); 2];
        for (slot, p) in peers.iter_mut().enumerate() {
            for r in 0..world {
                p.data[r] = field(r, slot);
                p.flags[r] = field(r, 2);
            }
        }
        // Nobody launches before every rank has its addresses.
        host.barrier()?;
        Ok(P2pAllReduce { gpu, rank, world, inputs, _flags: flags, counters, peers })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Bytes each input buffer holds.
    pub fn capacity(&self) -> usize {
        self.inputs[0].bytes()
    }

    /// Where this rank writes its part of the next all-reduce on `slot` (0 or 1).
    pub fn input(&self, slot: usize) -> u64 {
        self.inputs[slot & 1].ptr()
    }

    fn check(&self, op: &'static str, bf16_values: usize) -> Result<()> {
        if 2 * bf16_values > self.capacity() {
            return Err(Error::Size {
                op,
                detail: format!("{} bytes in buffers of {}", 2 * bf16_values, self.capacity()),
            });
        }
        Ok(())
    }

    /// `out = sum over ranks of input(slot)[..len]` (BF16, `len` a multiple of 8), summed in
    /// rank order on every rank.
    pub fn sum(&self, slot: usize, out: u64, len: usize) -> Result<()> {
        self.check("p2p all-reduce", len)?;
        // One block per 512 vectors of 8 values, up to the flag area's blocks.
        let blocks = (len / 8).div_ceil(512).clamp(1, AR_MAX_BLOCKS);
        ops::ar_sum(&self.gpu, &self.peers[slot & 1], self.counters.ptr(), out, len, self.rank, self.world, blocks)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    /// For `n` rows of `hidden`: `residual += sum over ranks of input(slot)`, then
    /// `out = rms_norm(residual) * weight` (bf16, or FP8 codes with a scale per row), in one
    /// kernel.
    pub fn add_rms_norm(
        &self,
        slot: usize,
        residual: u64,
        weight: u64,
        out: ops::NormOut,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        self.check("p2p all-reduce + RMSNorm", n * hidden)?;
        ops::ar_add_rms_norm(
            &self.gpu,
            &self.peers[slot & 1],
            self.counters.ptr(),
            residual,
            weight,
            out,
            n,
            hidden,
            eps,
            self.rank,
            self.world,
        )?;
        Ok(())
    }
}
