//! The same tiny model loaded from GGUF, a single safetensors file and sharded safetensors gives
//! the same logits; a hand-written single-token forward pass agrees with the model.

use flint_cpu::CpuBackend;
use flint_model::{Llama, ModelSource};
use flint_tensor::{Backend, DType};

use crate::support::*;

fn logits_of(source: &ModelSource, tokens: &[u32]) -> Vec<f32> {
    let backend = CpuBackend::new();
    let config = source.config().expect("config");
    let model = Llama::load(source, config, &backend, DType::F32, &mut |_| {}).expect("loads");
    let mut cache = model.new_kv_cache(&backend, CONTEXT).expect("cache");
    // Prefill all but the last token, then decode the last one, to cover both paths.
    let (head, last) = tokens.split_at(tokens.len() - 1);
    model.forward(&backend, head, &mut cache, false).expect("prefill");
    let logits = model.forward(&backend, last, &mut cache, true).expect("decode");
    backend.to_f32_vec(&logits).expect("read")
}

const TOKENS: [u32; 7] = [1, 5, 17, 3, 39, 22, 8];

#[test]
fn gguf_and_safetensors_give_the_same_logits() {
    let dir = temp_dir("equiv");
    let gguf_path = dir.join("tiny.gguf");
    std::fs::write(&gguf_path, tiny_gguf()).expect("write gguf");
    let single = dir.join("single");
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&single).expect("dir");
    std::fs::create_dir_all(&sharded).expect("dir");
    write_hf_dir(&single, 1);
    write_hf_dir(&sharded, 3);

    let from_gguf = logits_of(&ModelSource::open(&gguf_path).expect("gguf opens"), &TOKENS);
    let from_single = logits_of(&ModelSource::open(&single).expect("dir opens"), &TOKENS);
    let from_sharded = logits_of(&ModelSource::open(&sharded).expect("sharded opens"), &TOKENS);
    assert_eq!(from_gguf.len(), VOCAB);
    for i in 0..VOCAB {
        assert!((from_gguf[i] - from_single[i]).abs() < 1e-5, "logit {i}: {} vs {}", from_gguf[i], from_single[i]);
        assert_eq!(from_single[i], from_sharded[i]);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Prefill of all tokens at once and token-by-token decoding agree.
#[test]
fn prefill_and_incremental_decode_agree() {
    let dir = temp_dir("incremental");
    write_hf_dir(&dir, 1);
    let source = ModelSource::open(&dir).expect("opens");
    let backend = CpuBackend::new();
    let model =
        Llama::load(&source, source.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads");
    let mut all = model.new_kv_cache(&backend, CONTEXT).expect("cache");
    let batch = backend.to_f32_vec(&model.forward(&backend, &TOKENS, &mut all, true).expect("prefill")).expect("read");
    let mut one = model.new_kv_cache(&backend, CONTEXT).expect("cache");
    for (i, &t) in TOKENS.iter().enumerate() {
        let step = backend.to_f32_vec(&model.forward(&backend, &[t], &mut one, true).expect("step")).expect("read");
        for (a, b) in step.iter().zip(&batch[i * VOCAB..(i + 1) * VOCAB]) {
            assert!((a - b).abs() < 1e-5, "position {i}: {a} vs {b}");
        }
    }
    // The cache refuses to overflow.
    let mut small = model.new_kv_cache(&backend, 4).expect("cache");
    let err = model.forward(&backend, &TOKENS, &mut small, false).expect_err("overflow");
    assert!(err.to_string().contains("capacity"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A single token at position 0 attends only to itself, so attention returns its own value
/// vector: the whole forward pass can be written out by hand.
#[test]
fn first_token_matches_a_hand_written_forward() {
    let weights = tiny_weights();
    let get = |name: &str| weights.iter().find(|(n, _, _)| n == name).map(|(_, _, d)| d.clone()).expect("weight");
    let matvec = |w: &[f32], x: &[f32]| -> Vec<f32> {
        w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    };
    let rms = |x: &[f32], w: &[f32]| -> Vec<f32> {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        x.iter().zip(w).map(|(v, g)| v / (ms + 1e-5).sqrt() * g).collect()
    };
    let token = 7usize;
    let mut h: Vec<f32> = get("model.embed_tokens.weight")[token * HIDDEN..(token + 1) * HIDDEN].to_vec();
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let x = rms(&h, &get(&format!("{p}.input_layernorm.weight")));
        let v = matvec(&get(&format!("{p}.self_attn.v_proj.weight")), &x);
        // Each query head reads the value of its KV head (group of HEADS / KV_HEADS).
        let attn: Vec<f32> =
            (0..HEADS).flat_map(|hd| v[(hd / (HEADS / KV_HEADS)) * HEAD_DIM..][..HEAD_DIM].to_vec()).collect();
        let o = matvec(&get(&format!("{p}.self_attn.o_proj.weight")), &attn);
        h = h.iter().zip(&o).map(|(a, b)| a + b).collect();
        let x = rms(&h, &get(&format!("{p}.post_attention_layernorm.weight")));
        let g = matvec(&get(&format!("{p}.mlp.gate_proj.weight")), &x);
        let u = matvec(&get(&format!("{p}.mlp.up_proj.weight")), &x);
        let act: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let d = matvec(&get(&format!("{p}.mlp.down_proj.weight")), &act);
        h = h.iter().zip(&d).map(|(a, b)| a + b).collect();
    }
    let want = matvec(&get("lm_head.weight"), &rms(&h, &get("model.norm.weight")));

    let dir = temp_dir("by-hand");
    write_hf_dir(&dir, 1);
    let got = logits_of(&ModelSource::open(&dir).expect("opens"), &[token as u32, 3]);
    let backend = CpuBackend::new();
    let source = ModelSource::open(&dir).expect("opens");
    let model =
        Llama::load(&source, source.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads");
    let mut cache = model.new_kv_cache(&backend, 4).expect("cache");
    let first =
        backend.to_f32_vec(&model.forward(&backend, &[token as u32], &mut cache, false).expect("fwd")).expect("read");
    for (a, b) in first.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert_eq!(got.len(), VOCAB);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_and_malformed_files_are_errors() {
    let dir = temp_dir("malformed");
    assert!(ModelSource::open(&dir.join("absent.gguf")).is_err());
    std::fs::write(dir.join("config.json"), "{not json").expect("write");
    std::fs::write(dir.join("model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").expect("write");
    let source = ModelSource::open(&dir);
    match source {
        Ok(s) => assert!(s.config().is_err()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    std::fs::write(dir.join("model.safetensors"), b"garbage").expect("write");
    assert!(ModelSource::open(&dir).is_err());
    let _ = std::fs::remove_dir_all(dir);
}

/// Several sequences in one batch, in scattered blocks, with prompt chunks and single-token
/// decodes mixed, get exactly the logits each gets when run alone.
#[test]
fn batched_paged_forward_equals_each_sequence_alone() {
    use flint_model::{ForwardBatch, Logits};

    let dir = temp_dir("batched");
    write_hf_dir(&dir, 1);
    let source = ModelSource::open(&dir).expect("opens");
    let backend = CpuBackend::new();
    let model =
        Llama::load(&source, source.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads");
    let seqs: [&[u32]; 3] = [&[1, 5, 17, 3, 39, 22, 8, 9, 10], &[4, 4, 4], &[30, 2, 11, 12, 13, 14, 15]];
    let alone: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| {
            let mut cache = model.new_kv_cache(&backend, CONTEXT).expect("cache");
            backend.to_f32_vec(&model.forward(&backend, s, &mut cache, true).expect("fwd")).expect("read")
        })
        .collect();

    let block_size = 2;
    let cache = model.new_paged_kv_cache(&backend, 32, block_size).expect("paged");
    let tables: [Vec<u32>; 3] = [vec![31, 3, 17, 8, 25], vec![0, 30], vec![12, 1, 29, 6]];
    // Step 1: the first 4 tokens of sequence 0, all of sequence 1, the first 5 of sequence 2.
    // Step 2: the rest of sequence 0 in one chunk, and sequence 2 one token at a time.
    let mut got: Vec<Vec<f32>> = vec![Vec::new(); 3];
    let mut step = |parts: &[(usize, usize, usize)]| {
        let mut batch = ForwardBatch::new(block_size);
        for &(s, from, to) in parts {
            batch.push_sequence(&seqs[s][from..to], from, &tables[s], Logits::All).expect("push");
        }
        let logits = backend.to_f32_vec(&model.forward_batch(&backend, &batch, &cache).expect("step")).expect("read");
        let mut row = 0;
        for &(s, from, to) in parts {
            got[s].extend_from_slice(&logits[row * VOCAB..(row + to - from) * VOCAB]);
            row += to - from;
        }
    };
    step(&[(0, 0, 4), (1, 0, 3), (2, 0, 5)]);
    step(&[(2, 5, 6), (0, 4, 9)]);
    step(&[(2, 6, 7)]);
    for s in 0..3 {
        assert_eq!(got[s], alone[s], "sequence {s}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn micro_batches_split_by_sequence_and_keep_logit_rows() {
    let mut batch = flint_model::ForwardBatch::new(4);
    batch.push_sequence(&[1, 2, 3, 4, 5], 0, &[0, 1], flint_model::Logits::Last).expect("push");
    batch.push_sequence(&[6], 3, &[2], flint_model::Logits::Last).expect("push");
    batch.push_sequence(&[7, 8], 0, &[3], flint_model::Logits::All).expect("push");
    batch.push_sequence(&[9], 9, &[4, 5, 6], flint_model::Logits::None).expect("push");
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
