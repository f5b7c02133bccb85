//! `flint quantize --fp8`: write an FP8 copy of a safetensors checkpoint.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use flint_quant::{Granularity, ScaleRule};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GranularityArg {
    /// One scale per weight matrix.
    Tensor,
    /// One scale per output channel (row).
    Channel,
    /// One scale per 128x128 tile (the DeepSeek layout).
    Block,
}

impl From<GranularityArg> for Granularity {
    fn from(g: GranularityArg) -> Self {
        match g {
            GranularityArg::Tensor => Granularity::Tensor,
            GranularityArg::Channel => Granularity::Channel,
            GranularityArg::Block => Granularity::Block(128),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScalesArg {
    /// Each group's largest magnitude maps onto E4M3's largest value (448).
    Max,
    /// Of 64 scales over one octave above that, the one with the least squared error over the
    /// group (slower; never a larger error).
    Mse,
}

impl From<ScalesArg> for ScaleRule {
    fn from(s: ScalesArg) -> Self {
        match s {
            ScalesArg::Max => ScaleRule::Max,
            ScalesArg::Mse => ScaleRule::Mse,
        }
    }
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Quantize the decoder blocks' linear weights to FP8 E4M3 (the one scheme for now; required).
    #[arg(long)]
    fp8: bool,
    /// How finely weight scales are kept.
    #[arg(long, value_enum, default_value_t = GranularityArg::Channel)]
    granularity: GranularityArg,
    /// How each group's weight scale is chosen.
    #[arg(long, value_enum, default_value_t = ScalesArg::Max)]
    scales: ScalesArg,
    /// A Hugging Face model directory with F32, F16 or BF16 safetensors.
    input: PathBuf,
    /// Where to write the FP8 checkpoint (created; must not hold a checkpoint).
    output: PathBuf,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    if !args.fp8 {
        bail!("name the format to quantize to: --fp8 (the only one supported)");
    }
    if !args.input.is_dir() {
        bail!("{} is not a Hugging Face model directory (config.json and *.safetensors)", args.input.display());
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("quantizing [{bar:30}] {binary_bytes}/{binary_total_bytes} {eta}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    let report = flint_model::fp8_checkpoint::quantize_checkpoint(
        &args.input,
        &args.output,
        args.granularity.into(),
        args.scales.into(),
        &mut |p| {
            bar.set_length(p.total_bytes as u64);
            bar.set_position(p.done_bytes as u64);
        },
    )
    .with_context(|| format!("quantizing {}", args.input.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {}: {} weights to FP8 ({:?} scales, {:?} rule), {} tensors copied, {:.2} GB -> {:.2} GB in {} file(s)",
        args.output.display(),
        report.quantized,
        args.granularity,
        args.scales,
        report.copied,
        report.input_bytes as f64 / 1e9,
        report.output_bytes as f64 / 1e9,
        report.shards
    );
    Ok(())
}
