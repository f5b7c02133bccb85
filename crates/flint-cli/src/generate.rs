//! `flint generate`: load a model, run one prompt, stream the text (or print one JSON object).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use flint_cpu::CpuBackend;
use flint_engine::{ChatMessage, Engine, GenerateRequest, Prompt, SamplingParams};
use flint_model::ModelSource;
use flint_tensor::{Backend, DType};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt. Wrapped in the model's chat template as a user message unless --raw.
    #[arg(long)]
    prompt: String,
    /// A GGUF file or a Hugging Face model directory [default: $FLINT_MODEL, else the fetched SmolLM2]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Keep only the K most likely tokens; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalty on tokens already seen (1 is off; 1.1 is typical).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Subtracted from a token's logit per time it was generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Subtracted from a token's logit once it has been generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Seed for sampling, for reproducible runs [default: random, reported with --json].
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// A system message for the chat template.
    #[arg(long, conflicts_with = "raw")]
    system: Option<String>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// With --json, report each generated token's log-probability.
    #[arg(long)]
    logprobs: bool,
    /// With --logprobs, also this many most likely alternatives per token (at most 20).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    top_logprobs: u32,
    /// Print one JSON object with the text, token ids, finish reason and timings.
    #[arg(long)]
    json: bool,
    /// Where to compute: the GPU when one is usable (auto), or as named.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Run a released architecture with random weights instead of a checkpoint (GPU only):
    /// llama-3.2-1b, llama-3.1-8b, llama-3.3-70b. The prompt is fed as bytes and the output
    /// printed as token ids.
    #[arg(long, conflicts_with = "model")]
    random_weights: Option<String>,
    /// Longest sequence (prompt plus output) the GPU runtime is sized for.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(16..))]
    max_model_len: u32,
    /// Weight and activation type of the linear layers.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    dtype: DtypeArg,
    /// Element type of the KV cache (fp8: GPU only).
    #[arg(long, value_enum, default_value_t = KvDtypeArg::Auto)]
    kv_cache_dtype: KvDtypeArg,
    /// Tensor-parallel ranks: GPUs 0..N of this machine (NCCL), or N CPU threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    tp: u32,
    /// Pipeline stages: the layers split into N balanced stages, each of --tp ranks (GPUs
    /// 0..tp*pp of this machine over NCCL, or CPU threads).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pp: u32,
}

