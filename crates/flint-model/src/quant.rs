//! Quantized checkpoints: the `quantization_config` of a Hugging Face `config.json`, and reading
//! FP8 weights with the scales stored beside them.
//!
//! Three FP8 layouts are read, all as `F8_E4M3` weights plus F32/BF16 scales next to them:
//! - `quant_method: "fp8"` (Hugging Face fine-grained FP8, DeepSeek, and what `flint quantize`
//!   writes): `<module>.weight_scale_inv`, shaped `[1, 1]` / `[]` (tensor), `[rows, 1]`
//!   (channel) or `[ceil(rows / b), ceil(cols / b)]` with `weight_block_size: [b, b]`;
//! - `quant_method: "compressed-tensors"`, format `float-quantized`: `<module>.weight_scale`
//!   per tensor, channel or block (`strategy`), dynamic per-token activations;
//! - NVIDIA ModelOpt FP8 (`quant_method: "modelopt"`, `quant_algo: "FP8"`): per-tensor
//!   `<module>.weight_scale` (and static `input_scale`, which Flint replaces by per-token scales).
//!
//! In every layout `value = decode(code) * scale`.

use flint_quant::{Fp8Format, Fp8Matrix, Granularity};
use serde_json::Value;

use crate::{Error, Result};

/// The quantization a checkpoint declares.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    /// `fp8`, `compressed-tensors` or `modelopt`.
    pub method: String,
    /// Tile size of block-scaled weights, when the config names one.
    pub block_size: Option<usize>,
    /// Modules left unquantized (`ignore`, `modules_to_not_convert`, `exclude_modules`).
    pub ignored: Vec<String>,
}

impl QuantConfig {
    /// Reads `config.json`'s `quantization_config`; `None` when there is none.
    pub fn from_config_json(json: &str, source_name: &str) -> Result<Option<Self>> {
        let err = |message: String| Error::Config { source_name: source_name.to_string(), message };
        let root: Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        let Some(q) = root.get("quantization_config") else { return Ok(None) };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("").to_string();
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        let mut ignored = strings(q.get("ignore"));
        ignored.extend(strings(q.get("modules_to_not_convert")));
        ignored.extend(strings(q.get("exclude_modules")));
        let square = |v: Option<&Value>| -> Result<Option<usize>> {
            match v.and_then(Value::as_array) {
                None => Ok(None),
                Some(a) => {
                    let dims: Vec<u64> = a.iter().filter_map(Value::as_u64).collect();
                    match dims.as_slice() {
                        [r, c] if r == c && *r > 0 => Ok(Some(*r as usize)),
                        _ => Err(err(format!("block size {a:?}: only square blocks are supported"))),
                    }
                }
            }
        };
        let block_size = match method.as_str() {
            "fp8" => {
                let scheme = q.get("activation_scheme").and_then(Value::as_str).unwrap_or("dynamic");
                if scheme != "dynamic" {
                    tracing::warn!(scheme, "static activation scales are replaced by dynamic per-token scales");
                }
                square(q.get("weight_block_size"))?
            }
            "compressed-tensors" => {
                let format = q.get("format").and_then(Value::as_str).unwrap_or("");
                if format != "float-quantized" && format != "naive-quantized" {
                    return Err(err(format!(
                        "compressed-tensors format {format:?} is not supported (FP8 \"float-quantized\" is)"
                    )));
                }
                let mut block = None;
                if let Some(groups) = q.get("config_groups").and_then(Value::as_object) {
                    for group in groups.values() {
                        let w = group.get("weights");
                        let bits = w.and_then(|w| w.get("num_bits")).and_then(Value::as_u64);
                        let kind = w.and_then(|w| w.get("type")).and_then(Value::as_str);
                        if bits != Some(8) || kind != Some("float") {
                            return Err(err(format!(
                                "compressed-tensors weights of {bits:?} bits, type {kind:?}: only 8-bit float is supported"
                            )));
                        }
                        if let Some(b) = square(w.and_then(|w| w.get("block_structure")))? {
                            block = Some(b);
                        }
                    }
                }
                block
            }
            "modelopt" => {
                let algo = q.get("quant_algo").and_then(Value::as_str).unwrap_or("");
                if algo != "FP8" {
                    return Err(err(format!("ModelOpt quant_algo {algo:?} is not supported (FP8 is)")));
                }
                None
            }
            other => {
                return Err(err(format!(
                    "quant_method {other:?} is not supported (fp8, compressed-tensors and modelopt FP8 are)"
                )));
            }
        };
        Ok(Some(QuantConfig { method, block_size, ignored }))
    }
}

/// Where the scale of FP8 weight `name` (`<module>.weight`) is stored, in the order tried.
pub(crate) fn scale_names(name: &str) -> Vec<String> {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    vec![format!("{module}.weight_scale_inv"), format!("{module}.weight_scale")]
}

/// The granularity of a `[rows, cols]` matrix's scales from their stored dims.
pub(crate) fn granularity_of(
    name: &str,
    rows: usize,
    cols: usize,
    scale_dims: &[usize],
    block_size: Option<usize>,
) -> Result<Granularity> {
    let count: usize = scale_dims.iter().product();
    let bad = || Error::WeightFormat {
        name: name.to_string(),
        message: format!("FP8 scales of shape {scale_dims:?} do not fit a [{rows}, {cols}] weight"),
    };
    if count == 1 {
        return Ok(Granularity::Tensor);
    }
    match scale_dims {
        [r] | [r, 1] if *r == rows => Ok(Granularity::Channel),
        [r, c] => {
            let b = match block_size {
                Some(b) => b,
                // No block size in the config: the tile that gives this grid (128 when it fits).
                None if rows.div_ceil(128) == *r && cols.div_ceil(128) == *c => 128,
                None => return Err(bad()),
            };
            if rows.div_ceil(b) == *r && cols.div_ceil(b) == *c { Ok(Granularity::Block(b)) } else { Err(bad()) }
        }
        _ => Err(bad()),
    }
}

/// Builds an [`Fp8Matrix`] from stored codes and scales, checking their sizes.
pub(crate) fn fp8_matrix(
    name: &str,
    dims: &[usize],
    codes: &[u8],
    scale_dims: &[usize],
    scales: Vec<f32>,
    block_size: Option<usize>,
) -> Result<Fp8Matrix> {
    let (rows, cols) = match dims {
        [r, c] => (*r, *c),
        [n] => (1, *n),
        _ => {
            return Err(Error::WeightFormat {
                name: name.to_string(),
                message: format!("FP8 tensor of shape {dims:?}: only vectors and matrices are supported"),
            });
        }
    };
    let granularity = granularity_of(name, rows, cols, scale_dims, block_size)?;
    if let Some(bad) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
        return Err(Error::WeightFormat { name: name.to_string(), message: format!("FP8 scale {bad} is not valid") });
    }
    Ok(Fp8Matrix { rows, cols, format: Fp8Format::E4M3, granularity, codes: codes.to_vec(), scales })
}
