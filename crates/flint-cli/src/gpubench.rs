//! `flint bench --preset NAME`: the model benchmark on the local GPU. Random weights of a real
//! architecture's shapes; copy bandwidth and cuBLASLt's BF16 rate measured in the same run;
//! TTFT, decode latency and throughput per batch size, each decode figure as a fraction of the
//! bandwidth roofline; the prefill GEMMs' rate against cuBLASLt's best.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use flint_cuda::{Gpu, LaunchTuning};
use flint_model::ModelConfig;
use flint_model::cuda::bench::{self, Breakdown, DecodeRow, GemmRate, ProjectionChain};
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

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn parse_batches(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(|b| match b.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{b:?} is not a batch size"),
        })
        .collect()
}

/// `--launch-tuning`: comma-separated `off` (every kernel waits first) or a number of MiB (early
/// launch with that L2 prefetch budget; 0 for none).
pub fn parse_tunings(s: &str) -> anyhow::Result<Vec<LaunchTuning>> {
    s.split(',')
        .map(|t| match t.trim() {
            "off" => Ok(LaunchTuning { early_launch: false, l2_prefetch_budget: 0 }),
            mb => match mb.parse::<u32>() {
                Ok(mb) if mb <= 1024 => Ok(LaunchTuning { early_launch: true, l2_prefetch_budget: mb << 20 }),
                _ => bail!("{t:?}: --launch-tuning takes off or a number of MiB (0..=1024)"),
            },
        })
        .collect()
}

/// Decode rows measured again with another launch tuning, on the same model in the same run.
#[derive(Debug, Serialize)]
pub struct TuningRows {
    /// `off`, or `early+l2=NM` (LaunchTuning::label).
    pub tuning: String,
    pub rows: Vec<DecodeRow>,
}

#[derive(Debug, Serialize)]
pub struct ModelBench {
    /// The git revision `flint` was built from, and when the run started (Unix seconds).
    pub revision: &'static str,
    pub unix_time: u64,
    pub preset: String,
    pub gpu: String,
    pub dtype: &'static str,
    /// Tensor-parallel ranks per stage; every figure is the output rank's (the last stage's
    /// first), bytes per step are per GPU.
    pub tp: usize,
    /// Pipeline stages (GPUs: `tp * pp`).
    pub pp: usize,
    /// Each stage's layers.
    pub stages: Vec<(usize, usize)>,
    /// Whether small steps used the peer-to-peer all-reduce (else NCCL).
    pub p2p_all_reduce: bool,
    /// Its link (flags or lamport), where it was used.
    pub p2p_link: Option<&'static str>,
    pub copy_bandwidth_gbs: f64,
    pub cublaslt_peak: GemmRate,
    pub prefill_gemms: Vec<GemmRate>,
    pub startup_s: f64,
    pub weight_bytes_per_step: usize,
    pub rows: Vec<DecodeRow>,
    /// Eager per-operation times of single decode steps (where the time goes).
    pub decode_breakdown: Vec<Breakdown>,
    /// Each batch's projections alone in one graph (what the rest of the step adds to them).
    pub projection_chain: Vec<ProjectionChain>,
    pub gemv_max_m: usize,
    pub skipped: Vec<String>,
    pub cuda_graphs: bool,
    pub pdl: bool,
    /// The launch tuning of `rows` (LaunchTuning::label).
    pub launch_tuning: String,
    /// With `--launch-tuning A,B,...`: the rows again under B, ... (after `rows`, same model).
    pub tuning_rows: Vec<TuningRows>,
    /// Whether decode-only steps ran with RoPE and the KV write folded into the decode attention.
    pub fused_rope_attention: bool,
    /// With `--rope-attention both`: the rows again with a separate RoPE + KV-write kernel
    /// (the model built again, measured after the rest of the BF16 part).
    pub separate_rope_rows: Option<Vec<DecodeRow>>,
    /// With `--dtype fp8`: the same preset in FP8, measured after the BF16 model in this run.
    pub fp8: Option<Fp8Bench>,
}

