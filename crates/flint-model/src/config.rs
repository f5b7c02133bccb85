//! `ModelConfig`: the validated hyper-parameters of a Llama-family model, read from GGUF
//! metadata or a Hugging Face `config.json`.

use serde::Deserialize;

use crate::gguf::GgufFile;
use crate::{Error, Result};

/// Architectures this crate runs. All are Llama-style decoders (pre-norm, RMSNorm, RoPE, GQA,
/// SwiGLU); Qwen2 adds biases on the Q/K/V projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

const SUPPORTED: &str = "llama, mistral, qwen2 (GGUF) / LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Architecture::Llama),
            "mistral" | "MistralForCausalLM" => Ok(Architecture::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
            other => Err(Error::UnsupportedArchitecture { arch: other.to_string(), supported: SUPPORTED }),
        }
    }
}

/// Llama 3.1-style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1's piecewise scaling.
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors stored in the checkpoint (GGUF `rope_freqs.weight`).
    FreqFactors(Vec<f32>),
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear(f32),
}

/// The validated shape and numerics of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry biases (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks the invariants every kernel relies on.
    pub fn validate(self, source_name: &str) -> Result<Self> {
        let fail = |message: String| Error::Config { source_name: source_name.to_string(), message };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(fail(format!("{name} must be positive")));
            }
        }
        // Every size a loader or kernel derives must fit comfortably in memory arithmetic.
        const MAX_ELEMENTS: usize = 1 << 40;
        let products = [
            ("num_attention_heads x head_dim", self.n_heads.checked_mul(self.head_dim)),
            ("vocab_size x hidden_size", self.vocab_size.checked_mul(self.hidden_size)),
            ("intermediate_size x hidden_size", self.intermediate_size.checked_mul(self.hidden_size)),
            (
                "layers x kv heads x head_dim x context",
                self.n_layers
                    .checked_mul(self.n_kv_heads)
                    .and_then(|v| v.checked_mul(self.head_dim))
                    .and_then(|v| v.checked_mul(self.max_position_embeddings)),
            ),
        ];
        for (what, product) in products {
            if product.is_none_or(|p| p > MAX_ELEMENTS) {
                return Err(fail(format!("{what} is implausibly large")));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(fail(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.n_heads, self.n_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(fail(format!("head_dim {} must be even for rotary embeddings", self.head_dim)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(fail(format!("rms_norm_eps {} must be a non-negative number", self.rms_norm_eps)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(fail(format!("rope_theta {} must be positive", self.rope_theta)));
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling
            && f.len() != self.head_dim / 2
        {
            return Err(fail(format!("{} rope frequency factors for head_dim {}", f.len(), self.head_dim)));
        }
        if let Some(&id) = self.eos_token_ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(fail(format!("eos token id {id} is outside the vocabulary of {}", self.vocab_size)));
        }
        Ok(self)
    }

    /// The names of the built-in shape presets, for `--random-weights`.
    pub const PRESETS: &'static [&'static str] = &["llama-3.2-1b", "llama-3.1-8b", "llama-3.3-70b"];

    /// The exact shapes and numerics of a released model, for random-weight runs.
    pub fn preset(name: &str) -> Option<ModelConfig> {
        let llama3 = |factor: f32| {
            RopeScaling::Llama3(Llama3RopeScaling {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            })
        };
        let base = |hidden, inter, layers, heads, head_dim, factor, tie| ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 128_256,
            hidden_size: hidden,
            intermediate_size: inter,
            n_layers: layers,
            n_heads: heads,
            n_kv_heads: 8,
            head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: llama3(factor),
            max_position_embeddings: 131_072,
            tie_word_embeddings: tie,
            attention_bias: false,
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001, 128_008, 128_009],
        };
        match name {
            "llama-3.2-1b" => Some(base(2048, 8192, 16, 32, 64, 32.0, true)),
            "llama-3.1-8b" => Some(base(4096, 14336, 32, 32, 128, 8.0, false)),
            "llama-3.3-70b" => Some(base(8192, 28672, 80, 64, 128, 8.0, false)),
            _ => None,
        }
    }

    /// Parameters in the model (embedding and LM head counted once when tied).
    pub fn n_parameters(&self) -> usize {
        // u128 so that no config, however corrupt, overflows; saturates at usize::MAX.
        let h = self.hidden_size as u128;
        let q = self.n_heads as u128 * self.head_dim as u128;
        let kv = self.n_kv_heads as u128 * self.head_dim as u128;
        let attn = h * q + 2 * h * kv + q * h + if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size as u128;
        let per_layer = attn + mlp + 2 * h;
        let embed = self.vocab_size as u128 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let total = embed + head + self.n_layers as u128 * per_layer + h;
        usize::try_from(total).unwrap_or(usize::MAX)
    }

    /// Reads the config from GGUF metadata (`<arch>.*` keys).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let source_name = file.path().display().to_string();
        let fail = |message: String| Error::Config { source_name: source_name.clone(), message };
        let arch_name = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| fail("general.architecture is missing".to_string()))?;
        let architecture = Architecture::from_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<Option<usize>> {
            match file.get(&key(k)) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| fail(format!("{} must be an unsigned integer, got {v:?}", key(k)))),
            }
        };
        let required =
            |k: &str| -> Result<usize> { usize_of(k)?.ok_or_else(|| fail(format!("{} is missing", key(k)))) };
        let float_of = |k: &str| file.get(&key(k)).and_then(|v| v.as_f64()).map(|v| v as f32);

        let hidden_size = required("embedding_length")?;
        let n_heads = required("attention.head_count")?;
        let n_kv_heads = usize_of("attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = match usize_of("attention.key_length")? {
            Some(d) => d,
            None => hidden_size.checked_div(n_heads).unwrap_or(0),
        };
        let embed = file
            .tensor_info("token_embd.weight")
            .ok_or_else(|| fail("tensor token_embd.weight is missing".to_string()))?;
        let vocab_size = match usize_of("vocab_size")? {
            Some(v) => v,
            None => embed.dims.first().copied().unwrap_or(0),
        };
        let rope_scaling = match file.tensor_info("rope_freqs.weight") {
            Some(info) => {
                let values = flint_quant::dequantize(info.ggml_type, file.tensor_bytes(info), info.elem_count())?;
                RopeScaling::FreqFactors(values)
            }
            None => match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
                Some("linear") => RopeScaling::Linear(float_of("rope.scaling.factor").unwrap_or(1.0)),
                Some("none") | None => RopeScaling::None,
                Some(other) => return Err(fail(format!("unsupported rope scaling type {other:?}"))),
            },
        };
        let token_id = |k: &str| file.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: required("feed_forward_length")?,
            n_layers: required("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: float_of("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float_of("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: usize_of("context_length")?.unwrap_or(2048),
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
            attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        config.validate(&source_name)
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        let fail = |message: String| Error::Config { source_name: source_name.to_string(), message };
        let raw: HfConfig = serde_json::from_str(json).map_err(|e| fail(e.to_string()))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or(raw.model_type.clone())
            .ok_or_else(|| fail("neither architectures nor model_type is set".to_string()))?;
        let architecture = Architecture::from_name(&arch_name)?;
        let n_heads = raw.num_attention_heads;
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size.checked_div(n_heads).unwrap_or(0));
        // transformers 5 writes `rope_parameters` (type, base and scaling together) instead of
        // `rope_theta` and `rope_scaling`.
        let rope_source = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref());
        let rope_theta = raw.rope_theta.or(raw.rope_parameters.as_ref().and_then(|p| p.rope_theta));
        let rope_scaling = match rope_source {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_deref().or(s.kind.as_deref()) {
                Some("llama3") => RopeScaling::Llama3(Llama3RopeScaling {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
                }),
                Some("linear") => RopeScaling::Linear(s.factor.unwrap_or(1.0)),
                Some("default") | None => RopeScaling::None,
                Some(other) => return Err(fail(format!("unsupported rope_scaling type {other:?}"))),
            },
        };
        let eos_token_ids = match raw.eos_token_id {
            None => Vec::new(),
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
        };
        let config = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            n_layers: raw.num_hidden_layers,
            n_heads,
            n_kv_heads: raw.num_key_value_heads.unwrap_or(n_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(architecture == Architecture::Qwen2),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        };
        config.validate(source_name)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
    /// transformers 5 keeps the base here, in `rope_parameters`.
    rope_theta: Option<f32>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    rope_parameters: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_released_parameter_counts() {
        // Counts as published for each release (embedding and head separate unless tied).
        for (name, params) in
            [("llama-3.2-1b", 1_235_814_400usize), ("llama-3.1-8b", 8_030_261_248), ("llama-3.3-70b", 70_553_706_496)]
        {
            let config = ModelConfig::preset(name).expect("preset").validate(name).expect("valid");
            assert_eq!(config.n_parameters(), params, "{name}");
        }
        assert!(ModelConfig::preset("llama-9").is_none());
    }

    const LLAMA_31_8B: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]
    }"#;

    #[test]
    fn llama_31_8b_config() {
        let c = ModelConfig::from_hf_json(LLAMA_31_8B, "test").expect("valid");
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3(_)));
        // 8.03 B parameters.
        assert_eq!(c.n_parameters() / 10_000_000, 803);
    }

    #[test]
    fn bad_configs_are_errors() {
        let bad_heads = LLAMA_31_8B.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5");
        assert!(ModelConfig::from_hf_json(&bad_heads, "t").is_err());
        let bad_arch = LLAMA_31_8B.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = ModelConfig::from_hf_json(&bad_arch, "t").expect_err("unsupported");
        assert!(err.to_string().contains("GPT2LMHeadModel"));
        assert!(ModelConfig::from_hf_json("{", "t").is_err());
    }
}
