//! `flint bench --server ADDR`: a load generator for `flint serve`. Sends requests with
//! synthetic prompts of chosen token lengths (ids drawn from the model's vocabulary, EOS
//! ignored so every output has its chosen length), at a fixed concurrency or a Poisson request
//! rate, and reports throughput and latency percentiles.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flint_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tonic::transport::Channel;

/// A length: `N` exactly, or `A:B` drawn uniformly from A..=B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthRange {
    min: u32,
    max: u32,
}

impl FromStr for LengthRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| t.trim().parse::<u32>().map_err(|_| format!("{t:?} is not a token count"));
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("{s:?}: lengths must be at least 1, written N or MIN:MAX"));
        }
        Ok(LengthRange { min, max })
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Address of a running `flint serve` (host:port or http://host:port).
    #[arg(long, required_unless_present_any = ["preset", "allreduce"], conflicts_with_all = ["preset", "allreduce"])]
    server: Option<String>,
    /// Time all-reduces among GPUs 0..--tp over --sizes: NCCL (BF16 sums, host-enqueued and from
    /// a CUDA graph) against the peer-to-peer one-shot kernel, alone and fused with RMSNorm.
    #[arg(long, conflicts_with = "preset")]
    allreduce: bool,
    /// With --allreduce: message sizes in bytes, comma-separated (K and M suffixes allowed).
    #[arg(long, default_value = "4K,16K,64K,256K,1M,4M,16M", requires = "allreduce")]
    sizes: String,
    /// With --preset or --allreduce: tensor-parallel ranks (GPUs 0..N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    tp: u32,
    /// With --preset: pipeline stages, each of --tp GPUs (GPUs 0..tp*pp).
    #[arg(long, default_value_t = 1, requires = "preset", value_parser = clap::value_parser!(u32).range(1..=64))]
    pp: u32,
    /// With --preset and --tp: all-reduce through NCCL only (no peer-to-peer kernel).
    #[arg(long, requires = "preset")]
    no_p2p: bool,
    /// With --preset and --tp: how the peer-to-peer all-reduce moves data: flags (a flag
    /// barrier, then every rank reads every rank's values) or lamport (every rank pushes its
    /// values into the peers' memory; no barrier).
    #[arg(long, default_value = "flags", requires = "preset", conflicts_with = "no_p2p")]
    p2p_link: flint_comm::P2pLink,
    /// Benchmark a model on the local GPU instead: random weights of this preset's shapes
    /// (llama-3.2-1b, llama-3.1-8b, llama-3.3-70b).
    #[arg(long)]
    preset: Option<String>,
    /// Batch sizes for --preset, comma-separated.
    #[arg(long, default_value = "1,8,32,128", requires = "preset")]
    batches: String,
    /// PROMPT:OUTPUT lengths for --preset, comma-separated.
    #[arg(long, default_value = "128:128,2048:256", requires = "preset")]
    lengths: String,
    /// With --preset (one GPU, or --tp alone): also time each operation of a step mixing D
    /// decodes with P prompt tokens (new sequences of 128), as a server's steps under load are.
    #[arg(long, value_name = "D:P", requires = "preset", value_parser = parse_mixed)]
    mixed: Option<(usize, usize)>,
    /// With --preset: run decode steps without CUDA graphs.
    #[arg(long, requires = "preset")]
    no_graphs: bool,
    /// With --preset: largest token count that uses the GEMV kernel instead of cuBLASLt (1..=8).
    #[arg(long, default_value_t = 2, requires = "preset", value_parser = clap::value_parser!(u64).range(1..=8))]
    gemv_max_m: u64,
    /// With --preset: bf16, or fp8 to measure the FP8 model after the BF16 one in the same run
    /// (with --tp or --pp above 1: the FP8 model alone).
    #[arg(long, default_value = "bf16", requires = "preset", value_parser = ["bf16", "fp8"])]
    dtype: String,
    /// With --preset and --dtype fp8: the FP8 model's KV cache.
    #[arg(long, default_value = "fp8", requires = "preset", value_parser = ["bf16", "fp8"])]
    kv_cache_dtype: String,
    /// With --preset and --dtype fp8: how one-token decode steps quantize the inputs of the O
    /// and down projections (larger steps always run a quantization kernel): fused (the GEMVs
    /// quantize them from the amax their producers publish), separate (a quantization kernel
    /// before each), or both (the FP8 model measured each way, one after the other in this run).
    #[arg(long, default_value = "fused", requires = "preset", value_parser = ["fused", "separate", "both"])]
    fp8_quantization: String,
    /// With --preset: whether decode-only steps rope the queries and write the new keys and
    /// values in the decode attention kernel (fused) or in a kernel before it (separate); both:
    /// each model measured each way, one after the other in this run. The default is the
    /// model's.
    #[arg(long, default_value = "fused", requires = "preset", value_parser = ["fused", "separate", "both"])]
    rope_attention: String,
    /// With --preset and --dtype fp8: whether FP8 steps of one token on one GPU run the residual
    /// add + RMSNorm + quantize after the O and down projections in those GEMVs' last block
    /// (fused) or in a norm kernel after each (separate); both: the FP8 model measured each way
    /// in this run. The default is the model's.
    #[arg(long, default_value = "fused", requires = "preset", value_parser = ["fused", "separate", "both"])]
    norm_tail: String,
    /// With --preset and --dtype fp8: whether that norm (steps of one token) is split over the O
    /// or down GEMV, whose blocks each add their rows into the residual and leave their sums, and
    /// the GEMV after it, which finishes the norm and quantizes (fused), or run by the O and down
    /// GEMVs' last block once the others are done (separate); both: the FP8 model measured each
    /// way in this run. The default is the model's.
    #[arg(long, default_value = "fused", requires = "preset", value_parser = ["fused", "separate", "both"])]
    split_norm: String,
    /// With --preset on one GPU: launch tunings, comma-separated, each `off` (every kernel waits
    /// for the previous one before it reads anything) or N (early launch: the small kernels let
    /// the next one launch as they start and the GEMVs load weights before they wait, with N MiB
    /// of them asked into L2 by each GEMV that follows a latency-bound kernel). The first is the
    /// run's; the decode rows are measured again under each other one on the same models.
    /// Default: FLINT_EARLY_LAUNCH / FLINT_L2_PREFETCH_MB, else early launch with 4 MiB.
    #[arg(long, requires = "preset")]
    launch_tuning: Option<String>,
    /// With --preset or --allreduce: also write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Requests to send.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    num_requests: u32,
    /// Requests in flight at once (closed loop). Ignored with --request-rate.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Requests per second, arriving as a Poisson process (open loop).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Prompt length in tokens: N, or MIN:MAX drawn uniformly.
    #[arg(long, default_value = "128")]
    prompt_len: LengthRange,
    /// Output length in tokens: N, or MIN:MAX drawn uniformly.
    #[arg(long, default_value = "128")]
    output_len: LengthRange,
    /// Sampling temperature of every request (0: greedy, the default).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true, value_parser = parse_temperature)]
    temperature: f32,
    /// Nucleus sampling of every request (1: off).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_top_p)]
    top_p: Option<f32>,
    /// Keep each request's K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Repetition penalty of every request (1: off); such requests are sampled on the host.
    #[arg(long, value_parser = parse_repetition_penalty)]
    repetition_penalty: Option<f32>,
    /// Seed for prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Bearer token for the server.
    #[arg(long, env = "FLINT_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("{s:?}: expected a temperature >= 0 (0 is greedy)")),
    }
}

