//! Measurements of the CUDA backend on the machine it runs on: copy bandwidth, cuBLASLt's BF16
//! matrix rate, the model's prefill GEMMs, and end-to-end TTFT and decode latency per batch size
//! for a model. Timings use CUDA events or a host clock after synchronising; medians of many runs.

use std::time::Instant;

use flint_cuda::Gpu;
use flint_cuda::gemm::{Gemm, GemmOut};
use flint_cuda::ops::{self, DeviceSampling};
use serde::Serialize;

use super::{CudaLlama, StepOutput};
use crate::{Error, ForwardBatch, Logits, Result};

fn unsupported(message: String) -> Error {
    Error::Cuda(flint_cuda::Error::Unsupported(message))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Times `f` with CUDA events around `reps` calls; returns the median milliseconds per call over
/// `rounds` rounds.
fn time_events(gpu: &Gpu, rounds: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = gpu.event()?;
    let end = gpu.event()?;
    f()?;
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        start.record(gpu)?;
        for _ in 0..reps {
            f()?;
        }
        end.record(gpu)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64 / reps as f64);
    }
    Ok(median(times))
}

/// Device-to-device copy bandwidth, bytes read plus bytes written per second, over `bytes`-sized
/// buffers filled with random data.
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let src = gpu.alloc(bytes)?;
    let dst = gpu.alloc(bytes)?;
    ops::fill_uniform(gpu, src.ptr(), bytes / 2, 7, 0.0, 1.0)?;
    let ms = time_events(gpu, 9, 5, || Ok(gpu.copy(dst.ptr(), src.ptr(), bytes)?))?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3))
}

/// One GEMM shape's rate.
#[derive(Clone, Debug, Serialize)]
pub struct GemmRate {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ms: f64,
    pub tflops: f64,
}

/// `copies` random BF16 `[rows, k]` weights.
fn bf16_weight_copies(gpu: &Gpu, copies: usize, rows: usize, k: usize) -> Result<Vec<flint_cuda::DeviceBuffer>> {
    (0..copies)
        .map(|i| {
            let w = gpu.alloc(2 * rows * k)?;
            ops::fill_uniform(gpu, w.ptr(), rows * k, 13 + i as u64, 0.0, 0.02)?;
            Ok(w)
        })
        .collect()
}

/// `copies` random FP8 `[rows, k]` weights with per-row scales, quantized through `tmp` (at
/// least `2 * rows * k` bytes).
fn fp8_weight_copies(
    gpu: &Gpu,
    tmp: &flint_cuda::DeviceBuffer,
    copies: usize,
    rows: usize,
    k: usize,
) -> Result<Vec<(flint_cuda::DeviceBuffer, flint_cuda::DeviceBuffer)>> {
    (0..copies)
        .map(|i| {
            let (w, sc) = (gpu.alloc(rows * k)?, gpu.alloc(4 * rows)?);
            ops::fill_uniform(gpu, tmp.ptr(), rows * k, 13 + i as u64, 0.0, 0.02)?;
            ops::quantize_rows(gpu, tmp.ptr(), w.ptr(), sc.ptr(), rows, k)?;
            Ok((w, sc))
        })
        .collect()
}

/// Times `y[m, n] = x[m, k] . w[n, k]^T` in BF16 through cuBLASLt on random data, rotating
/// through enough weight copies that the L2 cache does not hold them.
pub fn gemm_rate(gpu: &Gpu, gemm: &Gemm, name: &str, m: usize, n: usize, k: usize) -> Result<GemmRate> {
    let copies = (256usize << 20).div_ceil(2 * n * k).clamp(1, 8);
    let x = gpu.alloc(2 * m * k)?;
    let y = gpu.alloc(2 * m * n)?;
    ops::fill_uniform(gpu, x.ptr(), m * k, 11, 0.0, 1.0)?;
    let ws = bf16_weight_copies(gpu, copies, n, k)?;
    let mut i = 0;
    let ms = time_events(gpu, 7, 10, || {
        i = (i + 1) % copies;
        Ok(gemm.matmul(gpu, x.ptr(), ws[i].ptr(), y.ptr(), m, n, k, GemmOut::Bf16)?)
    })?;
    Ok(GemmRate { name: name.to_string(), m, n, k, ms, tflops: 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12 })
}

