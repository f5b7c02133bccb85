//! All-reduce latency on this machine's GPUs: NCCL, enqueued from the host and replayed from a
//! CUDA graph (how a decode step runs it), against the peer-to-peer one-shot all-reduce
//! ([`P2pAllReduce`], over both of its links), alone and fused with the residual add and RMSNorm
//! that follow it in a model, over message sizes; every variant checked for the right sum first.

use std::sync::Arc;

use flint_cuda::{Gpu, ops};
use serde::Serialize;

use crate::{
    CommType, Communicator, DeviceSlice, Error, LocalComm, NcclComm, NcclId, P2pAllReduce, P2pLink, ReduceOp, Result,
};

/// The row length of the fused timings (Llama-3.3-70B's hidden size): a message of `bytes` is
/// `bytes / 16384` rows.
pub const FUSED_HIDDEN: usize = 8192;

/// The timings of [`all_reduce_latency`] (rank 0's; every rank runs the same).
#[derive(Clone, Debug, Serialize)]
pub struct AllReduceReport {
    pub gpu: String,
    pub ranks: usize,
    pub rows: Vec<AllReduceRow>,
}

/// One message size's timings on rank 0 (every rank runs the same).
#[derive(Clone, Debug, Serialize)]
pub struct AllReduceRow {
    pub bytes: usize,
    /// Host-enqueued, back to back: mean time per all-reduce.
    pub eager_us: f64,
    /// Replayed from a CUDA graph of `iters` all-reduces: mean time per all-reduce.
    pub graph_us: f64,
    /// `2 (world - 1) / world * bytes / graph time`, NCCL's "bus bandwidth".
    pub bus_gbs: f64,
    /// The peer-to-peer one-shot all-reduce (out of place) over the flag link, replayed from a
    /// CUDA graph.
    pub p2p_graph_us: f64,
    /// The same over the push link ([`P2pLink::Lamport`]).
    pub lamport_graph_us: f64,
    /// NCCL all-reduce then the residual-add + RMSNorm kernel, rows of [`FUSED_HIDDEN`], from a
    /// graph (none when the message is not a whole number of rows).
    pub nccl_norm_graph_us: Option<f64>,
    /// The same as one fused peer-to-peer kernel (flag link).
    pub p2p_norm_graph_us: Option<f64>,
    /// The same over the push link.
    pub lamport_norm_graph_us: Option<f64>,
}

fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// Times BF16 sum all-reduces of each size in `sizes` (bytes) among GPUs `0..world`, `iters`
/// per timing, median of 5 timings: NCCL in place, and the peer-to-peer one-shot kernel.
pub fn all_reduce_latency(world: usize, sizes: &[usize], iters: usize) -> Result<AllReduceReport> {
    if world < 2 || world > flint_cuda::device_count() {
        return Err(Error::Size {
            op: "all-reduce bench",
            detail: format!("{world} ranks on a machine with {} GPUs", flint_cuda::device_count()),
        });
    }
    let id = NcclId::new()?;
    let sizes = Arc::new(sizes.to_vec());
    let capacity = sizes.iter().copied().max().unwrap_or(0).next_multiple_of(16);
    let hosts = Arc::new(LocalComm::members(world, std::time::Duration::from_secs(120)));
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let sizes = Arc::clone(&sizes);
            let hosts = Arc::clone(&hosts);
            std::thread::spawn(move || -> Result<AllReduceReport> {
                let host = hosts.take(rank)?;
                let run = || -> Result<AllReduceReport> {
                    let gpu = Gpu::new(rank)?;
                    let comm = NcclComm::new(Arc::clone(&gpu), rank, world, &id)?;
                    let p2p = [
                        P2pAllReduce::new(Arc::clone(&gpu), &host, capacity, P2pLink::Flags)?,
                        P2pAllReduce::new(Arc::clone(&gpu), &host, capacity, P2pLink::Lamport)?,
                    ];
                    let rows: Result<Vec<_>> =
                        sizes.iter().map(|&bytes| time_one(&gpu, &comm, &p2p, bytes, iters)).collect();
                    // Peers may still read this rank's buffers: free them only when all are done.
                    gpu.synchronize()?;
                    host.barrier()?;
                    Ok(AllReduceReport { gpu: gpu.name().to_string(), ranks: world, rows: rows? })
                };
                let rows = run();
                if rows.is_err() {
                    host.abort();
                }
                rows
            })
        })
        .collect();
    let mut results: Vec<Result<AllReduceReport>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err(Error::Nccl("a rank's thread panicked".to_string()))))
        .collect();
    for r in &results[1..] {
        if let Err(e) = r {
            return Err(Error::Nccl(format!("a rank failed: {e}")));
        }
    }
    results.swap_remove(0)
}

