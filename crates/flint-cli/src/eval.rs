//! `flint eval`: accuracy of FP8 serving against the unquantized model in the same run.
//!
//! Perplexity on a fixed text, and top-1 agreement and mean KL divergence of next-token
//! distributions at every position of the text and of a prompt set. On the CPU, FP8 is the
//! reference's quantize-dequantize emulation (several weight granularities); on the GPU, the FP8
//! kernels against BF16.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use flint_cpu::CpuBackend;
use flint_engine::Tokenizer;
use flint_engine::accuracy::{BackendScorer, Comparison, CudaScorer, Scorer, compare_many, ppl_change_interval};
use flint_model::{Fp8Spec, Llama, ModelSource};
use flint_quant::{Granularity, ScaleRule};
use flint_tensor::{Backend, DType};
use serde::Serialize;

use crate::generate::DeviceArg;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A GGUF file or a Hugging Face model directory [default: $FLINT_MODEL, else the fetched SmolLM2]
    #[arg(long)]
    model: Option<PathBuf>,
    /// A released architecture with random weights instead of a checkpoint (GPU only).
    #[arg(long, conflicts_with = "model")]
    random_weights: Option<String>,
    /// Where to compute (auto: the GPU when usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// The text whose perplexity is measured.
    #[arg(long, default_value = "bench/data/alice.txt")]
    text: PathBuf,
    /// Prompts, one per line (`\n` for a newline), compared at every position.
    #[arg(long, default_value = "bench/data/prompts.txt")]
    prompts: PathBuf,
    /// Tokens per perplexity window (each window is scored on its own).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(2..))]
    window: u32,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    max_text_tokens: Option<usize>,
    /// Write the table as JSON here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Also score the serving scheme with its weight scales times 2^(k / (N + 1)) for k in 1..=N
    /// (CPU): the same scheme and error distribution with the FP8 grid elsewhere against the
    /// weights, so the spread of those rows is how much a perplexity change owes to where the
    /// rounding happened to fall.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    rounding_spread: u32,
}

#[derive(Debug, Serialize)]
struct Row {
    variant: String,
    weights: String,
    activations: String,
    kv_cache: String,
    #[serde(flatten)]
    comparison: ComparisonJson,
    /// Perplexity relative to the BF16 row's, where the report has one (the CPU's).
    #[serde(skip_serializing_if = "Option::is_none")]
    ppl_change_vs_bf16: Option<f64>,
    /// Its 95% interval, from the paired per-token differences between the two models.
    #[serde(skip_serializing_if = "Option::is_none")]
    ppl_change_vs_bf16_ci95: Option<(f64, f64)>,
}

#[derive(Debug, Serialize)]
struct ComparisonJson {
    reference_ppl: f64,
    ppl: f64,
    ppl_change: f64,
    /// A 95% interval of `ppl_change` over texts like this one (paired per-token differences,
    /// batch means of `flint_engine::accuracy::INTERVAL_BATCH` tokens); absent on short texts.
    ppl_change_ci95: Option<(f64, f64)>,
    top1_agreement: f64,
    mean_kl: f64,
    text_positions: usize,
    positions: usize,
}