/// [`gemm_rate`] for cuBLASLt FP8 (E4M3 inputs with per-row scales on both sides, BF16 out).
pub fn gemm_rate_fp8(gpu: &Gpu, gemm: &Gemm, name: &str, m: usize, n: usize, k: usize) -> Result<GemmRate> {
    gemm.reserve_fp8(gpu, m * n)?;
    let copies = (256usize << 20).div_ceil(n * k).clamp(1, 8);
    let tmp = gpu.alloc(2 * m.max(n) * k)?;
    let x = gpu.alloc(m * k)?;
    let xs = gpu.alloc(4 * m)?;
    let y = gpu.alloc(2 * m * n)?;
    ops::fill_uniform(gpu, tmp.ptr(), m * k, 11, 0.0, 1.0)?;
    ops::quantize_rows(gpu, tmp.ptr(), x.ptr(), xs.ptr(), m, k)?;
    let ws = fp8_weight_copies(gpu, &tmp, copies, n, k)?;
    let mut i = 0;
    let ms = time_events(gpu, 7, 10, || {
        i = (i + 1) % copies;
        Ok(gemm.matmul_fp8(gpu, x.ptr(), xs.ptr(), ws[i].0.ptr(), ws[i].1.ptr(), y.ptr(), m, n, k)?)
    })?;
    Ok(GemmRate { name: name.to_string(), m, n, k, ms, tflops: 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12 })
}

/// One small-batch GEMV's rate on one projection shape.
#[derive(Clone, Debug, Serialize)]
pub struct GemvRate {
    pub name: String,
    pub dtype: &'static str,
    /// The kernel variant (`ops::Fp8GemvConfig::label`, or `bf16`).
    pub variant: String,
    /// Whether the model's launcher picks this variant for the shape.
    pub chosen: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub swiglu: bool,
    pub us: f64,
    /// Weight (and scale) bytes read per second.
    pub gbs: f64,
    /// `gbs` over the measured copy bandwidth.
    pub fraction: f64,
}

/// Times the decode GEMV of `m` tokens over an `[n, k]` projection (`[2n, k]` gate and up with
/// `swiglu`): the BF16 kernel and every variant of the FP8 one, each rotating through enough
/// weight copies that the L2 cache does not hold them.
pub fn gemv_rates(
    gpu: &Gpu,
    bandwidth: f64,
    name: &str,
    m: usize,
    n: usize,
    k: usize,
    swiglu: bool,
) -> Result<Vec<GemvRate>> {
    let rows = if swiglu { 2 * n } else { n };
    let copies = (512usize << 20).div_ceil(rows * k).clamp(2, 16);
    let tmp = gpu.alloc(2 * rows.max(m) * k)?;
    let x16 = gpu.alloc(2 * m * k)?;
    let (x8, xs) = (gpu.alloc(m * k)?, gpu.alloc(4 * m)?);
    let y = gpu.alloc(4 * m * rows)?;
    ops::fill_uniform(gpu, x16.ptr(), m * k, 11, 0.0, 1.0)?;
    ops::quantize_rows(gpu, x16.ptr(), x8.ptr(), xs.ptr(), m, k)?;
    let mut out = Vec::new();
    let rate = |variant: String, chosen: bool, dtype: &'static str, bytes: usize, ms: f64| {
        let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
        GemvRate {
            name: name.to_string(),
            dtype,
            variant,
            chosen,
            m,
            n,
            k,
            swiglu,
            us: ms * 1e3,
            gbs,
            fraction: gbs * 1e9 / bandwidth,
        }
    };
    {
        let copies = copies.div_ceil(2).max(2);
        let ws = bf16_weight_copies(gpu, copies, rows, k)?;
        let epilogue = if swiglu { ops::Epilogue::SwiGlu } else { ops::Epilogue::Bf16 };
        let mut i = 0;
        let ms = time_events(gpu, 7, 20, || {
            i = (i + 1) % copies;
            Ok(ops::gemv(gpu, x16.ptr(), ws[i].ptr(), y.ptr(), m, n, k, epilogue)?)
        })?;
        out.push(rate("bf16".to_string(), true, "bf16", 2 * rows * k, ms));
    }
    let ws = fp8_weight_copies(gpu, &tmp, copies, rows, k)?;
    let epilogue = if swiglu { ops::Fp8Epilogue::SwiGlu } else { ops::Fp8Epilogue::Bf16 };
    let chosen = ops::Fp8GemvConfig::for_shape(n, k, epilogue);
    for config in ops::Fp8GemvConfig::ALL {
        let mut i = 0;
        let ms = time_events(gpu, 7, 20, || {
            i = (i + 1) % copies;
            let (w, sc) = &ws[i];
            let op = ops::Fp8Gemv::codes(x8.ptr(), xs.ptr(), w.ptr(), sc.ptr(), y.ptr(), m, n, k, epilogue);
            Ok(ops::run_gemv_fp8(gpu, Some(config), &op)?)
        })?;
        out.push(rate(config.label(), config == chosen, "fp8", rows * k + 4 * rows, ms));
    }
    Ok(out)
}

