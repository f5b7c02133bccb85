//! A one-shot all-reduce over peer-to-peer memory among the GPUs of one process, for the small
//! messages of decode steps (`kernels/allreduce.cu`): one kernel per all-reduce, optionally fused
//! with the residual add and RMSNorm that follow it, capturable in CUDA graphs.
//!
//! Each rank owns two input buffers (slots 0 and 1): a producer writes its partial result into
//! [`P2pAllReduce::input`] of a slot, and the all-reduce of that slot sums every rank's. Two
//! links move the data ([`P2pLink`]): `Flags`, where ranks meet at a flag barrier and read each
//! other's inputs (consecutive all-reduces must then alternate slots; see `allreduce.cuh` for why
//! that makes a second barrier unnecessary), and `Lamport`, where each rank pushes its input into
//! every peer's receive area and waits for the peers' values in its own memory (no barrier and no
//! remote loads; slots need not alternate).

use std::sync::Arc;

use flint_cuda::ops::{self, AR_LAMPORT_EMPTY, AR_MAX_BLOCKS, AR_MAX_RANKS, ArLamport, ArPeers};
use flint_cuda::{DeviceBuffer, Gpu, PeerBuffer};

use crate::{Communicator, Error, Result};

/// How the peer-to-peer all-reduce moves data between GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum P2pLink {
    /// Pull: a flag barrier among the ranks, then every rank reads every rank's input.
    #[default]
    Flags,
    /// Push: every rank writes its input into every peer's receive area, whose places hold a
    /// sentinel until the values land; no barrier, no remote loads (three times `world` input
    /// capacities of receive memory per GPU).
    Lamport,
}

impl P2pLink {
    pub fn name(self) -> &'static str {
        match self {
            P2pLink::Flags => "flags",
            P2pLink::Lamport => "lamport",
        }
    }
}

impl std::str::FromStr for P2pLink {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flags" => Ok(P2pLink::Flags),
            "lamport" => Ok(P2pLink::Lamport),
            _ => Err(format!("{s:?}: the peer-to-peer link is flags or lamport")),
        }
    }
}

/// The buffers of one link.
#[derive(Debug)]
enum Link {
    Flags { _flags: PeerBuffer, counters: DeviceBuffer, peers: [ArPeers; 2] },
    Lamport { _recv: PeerBuffer, _state: DeviceBuffer, bufs: [ArLamport; 2] },
}

/// One rank's side of the peer-to-peer all-reduce.
#[derive(Debug)]
pub struct P2pAllReduce {
    gpu: Arc<Gpu>,
    rank: usize,
    world: usize,
    inputs: [PeerBuffer; 2],
    link: Link,
}

impl P2pAllReduce {
    /// Sets up rank `host.rank()` of `host.world_size()` on `gpu` with input buffers of
    /// `capacity` bytes each, moving data over `link` (every rank must pass the same); `host`
    /// (the ranks' host communicator, same process) carries the buffer addresses. Every rank gets
    /// the same answer: an error on all of them when any pair of GPUs has no peer-to-peer path.
    pub fn new(gpu: Arc<Gpu>, host: &dyn Communicator<[u32]>, capacity: usize, link: P2pLink) -> Result<Self> {
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
        // Pull: the flag area; push: the receive area, three slots of a place per sender.
        let shared = match link {
            P2pLink::Flags => gpu.alloc_peer(4 * AR_MAX_BLOCKS * AR_MAX_RANKS)?,
            P2pLink::Lamport => {
                let recv = gpu.alloc_peer(3 * world * capacity)?;
                gpu.memset_u16(recv.ptr(), AR_LAMPORT_EMPTY, recv.bytes() / 2)?;
                recv
            }
        };
        let counters = gpu.zeros(4 * AR_MAX_BLOCKS)?;
        // Set before any peer can learn the addresses and write into them.
        gpu.synchronize()?;
        // Per rank: ok, link, input 0, input 1, shared area; addresses as (low, high) u32 halves.
        const FIELDS: usize = 8;
        let mut all = vec![0u32; world * FIELDS];
        let mine = &mut all[rank * FIELDS..(rank + 1) * FIELDS];
        mine[0] = u32::from(ok);
        mine[1] = link as u32;
        for (i, ptr) in [inputs[0].ptr(), inputs[1].ptr(), shared.ptr()].into_iter().enumerate() {
            mine[2 + 2 * i] = ptr as u32;
            mine[3 + 2 * i] = (ptr >> 32) as u32;
        }
        host.all_gather(&mut all)?;
        let field = |r: usize, i: usize| {
            let at = r * FIELDS + 2 + 2 * i;
            u64::from(all[at]) | (u64::from(all[at + 1]) << 32)
        };
        if let Some(r) = (0..world).find(|&r| all[r * FIELDS] == 0) {
            return Err(Error::Size {
                op: "p2p all-reduce",
                detail: format!("rank {r}'s GPU cannot reach every other GPU peer to peer"),
            });
        }
        if let Some(r) = (0..world).find(|&r| all[r * FIELDS + 1] != link as u32) {
            return Err(Error::Size { op: "p2p all-reduce", detail: format!("rank {r} was set up with another link") });
        }
        let link = match link {
            P2pLink::Flags => {
                let mut peers = [ArPeers::default(); 2];
                for (slot, p) in peers.iter_mut().enumerate() {
                    for r in 0..world {
                        p.data[r] = field(r, slot);
                        p.flags[r] = field(r, 2);
                    }
                }
                Link::Flags { _flags: shared, counters, peers }
            }
            P2pLink::Lamport => {
                let mut bufs = [ArLamport::default(); 2];
                for (slot, b) in bufs.iter_mut().enumerate() {
                    b.input = inputs[slot].ptr();
                    for r in 0..world {
                        b.recv[r] = field(r, 2);
                    }
                    b.state = counters.ptr();
                    b.cap8 = (capacity / 16) as u64;
                }
                Link::Lamport { _recv: shared, _state: counters, bufs }
            }
        };
        // Nobody launches before every rank has its addresses.
        host.barrier()?;
        Ok(P2pAllReduce { gpu, rank, world, inputs, link })
    }

    pub fn link(&self) -> P2pLink {
        match self.link {
            Link::Flags { .. } => P2pLink::Flags,
            Link::Lamport { .. } => P2pLink::Lamport,
        }
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
        match &self.link {
            Link::Flags { counters, peers, .. } => {
                ops::ar_sum(&self.gpu, &peers[slot & 1], counters.ptr(), out, len, self.rank, self.world, blocks)?
            }
            Link::Lamport { bufs, .. } => {
                ops::arl_sum(&self.gpu, &bufs[slot & 1], out, len, self.rank, self.world, blocks)?
            }
        }
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
        let (rank, world) = (self.rank, self.world);
        match &self.link {
            Link::Flags { counters, peers, .. } => ops::ar_add_rms_norm(
                &self.gpu,
                &peers[slot & 1],
                counters.ptr(),
                residual,
                weight,
                out,
                n,
                hidden,
                eps,
                rank,
                world,
            )?,
            Link::Lamport { bufs, .. } => {
                ops::arl_add_rms_norm(&self.gpu, &bufs[slot & 1], residual, weight, out, n, hidden, eps, rank, world)?
            }
        }
        Ok(())
    }
}
