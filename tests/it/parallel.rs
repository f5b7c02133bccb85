//! Tensor and pipeline parallelism on `LocalComm`, on random-weight models: split models
//! compute what one rank computes (logits within float tolerance, the same greedy tokens), with
//! sequences joining a running batch mid-way, for head layouts that split evenly, KV heads
//! replicated over ranks, attention biases, tied embeddings, a vocabulary that does not divide by
//! the rank count, pipeline stages with micro-batches, and TP x PP; steps that ask only for each
//! row's most likely tokens get exactly the full logits' top k.

use std::sync::Arc;

use flint_cpu::CpuBackend;
use flint_e2e::random_models::{Dims, rel_err, run_schedule, write_random_llama};
use flint_model::{ForwardBatch, Llama, Logits, ModelSource, Shard, TpGroup, top_candidates};
use flint_stages::{StagePlan, pipeline_cpu};
use flint_tensor::{Backend, DType};

const LAYERS: usize = 6;

/// The schedule's logits and tokens with the whole model on one rank.
fn one_rank(source: &ModelSource, vocab: usize) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let backend = CpuBackend::new();
    let config = source.config().expect("config");
    let one = Llama::load(source, config, &backend, DType::F32, &mut |_| {}).expect("loads");
    let cache = one.new_paged_kv_cache(&backend, 24, 4).expect("cache");
    run_schedule(vocab, |b| backend.to_f32_vec(&one.forward_batch(&backend, b, &cache).expect("fwd")).expect("read"))
}