/// The decode step's projections alone (`CudaLlama::enqueue_projections`) in one CUDA graph:
/// what its GEMVs take with nothing between them, beside the whole step.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectionChain {
    pub batch: usize,
    pub ms: f64,
    /// The weight bytes the step reads (as `DecodeRow::bytes_per_step`, without the KV cache).
    pub weight_bytes: usize,
    /// (weight_bytes / bandwidth) / ms.
    pub roofline_fraction: f64,
}

/// Times the projection chain of `batch` tokens (median of 7 rounds of 10 graph launches).
pub fn projection_chain(model: &CudaLlama, bandwidth: f64, batch: usize) -> Result<ProjectionChain> {
    let gpu = model.gpu();
    let graph = model.capture_projections(batch)?;
    let ms = time_events(gpu, 7, 10, || Ok(graph.launch()?))?;
    gpu.synchronize()?;
    let weight_bytes = model.weight_bytes_per_step();
    Ok(ProjectionChain { batch, ms, weight_bytes, roofline_fraction: (weight_bytes as f64 / bandwidth) / (ms * 1e-3) })
}

/// One batch size's end-to-end figures.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    pub prompt_len: usize,
    pub output_len: usize,
    pub batch: usize,
    /// From the start of the prefill to every sequence's first token.
    pub ttft_ms: f64,
    /// Median time of one decode step (all sequences advance one token).
    pub decode_ms_per_token: f64,
    pub tok_s_per_user: f64,
    pub tok_s_total: f64,
    /// Bytes one decode step reads at the median context: weights (the gathered embedding rows
    /// aside) plus the KV cache.
    pub bytes_per_step: f64,
    /// (bytes_per_step / bandwidth) / decode time.
    pub roofline_fraction: f64,
}

impl DecodeRow {
    /// The row of a run whose decode steps took `ms` (median), with this rank's bytes per step
    /// at the run's middle context; the roofline fraction against `bandwidth` where given (else
    /// 0: the caller knows what the group's roofline is).
    fn measured(
        model: &CudaLlama,
        prompt_len: usize,
        output_len: usize,
        batch: usize,
        ttft_ms: f64,
        ms: f64,
        bandwidth: Option<f64>,
    ) -> Self {
        let mid_context = prompt_len + output_len / 2;
        let bytes = model.weight_bytes_per_step() as f64 + model.kv_bytes_read(&vec![mid_context; batch]) as f64;
        DecodeRow {
            prompt_len,
            output_len,
            batch,
            ttft_ms,
            decode_ms_per_token: ms,
            tok_s_per_user: 1e3 / ms,
            tok_s_total: batch as f64 * 1e3 / ms,
            bytes_per_step: bytes,
            roofline_fraction: bandwidth.map_or(0.0, |bw| (bytes / bw) / (ms * 1e-3)),
        }
    }
}

