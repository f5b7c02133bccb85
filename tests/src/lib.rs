//! Shared support for Flint's end-to-end tests: where the default model and the reference data
//! live, and one engine per test binary on the CPU backend.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use flint_cpu::CpuBackend;
use flint_engine::Engine;
use flint_model::ModelSource;
use flint_tensor::DType;
use serde::Deserialize;

/// File name of the default model under `models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Path of the default model. Panics with the fix when it has not been fetched: a test that
/// needs the model must fail, not skip, without it.
pub fn default_model_path() -> PathBuf {
    let path = std::env::var_os("FLINT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models").join(DEFAULT_MODEL_FILE));
    assert!(path.exists(), "model file not found: {} (run `cargo xtask fetch-model`)", path.display());
    path
}

/// The default model loaded on the CPU, once per test binary.
pub fn cpu_engine() -> &'static Engine {
    shared_cpu_engine().as_ref()
}

/// The same engine as [`cpu_engine`], shareable with a server.
pub fn shared_cpu_engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let source = ModelSource::open(&default_model_path()).expect("default model opens");
        Arc::new(
            Engine::load(&source, Box::new(CpuBackend::new()), DType::F32, &mut |_| {}).expect("default model loads"),
        )
    })
}

/// The default model split over `world` tensor-parallel CPU ranks (threads over `LocalComm`).
pub fn cpu_tp_engine(world: usize) -> Engine {
    let source = std::sync::Arc::new(ModelSource::open(&default_model_path()).expect("default model opens"));
    let config = source.config().expect("config");
    let tokenizer = flint_engine::Tokenizer::for_source(&source, &config).expect("tokenizer");
    let group = flint_model::TpGroup::cpu(source, config, world, DType::F32, || Box::new(CpuBackend::new()))
        .expect("the default model splits");
    Engine::with_group(group, tokenizer)
}

/// The default model as a pipeline of `pp` balanced stages, each split over `tp` ranks, with
/// `pp` micro-batches per step.
pub fn cpu_pipeline_engine(tp: usize, pp: usize) -> Engine {
    let source = std::sync::Arc::new(ModelSource::open(&default_model_path()).expect("default model opens"));
    let config = source.config().expect("config");
    let tokenizer = flint_engine::Tokenizer::for_source(&source, &config).expect("tokenizer");
    let plan = flint_stages::StagePlan::balanced(&config, pp).expect("plan");
    let group = flint_stages::pipeline_cpu(source, config, tp, plan, pp, DType::F32, || Box::new(CpuBackend::new()))
        .expect("the default model splits");
    Engine::with_group(group, tokenizer)
}

/// Output of the independent reference (Hugging Face transformers on the same GGUF file).
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub generator: String,
    pub tokenizer: Vec<TokenizerCase>,
    pub first_prompt_top10: TopLogits,
    pub cases: Vec<GenerationCase>,
}

#[derive(Debug, Deserialize)]
pub struct TokenizerCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct TopLogits {
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct GenerationCase {
    /// `raw` or `chat`.
    pub kind: String,
    pub prompt: String,
    /// The chat-templated prompt text, for `chat` cases.
    pub rendered: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    /// Top-1 minus top-2 logit of the reference at each step.
    pub margins: Vec<f32>,
    pub text: String,
}

/// The committed reference for SmolLM2-135M-Instruct.
pub fn smollm2_reference() -> Reference {
    let path = workspace_root().join("tests/data/smollm2_reference.json");
    let text = std::fs::read_to_string(&path).expect("reference data is committed");
    serde_json::from_str(&text).expect("reference data parses")
}

/// Random-weight checkpoints and a continuous-batching schedule for the tensor- and
/// pipeline-parallel equivalence tests.
pub mod random_models {
    use std::collections::HashMap;
    use std::path::Path;

    use flint_model::{ForwardBatch, Logits};
    use safetensors::tensor::TensorView;

