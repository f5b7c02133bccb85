//! All-reduce latency on this machine's GPUs: NCCL, enqueued from the host and replayed from a
//! CUDA graph (how a decode step runs it), over message sizes, checked for the right sum.

use std::sync::Arc;

use flint_cuda::Gpu;
use serde::Serialize;

use crate::{CommType, Communicator, DeviceSlice, Error, NcclComm, NcclId, ReduceOp, Result};

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
}

fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// Times in-place BF16 sum all-reduces of each size in `sizes` (bytes) among GPUs `0..world`,
/// `iters` per timing, median of 5 timings.
pub fn nccl_all_reduce_latency(world: usize, sizes: &[usize], iters: usize) -> Result<Vec<AllReduceRow>> {
    if world < 2 || world > flint_cuda::device_count() {
        return Err(Error::Size {
            op: "all-reduce bench",
            detail: format!("{world} ranks on a machine with {} GPUs", flint_cuda::device_count()),
        });
    }
    let id = NcclId::new()?;
    let sizes = Arc::new(sizes.to_vec());
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let sizes = Arc::clone(&sizes);
            std::thread::spawn(move || -> Result<Vec<AllReduceRow>> {
                let gpu = Gpu::new(rank)?;
                let comm = NcclComm::new(Arc::clone(&gpu), rank, world, &id)?;
                sizes.iter().map(|&bytes| time_one(&gpu, &comm, bytes, iters)).collect()
            })
        })
        .collect();
    let mut results: Vec<Result<Vec<AllReduceRow>>> = handles
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

fn time_one(gpu: &Gpu, comm: &NcclComm, bytes: usize, iters: usize) -> Result<AllReduceRow> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let len = (bytes / 2).max(1);
    let buf = gpu.alloc(2 * len)?;
    let fill = |v: f32| -> Result<()> {
        gpu.write(&buf, 0, &vec![bf16_bits(v); len])?;
        Ok(())
    };
    let mut slice = DeviceSlice::new(buf.ptr(), len, CommType::Bf16);
    // Correctness: ranks hold 1..=world; every element must become their sum (exact in BF16).
    fill((rank + 1) as f32)?;
    comm.all_reduce(&mut slice, ReduceOp::Sum)?;
    let mut got = vec![0u16; len];
    gpu.read(buf.ptr(), &mut got)?;
    let want = bf16_bits((world * (world + 1) / 2) as f32);
    if let Some(i) = got.iter().position(|&g| g != want) {
        return Err(Error::Nccl(format!("all-reduce of {bytes} bytes: element {i} is {:#x}, want {want:#x}", got[i])));
    }
    // Timing on values that stay finite: x -> world * x per all-reduce from 2^-60.
    let mut eager = Vec::new();
    let mut graphed = Vec::new();
    let start = gpu.event()?;
    let end = gpu.event()?;
    fill(f32::powi(2.0, -60))?;
    let graph = gpu.capture(|| {
        for _ in 0..iters {
            let mut s = slice;
            comm.all_reduce(&mut s, ReduceOp::Sum).map_err(|e| flint_cuda::Error::Unsupported(e.to_string()))?;
        }
        Ok(())
    })?;
    for round in 0..6 {
        fill(f32::powi(2.0, -60))?;
        comm.barrier()?;
        start.record(gpu)?;
        for _ in 0..iters {
            comm.all_reduce(&mut slice, ReduceOp::Sum)?;
        }
        end.record(gpu)?;
        end.synchronize()?;
        let eager_ms = start.elapsed_ms(&end)? as f64;
        fill(f32::powi(2.0, -60))?;
        comm.barrier()?;
        start.record(gpu)?;
        graph.launch()?;
        end.record(gpu)?;
        end.synchronize()?;
        let graph_ms = start.elapsed_ms(&end)? as f64;
        if round > 0 {
            eager.push(eager_ms * 1e3 / iters as f64);
            graphed.push(graph_ms * 1e3 / iters as f64);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let graph_us = median(graphed);
    Ok(AllReduceRow {
        bytes: 2 * len,
        eager_us: median(eager),
        graph_us,
        bus_gbs: 2.0 * (world - 1) as f64 / world as f64 * (2 * len) as f64 / (graph_us * 1e-6) / 1e9,
    })
}
