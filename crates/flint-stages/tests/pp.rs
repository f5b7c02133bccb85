//! Pipeline parallelism on `LocalComm`: PP 2 and 3, and TP 2 x PP 2, compute what one rank
//! computes (the same greedy tokens, logits within float tolerance) with sequences joining the
//! running batch mid-way and each step cut into micro-batches.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use flint_cpu::CpuBackend;
use flint_model::{ForwardBatch, Llama, Logits, ModelSource};
use flint_stages::{StagePlan, pipeline_cpu};
use flint_tensor::{Backend, DType};
use safetensors::tensor::TensorView;

const LAYERS: usize = 6;

/// Deterministic pseudo-random values in [-scale, scale).
fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flint-stages-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    bias: bool,
    tied: bool,
}

fn write_model(dir: &Path, d: Dims, seed: u64) {
    let h = d.heads * d.head_dim;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": d.vocab,
        "hidden_size": h, "intermediate_size": d.ffn, "num_hidden_layers": LAYERS,
        "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": d.tied,
        "attention_bias": d.bias, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![d.vocab, h])];
    for i in 0..LAYERS {
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
                random(seed + i as u64, n, 0.2).iter().map(|v| 1.0 + v).collect()
            } else {
                random(seed + i as u64, n, 0.4)
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

fn argmax(row: &[f32]) -> u32 {
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
fn run_schedule(vocab: usize, mut step: impl FnMut(&ForwardBatch) -> Vec<f32>) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
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
                let next = argmax(&logits[row * vocab..(row + 1) * vocab]);
                seqs[i].push(next);
                row += 1;
            }
        }
        all_logits.push(logits);
    }
    (all_logits, seqs)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn pipelines_compute_what_one_rank_computes() {
    let dims = Dims { heads: 4, kv_heads: 2, head_dim: 8, ffn: 48, vocab: 43, bias: false, tied: true };
    let dir = temp_dir("pp");
    write_model(&dir, dims, 11);
    let source = Arc::new(ModelSource::open(&dir).expect("opens"));
    let config = source.config().expect("config");
    let backend = CpuBackend::new();
    let one = Llama::load(&source, config.clone(), &backend, DType::F32, &mut |_| {}).expect("loads");
    let cache = one.new_paged_kv_cache(&backend, 24, 4).expect("cache");
    let (want_logits, want_tokens) = run_schedule(dims.vocab, |b| {
        backend.to_f32_vec(&one.forward_batch(&backend, b, &cache).expect("fwd")).expect("read")
    });
    for (tp, pp, micro) in [(1, 2, 2), (1, 3, 3), (2, 2, 2), (1, 3, 1), (2, 3, 8)] {
        let plan = StagePlan::balanced(&config, pp).expect("plan");
        let group = pipeline_cpu(source.clone(), config.clone(), tp, plan.clone(), micro, DType::F32, || {
            Box::new(CpuBackend::new())
        })
        .expect("pipeline");
        group.new_kv_cache(24, 4).expect("caches");
        let (logits, tokens) = run_schedule(dims.vocab, |b| group.forward(b).expect("pipeline step"));
        assert_eq!(tokens, want_tokens, "TP {tp} x PP {pp} ({:?}), {micro} micro-batches", plan.stages);
        for (step, (got, want)) in logits.iter().zip(&want_logits).enumerate() {
            let err = rel_err(got, want);
            assert!(err < 1e-5, "TP {tp} x PP {pp}, step {step}: rel err {err:e}");
        }
    }
    // More stages than layers, and a stage run as a whole model, are errors.
    assert!(StagePlan::balanced(&config, LAYERS + 1).is_err());
    let part =
        Llama::load_part(&source, config.clone(), &backend, DType::F32, flint_model::Shard::SINGLE, 2..4, &mut |_| {})
            .expect("a middle stage loads");
    let cache = part.new_paged_kv_cache(&backend, 4, 4).expect("cache");
    let mut batch = ForwardBatch::new(4);
    batch.push_sequence(&[1, 2], 0, &[0], Logits::Last).expect("push");
    let e = part.forward_batch(&backend, &batch, &cache).expect_err("a stage alone").to_string();
    assert!(e.contains("needs the previous stage"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn micro_batches_split_by_sequence_and_keep_logit_rows() {
    let mut batch = ForwardBatch::new(4);
    batch.push_sequence(&[1, 2, 3, 4, 5], 0, &[0, 1], Logits::Last).expect("push");
    batch.push_sequence(&[6], 3, &[2], Logits::Last).expect("push");
    batch.push_sequence(&[7, 8], 0, &[3], Logits::All).expect("push");
    batch.push_sequence(&[9], 9, &[4, 5, 6], Logits::None).expect("push");
    for parts in 1..6 {
        let split = batch.split(parts);
        assert_eq!(split.len(), parts.min(4));
        let tokens: Vec<u32> = split.iter().flat_map(|b| b.tokens().to_vec()).collect();
        assert_eq!(tokens, batch.tokens());
        let rows: usize = split.iter().map(|b| b.logit_rows().len()).sum();
        assert_eq!(rows, batch.logit_rows().len());
        assert!(split.iter().all(|b| !b.is_empty()));
    }
    let two = batch.split(2);
    assert_eq!(two[0].n_seqs(), 1);
    assert_eq!(two[1].logit_rows(), &[0, 1, 2]);
}