#[derive(Debug, Serialize)]
pub struct Fp8Bench {
    pub cublaslt_fp8_peak: GemmRate,
    pub prefill_gemms: Vec<GemmRate>,
    pub weight_bytes_per_step: usize,
    /// Whether `rows` ran with the O and down GEMVs quantizing their inputs themselves.
    pub fused_quantization: bool,
    /// With `--fp8-quantization both`: the same rows with a quantization kernel before each of
    /// those GEMVs, measured after `rows` in this run.
    pub separate_quantization_rows: Option<Vec<DecodeRow>>,
    /// As `ModelBench::fused_rope_attention` and `separate_rope_rows`, for the FP8 model.
    pub fused_rope_attention: bool,
    pub separate_rope_rows: Option<Vec<DecodeRow>>,
    /// Whether `rows` ran with the O and down GEMVs doing the residual add + RMSNorm + quantize
    /// after them in their last block (steps of up to two tokens).
    pub fused_norm_tail: bool,
    /// With `--norm-tail both`: the same rows with the norm kernels, measured after `rows`.
    pub separate_norm_rows: Option<Vec<DecodeRow>>,
    /// Whether that norm (one-token steps) was split over those GEMVs and the GEMV after each
    /// rather than run by their last block.
    pub split_norm: bool,
    /// With `--split-norm both`: the same rows with the norm in the last block, measured after
    /// `rows`.
    pub norm_tail_rows: Option<Vec<DecodeRow>>,
    pub rows: Vec<DecodeRow>,
    /// As `ModelBench::tuning_rows`, for the FP8 model.
    pub tuning_rows: Vec<TuningRows>,
    pub decode_breakdown: Vec<Breakdown>,
    /// As `ModelBench::projection_chain`, for the FP8 model.
    pub projection_chain: Vec<ProjectionChain>,
    /// BF16 ms/token over FP8 ms/token, per row (same order as `rows`, where BF16 has the row).
    pub speedup_over_bf16: Vec<Option<f64>>,
    /// The decode GEMV of one token on each projection: BF16 and every FP8 variant.
    pub gemv: Vec<bench::GemvRate>,
    /// The FP8 model's KV cache: "fp8" (E4M3, a scale per position and head) or "bf16".
    pub kv_cache: &'static str,
    pub skipped: Vec<String>,
}

fn decode_rows(
    model: &CudaLlama,
    bandwidth: f64,
    batches: &[usize],
    lengths: &[(usize, usize)],
    skipped: &mut Vec<String>,
) -> (Vec<DecodeRow>, Vec<Breakdown>) {
    let rows = decode_rows_only(model, bandwidth, batches, lengths, skipped);
    let mut breakdown = Vec::new();
    for &b in batches {
        match bench::decode_breakdown(model, b, model.options().max_seq_len.saturating_sub(2).min(256)) {
            Ok(d) => breakdown.push(d),
            Err(e) => skipped.push(format!("breakdown batch {b}: {e}")),
        }
    }
    (rows, breakdown)
}

/// The projection chain of each batch that decodes through GEMVs.
fn projection_chains(
    model: &CudaLlama,
    bandwidth: f64,
    batches: &[usize],
    skipped: &mut Vec<String>,
) -> Vec<ProjectionChain> {
    let mut out = Vec::new();
    for &b in batches.iter().filter(|&&b| b <= model.options().gemv_max_m.min(flint_cuda::ops::GEMV_MAX_M)) {
        match bench::projection_chain(model, bandwidth, b) {
            Ok(c) => out.push(c),
            Err(e) => skipped.push(format!("projection chain batch {b}: {e}")),
        }
    }
    out
}

/// The rows again under each of `others` (the GPU's tuning restored after).
fn rows_per_tuning(
    model: &CudaLlama,
    bandwidth: f64,
    batches: &[usize],
    lengths: &[(usize, usize)],
    others: &[LaunchTuning],
    skipped: &mut Vec<String>,
) -> anyhow::Result<Vec<TuningRows>> {
    let gpu = model.gpu();
    let main = gpu.launch_tuning();
    let mut out = Vec::new();
    for &tuning in others {
        eprintln!("  launch tuning {}:", tuning.label());
        gpu.set_launch_tuning(tuning)?;
        let rows = decode_rows_only(model, bandwidth, batches, lengths, skipped);
        out.push(TuningRows { tuning: tuning.label(), rows });
    }
    gpu.set_launch_tuning(main)?;
    Ok(out)
}

