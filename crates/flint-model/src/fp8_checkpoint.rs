//! `flint quantize --fp8`: writes an FP8 copy of a Hugging Face safetensors checkpoint.
//!
//! The linear layers of the decoder blocks (`q/k/v/o_proj`, `gate/up/down_proj`) become
//! `F8_E4M3` weights with F32 `weight_scale_inv` beside them (`value = code * scale`), shaped
//! `[1, 1]`, `[rows, 1]` or `[ceil(rows / 128), ceil(cols / 128)]` by granularity; everything
//! else (embeddings, norms, biases, the LM head) is copied as stored. `config.json` gains the
//! Hugging Face fine-grained FP8 `quantization_config` (`quant_method: "fp8"`, dynamic
//! activations, `weight_block_size` for block scales), so Hugging Face transformers and other
//! engines read the result; the tokenizer and generation files are copied.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use flint_quant::{Fp8Format, Fp8Matrix, Granularity, ScaleRule};
use rayon::prelude::*;
use safetensors::{Dtype, View};
use serde_json::{Value, json};

use crate::source::SafetensorsDir;
use crate::{Error, Result};

/// Files copied unchanged from the input directory when present.
const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
];

/// Largest output shard, in bytes (Hugging Face's default for `save_pretrained`).
const SHARD_BYTES: usize = 5 << 30;