fn parse_repetition_penalty(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?}: expected a repetition penalty > 0 (1 is off)")),
    }
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("{s:?}: expected a top-p in (0, 1]")),
    }
}

/// `D:P`: decodes and prompt tokens of a mixed step, both positive.
fn parse_mixed(s: &str) -> Result<(usize, usize), String> {
    let (d, p) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected DECODES:PROMPT_TOKENS"))?;
    let num = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| n > 0);
    match (num(d), num(p)) {
        (Some(d), Some(p)) => Ok((d, p)),
        _ => Err(format!("{s:?}: decodes and prompt tokens must be positive integers")),
    }
}

struct Planned {
    prompt: Vec<u32>,
    output_len: u32,
    sampling: Option<pb::SamplingParams>,
    /// Offset from the start at which to send (open loop).
    send_at: Duration,
}

#[derive(Debug)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    prompt_tokens: u32,
    output_tokens: u32,
    ttft_s: f64,
    tpot_s: Option<f64>,
    latency_s: f64,
}

/// Percentiles of one metric, in milliseconds.
#[derive(Debug, Serialize)]
struct Percentiles {
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut values: Vec<f64>) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize] * 1e3;
    Some(Percentiles {
        mean: values.iter().sum::<f64>() / values.len() as f64 * 1e3,
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
    })
}