impl From<&Comparison> for ComparisonJson {
    fn from(c: &Comparison) -> Self {
        ComparisonJson {
            reference_ppl: c.reference_ppl,
            ppl: c.ppl,
            ppl_change: c.ppl_change(),
            ppl_change_ci95: c.ppl_change_interval(),
            top1_agreement: c.top1_agreement,
            mean_kl: c.mean_kl,
            text_positions: c.text_positions,
            positions: c.positions,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    device: String,
    reference: String,
    text: String,
    text_tokens: usize,
    window: usize,
    prompts: usize,
    rows: Vec<Row>,
    /// Rows against each other (the CPU's FP8 variants), with paired intervals.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pairs: Vec<Pair>,
    /// The serving row and its `--rounding-spread` rows against bf16.
    #[serde(skip_serializing_if = "Option::is_none")]
    rounding_spread: Option<Spread>,
}

/// How a perplexity change moves when only the placement of the FP8 grid against the weights
/// changes.
#[derive(Debug, Serialize)]
struct Spread {
    variants: Vec<String>,
    ppl_change_vs_bf16: Vec<f64>,
    mean: f64,
    /// Sample standard deviation over the placements.
    sd: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn new(rows: &[&Row]) -> Option<Self> {
        let changes: Vec<f64> = rows.iter().filter_map(|r| r.ppl_change_vs_bf16).collect();
        if changes.len() < 2 {
            return None;
        }
        let n = changes.len() as f64;
        let mean = changes.iter().sum::<f64>() / n;
        let sd = (changes.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        Some(Spread {
            variants: rows.iter().map(|r| r.variant.clone()).collect(),
            mean,
            sd,
            min: changes.iter().copied().fold(f64::INFINITY, f64::min),
            max: changes.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ppl_change_vs_bf16: changes,
        })
    }
}

/// One row's perplexity relative to another's, and its 95% interval from the two models' paired
/// per-token differences.
#[derive(Debug, Serialize)]
struct Pair {
    variant: String,
    against: String,
    ppl_change: f64,
    ppl_change_ci95: Option<(f64, f64)>,
}

/// `a`'s perplexity relative to `b`'s (both scored against the same reference on the same text).
fn paired(a: &Comparison, b: &Comparison) -> (f64, Option<(f64, f64)>) {
    let diffs: Vec<f64> = a.nll_diffs.iter().zip(&b.nll_diffs).map(|(x, y)| x - y).collect();
    (a.ppl / b.ppl - 1.0, ppl_change_interval(&diffs))
}

fn read_inputs(args: &EvalArgs, tokenizer: &Tokenizer) -> anyhow::Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading the evaluation text {}", args.text.display()))?;
    let mut ids = tokenizer.encode(&text, true)?;
    if let Some(n) = args.max_text_tokens {
        ids.truncate(n);
    }
    if ids.len() < 2 {
        bail!("the evaluation text {} has fewer than 2 tokens", args.text.display());
    }
    let prompts = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("reading the prompts {}", args.prompts.display()))?;
    let prompts = prompts
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| tokenizer.encode(&l.replace("\\n", "\n"), true))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ids, prompts))
}

fn describe(spec: &Fp8Spec) -> (String, String, String) {
    let w = match spec.weights {
        None => "unquantized".to_string(),
        Some(Granularity::Tensor) => "fp8 per tensor".into(),
        Some(Granularity::Channel) => "fp8 per channel".into(),
        Some(Granularity::Block(b)) => format!("fp8 {b}x{b} blocks"),
    };
    let w = match (spec.weights, spec.weight_scales) {
        (None, _) | (_, ScaleRule::Max) => w,
        (_, ScaleRule::Mse) => format!("{w}, mse scales"),
        (_, ScaleRule::Headroom(f)) => format!("{w}, scales x{f:.3}"),
    };
    let a = if spec.activations { "fp8 per token" } else { "unquantized" };
    let kv = if spec.kv_cache { "fp8 per token and head" } else { "unquantized" };
    (w, a.into(), kv.into())
}

/// A perplexity change and its interval, in percent: `+3.41% [+2.46, +4.36]`.
fn format_change(change: f64, interval: Option<(f64, f64)>) -> String {
    match interval {
        Some((lo, hi)) => format!("{:+.2}% [{:+.2}, {:+.2}]", 100.0 * change, 100.0 * lo, 100.0 * hi),
        None => format!("{:+.2}%", 100.0 * change),
    }
}

fn print_table(report: &Report) {
    println!(
        "{} on {}: perplexity over {} tokens of {} (windows of {}), next-token agreement and KL over those and {} prompts",
        report.model, report.device, report.text_tokens, report.text, report.window, report.prompts
    );
    println!(
        "reference ({}): perplexity {:.4}",
        report.reference,
        report.rows.first().map_or(0.0, |r| r.comparison.reference_ppl)
    );
    println!();
    let vs_bf16 = report.rows.iter().any(|r| r.ppl_change_vs_bf16.is_some());
    println!(
        "| variant | weights | activations | KV cache | perplexity | vs reference |{} top-1 agreement | mean KL (nats) |",
        if vs_bf16 { " vs bf16 |" } else { "" }
    );
    println!("| --- | --- | --- | --- | --- | --- |{} --- | --- |", if vs_bf16 { " --- |" } else { "" });
    for r in &report.rows {
        let c = &r.comparison;
        let bf16 = match r.ppl_change_vs_bf16 {
            Some(c) => format!(" {} |", format_change(c, r.ppl_change_vs_bf16_ci95)),
            None if vs_bf16 => " |".to_string(),
            None => String::new(),
        };
        println!(
            "| {} | {} | {} | {} | {:.4} | {} |{bf16} {:.4} | {:.5} |",
            r.variant,
            r.weights,
            r.activations,
            r.kv_cache,
            c.ppl,
            format_change(c.ppl_change, c.ppl_change_ci95),
            c.top1_agreement,
            c.mean_kl
        );
    }
    if !report.pairs.is_empty() {
        println!();
        println!("| variant | against | perplexity change |");
        println!("| --- | --- | --- |");
        for p in &report.pairs {
            println!("| {} | {} | {} |", p.variant, p.against, format_change(p.ppl_change, p.ppl_change_ci95));
        }
    }
    if let Some(s) = &report.rounding_spread {
        println!();
        println!(
            "rounding spread of the serving scheme vs bf16 over {} placements of the FP8 grid: mean {:+.2}%, sd {:.2} points, {:+.2}% to {:+.2}%",
            s.variants.len(),
            100.0 * s.mean,
            100.0 * s.sd,
            100.0 * s.min,
            100.0 * s.max
        );
    }
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let use_cuda = match args.device {
        DeviceArg::Cpu => false,
        DeviceArg::Cuda => true,
        DeviceArg::Auto => flint_cuda::cuda_available() && flint_kernels::all_built(),
    };
    if args.random_weights.is_some() && !use_cuda {
        bail!("--random-weights runs on the GPU: add --device cuda");
    }
    if args.rounding_spread > 0 && use_cuda {
        bail!(
            "--rounding-spread runs on the CPU (the GPU quantizes weights with their largest magnitude): use --device cpu"
        );
    }
    let report = if use_cuda { run_cuda(&args)? } else { run_cpu(&args)? };
    print_table(&report);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn progress_line(label: &str) -> impl FnMut(usize, usize) + '_ {
    move |done, total| eprint!("\r{label}: {done}/{total} sequences  ")
}

