//! `flint serve`: the gRPC server over one model, until SIGTERM or Ctrl-C.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flint_engine::SchedulerConfig;
use flint_server::{ServeOptions, Server};

use crate::generate::{DeviceArg, load_engine};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A GGUF file or a Hugging Face model directory [default: $FLINT_MODEL, else the fetched SmolLM2]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Serve a released architecture with random weights instead of a checkpoint (GPU only; for
    /// load tests): llama-3.2-1b, llama-3.1-8b, llama-3.3-70b. Prompts are tokenized as bytes.
    #[arg(long, conflicts_with = "model")]
    random_weights: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// gRPC port.
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Port for Prometheus metrics on /metrics (same host); off when not given.
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Longest sequence (prompt plus output) the GPU runtime is sized for.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(16..))]
    max_model_len: u64,
    /// Weight and activation type of the linear layers (fp8: GPU only).
    #[arg(long, value_enum, default_value_t = crate::generate::DtypeArg::Bf16)]
    dtype: crate::generate::DtypeArg,
    /// Element type of the KV cache (fp8: GPU only; auto: fp8 with --dtype fp8).
    #[arg(long, value_enum, default_value_t = crate::generate::KvDtypeArg::Auto)]
    kv_cache_dtype: crate::generate::KvDtypeArg,
    /// Memory for the KV cache, in MiB (CPU; the GPU takes 90% of the memory left after weights).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    kv_cache_mb: u64,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    block_size: u32,
    /// Most tokens per step (prompt chunks and decodes together).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_batch_tokens: u32,
    /// Most requests running at once (at most --max-batch-tokens).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_running: u32,
    /// Most requests waiting; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    max_waiting: u32,
    /// Require `authorization: Bearer TOKEN` on every call except health checks.
    #[arg(long, env = "FLINT_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Serve TLS with this PEM certificate (chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds running requests get to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace_s: f64,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Tensor-parallel ranks: GPUs 0..N of this machine (NCCL), or N CPU threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    tp: u32,
    /// Pipeline stages: the layers split into N balanced stages, each of --tp ranks (GPUs
    /// 0..tp*pp of this machine over NCCL, or CPU threads).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pp: u32,
    /// Steps kept in flight at once, each over its own share of the running requests (with
    /// --pp or --tp above 1) [default: --pp, a step per stage]; 1 runs one step at a time. Above
    /// 1 with --tp alone, a step's sampling and streaming overlap the next step on the GPUs.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    steps_in_flight: Option<u32>,
    /// Processes (on this host or others) sharing the --tp x --pp ranks evenly (stage by stage):
    /// node 0 serves requests, the others run their ranks' steps for it. On GPUs, a node's ranks
    /// take its GPUs 0, 1, ...; pipeline stages across nodes run on GPUs only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    nnodes: u32,
    /// This process's node, 0..--nnodes.
    #[arg(long, default_value_t = 0)]
    node_rank: u32,
    /// HOST:PORT where node 0 listens: that port for the ranks' collectives, the next one for
    /// steps. Required with --nnodes above 1.
    #[arg(long)]
    master_addr: Option<String>,
}