fn decode_rows_only(
    model: &CudaLlama,
    bandwidth: f64,
    batches: &[usize],
    lengths: &[(usize, usize)],
    skipped: &mut Vec<String>,
) -> Vec<DecodeRow> {
    let mut rows = Vec::new();
    for &(p, o) in lengths {
        for &b in batches {
            match bench::decode_run(model, bandwidth, p, o, b, 1 + b as u64) {
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
    rows
}

/// Whether a benchmark runs with a fusion of kernels, without it, or both ways (the same model
/// built again without it, measured after the fused one in the same run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    Fused,
    Separate,
    Both,
}

/// The kernel fusions a preset benchmark runs with (`flint bench --fp8-quantization,
/// --rope-attention, --norm-tail, --split-norm`).
#[derive(Clone, Copy, Debug)]
pub struct Fusions {
    pub fp8_quantization: Fusion,
    pub rope_attention: Fusion,
    pub norm_tail: Fusion,
    /// Fused: the norm after the O and down GEMVs split over them and the GEMV after each;
    /// separate: run by their last block (the norm tail).
    pub split_norm: Fusion,
}

impl Fusion {
    /// `flag`: the option's name, for the error.
    pub fn parse(flag: &str, s: &str) -> anyhow::Result<Self> {
        match s {
            "fused" => Ok(Self::Fused),
            "separate" => Ok(Self::Separate),
            "both" => Ok(Self::Both),
            _ => anyhow::bail!("--{flag} takes fused, separate or both, not {s:?}"),
        }
    }

    pub fn fused(self) -> bool {
        self != Self::Separate
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run_preset(
    preset: &str,
    batches: &[usize],
    lengths: &[(usize, usize)],
    graphs: bool,
    gemv_max_m: usize,
    fp8: Option<bool>,
    fusions: Fusions,
    tp: usize,
    pp: usize,
    p2p: Option<flint_comm::P2pLink>,
    mixed: Option<(usize, usize)>,
    tunings: &[LaunchTuning],
) -> anyhow::Result<ModelBench> {
    let start = Instant::now();
    let Fusions { fp8_quantization, rope_attention, norm_tail, split_norm } = fusions;
    anyhow::ensure!(tunings.is_empty() || tp * pp == 1, "--launch-tuning compares tunings on one GPU (no --tp, --pp)");
    anyhow::ensure!(mixed.is_none() || pp == 1, "--mixed times one GPU or tensor-parallel ranks (no --pp)");
    let config = ModelConfig::preset(preset)
        .with_context(|| format!("unknown preset {preset:?}; presets: {}", ModelConfig::PRESETS.join(", ")))?;
    let gpu = Gpu::new(0)?;
    if let Some(&first) = tunings.first() {
        gpu.set_launch_tuning(first)?;
    }
    let others = tunings.get(1..).unwrap_or_default();
    eprintln!("bench: {preset} on {} (launch tuning {})", gpu.name(), gpu.launch_tuning().label());
    let bandwidth = bench::copy_bandwidth(&gpu, 1 << 31)?;
    eprintln!("copy bandwidth {:.0} GB/s", bandwidth / 1e9);

    let (mixed_seqs, mixed_tokens) = mixed.map_or((0, 0), |(d, p)| (d + p.div_ceil(bench::MIXED_CHUNK), d + p));
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let max_len = lengths.iter().map(|(p, o)| p + o).max().unwrap_or(256);
    let options = CudaLlamaOptions {
        max_batch_tokens: 8192.max(max_batch).max(mixed_tokens),
        max_seqs: max_batch.max(mixed_seqs),
        max_seq_len: max_len.next_multiple_of(256),
        graphs,
        gemv_max_m,
        p2p_all_reduce: p2p.is_some(),
        p2p_link: p2p.unwrap_or_default(),
        fuse_fp8_quantization: fp8_quantization.fused(),
        fuse_rope_attention: rope_attention.fused(),
        fuse_norm_tail: norm_tail.fused(),
        split_norm: split_norm.fused(),
        ..CudaLlamaOptions::default()
    };
    if tp * pp > 1 {
        // Several GPUs measure one model: the FP8 one with --dtype fp8 (no BF16 run beside it).
        let options = match fp8 {
            Some(kv_fp8) => CudaLlamaOptions { fp8: true, kv_fp8, ..options },
            None => options,
        };
        return run_preset_parallel(preset, config, options, gpu, bandwidth, batches, lengths, tp, pp, mixed, start);
    }
    let model = CudaLlama::random(Arc::clone(&gpu), config.clone(), options.clone(), 0x5eed)?;
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

    let mut skipped = Vec::new();
    let (rows, mut decode_breakdown) = decode_rows(&model, bandwidth, batches, lengths, &mut skipped);
    let tuning_rows = rows_per_tuning(&model, bandwidth, batches, lengths, others, &mut skipped)?;
    let projection_chain = projection_chains(&model, bandwidth, batches, &mut skipped);
    if let Some((d, p)) = mixed {
        let context = model.options().max_seq_len.saturating_sub(2).min(256);
        match bench::mixed_breakdown(&model, d, p, context) {
            Ok(b) => decode_breakdown.push(b),
            Err(e) => skipped.push(format!("mixed step {d}:{p}: {e}")),
        }
    }
    let weight_bytes_per_step = model.weight_bytes_per_step();
    drop(model);
    let separate = CudaLlamaOptions { fuse_rope_attention: false, ..options.clone() };
    let title = "the same model with a separate RoPE + KV-write kernel";
    let separate_rope_rows =
        unfused_rows(&gpu, &config, separate, rope_attention, title, batches, lengths, &mut skipped)?;

    let fp8 = if let Some(kv_fp8) = fp8 {
        eprintln!("bench: {preset} in FP8");
        let gemm = flint_cuda::gemm::Gemm::new(&gpu)?;
        let peak8 = bench::gemm_rate_fp8(&gpu, &gemm, "square 8192", 8192, 8192, 8192)?;
        let mut gemms8 = Vec::new();
        for g in &prefill_gemms {
            gemms8.push(bench::gemm_rate_fp8(&gpu, &gemm, &g.name, g.m, g.n, g.k)?);
        }
        drop(gemm);
        let mut gemv = Vec::new();
        for (name, n, k, swiglu) in [
            ("qkv", qkv, h, false),
            ("o", h, config.n_heads * config.head_dim, false),
            ("gate_up", ff, h, true),
            ("down", h, ff, false),
        ] {
            gemv.extend(bench::gemv_rates(&gpu, bandwidth, name, 1, n, k, swiglu)?);
        }
        let model = CudaLlama::random(
            Arc::clone(&gpu),
            config.clone(),
            CudaLlamaOptions { fp8: true, kv_fp8, ..options },
            0x5eed,
        )?;
        let mut skipped8 = Vec::new();
        let (rows8, breakdown8) = decode_rows(&model, bandwidth, batches, lengths, &mut skipped8);
        let tuning_rows8 = rows_per_tuning(&model, bandwidth, batches, lengths, others, &mut skipped8)?;
        let chain8 = projection_chains(&model, bandwidth, batches, &mut skipped8);
        let weight_bytes8 = model.weight_bytes_per_step();
        drop(model);
        // Stream-ordered frees return their memory to the device at the next synchronization.
        gpu.synchronize()?;
        let fp8_options = CudaLlamaOptions { fp8: true, kv_fp8, ..options.clone() };
        let mut unfused = |fusion: Fusion, options: CudaLlamaOptions, title: &str| {
            unfused_rows(&gpu, &config, options, fusion, title, batches, lengths, &mut skipped8)
        };
        let separate_rows = unfused(
            fp8_quantization,
            CudaLlamaOptions { fuse_fp8_quantization: false, ..fp8_options.clone() },
            "the FP8 model with separate quantization kernels",
        )?;
        let separate_rope8 = unfused(
            rope_attention,
            CudaLlamaOptions { fuse_rope_attention: false, ..fp8_options.clone() },
            "the FP8 model with a separate RoPE + KV-write kernel",
        )?;
        let separate_norm8 = unfused(
            norm_tail,
            CudaLlamaOptions { fuse_norm_tail: false, ..fp8_options.clone() },
            "the FP8 model with the norm kernels after the O and down GEMVs",
        )?;
        let tail_norm8 = unfused(
            split_norm,
            CudaLlamaOptions { split_norm: false, ..fp8_options.clone() },
            "the FP8 model with the norm in the O and down GEMVs' last block",
        )?;
        let speedup = rows8
            .iter()
            .map(|r| {
                rows.iter()
                    .find(|b| (b.prompt_len, b.output_len, b.batch) == (r.prompt_len, r.output_len, r.batch))
                    .map(|b| b.decode_ms_per_token / r.decode_ms_per_token)
            })
            .collect();
        Some(Fp8Bench {
            cublaslt_fp8_peak: peak8,
            prefill_gemms: gemms8,
            weight_bytes_per_step: weight_bytes8,
            fused_quantization: fp8_quantization.fused(),
            separate_quantization_rows: separate_rows,
            fused_rope_attention: rope_attention.fused(),
            separate_rope_rows: separate_rope8,
            fused_norm_tail: norm_tail.fused(),
            separate_norm_rows: separate_norm8,
            split_norm: split_norm.fused(),
            norm_tail_rows: tail_norm8,
            rows: rows8,
            tuning_rows: tuning_rows8,
            decode_breakdown: breakdown8,
            projection_chain: chain8,
            speedup_over_bf16: speedup,
            gemv,
            kv_cache: if kv_fp8 { "fp8" } else { "bf16" },
            skipped: skipped8,
        })
    } else {
        None
    };
    Ok(ModelBench {
        revision: env!("FLINT_REVISION"),
        unix_time: unix_time(),
        preset: preset.to_string(),
        gpu: gpu.name().to_string(),
        dtype: "bf16",
        tp: 1,
        pp: 1,
        stages: vec![(0, config.n_layers)],
        p2p_all_reduce: false,
        p2p_link: None,
        copy_bandwidth_gbs: bandwidth / 1e9,
        cublaslt_peak: peak,
        prefill_gemms,
        startup_s,
        weight_bytes_per_step,
        rows,
        decode_breakdown,
        projection_chain,
        gemv_max_m,
        skipped,
        cuda_graphs: graphs,
        pdl: gpu.pdl(),
        launch_tuning: gpu.launch_tuning().label(),
        tuning_rows,
        fused_rope_attention: rope_attention.fused(),
        separate_rope_rows,
        fp8,
    })
}

/// With a fusion measured both ways (`fusion` is `Both`): the decode rows again on the model
/// built with `options` (without that fusion), after the fused model's memory is back.
#[allow(clippy::too_many_arguments)]
fn unfused_rows(
    gpu: &Arc<Gpu>,
    config: &ModelConfig,
    options: CudaLlamaOptions,
    fusion: Fusion,
    title: &str,
    batches: &[usize],
    lengths: &[(usize, usize)],
    skipped: &mut Vec<String>,
) -> anyhow::Result<Option<Vec<DecodeRow>>> {
    if fusion != Fusion::Both {
        return Ok(None);
    }
    gpu.synchronize()?;
    eprintln!("bench: {title}");
    let model = CudaLlama::random(Arc::clone(gpu), config.clone(), options, 0x5eed)?;
    let bandwidth = bench::copy_bandwidth(gpu, 1 << 31)?;
    let rows = decode_rows(&model, bandwidth, batches, lengths, skipped).0;
    drop(model);
    gpu.synchronize()?;
    Ok(Some(rows))
}

/// The preset split over GPUs `0..tp * pp` (TP shards within each of `pp` pipeline stages):
/// every rank runs the same steady-state decode runs (meeting in NCCL; with `pp` groups of
/// sequences in flight, see [`bench::pipeline_decode_run`]) and the output rank's figures are
/// reported. The GEMM rate is one GPU's (cuBLASLt on GPU 0).
#[allow(clippy::too_many_arguments)]
fn run_preset_parallel(
    preset: &str,
    config: ModelConfig,
    options: CudaLlamaOptions,
    gpu: Arc<Gpu>,
    bandwidth: f64,
    batches: &[usize],
    lengths: &[(usize, usize)],
    tp: usize,
    pp: usize,
    mixed: Option<(usize, usize)>,
    start: Instant,
) -> anyhow::Result<ModelBench> {
    use flint_model::cuda::{GroupWeights, with_cuda_rank};
    use flint_model::{RankModel, TpGroup};
    let gemm = flint_cuda::gemm::Gemm::new(&gpu)?;
    let peak = bench::gemm_rate(&gpu, &gemm, "square 8192", 8192, 8192, 8192)?;
    drop(gemm);
    let plan = flint_stages::StagePlan::balanced(&config, pp)?;
    let p2p = options.p2p_all_reduce;
    let p2p_link = p2p.then_some(options.p2p_link.name());
    let dtype = if options.fp8 { "fp8" } else { "bf16" };
    let fused_rope_attention = options.fuse_rope_attention;
    let group = TpGroup::cuda_stages(config, tp, plan.stages.clone(), pp, options, GroupWeights::Random(0x5eed))?;
    let startup_s = start.elapsed().as_secs_f64();
    let what = format!("TP {tp} x PP {pp}");
    eprintln!("{what}: {} ranks ready in {startup_s:.1} s, stages {:?}", group.world_size(), plan.stages);
    let output = (pp - 1) * tp;
    // The last stage's sampled tokens back to the first stage (host links, as the scheduler's).
    let links = Arc::new(flint_comm::LocalComm::members(tp * pp, std::time::Duration::from_secs(300)));
    let take_link = {
        let links = Arc::clone(&links);
        Arc::new(move |rank: usize| links.take(rank).map_err(flint_model::Error::from))
    };
    let tokens_back: Arc<Vec<std::sync::Mutex<Option<flint_comm::LocalComm>>>> =
        Arc::new((0..tp * pp).map(|_| std::sync::Mutex::new(None)).collect());
    let rows = Arc::new(std::sync::Mutex::new(Vec::<DecodeRow>::new()));
    let breakdown = Arc::new(std::sync::Mutex::new(Vec::<Breakdown>::new()));
    let weight_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let poisoned = || flint_model::Error::Sharding("poisoned".into());
    let mut skipped = Vec::new();
    for &(p, o) in lengths {
        for &b in batches {
            let out = Arc::clone(&rows);
            let wb = Arc::clone(&weight_bytes);
            let (take_link, tokens_back) = (Arc::clone(&take_link), Arc::clone(&tokens_back));
            let job = Arc::new(move |rank: usize, model: &mut dyn RankModel| {
                with_cuda_rank(model, |r| {
                    let mut slot = tokens_back[rank].lock().map_err(|_| poisoned())?;
                    if slot.is_none() {
                        *slot = Some(take_link(rank)?);
                    }
                    let link = slot.as_ref().ok_or_else(poisoned)?;
                    let (stage, t) = (rank / tp, rank % tp);
                    let peer = if stage == 0 { (pp - 1) * tp + t } else { t };
                    let back = (pp > 1).then_some(bench::TokensBack { link, peer });
                    let mut row = bench::pipeline_decode_run(&r.model, p, o, b, pp, 1 + b as u64, back)?;
                    if rank == output {
                        row.roofline_fraction = if pp == 1 {
                            (row.bytes_per_step / bandwidth) / (row.decode_ms_per_token * 1e-3)
                        } else {
                            0.0
                        };
                        wb.store(r.model.weight_bytes_per_step(), std::sync::atomic::Ordering::Relaxed);
                        out.lock().map_err(|_| poisoned())?.push(row);
                    }
                    Ok(Vec::new())
                })
            });
            match group.run_on_all(job) {
                Ok(_) => {
                    if let Some(row) = rows.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.last() {
                        eprintln!(
                            "  {what} {p}/{o} batch {b}: TTFT {:.1} ms, {:.3} ms/token, {:.1} tok/s/user, {:.0} tok/s, {:.2} of roofline",
                            row.ttft_ms,
                            row.decode_ms_per_token,
                            row.tok_s_per_user,
                            row.tok_s_total,
                            row.roofline_fraction
                        );
                    }
                }
                Err(e) => {
                    eprintln!("  {what} {p}/{o} batch {b}: skipped: {e}");
                    skipped.push(format!("{p}/{o} batch {b}: {e}"));
                }
            }
        }
    }
    if pp == 1 {
        for &b in batches.iter().filter(|&&b| b <= 8) {
            let out = Arc::clone(&breakdown);
            let job = Arc::new(move |rank: usize, model: &mut dyn RankModel| {
                with_cuda_rank(model, |r| {
                    let context = r.model.options().max_seq_len.saturating_sub(2).min(256);
                    let d = bench::decode_breakdown(&r.model, b, context)?;
                    if rank == 0 {
                        out.lock().map_err(|_| poisoned())?.push(d);
                    }
                    Ok(Vec::new())
                })
            });
            if let Err(e) = group.run_on_all(job) {
                skipped.push(format!("breakdown batch {b}: {e}"));
            }
        }
        if let Some((d, p)) = mixed {
            let out = Arc::clone(&breakdown);
            let job = Arc::new(move |rank: usize, model: &mut dyn RankModel| {
                with_cuda_rank(model, |r| {
                    let context = r.model.options().max_seq_len.saturating_sub(2).min(256);
                    let b = bench::mixed_breakdown(&r.model, d, p, context)?;
                    if rank == 0 {
                        out.lock().map_err(|_| poisoned())?.push(b);
                    }
                    Ok(Vec::new())
                })
            });
            if let Err(e) = group.run_on_all(job) {
                skipped.push(format!("mixed step {d}:{p}: {e}"));
            }
        }
    }
    drop(group);
    let rows = rows.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let decode_breakdown = breakdown.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    Ok(ModelBench {
        revision: env!("FLINT_REVISION"),
        unix_time: unix_time(),
        preset: preset.to_string(),
        gpu: gpu.name().to_string(),
        dtype,
        tp,
        pp,
        stages: plan.stages.iter().map(|r| (r.start, r.end)).collect(),
        p2p_all_reduce: p2p,
        p2p_link,
        copy_bandwidth_gbs: bandwidth / 1e9,
        cublaslt_peak: peak,
        prefill_gemms: Vec::new(),
        startup_s,
        weight_bytes_per_step: weight_bytes.load(std::sync::atomic::Ordering::Relaxed),
        rows,
        decode_breakdown,
        projection_chain: Vec::new(),
        gemv_max_m: 2,
        skipped,
        cuda_graphs: true,
        pdl: gpu.pdl(),
        launch_tuning: gpu.launch_tuning().label(),
        tuning_rows: Vec::new(),
        fused_rope_attention,
        separate_rope_rows: None,
        fp8: None,
    })
}

pub fn print_table(b: &ModelBench) {
    for d in &b.decode_breakdown {
        let parts: Vec<String> = d.ops.iter().map(|(l, ms)| format!("{l} {ms:.3}")).collect();
        let prompts =
            if d.prompt_tokens > 0 { format!(" and {} prompt tokens", d.prompt_tokens) } else { String::new() };
        println!(
            "decode step breakdown, batch {} at {} positions{prompts} ({:.3} ms eager): {}",
            d.batch,
            d.context,
            d.total_ms,
            parts.join(", ")
        );
    }
    let on = match (b.tp, b.pp) {
        (1, 1) => b.gpu.clone(),
        (t, 1) => format!(
            "{t} x {} (tensor parallel, {} all-reduce)",
            b.gpu,
            match b.p2p_link {
                Some("lamport") => "p2p (lamport) + NCCL",
                Some(_) => "p2p + NCCL",
                None => "NCCL",
            }
        ),
        (t, p) => {
            format!("{} x {} (TP {t} x PP {p}, stages {:?}; {p} groups of sequences in flight)", t * p, b.gpu, b.stages)
        }
    };
    println!(
        "{} on {on} ({}), copy bandwidth {:.0} GB/s per GPU",
        b.preset,
        b.dtype.to_uppercase(),
        b.copy_bandwidth_gbs
    );
    if b.tp * b.pp > 1 {
        println!(
            "weights read per step per GPU {:.2} GB; roofline = that plus the KV cache over one GPU's bandwidth",
            b.weight_bytes_per_step as f64 / 1e9
        );
    }
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
    print_tuning_rows(&b.launch_tuning, &b.rows, &b.tuning_rows);
    print_chains(&b.projection_chain, &b.rows);
    if let Some(rows) = &b.separate_rope_rows {
        print_unfused("the same model with a separate RoPE + KV-write kernel:", rows, &b.rows);
    }
}

/// Each projection chain beside the first row of its batch.
fn print_chains(chains: &[ProjectionChain], rows: &[DecodeRow]) {
    for c in chains {
        let step = rows.iter().find(|r| r.batch == c.batch).map_or(String::new(), |r| {
            format!("; the whole step {:.3} ms, {:.3} ms more", r.decode_ms_per_token, r.decode_ms_per_token - c.ms)
        });
        println!(
            "the step's projections alone (one graph), batch {}: {:.3} ms, {:.2} of the weights' roofline{step}",
            c.batch, c.ms, c.roofline_fraction
        );
    }
}

/// Each other tuning's rows beside the main ones.
fn print_tuning_rows(main: &str, rows: &[DecodeRow], others: &[TuningRows]) {
    for t in others {
        let title = format!("the same model with launch tuning {} (rows above: {main}):", t.tuning);
        print_compared(&title, "rows above vs", 16, &t.rows, rows);
    }
}

/// The FP8 part of a `--dtype fp8` report.
pub fn print_fp8_table(b: &ModelBench) {
    let Some(f) = &b.fp8 else { return };
    println!("decode GEMV, 1 token, weight bytes read per second over the copy bandwidth (* = the launcher's pick):");
    for name in ["qkv", "o", "gate_up", "down"] {
        let parts: Vec<String> = f
            .gemv
            .iter()
            .filter(|g| g.name == name)
            .map(|g| {
                format!(
                    "{}{} {:.1} us {:.2}",
                    g.variant,
                    if g.chosen && g.dtype == "fp8" { "*" } else { "" },
                    g.us,
                    g.fraction
                )
            })
            .collect();
        println!("  {name:8} {}", parts.join(", "));
    }
    for d in &f.decode_breakdown {
        let parts: Vec<String> = d.ops.iter().map(|(l, ms)| format!("{l} {ms:.3}")).collect();
        println!("FP8 decode step breakdown, batch {} ({:.3} ms eager): {}", d.batch, d.total_ms, parts.join(", "));
    }
    println!(
        "{} on {} in FP8 (E4M3 weights per channel, activations per token; {}; BF16 embedding and LM head): {:.2} GB of weights per step (BF16: {:.2} GB)",
        b.preset,
        b.gpu,
        if f.kv_cache == "fp8" { "E4M3 KV cache per position and head" } else { "BF16 KV cache" },
        f.weight_bytes_per_step as f64 / 1e9,
        b.weight_bytes_per_step as f64 / 1e9
    );
    println!(
        "cuBLASLt FP8 {}x{}x{}: {:.0} TFLOP/s ({:.2}x its BF16 rate); prefill GEMMs at 2048 tokens:",
        f.cublaslt_fp8_peak.m,
        f.cublaslt_fp8_peak.n,
        f.cublaslt_fp8_peak.k,
        f.cublaslt_fp8_peak.tflops,
        f.cublaslt_fp8_peak.tflops / b.cublaslt_peak.tflops
    );
    for (g, g16) in f.prefill_gemms.iter().zip(&b.prefill_gemms) {
        println!(
            "  {:8} {}x{}x{}: {:.0} TFLOP/s ({:.2} of cuBLASLt FP8's best, {:.2}x BF16)",
            g.name,
            g.m,
            g.n,
            g.k,
            g.tflops,
            g.tflops / f.cublaslt_fp8_peak.tflops,
            g.tflops / g16.tflops
        );
    }
    println!(
        "{:>7} {:>6} {:>10} {:>12} {:>12} {:>12} {:>9} {:>10}",
        "len", "batch", "TTFT ms", "ms/token", "tok/s/user", "tok/s total", "roofline", "vs BF16"
    );
    for (r, s) in f.rows.iter().zip(&f.speedup_over_bf16) {
        println!(
            "{:>7} {:>6} {:>10.1} {:>12.3} {:>12.1} {:>12.0} {:>9.2} {:>10}",
            format!("{}/{}", r.prompt_len, r.output_len),
            r.batch,
            r.ttft_ms,
            r.decode_ms_per_token,
            r.tok_s_per_user,
            r.tok_s_total,
            r.roofline_fraction,
            s.map_or("-".to_string(), |s| format!("{s:.2}x"))
        );
    }
    print_tuning_rows(&b.launch_tuning, &f.rows, &f.tuning_rows);
    print_chains(&f.projection_chain, &f.rows);
    if let Some(rows) = &f.separate_quantization_rows {
        print_unfused("the same FP8 model with a quantization kernel before the O and down GEMVs:", rows, &f.rows);
    }
    if let Some(rows) = &f.separate_rope_rows {
        print_unfused("the same FP8 model with a separate RoPE + KV-write kernel:", rows, &f.rows);
    }
    if let Some(rows) = &f.separate_norm_rows {
        print_unfused("the same FP8 model with the norm kernels after the O and down GEMVs:", rows, &f.rows);
    }
    if let Some(rows) = &f.norm_tail_rows {
        print_unfused("the same FP8 model with the norm in the O and down GEMVs' last block:", rows, &f.rows);
    }
}

/// Rows of a model run without a fusion, each beside the fused run's row of the same shape.
fn print_unfused(title: &str, rows: &[DecodeRow], fused: &[DecodeRow]) {
    print_compared(title, "fused speedup", 14, rows, fused);
}

/// `rows` under `title`, each with its time over that of `base`'s row of the same shape in a
/// last column `column` of width `w`.
fn print_compared(title: &str, column: &str, w: usize, rows: &[DecodeRow], base: &[DecodeRow]) {
    println!("{title}");
    println!("{:>7} {:>6} {:>12} {:>9} {column:>w$}", "len", "batch", "ms/token", "roofline");
    for r in rows {
        let b = base.iter().find(|x| (x.prompt_len, x.output_len, x.batch) == (r.prompt_len, r.output_len, r.batch));
        let ratio = b.map_or("-".to_string(), |x| format!("{:.3}x", r.decode_ms_per_token / x.decode_ms_per_token));
        println!(
            "{:>7} {:>6} {:>12.3} {:>9.2} {ratio:>w$}",
            format!("{}/{}", r.prompt_len, r.output_len),
            r.batch,
            r.decode_ms_per_token,
            r.roofline_fraction
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_tunings_parse_in_order() {
        let t = parse_tunings("32, off,0").unwrap();
        assert_eq!(
            t,
            [
                LaunchTuning { early_launch: true, l2_prefetch_budget: 32 << 20 },
                LaunchTuning { early_launch: false, l2_prefetch_budget: 0 },
                LaunchTuning { early_launch: true, l2_prefetch_budget: 0 },
            ]
        );
        assert_eq!(t[0].label(), "early+l2=32M");
        assert_eq!(t[1].label(), "off");
        for bad in ["", "on", "-1", "2048", "32,"] {
            assert!(parse_tunings(bad).is_err(), "{bad:?}");
        }
    }
}