fn run_cpu(args: &EvalArgs) -> anyhow::Result<Report> {
    let path = crate::resolve_model(args.model.clone())?;
    let source = ModelSource::open(&path)?;
    let config = source.config()?;
    let tokenizer = Tokenizer::for_source(&source, &config)?;
    let (text, prompts) = read_inputs(args, &tokenizer)?;
    // Whole windows are scored at once, so the faster blocked products are used; no row is
    // compared with the same row in another batch.
    let backend = CpuBackend::blocked();
    let load_as = |dtype: DType| -> anyhow::Result<Llama> {
        Ok(Llama::load(&source, config.clone(), &backend as &dyn Backend, dtype, &mut |_| {})?)
    };
    let load = || load_as(DType::F32);
    let reference = load()?;
    let chunk = 512;
    let ref_scorer = BackendScorer { model: &reference, backend: &backend, chunk };
    let serving = Fp8Spec::SERVING;
    let mut variants = vec![
        ("fp8".to_string(), serving),
        ("fp8-tensor".into(), Fp8Spec { weights: Some(Granularity::Tensor), ..serving }),
        ("fp8-block".into(), Fp8Spec { weights: Some(Granularity::Block(128)), ..serving }),
        ("fp8-mse".into(), Fp8Spec { weight_scales: ScaleRule::Mse, ..serving }),
        ("fp8-weights".into(), Fp8Spec { activations: false, kv_cache: false, ..serving }),
        ("fp8-w-a".into(), Fp8Spec { kv_cache: false, ..serving }),
        ("fp8-w-kv".into(), Fp8Spec { activations: false, ..serving }),
    ];
    let n = args.rounding_spread;
    let spread_names: Vec<String> =
        std::iter::once("fp8".to_string()).chain((1..=n).map(|k| format!("fp8-grid-{k}"))).collect();
    for (k, name) in spread_names.iter().enumerate().skip(1) {
        let factor = (k as f32 / (n + 1) as f32).exp2();
        variants.push((name.clone(), Fp8Spec { weight_scales: ScaleRule::Headroom(factor), ..serving }));
    }
    // The weights a BF16 deployment holds (rounded to bf16, computed in f32): the FP8 rows are
    // also given relative to it, as the GPU's table compares FP8 kernels with BF16 ones.
    let mut models = vec![load_as(DType::BF16)?];
    for (_, spec) in &variants {
        let mut model = load()?;
        model.quantize_fp8(&backend, *spec)?;
        models.push(model);
    }
    let scorers: Vec<BackendScorer<'_>> =
        models.iter().map(|model| BackendScorer { model, backend: &backend, chunk }).collect();
    let dyn_scorers: Vec<&dyn Scorer> = scorers.iter().map(|s| s as &dyn Scorer).collect();
    let comparisons =
        compare_many(&ref_scorer, &dyn_scorers, &text, args.window as usize, &prompts, &mut progress_line("scoring"))?;
    eprintln!();
    let bf16_row = Row {
        variant: "bf16".into(),
        weights: "bf16".into(),
        activations: "unquantized".into(),
        kv_cache: "unquantized".into(),
        comparison: (&comparisons[0]).into(),
        ppl_change_vs_bf16: None,
        ppl_change_vs_bf16_ci95: None,
    };
    let rows: Vec<Row> = std::iter::once(bf16_row)
        .chain(variants.iter().zip(&comparisons[1..]).map(|((name, spec), c)| {
            let (weights, activations, kv_cache) = describe(spec);
            let (change, interval) = paired(c, &comparisons[0]);
            Row {
                variant: name.clone(),
                weights,
                activations,
                kv_cache,
                comparison: c.into(),
                ppl_change_vs_bf16: Some(change),
                ppl_change_vs_bf16_ci95: interval,
            }
        }))
        .collect();
    // The other weight granularities against per-channel, and what quantizing the KV cache and
    // the activations each adds to the serving row.
    let index = |name: &str| 1 + variants.iter().position(|(n, _)| n == name).expect("a listed variant");
    let pairs =
        [("fp8-tensor", "fp8"), ("fp8-block", "fp8"), ("fp8-mse", "fp8"), ("fp8", "fp8-w-a"), ("fp8", "fp8-w-kv")]
            .into_iter()
            .map(|(a, b)| {
                let (ppl_change, ppl_change_ci95) = paired(&comparisons[index(a)], &comparisons[index(b)]);
                Pair { variant: a.into(), against: b.into(), ppl_change, ppl_change_ci95 }
            })
            .collect();
    Ok(Report {
        model: display_name(&path),
        device: "cpu (FP8 emulated: quantize-dequantize in f32)".into(),
        reference: "unquantized weights, f32 compute".into(),
        text: display_name(&args.text),
        text_tokens: text.len(),
        window: args.window as usize,
        prompts: prompts.len(),
        rounding_spread: Spread::new(
            &spread_names.iter().filter_map(|name| rows.iter().find(|r| &r.variant == name)).collect::<Vec<_>>(),
        ),
        rows,
        pairs,
    })
}