#[derive(Debug, Serialize)]
struct Report {
    server: String,
    model: String,
    device: String,
    mode: String,
    requests: u32,
    succeeded: usize,
    failed: usize,
    first_error: Option<String>,
    duration_s: f64,
    requests_per_s: f64,
    output_tokens_per_s: f64,
    total_tokens_per_s: f64,
    prompt_tokens: u64,
    output_tokens: u64,
    ttft_ms: Option<Percentiles>,
    tpot_ms: Option<Percentiles>,
    latency_ms: Option<Percentiles>,
}

async fn one_request(mut client: InferenceClient<Channel>, token: Option<String>, plan: Planned) -> Outcome {
    let started = Instant::now();
    let prompt_tokens = plan.prompt.len() as u32;
    let body = pb::GenerateRequest {
        prompt_token_ids: plan.prompt,
        max_tokens: plan.output_len,
        ignore_eos: true,
        sampling: plan.sampling,
        ..Default::default()
    };
    let mut request = tonic::Request::new(body);
    if let Some(t) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
        request.metadata_mut().insert("authorization", t);
    }
    let result: Result<(u32, Option<Instant>, Instant), tonic::Status> = async {
        let mut stream = client.generate(request).await?.into_inner();
        let mut n = 0u32;
        let mut first = None;
        let mut last = Instant::now();
        while let Some(msg) = stream.message().await? {
            if !msg.token_ids.is_empty() {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                n += msg.token_ids.len() as u32;
            }
        }
        Ok((n, first, last))
    }
    .await;
    let latency_s = started.elapsed().as_secs_f64();
    match result {
        Ok((n, Some(first), last)) => Outcome {
            ok: true,
            error: None,
            prompt_tokens,
            output_tokens: n,
            ttft_s: (first - started).as_secs_f64(),
            tpot_s: (n > 1).then(|| (last - first).as_secs_f64() / (n - 1) as f64),
            latency_s,
        },
        Ok((_, None, _)) => Outcome {
            ok: false,
            error: Some("the stream ended without tokens".into()),
            prompt_tokens,
            output_tokens: 0,
            ttft_s: 0.0,
            tpot_s: None,
            latency_s,
        },
        Err(status) => Outcome {
            ok: false,
            error: Some(format!("{:?}: {}", status.code(), status.message())),
            prompt_tokens,
            output_tokens: 0,
            ttft_s: 0.0,
            tpot_s: None,
            latency_s,
        },
    }
}

fn endpoint(server: &str) -> String {
    if server.contains("://") { server.to_string() } else { format!("http://{server}") }
}

fn parse_size(s: &str) -> anyhow::Result<usize> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1usize << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        _ => (s, 1),
    };
    let n: usize = num.parse().with_context(|| format!("bad size {s:?} (bytes, or with a K or M suffix)"))?;
    anyhow::ensure!(n > 0, "sizes must be positive: {s:?}");
    Ok(n * mult)
}