/// Prefills one prompt of `prompt_len` tokens (`token(seq, pos)`) per block table, in steps of
/// up to the model's token budget (prompts split across steps), greedy on the device; returns
/// each sequence's first sampled token (meaningful on ranks that compute logits).
fn prefill(
    model: &CudaLlama,
    token: &dyn Fn(usize, usize) -> u32,
    tables: &[Vec<u32>],
    prompt_len: usize,
) -> Result<Vec<u32>> {
    let (batch, bs) = (tables.len(), model.block_size());
    let greedy = DeviceSampling::GREEDY;
    let budget = model.options().max_batch_tokens;
    let mut last = vec![0u32; batch];
    let mut done = vec![0usize; batch];
    let mut s = 0;
    while s < batch {
        let mut fb = ForwardBatch::new(bs);
        let mut room = budget;
        let mut finishing = Vec::new();
        while s < batch && room > 0 && fb.n_seqs() < model.options().max_seqs {
            let take = (prompt_len - done[s]).min(room);
            let ends = done[s] + take == prompt_len;
            let toks: Vec<u32> = (done[s]..done[s] + take).map(|p| token(s, p)).collect();
            fb.push_sequence(&toks, done[s], &tables[s], if ends { Logits::Last } else { Logits::None })?;
            done[s] += take;
            room -= take;
            if ends {
                finishing.push(s);
                s += 1;
            }
        }
        let params = vec![greedy; finishing.len()];
        if let StepOutput::Tokens(t) = model.step(&fb, Some(&params))? {
            for (i, &seq) in finishing.iter().enumerate() {
                last[seq] = t[i];
            }
        }
    }
    Ok(last)
}

/// Runs `batch` sequences of random prompts of `prompt_len` tokens through prefill (in chunks of
/// the model's token budget) and `output_len - 1` decode steps, greedy on the device. The last
/// step runs as a profiler range ([`Gpu::profiled`]), so that `ncu --profile-from-start off` sees
/// one steady-state step of each run (`tests/gpu/profile-step.sh`).
pub fn decode_run(
    model: &CudaLlama,
    bandwidth: f64,
    prompt_len: usize,
    output_len: usize,
    batch: usize,
    seed: u64,
) -> Result<DecodeRow> {
    let bs = model.block_size();
    let total = prompt_len + output_len;
    let per_seq = total.div_ceil(bs);
    if per_seq * batch > model.n_blocks() {
        return Err(unsupported(format!(
            "{batch} sequences of {total} positions need {} KV blocks, the cache has {}",
            per_seq * batch,
            model.n_blocks()
        )));
    }
    let tables: Vec<Vec<u32>> =
        (0..batch).map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect()).collect();
    let vocab = model.config().vocab_size as u64;
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab) as u32
    };
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..prompt_len).map(|_| next()).collect()).collect();
    let greedy = DeviceSampling::GREEDY;

    model.gpu().synchronize()?;
    let t0 = Instant::now();
    let mut last = prefill(model, &|s, p| prompts[s][p], &tables, prompt_len)?;
    let ttft_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Decode.
    let params = vec![greedy; batch];
    let mut times = Vec::with_capacity(output_len);
    for step in 1..output_len {
        let mut fb = ForwardBatch::new(bs);
        for (s, table) in tables.iter().enumerate() {
            fb.push_sequence(&[last[s]], prompt_len + step - 1, table, Logits::Last)?;
        }
        let t = Instant::now();
        // The last step is a profiler range, for a profiler that collects only there.
        let out = if step + 1 == output_len {
            model.gpu().profiled(|| model.step(&fb, Some(&params)))?
        } else {
            model.step(&fb, Some(&params))?
        };
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if let StepOutput::Tokens(t) = out {
            last = t;
        }
    }
    Ok(DecodeRow::measured(model, prompt_len, output_len, batch, ttft_ms, median(times), Some(bandwidth)))
}

