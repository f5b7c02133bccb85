//! `flint bench --preset NAME`: the model benchmark on the local GPU. Random weights of a real
//! architecture's shapes; copy bandwidth and cuBLASLt's BF16 rate measured in the same run;
//! TTFT, decode latency and throughput per batch size, each decode figure as a fraction of the
//! bandwidth roofline; the prefill GEMMs' rate against cuBLASLt's best.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use flint_cuda::Gpu;
use flint_model::ModelConfig;
use flint_model::cuda::bench::{self, Breakdown, DecodeRow, GemmRate};
use flint_model::cuda::{CudaLlama, CudaLlamaOptions};
use serde::Serialize;

/// `P:O` pairs of prompt and output lengths.
pub fn parse_lengths(s: &str) -> anyhow::Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|pair| {
            let (p, o) = pair.split_once(':').with_context(|| format!("{pair:?}: write PROMPT:OUTPUT"))?;
            let (p, o): (usize, usize) = (p.trim().parse()?, o.trim().parse()?);
            if p == 0 || o == 0 {
                bail!("{pair:?}: lengths must be positive");
            }
            Ok((p, o))
        })
        .collect()
}

pub fn parse_batches(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(|b| match b.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{b:?} is not a batch size"),
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct ModelBench {
    pub preset: String,
    pub gpu: String,
    pub dtype: &'static str,
    pub copy_bandwidth_gbs: f64,
    pub cublaslt_peak: GemmRate,
    pub prefill_gemms: Vec<GemmRate>,
    pub startup_s: f64,
    pub weight_bytes_per_step: usize,
    pub rows: Vec<DecodeRow>,
    /// Eager per-operation times of single decode steps (where the time goes).
    pub decode_breakdown: Vec<Breakdown>,
    pub gemv_max_m: usize,
    pub skipped: Vec<String>,
    pub cuda_graphs: bool,
    pub pdl: bool,
}

pub fn run_preset(
    preset: &str,
    batches: &[usize],
    lengths: &[(usize, usize)],
    graphs: bool,
    gemv_max_m: usize,
) -> anyhow::Result<ModelBench> {
    let start = Instant::now();
    let config = ModelConfig::preset(preset)
        .with_context(|| format!("unknown preset {preset:?}; presets: {}", ModelConfig::PRESETS.join(", ")))?;
    let gpu = Gpu::new(0)?;
    eprintln!("bench: {preset} on {}", gpu.name());
    let bandwidth = bench::copy_bandwidth(&gpu, 1 << 31)?;
    eprintln!("copy bandwidth {:.0} GB/s", bandwidth / 1e9);

    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let max_len = lengths.iter().map(|(p, o)| p + o).max().unwrap_or(256);
    let options = CudaLlamaOptions {
        max_batch_tokens: 8192.max(max_batch),
        max_seqs: max_batch,
        max_seq_len: max_len.next_multiple_of(256),
        graphs,
        gemv_max_m,
        ..CudaLlamaOptions::default()
    };
    let model = CudaLlama::random(Arc::clone(&gpu), config.clone(), options, 0x5eed)?;
    gpu.synchronize()?;
    let startup_s = start.elapsed().as_secs_f64();

    // cuBLASLt's rate on a large square product, and on this model's prefill shapes (2048 tokens).
    let gemm = flint_cuda::gemm::Gemm::new(&gpu)?;
    let peak = bench::gemm_rate(&gpu, &gemm, "square 8192", 8192, 8192, 8192)?;
    let (h, ff) = (config.hidden_size, config.intermediate_size);
    let qkv = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim;
    let m = 2048;
    let mut prefill_gemms = Vec::new();
    for (name, n, k) in
        [("qkv", qkv, h), ("o", h, config.n_heads * config.head_dim), ("gate_up", 2 * ff, h), ("down", h, ff)]
    {
        prefill_gemms.push(bench::gemm_rate(&gpu, &gemm, name, m, n, k)?);
    }
    drop(gemm);

    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for &(p, o) in lengths {
        for &b in batches {
            match bench::decode_run(&model, bandwidth, p, o, b, 1 + b as u64) {
                Ok(row) => {
                    eprintln!(
                        "  {p}/{o} batch {b}: TTFT {:.1} ms, decode {:.3} ms/token, {:.1} tok/s/user, {:.2} of roofline",
                        row.ttft_ms, row.decode_ms_per_token, row.tok_s_per_user, row.roofline_fraction
                    );
                    rows.push(row);
                }
                Err(e) => {
                    eprintln!("  {p}/{o} batch {b}: skipped: {e}");
                    skipped.push(format!("{p}/{o} batch {b}: {e}"));
                }
            }
        }
    }
    let mut decode_breakdown = Vec::new();
    for &b in batches {
        match bench::decode_breakdown(&model, b, 256) {
            Ok(d) => decode_breakdown.push(d),
            Err(e) => skipped.push(format!("breakdown batch {b}: {e}")),
        }
    }
    Ok(ModelBench {
        preset: preset.to_string(),
        gpu: gpu.name().to_string(),
        dtype: "bf16",
        copy_bandwidth_gbs: bandwidth / 1e9,
        cublaslt_peak: peak,
        prefill_gemms,
        startup_s,
        weight_bytes_per_step: model.weight_bytes_per_step(),
        rows,
        decode_breakdown,
        gemv_max_m,
        skipped,
        cuda_graphs: graphs,
        pdl: gpu.pdl(),
    })
}

pub fn print_table(b: &ModelBench) {
    for d in &b.decode_breakdown {
        let parts: Vec<String> = d.ops.iter().map(|(l, ms)| format!("{l} {ms:.3}")).collect();
        println!(
            "decode step breakdown, batch {} at {} positions ({:.3} ms eager): {}",
            d.batch,
            d.context,
            d.total_ms,
            parts.join(", ")
        );
    }
    println!("{} on {} (BF16), copy bandwidth {:.0} GB/s", b.preset, b.gpu, b.copy_bandwidth_gbs);
    println!(
        "cuBLASLt BF16 {}x{}x{}: {:.0} TFLOP/s; prefill GEMMs at 2048 tokens:",
        b.cublaslt_peak.m, b.cublaslt_peak.n, b.cublaslt_peak.k, b.cublaslt_peak.tflops
    );
    for g in &b.prefill_gemms {
        println!(
            "  {:8} {}x{}x{}: {:.0} TFLOP/s ({:.2} of cuBLASLt's best)",
            g.name,
            g.m,
            g.n,
            g.k,
            g.tflops,
            g.tflops / b.cublaslt_peak.tflops
        );
    }
    println!(
        "{:>7} {:>6} {:>10} {:>12} {:>12} {:>12} {:>9}",
        "len", "batch", "TTFT ms", "ms/token", "tok/s/user", "tok/s total", "roofline"
    );
    for r in &b.rows {
        println!(
            "{:>7} {:>6} {:>10.1} {:>12.3} {:>12.1} {:>12.0} {:>9.2}",
            format!("{}/{}", r.prompt_len, r.output_len),
            r.batch,
            r.ttft_ms,
            r.decode_ms_per_token,
            r.tok_s_per_user,
            r.tok_s_total,
            r.roofline_fraction
        );
    }
}
