//! The `flint` command: `generate` text with a model, `inspect` a checkpoint.

mod bench;
mod eval;
mod generate;
mod gpubench;
mod inspect;
mod quantize;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Flint: fast LLM inference.
#[derive(Debug, Parser)]
#[command(name = "flint", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Print a checkpoint's architecture, shapes, tensor types and memory needs.
    Inspect(inspect::InspectArgs),
    /// Load-test a running `flint serve`: throughput, time to first token, time per output token.
    Bench(Box<bench::BenchArgs>),
    /// Convert a safetensors checkpoint to FP8 (Hugging Face `quant_method: "fp8"` layout).
    Quantize(quantize::QuantizeArgs),
    /// Accuracy of FP8 against the unquantized model: perplexity, top-1 agreement, KL divergence.
    Eval(eval::EvalArgs),
    /// Serve the model over gRPC (flint.v1.Inference, health, reflection) with continuous batching.
    Serve(serve::ServeArgs),
}

/// File name of the default model, fetched by `cargo xtask fetch-model` into `models/`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model path to use: the flag, else `$FLINT_MODEL`, else the default model.
pub fn resolve_model(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = flag.or_else(|| std::env::var_os("FLINT_MODEL").map(PathBuf::from)) {
        anyhow::ensure!(path.exists(), "model not found: {}", path.display());
        return Ok(path);
    }
    let path = PathBuf::from(DEFAULT_MODEL);
    anyhow::ensure!(
        path.exists(),
        "model file not found: {DEFAULT_MODEL} (run `cargo xtask fetch-model` from the repository root, or pass --model PATH)"
    );
    Ok(path)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap's message spans several lines (tips, usage); keep its substance on one line.
            let rendered = e.to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.starts_with("Usage:"))
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with("tip:"))
                .collect();
            eprintln!("{} (see `flint --help`)", message.join(" "));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(*args),
        Command::Quantize(args) => quantize::run(args),
        Command::Eval(args) => eval::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