/// Per-operation times of one eager decode step of `batch` sequences at `context` positions
/// (with `prompt_tokens` prompt tokens of new sequences beside them: [`mixed_breakdown`]).
#[derive(Clone, Debug, Serialize)]
pub struct Breakdown {
    pub batch: usize,
    pub context: usize,
    pub prompt_tokens: usize,
    /// (operation, milliseconds), summed over layers.
    pub ops: Vec<(String, f64)>,
    pub total_ms: f64,
}

pub fn decode_breakdown(model: &CudaLlama, batch: usize, context: usize) -> Result<Breakdown> {
    let bs = model.block_size();
    let per_seq = (context + 1).div_ceil(bs);
    if per_seq * batch > model.n_blocks() {
        return Err(unsupported(format!("{batch} sequences of {context} positions do not fit the cache")));
    }
    let mut fb = ForwardBatch::new(bs);
    for s in 0..batch {
        let table: Vec<u32> = ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect();
        fb.push_sequence(&[(s as u32 * 31) % model.config().vocab_size as u32], context, &table, Logits::Last)?;
    }
    let params = vec![DeviceSampling::GREEDY; batch];
    let ops = model.profile(&fb, Some(&params))?;
    let total_ms = ops.iter().map(|(_, ms)| ms).sum();
    Ok(Breakdown { batch, context, prompt_tokens: 0, ops, total_ms })
}

/// Prompt tokens per new sequence in [`mixed_breakdown`].
pub const MIXED_CHUNK: usize = 128;

/// Per-operation times of one eager step as a server runs under load: `decodes` sequences
/// decoding at `context` positions beside `prompt_tokens` prompt tokens of new sequences (prompts
/// of [`MIXED_CHUNK`] tokens, the last shorter), every sequence sampling one token.
pub fn mixed_breakdown(model: &CudaLlama, decodes: usize, prompt_tokens: usize, context: usize) -> Result<Breakdown> {
    let bs = model.block_size();
    let per_seq = (context + 1).div_ceil(bs);
    let per_prompt = MIXED_CHUNK.div_ceil(bs);
    let prompts = prompt_tokens.div_ceil(MIXED_CHUNK);
    if per_seq * decodes + per_prompt * prompts > model.n_blocks() {
        return Err(unsupported(format!(
            "{decodes} sequences of {context} positions and {prompt_tokens} prompt tokens do not fit the cache"
        )));
    }
    let vocab = model.config().vocab_size;
    let mut next_block = 0u32;
    let mut table = |n: usize| {
        let t: Vec<u32> = (next_block..next_block + n as u32).collect();
        next_block += n as u32;
        t
    };
    let mut fb = ForwardBatch::new(bs);
    for s in 0..decodes {
        fb.push_sequence(&[((s * 31) % vocab) as u32], context, &table(per_seq), Logits::Last)?;
    }
    for p in 0..prompts {
        let len = (prompt_tokens - p * MIXED_CHUNK).min(MIXED_CHUNK);
        let tokens: Vec<u32> = (0..len).map(|i| ((p * 131 + i * 7) % vocab) as u32).collect();
        fb.push_sequence(&tokens, 0, &table(per_prompt), Logits::Last)?;
    }
    let rows = decodes + prompts;
    let params = vec![DeviceSampling::GREEDY; rows];
    let ops = model.profile(&fb, Some(&params))?;
    let total_ms = ops.iter().map(|(_, ms)| ms).sum();
    Ok(Breakdown { batch: decodes, context, prompt_tokens, ops, total_ms })
}