/// Writes a GPU report to `--json-out` if given and prints it with `--json`; whether it was
/// printed (else the caller prints its table).
fn emit_json(args: &BenchArgs, report: &impl serde::Serialize) -> anyhow::Result<bool> {
    let json = serde_json::to_string_pretty(report).context("encoding the report")?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    }
    Ok(args.json)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.allreduce {
        anyhow::ensure!(args.tp >= 2, "--allreduce needs --tp 2 or more");
        let sizes = args.sizes.split(',').map(parse_size).collect::<anyhow::Result<Vec<_>>>()?;
        let measured = flint_comm::bench::all_reduce_latency(args.tp as usize, &sizes, 50)?;
        let report = serde_json::json!({
            "revision": env!("FLINT_REVISION"),
            "unix_time": crate::gpubench::unix_time(),
            "gpu": measured.gpu,
            "ranks": measured.ranks,
            "rows": measured.rows,
        });
        if !emit_json(&args, &report)? {
            let rows = &measured.rows;
            println!(
                "BF16 sum all-reduce, {} GPUs, mean of 50, median of 5 runs: NCCL (in place; eager and from a CUDA graph) \
                 against the peer-to-peer one-shot kernel over its flag and push (lamport) links (graph), alone and followed by \
                 residual add + RMSNorm over rows of {}",
                args.tp,
                flint_comm::bench::FUSED_HIDDEN
            );
            println!(
                "{:>10} {:>11} {:>11} {:>10} {:>11} {:>11} {:>15} {:>15} {:>15}",
                "bytes",
                "nccl eager",
                "nccl graph",
                "bus GB/s",
                "p2p graph",
                "push graph",
                "nccl+norm graph",
                "p2p+norm fused",
                "push+norm fused"
            );
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            for r in rows {
                println!(
                    "{:>10} {:>11.2} {:>11.2} {:>10.1} {:>11.2} {:>11.2} {:>15} {:>15} {:>15}",
                    r.bytes,
                    r.eager_us,
                    r.graph_us,
                    r.bus_gbs,
                    r.p2p_graph_us,
                    r.lamport_graph_us,
                    opt(r.nccl_norm_graph_us),
                    opt(r.p2p_norm_graph_us),
                    opt(r.lamport_norm_graph_us)
                );
            }
        }
        return Ok(());
    }
    if let Some(preset) = &args.preset {
        let batches = crate::gpubench::parse_batches(&args.batches)?;
        let lengths = crate::gpubench::parse_lengths(&args.lengths)?;
        let tunings = args.launch_tuning.as_deref().map(crate::gpubench::parse_tunings).transpose()?;
        let report = crate::gpubench::run_preset(
            preset,
            &batches,
            &lengths,
            !args.no_graphs,
            args.gemv_max_m as usize,
            (args.dtype == "fp8").then_some(args.kv_cache_dtype == "fp8"),
            crate::gpubench::Fusions {
                fp8_quantization: crate::gpubench::Fusion::parse("fp8-quantization", &args.fp8_quantization)?,
                rope_attention: crate::gpubench::Fusion::parse("rope-attention", &args.rope_attention)?,
                norm_tail: crate::gpubench::Fusion::parse("norm-tail", &args.norm_tail)?,
                split_norm: crate::gpubench::Fusion::parse("split-norm", &args.split_norm)?,
            },
            args.tp as usize,
            args.pp as usize,
            (!args.no_p2p).then_some(args.p2p_link),
            args.mixed,
            tunings.as_deref().unwrap_or_default(),
        )?;
        if !emit_json(&args, &report)? {
            crate::gpubench::print_table(&report);
            crate::gpubench::print_fp8_table(&report);
        }
        return Ok(());
    }
    if let Some(rate) = args.request_rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--request-rate must be a positive number of requests per second");
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = runtime.block_on(bench(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report).context("encoding the report")?);
    } else {
        print_table(&report);
    }
    if report.succeeded == 0 {
        bail!("every request failed: {}", report.first_error.unwrap_or_default());
    }
    Ok(())
}