    /// Deterministic pseudo-random values in [-scale, scale).
    pub fn pseudo_random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[derive(Clone, Copy, Debug)]
    pub struct Dims {
        pub heads: usize,
        pub kv_heads: usize,
        pub head_dim: usize,
        pub ffn: usize,
        pub vocab: usize,
        pub bias: bool,
        pub tied: bool,
    }

    /// Writes a random-weight Llama of these shapes and `layers` layers as a Hugging Face
    /// directory (`config.json`, F32 `model.safetensors`).
    pub fn write_random_llama(dir: &Path, d: Dims, layers: usize, seed: u64) {
        let h = d.heads * d.head_dim;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": d.vocab,
            "hidden_size": h, "intermediate_size": d.ffn, "num_hidden_layers": layers,
            "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": d.tied,
            "attention_bias": d.bias, "bos_token_id": 1, "eos_token_id": 2
        });
        std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
        let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![d.vocab, h])];
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
            shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            if d.bias {
                shapes.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                shapes.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                shapes.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![d.ffn, h]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![d.ffn, h]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, d.ffn]));
        }
        shapes.push(("model.norm.weight".into(), vec![h]));
        if !d.tied {
            shapes.push(("lm_head.weight".into(), vec![d.vocab, h]));
        }
        let bytes: Vec<Vec<u8>> = shapes
            .iter()
            .enumerate()
            .map(|(i, (name, dims))| {
                let n = dims.iter().product();
                let data: Vec<f32> = if name.contains("norm") {
                    pseudo_random(seed + i as u64, n, 0.2).iter().map(|v| 1.0 + v).collect()
                } else {
                    pseudo_random(seed + i as u64, n, 0.4)
                };
                data.iter().flat_map(|v| v.to_le_bytes()).collect()
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = shapes
            .iter()
            .zip(&bytes)
            .map(|((n, dims), b)| (n.clone(), TensorView::new(safetensors::Dtype::F32, dims.clone(), b).expect("view")))
            .collect();
        let data = safetensors::serialize(views, None::<HashMap<String, String>>).expect("serialize");
        std::fs::write(dir.join("model.safetensors"), data).expect("weights");
    }

    fn argmax_row(row: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best as u32
    }

    /// Greedy decoding of three prompts under a continuous-batching pattern (sequence 2 joins after
    /// two steps, sequence 0's prompt comes in two chunks), through `step`; returns every step's
    /// logits and each sequence's tokens.
    pub fn run_schedule(
        vocab: usize,
        mut step: impl FnMut(&ForwardBatch) -> Vec<f32>,
    ) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
        let prompts: [&[u32]; 3] = [&[1, 5, 17, 3, 9, 22, 8, 9, 10], &[4, 4, 4], &[30, 2, 11, 12, 13]];
        let tables: [Vec<u32>; 3] = [(0..8).collect(), (8..16).collect(), (16..24).collect()];
        let block_size = 4;
        let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut cached = [0usize; 3];
        let mut all_logits = Vec::new();
        for s in 0..10 {
            let mut batch = ForwardBatch::new(block_size);
            let mut members = Vec::new();
            for i in 0..3 {
                if i == 2 && s < 2 {
                    continue;
                }
                let end = if i == 0 && s == 0 { 4 } else { seqs[i].len() };
                let new = &seqs[i][cached[i]..end];
                let wants = if end == seqs[i].len() { Logits::Last } else { Logits::None };
                batch.push_sequence(new, cached[i], &tables[i], wants).expect("push");
                members.push((i, end, wants));
            }
            let logits = step(&batch);
            let mut row = 0;
            for (i, end, wants) in members {
                cached[i] = end;
                if wants == Logits::Last {
                    let next = argmax_row(&logits[row * vocab..(row + 1) * vocab]);
                    seqs[i].push(next);
                    row += 1;
                }
            }
            all_logits.push(logits);
        }
        (all_logits, seqs)
    }

    pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }
}