/// Whether `name` is a weight that FP8 checkpoints quantize.
pub fn is_quantized_weight(name: &str) -> bool {
    const MODULES: &[&str] = &[
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    name.starts_with("model.layers.")
        && name.strip_suffix(".weight").is_some_and(|module| MODULES.iter().any(|m| module.ends_with(m)))
}

/// Progress of a conversion: bytes of input read so far and in all.
#[derive(Clone, Copy, Debug)]
pub struct QuantizeProgress {
    pub done_bytes: usize,
    pub total_bytes: usize,
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    pub quantized: usize,
    pub copied: usize,
    pub input_bytes: usize,
    pub output_bytes: usize,
    pub shards: usize,
}

struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// The `quantization_config` written for `granularity`.
pub fn quantization_config(granularity: Granularity) -> Value {
    let block = match granularity {
        Granularity::Block(b) => json!([b, b]),
        _ => Value::Null,
    };
    json!({
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": block,
        "modules_to_not_convert": ["lm_head"],
    })
}

/// Converts the safetensors checkpoint in `input` into an FP8 checkpoint in `output` (created;
/// it must not hold a checkpoint already), each weight group's scale chosen by `rule` (any rule
/// writes the same layout: a reader takes the scales as stored).
pub fn quantize_checkpoint(
    input: &Path,
    output: &Path,
    granularity: Granularity,
    rule: ScaleRule,
    progress: &mut dyn FnMut(QuantizeProgress),
) -> Result<QuantizeReport> {
    let src = SafetensorsDir::open(input)?;
    if src.quant_config().is_some() {
        return Err(Error::Config {
            source_name: input.join("config.json").display().to_string(),
            message: "the checkpoint is quantized already; FP8 conversion needs F32, F16 or BF16 weights".into(),
        });
    }
    let config_path = input.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let mut config: Value = serde_json::from_str(&config_text)
        .map_err(|e| Error::Config { source_name: config_path.display().to_string(), message: e.to_string() })?;
    // Validate the architecture before writing anything.
    crate::ModelConfig::from_hf_json(&config_text, &config_path.display().to_string())?;

    if output.join("config.json").exists() || output.join("model.safetensors.index.json").exists() {
        return Err(Error::Config {
            source_name: output.display().to_string(),
            message: "the output directory holds a checkpoint already".into(),
        });
    }
    std::fs::create_dir_all(output).map_err(io(output))?;

    let names = src.names();
    let mut total_bytes = 0;
    for name in &names {
        if let Some((_, _, bytes)) = src.raw(name)? {
            total_bytes += bytes.len();
        }
    }
    let mut report = QuantizeReport { quantized: 0, copied: 0, input_bytes: total_bytes, output_bytes: 0, shards: 0 };
    let mut done_bytes = 0;
    progress(QuantizeProgress { done_bytes, total_bytes });

    // Tensors grouped into shards of at most SHARD_BYTES, written as each fills.
    let mut shard: Vec<(String, OwnedView)> = Vec::new();
    let mut shard_bytes = 0;
    let mut shard_files: Vec<(String, Vec<String>)> = Vec::new();
    let flush = |shard: &mut Vec<(String, OwnedView)>, files: &mut Vec<(String, Vec<String>)>| -> Result<()> {
        if shard.is_empty() {
            return Ok(());
        }
        let file = format!("model-part-{:05}.safetensors", files.len() + 1);
        let path = output.join(&file);
        let mut metadata = HashMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(shard.iter().map(|(n, v)| (n.as_str(), v)), Some(metadata), &path)
            .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        files.push((file, shard.drain(..).map(|(n, _)| n).collect()));
        Ok(())
    };
    for name in &names {
        let Some((dtype, dims, bytes)) = src.raw(name)? else { continue };
        let mut views = Vec::with_capacity(2);
        if is_quantized_weight(name) && dims.len() == 2 {
            let values = src
                .tensor_f32(name)?
                .ok_or_else(|| Error::WeightFormat { name: name.clone(), message: "vanished".into() })?;
            let (rows, cols) = (dims[0], dims[1]);
            let m = quantize_parallel(&values.data, rows, cols, granularity, rule);
            let scale_dims = granularity.scale_dims(rows, cols).to_vec();
            let module = name.strip_suffix(".weight").unwrap_or(name);
            views.push((name.clone(), OwnedView { dtype: Dtype::F8_E4M3, shape: dims.clone(), data: m.codes }));
            views.push((
                format!("{module}.weight_scale_inv"),
                OwnedView {
                    dtype: Dtype::F32,
                    shape: scale_dims,
                    data: m.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                },
            ));
            report.quantized += 1;
        } else {
            views.push((name.clone(), OwnedView { dtype, shape: dims.clone(), data: bytes.to_vec() }));
            report.copied += 1;
        }
        for (n, v) in views {
            shard_bytes += v.data.len();
            report.output_bytes += v.data.len();
            shard.push((n, v));
        }
        if shard_bytes >= SHARD_BYTES {
            flush(&mut shard, &mut shard_files)?;
            shard_bytes = 0;
        }
        done_bytes += bytes.len();
        progress(QuantizeProgress { done_bytes, total_bytes });
    }
    flush(&mut shard, &mut shard_files)?;

    // Final names: model-0000i-of-0000N.safetensors, with the index.
    let n = shard_files.len();
    let mut weight_map = BTreeMap::new();
    for (i, (file, tensors)) in shard_files.iter().enumerate() {
        let final_name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        std::fs::rename(output.join(file), output.join(&final_name)).map_err(io(output))?;
        for t in tensors {
            weight_map.insert(t.clone(), final_name.clone());
        }
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": report.output_bytes }, "weight_map": weight_map });
        let path = output.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap_or_default()).map_err(io(&path))?;
    }
    report.shards = n;

    if let Some(obj) = config.as_object_mut() {
        obj.insert("quantization_config".into(), quantization_config(granularity));
    }
    let path = output.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap_or_default()).map_err(io(&path))?;
    for file in COPIED_FILES {
        let from = input.join(file);
        if from.exists() {
            let to = output.join(file);
            std::fs::copy(&from, &to).map_err(io(&to))?;
        }
    }
    Ok(report)
}

/// [`Fp8Matrix::quantize_with`] with the rows spread over threads (scales first, then codes).
fn quantize_parallel(values: &[f32], rows: usize, cols: usize, granularity: Granularity, rule: ScaleRule) -> Fp8Matrix {
    let format = Fp8Format::E4M3;
    if let Granularity::Channel = granularity {
        let parts: Vec<(Vec<u8>, f32)> = values
            .par_chunks(cols)
            .map(|row| {
                let m = Fp8Matrix::quantize_with(row, 1, cols, Granularity::Tensor, format, rule);
                (m.codes, m.scales[0])
            })
            .collect();
        let mut codes = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(rows);
        for (c, s) in parts {
            codes.extend(c);
            scales.push(s);
        }
        return Fp8Matrix { rows, cols, format, granularity, codes, scales };
    }
    Fp8Matrix::quantize_with(values, rows, cols, granularity, format, rule)
}
