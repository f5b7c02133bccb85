//! Test support: a GGUF writer, and a tiny random Llama written as a Hugging Face safetensors
//! directory and as a llama.cpp-style GGUF file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;

/// A GGUF metadata value.
pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    StrArray(Vec<String>),
}

/// Builds a GGUF v3 file in memory. Tensors are f32, dims outermost first.
#[derive(Default)]
pub struct GgufWriter {
    meta: Vec<(String, Meta)>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl GgufWriter {
    pub fn meta(&mut self, key: &str, value: Meta) -> &mut Self {
        self.meta.push((key.to_string(), value));
        self
    }

    pub fn tensor(&mut self, name: &str, dims: &[usize], data: Vec<f32>) -> &mut Self {
        assert_eq!(dims.iter().product::<usize>(), data.len());
        self.tensors.push((name.to_string(), dims.to_vec(), data));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for (key, value) in &self.meta {
            put_str(&mut out, key);
            match value {
                Meta::U32(v) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Meta::F32(v) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Meta::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Meta::StrArray(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut out, s);
                    }
                }
            }
        }
        let mut offset = 0u64;
        for (name, dims, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64 * 4).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for (_, _, data) in &self.tensors {
            for v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
            while out.len() % 32 != 0 {
                out.push(0);
            }
        }
        out
    }
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub const VOCAB: usize = 40;
pub const HIDDEN: usize = 16;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 4;
pub const FFN: usize = 24;
pub const LAYERS: usize = 2;
pub const CONTEXT: usize = 64;

/// The tiny model's weights under Hugging Face names, in Hugging Face layout.
pub fn tiny_weights() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut w = Vec::new();
    let mut seed = 1;
    let mut add = |name: String, dims: Vec<usize>, scale: f32| {
        seed += 1;
        let n = dims.iter().product();
        let data = if name.contains("norm") {
            random(seed, n, 0.2).iter().map(|v| 1.0 + v).collect()
        } else {
            random(seed, n, scale)
        };
        w.push((name, dims, data));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![HIDDEN], 0.0);
        add(format!("{p}.self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN], 0.5);
        add(format!("{p}.self_attn.k_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.5);
        add(format!("{p}.self_attn.v_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.5);
        add(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM], 0.5);
        add(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], 0.0);
        add(format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN], 0.5);
        add(format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN], 0.5);
        add(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN], 0.5);
    }
    add("model.norm.weight".into(), vec![HIDDEN], 0.0);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 1.0);
    w
}

pub fn tiny_config_json() -> String {
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": {VOCAB},
            "hidden_size": {HIDDEN}, "intermediate_size": {FFN}, "num_hidden_layers": {LAYERS},
            "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": {CONTEXT}, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2}}"#
    )
}

/// A fresh, empty temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flint-model-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes the tiny model as a Hugging Face directory, split over `n_shards` files (with an index
/// when more than one).
pub fn write_hf_dir(dir: &Path, n_shards: usize) {
    std::fs::write(dir.join("config.json"), tiny_config_json()).expect("config");
    let weights = tiny_weights();
    let bytes: Vec<Vec<u8>> = weights.iter().map(|(_, _, d)| f32_bytes(d)).collect();
    let mut weight_map = serde_json::Map::new();
    for shard in 0..n_shards {
        let name = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", shard + 1)
        };
        let views: Vec<(String, TensorView<'_>)> = weights
            .iter()
            .zip(&bytes)
            .enumerate()
            .filter(|(i, _)| i % n_shards == shard)
            .map(|(_, ((n, dims, _), b))| {
                (n.clone(), TensorView::new(safetensors::Dtype::F32, dims.clone(), b).expect("view"))
            })
            .collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), serde_json::Value::String(name.clone()));
        }
        let data = safetensors::serialize(views, None::<HashMap<String, String>>).expect("serialize");
        std::fs::write(dir.join(&name), data).expect("write shard");
    }
    if n_shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    }
}

/// llama.cpp's Q/K row permutation for its interleaved rotary layout.
fn permute(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    let head_rows = data.len() / row_len / n_heads;
    let half = head_rows / 2;
    let mut out = vec![0.0; data.len()];
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

/// The tiny model as llama.cpp's converter writes it.
pub fn tiny_gguf() -> Vec<u8> {
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Meta::Str("llama".into()))
        .meta("llama.embedding_length", Meta::U32(HIDDEN as u32))
        .meta("llama.feed_forward_length", Meta::U32(FFN as u32))
        .meta("llama.block_count", Meta::U32(LAYERS as u32))
        .meta("llama.attention.head_count", Meta::U32(HEADS as u32))
        .meta("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32))
        .meta("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5))
        .meta("llama.rope.freq_base", Meta::F32(10000.0))
        .meta("llama.context_length", Meta::U32(CONTEXT as u32))
        .meta("tokenizer.ggml.model", Meta::Str("gpt2".into()))
        .meta("tokenizer.ggml.tokens", Meta::StrArray((0..VOCAB).map(|i| format!("t{i}")).collect()));
    for (name, dims, data) in tiny_weights() {
        let gguf = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm");
        let data = if gguf.ends_with("attn_q.weight") {
            permute(&data, HEADS, HIDDEN)
        } else if gguf.ends_with("attn_k.weight") {
            permute(&data, KV_HEADS, HIDDEN)
        } else {
            data
        };
        w.tensor(&gguf, &dims, data);
    }
    w.to_bytes()
}