/// How a pipeline's sampled tokens get back to its first stage: the last stage's rank sends
/// each decode step's tokens to the first stage's rank of the same TP index over a host link,
/// as the engine's scheduler does when it feeds the next step.
#[derive(Debug)]
pub struct TokensBack<'a> {
    pub link: &'a dyn flint_comm::Communicator<[u32]>,
    /// This rank's partner in `link`: the first stage's rank on the last stage, the last stage's
    /// on the first.
    pub peer: usize,
}

/// Steady-state decode of a parallel group's rank (every rank of the group runs it at once):
/// `batch` sequences prefilled with `prompt_len` random tokens, then `output_len - 1` rounds in
/// which each of `groups` equal groups of sequences takes one greedy decode step, group after
/// group. Each step's input is the token sampled for it at the step before: on one stage the
/// rank's own; in a pipeline the first stage waits for the last stage's tokens (`back`) before
/// it starts a group's next step.
///
/// With `groups` = the number of pipeline stages, stage `s` works on group `g` while stage
/// `s + 1` works on group `g - 1`: the pipeline stays full, as a serving engine keeps it by
/// giving the stages different batches of requests. The time of a round is the time per output
/// token of every user.
pub fn pipeline_decode_run(
    model: &CudaLlama,
    prompt_len: usize,
    output_len: usize,
    batch: usize,
    groups: usize,
    seed: u64,
    back: Option<TokensBack<'_>>,
) -> Result<DecodeRow> {
    let bs = model.block_size();
    let total = prompt_len + output_len;
    let per_seq = total.div_ceil(bs);
    let groups = groups.clamp(1, batch.max(1));
    if per_seq * batch > model.n_blocks() {
        return Err(unsupported(format!(
            "{batch} sequences of {total} positions need {} KV blocks, the cache has {}",
            per_seq * batch,
            model.n_blocks()
        )));
    }
    if batch.div_ceil(groups) > model.options().max_seqs {
        return Err(unsupported(format!(
            "groups of {} sequences exceed the {} a step holds",
            batch.div_ceil(groups),
            model.options().max_seqs
        )));
    }
    let tables: Vec<Vec<u32>> =
        (0..batch).map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect()).collect();
    let vocab = model.config().vocab_size as u64;
    let token = |s: usize, pos: usize| -> u32 {
        let mut x = seed ^ ((s as u64) << 32) ^ pos as u64;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
        ((x ^ (x >> 31)) % vocab) as u32
    };
    let greedy = DeviceSampling::GREEDY;
    let group_of = |g: usize| (g * batch / groups)..((g + 1) * batch / groups);

    model.gpu().synchronize()?;
    let t0 = Instant::now();
    prefill(model, &token, &tables, prompt_len)?;
    let ttft_ms = t0.elapsed().as_secs_f64() * 1e3;

    // The first decode step's inputs (the prefill's samples are not passed around).
    let mut last: Vec<u32> = (0..batch).map(|s| token(s, prompt_len)).collect();
    let (first_stage, last_stage) = (model.is_first_stage(), model.is_last_stage());
    let mut rounds = Vec::with_capacity(output_len);
    for step in 1..output_len {
        let t = Instant::now();
        for g in 0..groups {
            let seqs = group_of(g);
            if step > 1
                && first_stage
                && !last_stage
                && let Some(b) = &back
            {
                b.link.recv(&mut last[seqs.clone()], b.peer)?;
            }
            let mut fb = ForwardBatch::new(bs);
            for s in seqs.clone() {
                fb.push_sequence(&[last[s]], prompt_len + step - 1, &tables[s], Logits::Last)?;
            }
            let params = vec![greedy; seqs.len()];
            if let StepOutput::Tokens(sampled) = model.step(&fb, Some(&params))?
                && last_stage
            {
                last[seqs.clone()].copy_from_slice(&sampled);
                if step + 1 < output_len
                    && !first_stage
                    && let Some(b) = &back
                {
                    b.link.send(&sampled, b.peer)?;
                }
            }
        }
        rounds.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(DecodeRow::measured(model, prompt_len, output_len, batch, ttft_ms, median(rounds), None))
}
