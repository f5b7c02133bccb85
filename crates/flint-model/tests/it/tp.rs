//! Tensor parallelism on `LocalComm`: a model split over 2 and 4 ranks computes what one rank
//! computes (logits within float tolerance, the same greedy tokens), with sequences joining a
//! running batch mid-way, for head layouts that split evenly, KV heads replicated over ranks,
//! attention biases, tied embeddings and a vocabulary that does not divide by the rank count.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use flint_cpu::CpuBackend;
use flint_model::{ForwardBatch, Llama, Logits, ModelSource, Shard, TpGroup};
use flint_tensor::{Backend, DType};
use safetensors::tensor::TensorView;

use crate::support::{random, temp_dir};

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
        "hidden_size": h, "intermediate_size": d.ffn, "num_hidden_layers": 2,
        "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": d.tied,
        "attention_bias": d.bias, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![d.vocab, h])];
    for i in 0..2 {
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
fn split_models_compute_what_one_rank_computes() {
    let cases = [
        (Dims { heads: 4, kv_heads: 2, head_dim: 8, ffn: 48, vocab: 40, bias: false, tied: false }, [2, 4]),
        (Dims { heads: 8, kv_heads: 8, head_dim: 4, ffn: 64, vocab: 43, bias: true, tied: true }, [2, 4]),
        (Dims { heads: 8, kv_heads: 1, head_dim: 8, ffn: 32, vocab: 50, bias: false, tied: false }, [4, 8]),
    ];
    for (n, (dims, worlds)) in cases.into_iter().enumerate() {
        let dir = temp_dir(&format!("tp{n}"));
        write_model(&dir, dims, 100 * n as u64);
        let source = Arc::new(ModelSource::open(&dir).expect("opens"));
        let config = source.config().expect("config");
        let backend = CpuBackend::new();
        let one = Llama::load(&source, config.clone(), &backend, DType::F32, &mut |_| {}).expect("loads");
        let cache = one.new_paged_kv_cache(&backend, 24, 4).expect("cache");
        let (want_logits, want_tokens) = run_schedule(dims.vocab, |b| {
            backend.to_f32_vec(&one.forward_batch(&backend, b, &cache).expect("fwd")).expect("read")
        });
        for world in worlds {
            let group = TpGroup::cpu(source.clone(), config.clone(), world, DType::F32, || Box::new(CpuBackend::new()))
                .expect("group");
            group.new_kv_cache(24, 4).expect("caches");
            let (logits, tokens) = run_schedule(dims.vocab, |b| group.forward(b).expect("tp step"));
            assert_eq!(tokens, want_tokens, "{dims:?} at TP {world}");
            for (step, (got, want)) in logits.iter().zip(&want_logits).enumerate() {
                assert_eq!(got.len(), want.len());
                let err = rel_err(got, want);
                assert!(err < 1e-5, "{dims:?} at TP {world}, step {step}: rel err {err:e}");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn unsplittable_shapes_and_misused_ranks_are_errors() {
    let dir = temp_dir("tp-bad");
    let dims = Dims { heads: 4, kv_heads: 2, head_dim: 8, ffn: 48, vocab: 40, bias: false, tied: false };
    write_model(&dir, dims, 7);
    let source = Arc::new(ModelSource::open(&dir).expect("opens"));
    let config = source.config().expect("config");
    let e = TpGroup::cpu(source.clone(), config.clone(), 3, DType::F32, || Box::new(CpuBackend::new()))
        .expect_err("4 heads over 3 ranks")
        .to_string();
    assert!(e.contains("4 attention heads do not split over 3 ranks"), "{e}");

    // A rank's shard cannot run as a whole model.
    let backend = CpuBackend::new();
    let shard = Shard::new(1, 2).expect("shard");
    let half = Llama::load_shard(&source, config.clone(), &backend, DType::F32, shard, &mut |_| {}).expect("loads");
    let cache = half.new_paged_kv_cache(&backend, 4, 4).expect("cache");
    let mut batch = ForwardBatch::new(4);
    batch.push_sequence(&[1, 2], 0, &[0], Logits::Last).expect("push");
    let e = half.forward_batch(&backend, &batch, &cache).expect_err("needs its group").to_string();
    assert!(e.contains("forward_batch_tp"), "{e}");

    // A step before any cache exists fails on every rank, and the group goes on serving.
    let group = TpGroup::cpu(source, config, 2, DType::F32, || Box::new(CpuBackend::new())).expect("group");
    let e = group.forward(&batch).expect_err("no cache").to_string();
    assert!(e.contains("no KV cache"), "{e}");
    group.new_kv_cache(4, 4).expect("caches");
    assert_eq!(group.forward(&batch).expect("step").len(), 40);
    let _ = std::fs::remove_dir_all(dir);
}
