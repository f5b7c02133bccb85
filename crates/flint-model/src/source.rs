//! `ModelSource`: an opened checkpoint, GGUF file or Hugging Face safetensors directory,
//! that yields its config and its weights under Hugging Face tensor names.
//!
//! GGUF checkpoints of Llama and Mistral store Q and K projections with their rows permuted for
//! ggml's interleaved rotary layout; they are permuted back here, so every architecture runs
//! with the rotate-half layout of the Hugging Face reference.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use flint_quant::{Fp8Format, Fp8Matrix, GgmlType};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde::Deserialize;

use crate::config::{Architecture, ModelConfig};
use crate::gguf::GgufFile;
use crate::quant::{self, QuantConfig};
use crate::{Error, Result};

/// A tensor as stored: its type, dims and bytes.
pub type RawTensor<'a> = (StDtype, Vec<usize>, &'a [u8]);

/// A weight read into host memory as f32, shaped outermost first.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// One stored tensor, for listings (`flint inspect`).
#[derive(Clone, Debug)]
pub struct StoredTensor {
    pub name: String,
    pub dims: Vec<usize>,
    /// Storage type as the file names it (`Q4_1`, `BF16`).
    pub type_name: String,
    pub size_in_bytes: usize,
}

/// An opened checkpoint.
#[derive(Debug)]
pub enum ModelSource {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
}

impl ModelSource {
    /// Opens a `.gguf` file, or a directory holding `config.json` and `*.safetensors`.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        if meta.is_dir() {
            Ok(ModelSource::Safetensors(SafetensorsDir::open(path)?))
        } else {
            Ok(ModelSource::Gguf(GgufFile::open(path)?))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(f) => f.path(),
            ModelSource::Safetensors(d) => &d.dir,
        }
    }

    /// The format's name, for messages.
    pub fn format(&self) -> &'static str {
        match self {
            ModelSource::Gguf(_) => "gguf",
            ModelSource::Safetensors(_) => "safetensors",
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::Gguf(f) => ModelConfig::from_gguf(f),
            ModelSource::Safetensors(d) => {
                let path = d.dir.join("config.json");
                let json = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
                ModelConfig::from_hf_json(&json, &path.display().to_string())
            }
        }
    }

    /// Every tensor stored in the checkpoint, in file order.
    pub fn stored_tensors(&self) -> Result<Vec<StoredTensor>> {
        match self {
            ModelSource::Gguf(f) => Ok(f
                .tensors()
                .iter()
                .map(|t| StoredTensor {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    type_name: t.ggml_type.name().to_string(),
                    size_in_bytes: t.size,
                })
                .collect()),
            ModelSource::Safetensors(d) => d.stored_tensors(),
        }
    }

    /// The tensor with Hugging Face name `name` as f32, or `None` when the checkpoint lacks it.
    pub fn tensor(&self, name: &str, config: &ModelConfig) -> Result<Option<HostTensor>> {
        match self {
            ModelSource::Gguf(f) => gguf_tensor(f, name, config),
            ModelSource::Safetensors(d) => d.tensor(name),
        }
    }

    /// The stored bytes of a BF16 safetensors tensor, memory-mapped, with its dims: lets a
    /// device loader copy weights without converting them. `None` for other formats and types.
    pub fn raw_bf16(&self, name: &str) -> Result<Option<(Vec<usize>, &[u8])>> {
        match self {
            ModelSource::Gguf(_) => Ok(None),
            ModelSource::Safetensors(d) => d.raw_bf16(name),
        }
    }

    /// Weight `name` as stored FP8 codes with their scales; `None` when it is not FP8.
    pub fn fp8_tensor(&self, name: &str) -> Result<Option<Fp8Matrix>> {
        match self {
            ModelSource::Gguf(_) => Ok(None),
            ModelSource::Safetensors(d) => d.fp8(name),
        }
    }

    /// The quantization the checkpoint declares (`None`: plain weights).
    pub fn quant_config(&self) -> Option<&QuantConfig> {
        match self {
            ModelSource::Gguf(_) => None,
            ModelSource::Safetensors(d) => d.quant_config(),
        }
    }

    /// Bytes of weight data stored in the checkpoint.
    pub fn data_size(&self) -> usize {
        match self {
            ModelSource::Gguf(f) => f.data_size(),
            ModelSource::Safetensors(d) => d.data_size,
        }
    }
}