async fn bench(args: &BenchArgs) -> anyhow::Result<Report> {
    let server = args.server.as_deref().context("--server is required")?;
    let uri = endpoint(server);
    let channel = Channel::from_shared(uri.clone())
        .with_context(|| format!("invalid server address {server:?}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri}"))?;
    let mut info_request = tonic::Request::new(pb::ModelInfoRequest {});
    if let Some(t) = args.auth_token.as_ref().and_then(|t| format!("Bearer {t}").parse().ok()) {
        info_request.metadata_mut().insert("authorization", t);
    }
    let info = InferenceClient::new(channel.clone())
        .model_info(info_request)
        .await
        .map_err(|s| anyhow::anyhow!("ModelInfo failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let vocab = info.vocab_size.max(2);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut send_at = Duration::ZERO;
    let sampling =
        (args.temperature > 0.0 || args.top_p.is_some() || args.top_k > 0 || args.repetition_penalty.is_some()).then(
            || pb::SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                top_k: args.top_k,
                repetition_penalty: args.repetition_penalty,
                ..Default::default()
            },
        );
    let plans: Vec<Planned> = (0..args.num_requests)
        .map(|_| {
            let n_prompt = rng.random_range(args.prompt_len.min..=args.prompt_len.max);
            let output_len = rng.random_range(args.output_len.min..=args.output_len.max);
            // Ordinary ids: skip the low range, where tokenizers keep their special tokens.
            let low = 256.min(vocab - 1);
            let prompt = (0..n_prompt).map(|_| rng.random_range(low..vocab)).collect();
            if let Some(rate) = args.request_rate {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                send_at += Duration::from_secs_f64(-u.ln() / rate);
            }
            Planned { prompt, output_len, send_at, sampling }
        })
        .collect();

    let started = Instant::now();
    let token = args.auth_token.clone();
    let outcomes: Vec<Outcome> = if args.request_rate.is_some() {
        let mut tasks = Vec::with_capacity(plans.len());
        for plan in plans {
            let client = InferenceClient::new(channel.clone());
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until((started + plan.send_at).into()).await;
                one_request(client, token, plan).await
            }));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.context("request task")?);
        }
        out
    } else {
        let queue = std::sync::Arc::new(tokio::sync::Mutex::new(plans.into_iter()));
        let mut workers = Vec::new();
        for _ in 0..args.concurrency {
            let queue = std::sync::Arc::clone(&queue);
            let client = InferenceClient::new(channel.clone());
            let token = token.clone();
            workers.push(tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let next = queue.lock().await.next();
                    let Some(plan) = next else { break };
                    done.push(one_request(client.clone(), token.clone(), plan).await);
                }
                done
            }));
        }
        let mut out = Vec::new();
        for w in workers {
            out.extend(w.await.context("worker task")?);
        }
        out
    };
    let duration_s = started.elapsed().as_secs_f64();

    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let prompt_tokens: u64 = ok.iter().map(|o| o.prompt_tokens as u64).sum();
    let output_tokens: u64 = ok.iter().map(|o| o.output_tokens as u64).sum();
    Ok(Report {
        server: uri,
        model: info.model,
        device: info.device,
        mode: format!(
            "{}, {}",
            match args.request_rate {
                Some(r) => format!("poisson {r} req/s"),
                None => format!("concurrency {}", args.concurrency),
            },
            match sampling {
                Some(p) => format!(
                    "temperature {} top-p {} top-k {} repetition penalty {}",
                    p.temperature,
                    p.top_p.unwrap_or(1.0),
                    p.top_k,
                    p.repetition_penalty.unwrap_or(1.0)
                ),
                None => "greedy".to_string(),
            }
        ),
        requests: args.num_requests,
        succeeded: ok.len(),
        failed: outcomes.len() - ok.len(),
        first_error: outcomes.iter().find_map(|o| o.error.clone()),
        duration_s,
        requests_per_s: ok.len() as f64 / duration_s,
        output_tokens_per_s: output_tokens as f64 / duration_s,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / duration_s,
        prompt_tokens,
        output_tokens,
        ttft_ms: percentiles(ok.iter().map(|o| o.ttft_s).collect()),
        tpot_ms: percentiles(ok.iter().filter_map(|o| o.tpot_s).collect()),
        latency_ms: percentiles(ok.iter().map(|o| o.latency_s).collect()),
    })
}

fn print_table(r: &Report) {
    println!("server         {} ({} on {})", r.server, r.model, r.device);
    println!("load           {}, {} requests", r.mode, r.requests);
    println!(
        "succeeded      {} ({} failed{})",
        r.succeeded,
        r.failed,
        r.first_error.as_ref().map(|e| format!(", first: {e}")).unwrap_or_default()
    );
    println!("duration       {:.2} s", r.duration_s);
    println!(
        "throughput     {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
        r.requests_per_s, r.output_tokens_per_s, r.total_tokens_per_s
    );
    println!("tokens         {} prompt, {} output", r.prompt_tokens, r.output_tokens);
    println!("{:<14} {:>10} {:>10} {:>10} {:>10} {:>10}", "ms", "mean", "p50", "p90", "p99", "max");
    for (name, p) in [("TTFT", &r.ttft_ms), ("TPOT", &r.tpot_ms), ("latency", &r.latency_ms)] {
        if let Some(p) = p {
            println!("{name:<14} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}", p.mean, p.p50, p.p90, p.p99, p.max);
        }
    }
}