/// Median of `rounds` timings (after one warm-up) of `run`, in microseconds per `iters`.
fn timed(
    gpu: &Gpu,
    comm: &NcclComm,
    iters: usize,
    reset: &dyn Fn() -> Result<()>,
    run: &dyn Fn() -> Result<()>,
) -> Result<f64> {
    let start = gpu.event()?;
    let end = gpu.event()?;
    let mut times = Vec::new();
    for round in 0..6 {
        reset()?;
        comm.barrier()?;
        start.record(gpu)?;
        run()?;
        end.record(gpu)?;
        end.synchronize()?;
        if round > 0 {
            times.push(start.elapsed_ms(&end)? as f64 * 1e3 / iters as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn capture(gpu: &Gpu, iters: usize, one: &dyn Fn(usize) -> Result<()>) -> Result<flint_cuda::Graph> {
    Ok(gpu.capture(|| {
        for i in 0..iters {
            one(i).map_err(|e| flint_cuda::Error::Unsupported(e.to_string()))?;
        }
        Ok(())
    })?)
}

fn check_all(gpu: &Gpu, ptr: u64, len: usize, want: u16, what: &str) -> Result<()> {
    let mut got = vec![0u16; len];
    gpu.read(ptr, &mut got)?;
    if let Some(i) = got.iter().position(|&g| g != want) {
        return Err(Error::Nccl(format!("{what}: element {i} is {:#x}, want {want:#x}", got[i])));
    }
    Ok(())
}

fn time_one(gpu: &Gpu, comm: &NcclComm, links: &[P2pAllReduce; 2], bytes: usize, iters: usize) -> Result<AllReduceRow> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let len = (bytes / 2).max(8).next_multiple_of(8);
    let buf = gpu.alloc(2 * len)?;
    let fill = |ptr: u64, v: f32| -> Result<()> {
        let host = vec![bf16_bits(v); len];
        gpu.write_ptr(ptr, &host)?;
        Ok(())
    };
    let slice = DeviceSlice::new(buf.ptr(), len, CommType::Bf16);
    // Correctness: ranks hold 1..=world; every element must become their sum (exact in BF16).
    let want = bf16_bits((world * (world + 1) / 2) as f32);
    fill(buf.ptr(), (rank + 1) as f32)?;
    comm.all_reduce(&mut { slice }, ReduceOp::Sum)?;
    check_all(gpu, buf.ptr(), len, want, &format!("NCCL all-reduce of {bytes} bytes"))?;
    for p2p in links {
        for slot in 0..2 {
            fill(p2p.input(slot), (rank + 1) as f32)?;
            gpu.memset(buf.ptr(), 0, 2 * len)?;
            p2p.sum(slot, buf.ptr(), len)?;
            let what = format!("p2p all-reduce ({} link) of {bytes} bytes, slot {slot}", p2p.link().name());
            check_all(gpu, buf.ptr(), len, want, &what)?;
        }
    }

    // NCCL timings on values that stay finite: x -> world * x per all-reduce from 2^-60.
    let reset = || fill(buf.ptr(), f32::powi(2.0, -60));
    let nccl_one = |_: usize| comm.all_reduce(&mut { slice }, ReduceOp::Sum);
    let eager_us = timed(gpu, comm, iters, &reset, &|| (0..iters).try_for_each(nccl_one))?;
    let graph = capture(gpu, iters, &nccl_one)?;
    let graph_us = timed(gpu, comm, iters, &reset, &|| Ok(graph.launch()?))?;
    // The p2p inputs hold rank + 1 and are only read.
    let mut p2p_graph = [0f64; 2];
    for (t, p2p) in p2p_graph.iter_mut().zip(links) {
        let p2p_one = |i: usize| p2p.sum(i % 2, buf.ptr(), len);
        let graph = capture(gpu, iters, &p2p_one)?;
        *t = timed(gpu, comm, iters, &|| Ok(()), &|| Ok(graph.launch()?))?;
    }

    let rows = len / FUSED_HIDDEN;
    let (mut nccl_norm_graph_us, mut p2p_norm_graph) = (None, [None; 2]);
    if rows > 0 && len.is_multiple_of(FUSED_HIDDEN) && rows <= 64 {
        let residual = gpu.zeros(2 * len)?;
        let normed = gpu.alloc(2 * len)?;
        let weight = gpu.upload(&vec![1.0f32; FUSED_HIDDEN])?;
        // Sums of tiny values keep the residual finite over any number of adds.
        let tiny = |ptr: u64| fill(ptr, f32::powi(2.0, -100));
        let reset = || {
            gpu.memset(residual.ptr(), 0, 2 * len)?;
            tiny(buf.ptr())
        };
        let eps = 1e-5;
        let nccl_norm = |_: usize| -> Result<()> {
            comm.all_reduce(&mut { slice }, ReduceOp::Sum)?;
            flint_cuda::ops::add_rms_norm(
                gpu,
                residual.ptr(),
                buf.ptr(),
                weight.ptr(),
                normed.ptr(),
                rows,
                FUSED_HIDDEN,
                eps,
            )?;
            Ok(())
        };
        let graph = capture(gpu, iters, &nccl_norm)?;
        nccl_norm_graph_us = Some(timed(gpu, comm, iters, &reset, &|| Ok(graph.launch()?))?);
        for (t, p2p) in p2p_norm_graph.iter_mut().zip(links) {
            tiny(p2p.input(0))?;
            tiny(p2p.input(1))?;
            let p2p_norm = |i: usize| {
                p2p.add_rms_norm(
                    i % 2,
                    residual.ptr(),
                    weight.ptr(),
                    ops::NormOut::Bf16(normed.ptr()),
                    rows,
                    FUSED_HIDDEN,
                    eps,
                )
            };
            let graph = capture(gpu, iters, &p2p_norm)?;
            let reset = || Ok(gpu.memset(residual.ptr(), 0, 2 * len)?);
            *t = Some(timed(gpu, comm, iters, &reset, &|| Ok(graph.launch()?))?);
        }
    }
    Ok(AllReduceRow {
        bytes: 2 * len,
        eager_us,
        graph_us,
        bus_gbs: 2.0 * (world - 1) as f64 / world as f64 * (2 * len) as f64 / (graph_us * 1e-6) / 1e9,
        p2p_graph_us: p2p_graph[0],
        lamport_graph_us: p2p_graph[1],
        nccl_norm_graph_us,
        p2p_norm_graph_us: p2p_norm_graph[0],
        lamport_norm_graph_us: p2p_norm_graph[1],
    })
}
