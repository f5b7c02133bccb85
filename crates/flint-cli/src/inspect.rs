//! `flint inspect`: what a checkpoint holds, and what it costs to run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use flint_model::ModelSource;
use flint_tensor::DType;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A GGUF file or a Hugging Face model directory.
    path: PathBuf,
    /// List every tensor, not only the totals per type.
    #[arg(long)]
    tensors: bool,
    /// Also list GGUF metadata keys.
    #[arg(long)]
    metadata: bool,
}

fn human(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let source = ModelSource::open(&args.path)?;
    let config = source.config()?;
    let mut out = String::new();
    let c = &config;
    writeln!(out, "path            {}", source.path().display())?;
    writeln!(out, "format          {}", source.format())?;
    if let ModelSource::Gguf(f) = &source {
        writeln!(out, "gguf version    {}", f.version())?;
        if let Some(name) = f.get("general.name").and_then(|v| v.as_str()) {
            writeln!(out, "name            {name}")?;
        }
    }
    writeln!(out, "architecture    {}", c.architecture.as_str())?;
    writeln!(out, "parameters      {:.1} M", c.n_parameters() as f64 / 1e6)?;
    writeln!(out, "layers          {}", c.n_layers)?;
    writeln!(out, "hidden size     {}", c.hidden_size)?;
    writeln!(out, "ffn size        {}", c.intermediate_size)?;
    writeln!(out, "heads           {} query, {} key/value, head dim {}", c.n_heads, c.n_kv_heads, c.head_dim)?;
    writeln!(out, "vocabulary      {}", c.vocab_size)?;
    writeln!(out, "context         {}", c.max_position_embeddings)?;
    writeln!(out, "rope theta      {}, scaling {}", c.rope_theta, summarize_scaling(&c.rope_scaling))?;
    writeln!(out, "rms norm eps    {:e}", c.rms_norm_eps)?;
    writeln!(out, "tied embeddings {}", c.tie_word_embeddings)?;
    writeln!(out, "eos token ids   {:?}", c.eos_token_ids)?;

    let tensors = source.stored_tensors()?;
    let mut by_type: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for t in &tensors {
        let e = by_type.entry(t.type_name.clone()).or_default();
        e.0 += 1;
        e.1 += t.dims.iter().product::<usize>();
        e.2 += t.size_in_bytes;
    }
    writeln!(out, "\ntensors         {} ({} of data)", tensors.len(), human(source.data_size()))?;
    for (ty, (count, elems, bytes)) in &by_type {
        let bits = if *elems > 0 { *bytes as f64 * 8.0 / *elems as f64 } else { 0.0 };
        writeln!(out, "  {ty:<8} {count:>5} tensors  {:>10}  {bits:.2} bits/weight", human(*bytes))?;
    }

    let kv_per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim;
    writeln!(out, "\nmemory")?;
    for dtype in [DType::F32, DType::BF16] {
        writeln!(out, "  weights as {dtype:<4}       {}", human(dtype.size_in_bytes(c.n_parameters())))?;
    }
    for dtype in [DType::F32, DType::BF16] {
        writeln!(
            out,
            "  KV cache as {dtype:<4}      {} per token, {} for the full context",
            human(dtype.size_in_bytes(kv_per_token)),
            human(dtype.size_in_bytes(kv_per_token) * c.max_position_embeddings)
        )?;
    }

    if args.tensors {
        writeln!(out, "\n{:<48} {:<8} {:<20} {:>10}", "tensor", "type", "shape", "bytes")?;
        for t in &tensors {
            writeln!(
                out,
                "{:<48} {:<8} {:<20} {:>10}",
                t.name,
                t.type_name,
                format!("{:?}", t.dims),
                human(t.size_in_bytes)
            )?;
        }
    }
    if args.metadata
        && let ModelSource::Gguf(f) = &source
    {
        writeln!(out, "\nmetadata")?;
        for (k, v) in f.metadata() {
            writeln!(out, "  {k:<44} {}", v.summary())?;
        }
    }
    print!("{out}");
    Ok(())
}

fn summarize_scaling(s: &flint_model::RopeScaling) -> String {
    match s {
        flint_model::RopeScaling::None => "none".to_string(),
        flint_model::RopeScaling::Linear(f) => format!("linear x{f}"),
        flint_model::RopeScaling::Llama3(l) => {
            format!("llama3 x{} (original context {})", l.factor, l.original_max_position_embeddings)
        }
        flint_model::RopeScaling::FreqFactors(f) => format!("{} stored frequency factors", f.len()),
    }
}