fn display_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

fn run_cuda(args: &EvalArgs) -> anyhow::Result<Report> {
    use flint_model::cuda::{CudaLlama, CudaLlamaOptions};
    let gpu = flint_cuda::Gpu::new(0)?;
    let window = args.window as usize;
    let options = |fp8: bool| CudaLlamaOptions {
        max_batch_tokens: 2048,
        max_seqs: 128,
        max_seq_len: window.max(512).next_multiple_of(16),
        n_blocks: Some(window.max(512).div_ceil(16) + 1),
        graphs: false,
        fp8,
        kv_fp8: fp8,
        ..CudaLlamaOptions::default()
    };
    let (reference, quantized, tokenizer, name) = match &args.random_weights {
        Some(preset) => {
            let config =
                flint_model::ModelConfig::preset(preset).with_context(|| format!("unknown preset {preset:?}"))?;
            let r = CudaLlama::random(std::sync::Arc::clone(&gpu), config.clone(), options(false), 0x5eed)?;
            let q = CudaLlama::random(std::sync::Arc::clone(&gpu), config, options(true), 0x5eed)?;
            (r, q, Tokenizer::byte_level()?, format!("{preset} (random weights, byte tokens)"))
        }
        None => {
            let path = crate::resolve_model(args.model.clone())?;
            let source = ModelSource::open(&path)?;
            let config = source.config()?;
            let tokenizer = Tokenizer::for_source(&source, &config)?;
            let r = CudaLlama::load(std::sync::Arc::clone(&gpu), &source, config.clone(), options(false))?;
            let q = CudaLlama::load(std::sync::Arc::clone(&gpu), &source, config, options(true))?;
            (r, q, tokenizer, display_name(&path))
        }
    };
    let (mut text, mut prompts) = read_inputs(args, &tokenizer)?;
    // Byte tokens of a random model stand in for text; keep them inside its vocabulary.
    let vocab = reference.config().vocab_size as u32;
    text.iter_mut().chain(prompts.iter_mut().flatten()).for_each(|t| *t %= vocab);
    let (rs, qs) = (CudaScorer { model: &reference }, CudaScorer { model: &quantized });
    let c = compare_many(&rs, &[&qs as &dyn Scorer], &text, window, &prompts, &mut progress_line("scoring"))?;
    eprintln!();
    let (weights, activations, kv_cache) = describe(&Fp8Spec::SERVING);
    Ok(Report {
        model: name,
        device: format!("{} (FP8 kernels)", gpu.name()),
        reference: "bf16 on the same GPU".into(),
        text: display_name(&args.text),
        text_tokens: text.len(),
        window,
        prompts: prompts.len(),
        rows: vec![Row {
            variant: "fp8".into(),
            weights,
            activations,
            kv_cache,
            comparison: (&c[0]).into(),
            ppl_change_vs_bf16: None,
            ppl_change_vs_bf16_ci95: None,
        }],
        pairs: Vec::new(),
        rounding_spread: None,
    })
}