/// The group's step with full logits, after checking that the same step asking for candidates
/// (the ranks' vocabulary parts' top k, merged) gives exactly the full logits' top k.
fn step_checking_candidates(group: &TpGroup, batch: &ForwardBatch, vocab: usize) -> Vec<f32> {
    // Running a step again rewrites the same keys and values: the logits do not change.
    let full = group.forward(batch).expect("step");
    for k in [1, 3, vocab + 5] {
        let mut b = batch.clone();
        b.set_candidates(Some(k)).expect("k");
        let got = group.forward(&b).expect("candidate step");
        let want = top_candidates(&full, vocab, 0, k);
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{k} candidates");
    }
    full
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flint-e2e-parallel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
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
        write_random_llama(&dir, dims, 2, 100 * n as u64);
        let source = Arc::new(ModelSource::open(&dir).expect("opens"));
        let config = source.config().expect("config");
        let (want_logits, want_tokens) = one_rank(&source, dims.vocab);
        for world in worlds {
            let group = TpGroup::cpu(source.clone(), config.clone(), world, DType::F32, || Box::new(CpuBackend::new()))
                .expect("group");
            group.new_kv_cache(24, 4).expect("caches");
            let (logits, tokens) = run_schedule(dims.vocab, |b| step_checking_candidates(&group, b, dims.vocab));
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
    write_random_llama(&dir, dims, 2, 7);
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

#[test]
fn pipelines_compute_what_one_rank_computes() {
    let dims = Dims { heads: 4, kv_heads: 2, head_dim: 8, ffn: 48, vocab: 43, bias: false, tied: true };
    let dir = temp_dir("pp");
    write_random_llama(&dir, dims, LAYERS, 11);
    let source = Arc::new(ModelSource::open(&dir).expect("opens"));
    let config = source.config().expect("config");
    let (want_logits, want_tokens) = one_rank(&source, dims.vocab);
    let backend = CpuBackend::new();
    for (tp, pp, micro) in [(1, 2, 2), (1, 3, 3), (2, 2, 2), (1, 3, 1), (2, 3, 8)] {
        let plan = StagePlan::balanced(&config, pp).expect("plan");
        let group = pipeline_cpu(source.clone(), config.clone(), tp, plan.clone(), micro, DType::F32, || {
            Box::new(CpuBackend::new())
        })
        .expect("pipeline");
        group.new_kv_cache(24, 4).expect("caches");
        // Caches are sized for the rank with the most layers.
        let most_layers = plan.stages.iter().map(|r| r.len()).max().expect("stages");
        let kv_per_rank = dims.kv_heads / tp;
        assert_eq!(group.info().kv_bytes_per_token, 4 * 2 * most_layers * kv_per_rank * dims.head_dim);
        let (logits, tokens) = run_schedule(dims.vocab, |b| step_checking_candidates(&group, b, dims.vocab));
        assert_eq!(tokens, want_tokens, "TP {tp} x PP {pp} ({:?}), {micro} micro-batches", plan.stages);
        for (step, (got, want)) in logits.iter().zip(&want_logits).enumerate() {
            let err = rel_err(got, want);
            assert!(err < 1e-5, "TP {tp} x PP {pp}, step {step}: rel err {err:e}");
        }
    }
    // More stages than layers, and a stage run as a whole model, are errors.
    assert!(StagePlan::balanced(&config, LAYERS + 1).is_err());
    let part = Llama::load_part(&source, config.clone(), &backend, DType::F32, Shard::SINGLE, 2..4, &mut |_| {})
        .expect("a middle stage loads");
    let cache = part.new_paged_kv_cache(&backend, 4, 4).expect("cache");
    let mut batch = ForwardBatch::new(4);
    batch.push_sequence(&[1, 2], 0, &[0], Logits::Last).expect("push");
    let e = part.forward_batch(&backend, &batch, &cache).expect_err("a stage alone").to_string();
    assert!(e.contains("needs the previous stage"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Steps submitted to a pipeline before the earlier ones finish (one per stage in flight) give
/// what they give one at a time on one rank, in submission order; a step nobody collects is
/// skipped by the next collect or command, and a ticket whose outputs were skipped is refused.
#[test]
fn pipelined_steps_finish_in_order_and_uncollected_ones_are_skipped() {
    let dims = Dims { heads: 4, kv_heads: 2, head_dim: 8, ffn: 48, vocab: 43, bias: false, tied: true };
    let dir = temp_dir("in-flight");
    write_random_llama(&dir, dims, LAYERS, 12);
    let source = Arc::new(ModelSource::open(&dir).expect("opens"));
    let config = source.config().expect("config");
    // Three sequences on their own blocks, each a step of its own (prompt, then a decode).
    let step = |seq: u32, decode: bool| {
        let mut b = ForwardBatch::new(4);
        let blocks = [2 * seq, 2 * seq + 1];
        if decode {
            b.push_sequence(&[7 + seq], 5, &blocks, Logits::Last).expect("push");
        } else {
            b.push_sequence(&[1 + seq, 2, 3, 4 + seq, 5], 0, &blocks, Logits::Last).expect("push");
        }
        b
    };
    let order = [step(0, false), step(1, false), step(2, false), step(0, true), step(1, true), step(2, true)];
    let backend = CpuBackend::new();
    let one = Llama::load(&source, config.clone(), &backend, DType::F32, &mut |_| {}).expect("loads");
    let cache = one.new_paged_kv_cache(&backend, 8, 4).expect("cache");
    let want: Vec<Vec<f32>> = order
        .iter()
        .map(|b| backend.to_f32_vec(&one.forward_batch(&backend, b, &cache).expect("fwd")).expect("read"))
        .collect();

    let plan = StagePlan::balanced(&config, 3).expect("plan");
    let group = pipeline_cpu(source.clone(), config.clone(), 1, plan, 1, DType::F32, || Box::new(CpuBackend::new()))
        .expect("pipeline");
    assert_eq!(group.pipeline_depth(), 3);
    group.new_kv_cache(8, 4).expect("caches");
    let tickets: Vec<_> = order[..3].iter().map(|b| group.submit(b).expect("submit")).collect();
    for (i, t) in tickets.into_iter().enumerate() {
        let got = group.collect(t).expect("collect");
        assert!(rel_err(&got, &want[i]) < 1e-5, "prompt step {i}");
    }
    let mut tickets: Vec<_> = order[3..].iter().map(|b| group.submit(b).expect("submit")).collect();
    let last = tickets.pop().expect("three");
    let middle = tickets.pop().expect("two");
    drop(tickets);
    let got = group.collect(last).expect("the newest step, after skipping the older ones");
    assert!(rel_err(&got, &want[5]) < 1e-5, "decode step 2");
    let e = group.collect(middle).expect_err("skipped").to_string();
    assert!(e.contains("not waiting"), "{e}");
    // A step left in flight is waited for before a command, and the group goes on serving.
    drop(group.submit(&order[0]).expect("submit"));
    group.new_kv_cache(8, 4).expect("caches after an uncollected step");
    let got = group.forward(&order[0]).expect("step");
    assert!(rel_err(&got, &want[0]) < 1e-5, "a fresh cache's prompt step");
    let _ = std::fs::remove_dir_all(dir);
}