/// `--nnodes` above 1: the node layout, after checking the flags that go with it.
fn multi_node(args: &ServeArgs) -> anyhow::Result<Option<flint_model::remote::Nodes>> {
    if args.nnodes == 1 {
        anyhow::ensure!(
            args.node_rank == 0 && args.master_addr.is_none(),
            "--node-rank and --master-addr go with --nnodes"
        );
        return Ok(None);
    }
    let master_addr = args.master_addr.clone().context("--nnodes above 1 needs --master-addr HOST:PORT (node 0's)")?;
    anyhow::ensure!(args.node_rank < args.nnodes, "--node-rank {} of {} nodes", args.node_rank, args.nnodes);
    anyhow::ensure!(
        (args.tp * args.pp).is_multiple_of(args.nnodes),
        "--tp {} x --pp {} ranks do not split evenly over {} nodes",
        args.tp,
        args.pp,
        args.nnodes
    );
    Ok(Some(flint_model::remote::Nodes {
        nnodes: args.nnodes as usize,
        node_rank: args.node_rank as usize,
        master_addr,
        timeout: Duration::from_secs(600),
    }))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.shutdown_grace_s.is_finite() && args.shutdown_grace_s >= 0.0,
        "--shutdown-grace-s must be a number of seconds >= 0"
    );
    anyhow::ensure!(
        args.max_batch_tokens >= args.max_running,
        "--max-batch-tokens ({}) must be at least --max-running ({}): every running request needs a token per step",
        args.max_batch_tokens,
        args.max_running
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(flint_server::TlsFiles {
            cert_pem: std::fs::read(cert).with_context(|| format!("reading --tls-cert {}", cert.display()))?,
            key_pem: std::fs::read(key).with_context(|| format!("reading --tls-key {}", key.display()))?,
        }),
        _ => None,
    };
    let nodes = multi_node(&args)?;
    if let Some(n) = args.steps_in_flight {
        anyhow::ensure!(
            args.tp * args.pp > 1 || n == 1,
            "--steps-in-flight {n} goes with --pp or --tp above 1 (rank threads that take steps in order)"
        );
    }
    if args.random_weights.is_some() {
        anyhow::ensure!(args.device != DeviceArg::Cpu, "--random-weights runs on the GPU only");
    }
    let model_path = match &args.random_weights {
        Some(preset) => PathBuf::from(format!("{preset}-random")),
        None => crate::resolve_model(args.model)?,
    };
    let sizing = crate::generate::CudaSizing {
        max_seqs: args.max_running as usize,
        max_batch_tokens: args.max_batch_tokens as usize,
        max_model_len: args.max_model_len as usize,
        block_size: args.block_size as usize,
        fp8: args.dtype == crate::generate::DtypeArg::Fp8,
        kv_fp8: args.kv_cache_dtype.fp8(args.dtype),
        tp: args.tp as usize,
        pp: args.pp as usize,
    };
    let mut engine = match (nodes, &args.random_weights) {
        (None, Some(preset)) => crate::generate::random_engine(preset, sizing)?,
        (None, None) => load_engine(&model_path, args.device, sizing)?,
        (Some(_), Some(_)) => anyhow::bail!("--random-weights runs in one process (no --nnodes)"),
        (Some(nodes), None) => {
            let use_cuda = match args.device {
                DeviceArg::Cpu => false,
                DeviceArg::Cuda => true,
                DeviceArg::Auto => crate::generate::gpu_usable(),
            };
            let source = Arc::new(flint_model::ModelSource::open(&model_path)?);
            let config = source.config()?;
            let (tp, pp) = (args.tp as usize, args.pp as usize);
            let world = tp * pp;
            let node = nodes.node_rank;
            let first_local = nodes.local_ranks(world)?.start;
            let make: Box<flint_model::remote::MakeRank<'static>> = if use_cuda {
                let options = crate::generate::cuda_options(sizing, config.max_position_embeddings);
                let weights = flint_model::cuda::GroupWeights::Checkpoint(Arc::clone(&source));
                let plan = flint_stages::StagePlan::balanced(&config, pp)?;
                // Whole steps: the engine keeps a step per stage in flight.
                let layout = flint_model::cuda::NodeLayout { tp, stages: plan.stages, micro_batches: 1 };
                let (c, n) = (config.clone(), nodes.clone());
                Box::new(move |rank| {
                    let (model, info) = flint_model::cuda::CudaRank::for_node(
                        &c,
                        &layout,
                        rank,
                        rank - first_local,
                        &n,
                        &options,
                        &weights,
                    )?;
                    Ok((Box::new(model) as Box<dyn flint_model::RankModel>, info))
                })
            } else {
                anyhow::ensure!(
                    pp == 1,
                    "pipeline stages across nodes run on GPUs (--device cuda); CPU nodes split --tp ranks only"
                );
                let (s, c, n) = (Arc::clone(&source), config.clone(), nodes.clone());
                Box::new(move |rank| {
                    let backend = Box::new(flint_cpu::CpuBackend::new());
                    flint_model::remote::cpu_rank_model(&s, &c, world, rank, &n, flint_tensor::DType::F32, backend)
                })
            };
            if node > 0 {
                eprintln!("node {node} of {}: following {} for --tp {tp} --pp {pp}", nodes.nnodes, nodes.master_addr);
                flint_model::remote::follow_node(world, &nodes, make.as_ref())
                    .with_context(|| format!("node {node}"))?;
                eprintln!("node {node}: the leader closed the job");
                return Ok(());
            }
            let tokenizer = flint_engine::Tokenizer::for_source(&source, &config)?;
            let group =
                flint_model::TpGroup::leader(config, tp, pp, &nodes, make).context("starting node 0 of the job")?;
            flint_engine::Engine::with_group(group, tokenizer)
        }
    };
    if let Some(n) = args.steps_in_flight {
        engine.set_steps_in_flight(n as usize);
    }
    let block_size = args.block_size as usize;
    let n_blocks = match engine.fixed_limits() {
        // The GPU sized its cache from free memory at load.
        Some((n_blocks, _, _, _)) => n_blocks,
        None => ((args.kv_cache_mb as usize) << 20) / (engine.kv_bytes_per_token() * block_size),
    };
    anyhow::ensure!(n_blocks > 0, "--kv-cache-mb {} holds no block of {block_size} tokens", args.kv_cache_mb);
    let scheduler = SchedulerConfig {
        block_size,
        n_blocks,
        max_batch_tokens: args.max_batch_tokens as usize,
        max_running: args.max_running as usize,
        max_waiting: args.max_waiting as usize,
    };
    let options = ServeOptions {
        model_name: model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        scheduler,
        metrics_addr: args.metrics_port.map(|p| SocketAddr::new(args.host, p)),
        auth_token: args.auth_token.filter(|t| !t.is_empty()),
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace_s),
        tls,
    };
    let addr = SocketAddr::new(args.host, args.port);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let server = Server::new(Arc::new(engine), options)?;
        eprintln!(
            "serving {} on {addr} (KV cache: {} tokens in {n_blocks} blocks)",
            model_path.display(),
            n_blocks * block_size
        );
        server.run(listener, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}