/// The GGUF name of a Hugging Face tensor name, for the Llama family.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// Undoes llama.cpp's Q/K row permutation: within each head, rows were reordered from
/// `[half, pair]` to `[pair, half]`; this restores the rotate-half order.
fn unpermute_rows(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    let n_rows = data.len() / row_len;
    let head_rows = n_rows / n_heads;
    let half = head_rows / 2;
    let mut out = vec![0.0f32; data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                // Stored row (h, i, j) holds original row (h, j, i).
                let src = h * head_rows + i * 2 + j;
                let dst = h * head_rows + j * half + i;
                out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

fn gguf_tensor(file: &GgufFile, name: &str, config: &ModelConfig) -> Result<Option<HostTensor>> {
    let Some(gguf) = gguf_name(name) else { return Ok(None) };
    let Some(info) = file.tensor_info(&gguf) else { return Ok(None) };
    let data = flint_quant::dequantize(info.ggml_type, file.tensor_bytes(info), info.elem_count())
        .map_err(|e| Error::WeightFormat { name: gguf.clone(), message: e.to_string() })?;
    let permuted = matches!(config.architecture, Architecture::Llama | Architecture::Mistral);
    let heads = if gguf.ends_with("attn_q.weight") || gguf.ends_with("attn_q.bias") {
        Some(config.n_heads)
    } else if gguf.ends_with("attn_k.weight") || gguf.ends_with("attn_k.bias") {
        Some(config.n_kv_heads)
    } else {
        None
    };
    let data = match heads {
        Some(n_heads) if permuted => {
            let row_len = if info.dims.len() == 2 { info.dims[1] } else { 1 };
            let n_rows = info.dims[0];
            if n_heads == 0 || n_rows % (2 * n_heads) != 0 {
                return Err(Error::WeightShape {
                    name: gguf,
                    got: info.dims.clone(),
                    expected: vec![n_heads * config.head_dim, config.hidden_size],
                });
            }
            unpermute_rows(&data, n_heads, row_len)
        }
        _ => data,
    };
    Ok(Some(HostTensor { dims: info.dims.clone(), data }))
}

#[derive(Deserialize)]
struct SafetensorsIndex {
    weight_map: BTreeMap<String, String>,
}

/// A Hugging Face model directory: `config.json` and one or more `*.safetensors` shards.
#[derive(Debug)]
pub struct SafetensorsDir {
    dir: PathBuf,
    shards: Vec<(PathBuf, Mmap)>,
    /// Tensor name to shard index.
    index: BTreeMap<String, usize>,
    data_size: usize,
    quant: Option<QuantConfig>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let json = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
            let index: SafetensorsIndex = serde_json::from_str(&json)
                .map_err(|e| Error::Safetensors { path: index_path.clone(), message: format!("bad index: {e}") })?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names
        } else {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(io(dir))? {
                let entry = entry.map_err(io(dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") {
                    names.push(name);
                }
            }
            names.sort();
            names
        };
        if shard_names.is_empty() {
            return Err(Error::Safetensors {
                path: dir.to_path_buf(),
                message: "no *.safetensors files in the directory".to_string(),
            });
        }
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut index = BTreeMap::new();
        let mut data_size = 0;
        for (i, name) in shard_names.iter().enumerate() {
            if name.contains('/') || name.contains("..") {
                return Err(Error::Safetensors {
                    path: index_path.clone(),
                    message: format!("shard name {name:?} leaves the directory"),
                });
            }
            let path = dir.join(name);
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: read-only mapping of a file we opened for reading; see `GgufFile::open`.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
            for (tensor_name, view) in st.tensors() {
                data_size += view.data().len();
                index.insert(tensor_name, i);
            }
            shards.push((path, mmap));
        }
        let config_path = dir.join("config.json");
        let quant = match std::fs::read_to_string(&config_path) {
            Ok(json) => QuantConfig::from_config_json(&json, &config_path.display().to_string())?,
            Err(_) => None,
        };
        Ok(SafetensorsDir { dir: dir.to_path_buf(), shards, index, data_size, quant })
    }

    fn stored_tensors(&self) -> Result<Vec<StoredTensor>> {
        let mut out = Vec::new();
        for (path, mmap) in &self.shards {
            let st = SafeTensors::deserialize(mmap)
                .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
            let mut names = st.names();
            names.sort();
            for name in names {
                let view =
                    st.tensor(name).map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
                out.push(StoredTensor {
                    name: name.to_string(),
                    dims: view.shape().to_vec(),
                    type_name: format!("{:?}", view.dtype()),
                    size_in_bytes: view.data().len(),
                });
            }
        }
        Ok(out)
    }

    fn raw_bf16(&self, name: &str) -> Result<Option<(Vec<usize>, &[u8])>> {
        Ok(self.raw(name)?.filter(|(dtype, _, _)| *dtype == StDtype::BF16).map(|(_, dims, bytes)| (dims, bytes)))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    /// A tensor as stored: type, dims and the mapped bytes.
    pub fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        let Some(&shard) = self.index.get(name) else { return Ok(None) };
        let (path, mmap) = &self.shards[shard];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        let view = st.tensor(name).map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        let bytes = view.data();
        let offset = bytes.as_ptr() as usize - mmap.as_ptr() as usize;
        Ok(Some((view.dtype(), view.shape().to_vec(), &mmap[offset..offset + bytes.len()])))
    }

    /// A tensor as f32 values (any stored type, FP8 dequantized with its scales).
    pub fn tensor_f32(&self, name: &str) -> Result<Option<HostTensor>> {
        self.tensor(name)
    }

    /// The quantization `config.json` declares.
    pub fn quant_config(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    /// FP8 weight `name` with its scales, or `None` when it is not stored as FP8.
    fn fp8(&self, name: &str) -> Result<Option<Fp8Matrix>> {
        Ok(self.fp8_with_dims(name)?.map(|(_, m)| m))
    }

    fn fp8_with_dims(&self, name: &str) -> Result<Option<(Vec<usize>, Fp8Matrix)>> {
        let Some(&shard) = self.index.get(name) else { return Ok(None) };
        let (path, mmap) = &self.shards[shard];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        let view = st.tensor(name).map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        let format = match view.dtype() {
            StDtype::F8_E4M3 => Fp8Format::E4M3,
            StDtype::F8_E5M2 => Fp8Format::E5M2,
            _ => return Ok(None),
        };
        let Some((scale_name, scale)) =
            quant::scale_names(name).into_iter().find_map(|n| self.tensor(&n).transpose().map(|t| (n, t)))
        else {
            return Err(Error::WeightFormat {
                name: name.to_string(),
                message: "FP8 weight without a weight_scale or weight_scale_inv beside it".to_string(),
            });
        };
        let scale = scale?;
        let block = self.quant.as_ref().and_then(|q| q.block_size);
        let mut m = quant::fp8_matrix(&scale_name, view.shape(), view.data(), &scale.dims, scale.data, block)?;
        m.format = format;
        Ok(Some((view.shape().to_vec(), m)))
    }

    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        if let Some((dims, m)) = self.fp8_with_dims(name)? {
            return Ok(Some(HostTensor { dims, data: m.dequantize() }));
        }
        let Some(&shard) = self.index.get(name) else { return Ok(None) };
        let (path, mmap) = &self.shards[shard];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        let view = st.tensor(name).map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            StDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StDtype::F16 => flint_quant::dequantize(GgmlType::F16, bytes, bytes.len() / 2)?,
            StDtype::BF16 => flint_quant::dequantize(GgmlType::BF16, bytes, bytes.len() / 2)?,
            other => {
                return Err(Error::WeightFormat {
                    name: name.to_string(),
                    message: format!("dtype {other:?} is not supported (F32, F16, BF16 and FP8 with scales are)"),
                });
            }
        };
        Ok(Some(HostTensor { dims: view.shape().to_vec(), data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permutation, written as its convert script does, to check our inverse.
    fn permute_rows(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
        let n_rows = data.len() / row_len;
        let head_rows = n_rows / n_heads;
        let half = head_rows / 2;
        let mut out = vec![0.0f32; data.len()];
        for h in 0..n_heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = h * head_rows + j * half + i;
                    let dst = h * head_rows + i * 2 + j;
                    out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let data: Vec<f32> = (0..3 * 8 * 5).map(|i| i as f32).collect();
        assert_eq!(unpermute_rows(&permute_rows(&data, 3, 5), 3, 5), data);
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(), Some("blk.12.attn_k.weight"));
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }
}