/// How to size a CUDA runtime.
#[derive(Clone, Copy, Debug)]
pub struct CudaSizing {
    pub max_seqs: usize,
    pub max_batch_tokens: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// FP8 linear layers (GPU only).
    pub fp8: bool,
    /// FP8 KV cache (GPU only).
    pub kv_fp8: bool,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Pipeline stages (CPU only).
    pub pp: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// BF16 weights and activations (the CPU computes in f32).
    Bf16,
    /// FP8 E4M3 linear layers: weights per output channel, activations per token (GPU only;
    /// `flint eval` emulates it on the CPU). FP8 checkpoints load as stored.
    Fp8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvDtypeArg {
    /// FP8 with `--dtype fp8`, BF16 otherwise.
    Auto,
    Bf16,
    /// E4M3 codes with one scale per position and KV head, quantized as they are written
    /// (GPU only; `flint eval` emulates it on the CPU).
    Fp8,
}

impl KvDtypeArg {
    /// Whether the cache is FP8 for linear layers of `dtype`.
    pub fn fp8(self, dtype: DtypeArg) -> bool {
        match self {
            KvDtypeArg::Auto => dtype == DtypeArg::Fp8,
            KvDtypeArg::Bf16 => false,
            KvDtypeArg::Fp8 => true,
        }
    }
}

pub fn cuda_options(sizing: CudaSizing, max_positions: usize) -> flint_model::cuda::CudaLlamaOptions {
    flint_model::cuda::CudaLlamaOptions {
        max_batch_tokens: sizing.max_batch_tokens.max(sizing.max_seqs),
        max_seqs: sizing.max_seqs,
        max_seq_len: sizing.max_model_len.min(max_positions),
        block_size: sizing.block_size,
        fp8: sizing.fp8,
        kv_fp8: sizing.kv_fp8,
        ..flint_model::cuda::CudaLlamaOptions::default()
    }
}

/// Whether `--device auto` picks the GPU.
pub fn gpu_usable() -> bool {
    flint_cuda::cuda_available() && flint_kernels::all_built()
}

/// A random-weight model of a preset's shapes on GPU 0, with a byte tokenizer.
pub fn random_engine(preset: &str, sizing: CudaSizing) -> anyhow::Result<Engine> {
    let config = flint_model::ModelConfig::preset(preset).with_context(|| {
        format!("unknown preset {preset:?}; presets: {}", flint_model::ModelConfig::PRESETS.join(", "))
    })?;
    let options = cuda_options(sizing, config.max_position_embeddings);
    let tokenizer = flint_engine::Tokenizer::byte_level()?;
    if sizing.tp * sizing.pp > 1 {
        let weights = flint_model::cuda::GroupWeights::Random(0x5eed);
        let plan = flint_stages::StagePlan::balanced(&config, sizing.pp)?;
        let group = flint_stages::pipeline_cuda(config, sizing.tp, plan, 1, options, weights)?;
        return Ok(Engine::with_group(group, tokenizer));
    }
    let gpu = flint_cuda::Gpu::new(0).context("--random-weights needs a CUDA GPU")?;
    let model = flint_model::cuda::CudaLlama::random(gpu, config, options, 0x5eed)?;
    Ok(Engine::with_cuda(model, tokenizer))
}

/// Opens the model at `path` and loads it on `device`, with a progress bar on stderr. A
/// pipeline runs each step whole (one micro-batch): the engine keeps a step per stage in flight.
pub fn load_engine(model_path: &std::path::Path, device: DeviceArg, sizing: CudaSizing) -> anyhow::Result<Engine> {
    let use_cuda = match device {
        DeviceArg::Cpu => false,
        DeviceArg::Cuda => true,
        DeviceArg::Auto => gpu_usable(),
    };
    let source = Arc::new(ModelSource::open(model_path)?);
    if sizing.pp > 1 && use_cuda {
        let config = source.config()?;
        let tokenizer = flint_engine::Tokenizer::for_source(&source, &config)?;
        let plan = flint_stages::StagePlan::balanced(&config, sizing.pp)?;
        let options = cuda_options(sizing, config.max_position_embeddings);
        let what = format!("{} stages of {} GPUs", sizing.pp, sizing.tp);
        let weights = flint_model::cuda::GroupWeights::Checkpoint(Arc::clone(&source));
        let group = flint_stages::pipeline_cuda(config, sizing.tp, plan, 1, options, weights)
            .with_context(|| format!("loading {} as {what}", model_path.display()))?;
        return Ok(Engine::with_group(group, tokenizer));
    }
    if sizing.pp > 1 {
        let config = source.config()?;
        let tokenizer = flint_engine::Tokenizer::for_source(&source, &config)?;
        let plan = flint_stages::StagePlan::balanced(&config, sizing.pp)?;
        let what = format!("{} stages of {} CPU ranks", sizing.pp, sizing.tp);
        let group = flint_stages::pipeline_cpu(Arc::clone(&source), config, sizing.tp, plan, 1, DType::F32, || {
            Box::new(CpuBackend::new())
        })
        .with_context(|| format!("loading {} as {what}", model_path.display()))?;
        return Ok(Engine::with_group(group, tokenizer));
    }
    if use_cuda {
        let attempt = (|| -> anyhow::Result<Engine> {
            let config = source.config()?;
            let tokenizer = flint_engine::Tokenizer::for_source(&source, &config)?;
            if sizing.tp > 1 {
                let options = cuda_options(sizing, config.max_position_embeddings);
                let weights = flint_model::cuda::GroupWeights::Checkpoint(Arc::clone(&source));
                let group = flint_model::TpGroup::cuda(config, sizing.tp, options, weights)?;
                return Ok(Engine::with_group(group, tokenizer));
            }
            let gpu = flint_cuda::Gpu::new(0)?;
            let options = cuda_options(sizing, config.max_position_embeddings);
            let model = flint_model::cuda::CudaLlama::load(gpu, &source, config, options)?;
            Ok(Engine::with_cuda(model, tokenizer))
        })();
        match attempt {
            Ok(engine) => return Ok(engine),
            Err(e) if device == DeviceArg::Cuda => {
                return Err(e.context(format!("loading {} on the GPU", model_path.display())));
            }
            Err(e) => eprintln!("warning: the GPU is not usable ({e:#}); running on the CPU"),
        }
    }
    if sizing.fp8 {
        bail!("--dtype fp8 runs on the GPU (`flint eval` measures its accuracy on the CPU by emulation)");
    }
    if sizing.kv_fp8 {
        bail!("--kv-cache-dtype fp8 runs on the GPU (`flint eval` measures its accuracy on the CPU by emulation)");
    }
    if sizing.tp > 1 {
        let config = source.config()?;
        let tokenizer = flint_engine::Tokenizer::for_source(&source, &config)?;
        let group = flint_model::TpGroup::cpu(Arc::clone(&source), config, sizing.tp, DType::F32, || {
            Box::new(CpuBackend::new())
        })
        .with_context(|| format!("loading {} over {} CPU ranks", model_path.display(), sizing.tp))?;
        return Ok(Engine::with_group(group, tokenizer));
    }
    let backend: Box<dyn Backend> = Box::new(CpuBackend::new());
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_message(model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let engine = Engine::load(&source, backend, DType::F32, &mut |p| {
        bar.set_length(p.total_bytes as u64);
        bar.set_position(p.loaded_bytes as u64);
    })
    .with_context(|| format!("loading {}", model_path.display()))?;
    bar.finish_and_clear();
    Ok(engine)
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    model: String,
    device: String,
    #[serde(flatten)]
    generation: &'a flint_engine::Generation,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        seed: args.seed,
    };
    sampling.validate()?;
    let sizing = CudaSizing {
        max_seqs: 1,
        max_batch_tokens: 2048,
        max_model_len: args.max_model_len as usize,
        block_size: 16,
        fp8: args.dtype == DtypeArg::Fp8,
        kv_fp8: args.kv_cache_dtype.fp8(args.dtype),
        tp: args.tp as usize,
        pp: args.pp as usize,
    };
    let (engine, model_name) = match &args.random_weights {
        Some(preset) => {
            if args.device == DeviceArg::Cpu {
                bail!("--random-weights runs on the GPU only");
            }
            (random_engine(preset, sizing)?, format!("{preset} (random weights)"))
        }
        None => {
            let model_path = crate::resolve_model(args.model)?;
            (load_engine(&model_path, args.device, sizing)?, model_path.display().to_string())
        }
    };
    let device = engine.device();
    let random = args.random_weights.is_some();

    let prompt = if random {
        Prompt::TokenIds(args.prompt.bytes().map(u32::from).collect())
    } else if args.raw {
        Prompt::Raw(args.prompt)
    } else if engine.tokenizer().chat_template().is_none() {
        bail!("the model has no chat template: pass --raw to use the prompt as is")
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", args.prompt));
        Prompt::Chat(messages)
    };
    let request = GenerateRequest {
        prompt,
        max_tokens: args.max_tokens as usize,
        sampling,
        stop: args.stop,
        ignore_eos: args.ignore_eos,
        logprobs: (args.logprobs || args.top_logprobs > 0).then_some(args.top_logprobs as usize),
    };

    let generation = if args.json {
        engine.generate(&request, &mut |_| {})?
    } else if random {
        let generation = engine.generate(&request, &mut |_| {})?;
        let ids: Vec<String> = generation.token_ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(" "));
        generation
    } else {
        let stdout = std::io::stdout();
        let mut write_error = None;
        let generation = engine.generate(&request, &mut |piece| {
            let mut out = stdout.lock();
            if write_error.is_none()
                && let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush())
            {
                write_error = Some(e);
            }
        })?;
        if let Some(e) = write_error {
            return Err(e).context("writing to stdout");
        }
        writeln!(stdout.lock()).context("writing to stdout")?;
        generation
    };
    let t = &generation.timings;
    tracing::info!(
        prompt_tokens = generation.prompt_token_ids.len(),
        generated = generation.token_ids.len(),
        prefill_ms = format!("{:.1}", t.prefill_ms),
        decode_tok_s = format!("{:.1}", t.decode_tokens_per_s),
        finish = ?generation.finish_reason,
        "done"
    );
    if args.json {
        let out = JsonOutput { model: model_name, device, generation: &generation };
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &out).context("writing JSON")?;
        writeln!(stdout).context("writing to stdout")?;
    }
    Ok(())
}
