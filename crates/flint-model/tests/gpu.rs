//! Whole models on the GPU against Hugging Face `transformers` and against the CPU reference.
//!
//! `FLINT_HF_MODELS` names a folder of checkpoints written by `tests/gpu/hf_models.py` on the GPU
//! machine (random-weight Llama and Qwen2 models, BF16 safetensors, with the reference's prefill
//! and 64 greedy decode steps). Flint loads each, runs the same prompt, and compares logits at
//! every step (teacher-forced on the reference's tokens) and greedy tokens where the reference's
//! top-2 margin is clear. The CPU backend runs the same checkpoints as a second reference.
//!
//! Skipped without a GPU or without the folder, unless `FLINT_REQUIRE_GPU=1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flint_cpu::CpuBackend;
use flint_cuda::Gpu;
use flint_cuda::ops::NormOut;
use flint_model::cuda::{CudaLlama, CudaLlamaOptions};
use flint_model::{ForwardBatch, Llama, Logits, ModelSource};
use flint_tensor::{Backend, DType};
use flint_testkit::{gpu, gpu_required};
use serde_json::Value;

fn hf_dirs() -> Option<Vec<PathBuf>> {
    let Some(root) = std::env::var_os("FLINT_HF_MODELS").map(PathBuf::from) else {
        assert!(!gpu_required(), "FLINT_REQUIRE_GPU is set but FLINT_HF_MODELS is not");
        eprintln!("skipped: FLINT_HF_MODELS is not set");
        return None;
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("FLINT_HF_MODELS is a folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no reference models under {}", root.display());
    Some(dirs)
}

fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    assert!(out.iter().all(|x| x.is_finite()), "non-finite logits");
    let num: f64 = out.iter().zip(reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32
}

fn small_options(graphs: bool) -> CudaLlamaOptions {
    CudaLlamaOptions {
        max_batch_tokens: 256,
        max_seqs: 8,
        max_seq_len: 512,
        block_size: 16,
        n_blocks: Some(128),
        graphs,
        ..CudaLlamaOptions::default()
    }
}

struct Reference {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    margins: Vec<f64>,
    logits: Vec<Vec<f32>>,
}

fn read_reference(dir: &Path) -> Reference {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("read")).expect("json");
    let ids = |k: &str| json[k].as_array().expect(k).iter().map(|v| v.as_u64().expect("id") as u32).collect::<Vec<_>>();
    let vocab = json["vocab_size"].as_u64().expect("vocab") as usize;
    let raw = std::fs::read(dir.join("logits.f32")).expect("logits");
    let flat: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    eprintln!("{}: {}", dir.display(), json["generator"]);
    Reference {
        prompt: ids("prompt"),
        tokens: ids("tokens"),
        margins: json["margins"].as_array().expect("margins").iter().map(|v| v.as_f64().expect("m")).collect(),
        logits: flat.chunks(vocab).map(<[f32]>::to_vec).collect(),
    }
}

/// Prefill, then teacher-forced decode on the reference's tokens, through `forward` (one GPU,
/// or a tensor-parallel group); returns logits per step.
fn run_forced(forward: &dyn Fn(&ForwardBatch) -> Vec<f32>, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let table: Vec<u32> = (0..((prompt.len() + forced.len() + 1).div_ceil(16)) as u32).collect();
    let mut out = Vec::new();
    let mut b = ForwardBatch::new(16);
    b.push_sequence(prompt, 0, &table, Logits::Last).expect("batch");
    out.push(forward(&b));
    for (i, &t) in forced.iter().enumerate() {
        let mut b = ForwardBatch::new(16);
        b.push_sequence(&[t], prompt.len() + i, &table, Logits::Last).expect("batch");
        out.push(forward(&b));
    }
    out
}

fn run_gpu(model: &CudaLlama, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    run_forced(&|b| model.forward(b).expect("step"), prompt, forced)
}

fn run_cpu(model: &Llama, backend: &CpuBackend, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_kv_cache(backend, prompt.len() + forced.len() + 1).expect("cache");
    let mut out = Vec::new();
    let l = model.forward(backend, prompt, &mut cache, false).expect("prefill");
    out.push(backend.to_f32_vec(&l).expect("read"));
    for &t in forced {
        let l = model.forward(backend, &[t], &mut cache, false).expect("decode");
        out.push(backend.to_f32_vec(&l).expect("read"));
    }
    out
}

#[test]
fn random_checkpoints_match_transformers_and_the_cpu() {
    let Some(g) = gpu() else { return };
    let Some(dirs) = hf_dirs() else { return };
    for dir in dirs {
        let r = read_reference(&dir);
        let source = ModelSource::open(&dir).expect("open checkpoint");
        let config = source.config().expect("config");
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let forced = &r.tokens[..r.tokens.len() - 1];
        for graphs in [false, true] {
            let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), small_options(graphs)).expect("load");
            let got = run_gpu(&model, &r.prompt, forced);
            let mut worst = 0f64;
            let mut clear = 0;
            for (step, (l, want)) in got.iter().zip(&r.logits).enumerate() {
                let e = rel_err(l, want);
                worst = worst.max(e);
                assert!(e <= 2e-2, "{name} graphs={graphs}: step {step} logits rel err {e:.3e} > 2e-2");
                if r.margins[step] > 0.1 {
                    clear += 1;
                    assert_eq!(
                        argmax(l),
                        r.tokens[step],
                        "{name} graphs={graphs}: greedy token differs at step {step} (margin {:.3})",
                        r.margins[step]
                    );
                }
            }
            eprintln!(
                "{name} graphs={graphs}: {} steps, worst logits rel err {worst:.2e}, {clear} clear-margin tokens equal",
                got.len()
            );
        }
        // The CPU reference (bf16 weights, f32 activations) on the same checkpoint.
        let backend = CpuBackend::new();
        let cpu = Llama::load(&source, config.clone(), &backend, DType::BF16, &mut |_| {}).expect("cpu load");
        let steps = 8.min(forced.len());
        let cpu_logits = run_cpu(&cpu, &backend, &r.prompt, &forced[..steps]);
        let model = CudaLlama::load(Arc::clone(&g), &source, config, small_options(true)).expect("load");
        let gpu_logits = run_gpu(&model, &r.prompt, &forced[..steps]);
        for (step, (a, b)) in gpu_logits.iter().zip(&cpu_logits).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= 2e-2, "{name}: GPU vs CPU step {step} rel err {e:.3e}");
        }
        eprintln!("{name}: GPU matches the CPU reference over {} steps", steps + 1);
    }
}

/// A row computed with other sequences against the same sequence alone: within BF16 (FP8)
/// tolerance, and the same greedy token (`token`) where the alone row's top-2 margin is clear.
/// Returns the relative error and whether the margin was clear.
fn check_against_alone(together: &[f32], alone: &[f32], token: u32, fp8: bool, what: &str) -> (f64, bool) {
    let e = rel_err(together, alone);
    // FP8: GEMV and cuBLASLt round BF16 outputs differently, which FP8 quantization of the
    // next activation can turn into whole FP8 steps (measured 5.4e-2 on an H100).
    let tol = if fp8 { 1e-1 } else { 2e-2 };
    assert!(e <= tol, "{what} vs alone: rel err {e:.3e}");
    let mut sorted = alone.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    // FP8's rounding noise is larger: only margins it cannot flip count.
    let clear = sorted[0] - sorted[1] > if fp8 { 0.5 } else { 0.1 };
    if clear {
        assert_eq!(argmax(together), token, "{what}: greedy token changed");
    }
    (e, clear)
}

#[test]
fn batched_decode_matches_each_sequence_alone() {
    // Alone, a decode step runs the GEMV kernel; batched, the sequences share a padded graph
    // bucket and may run cuBLASLt: the same function, other rounding. Teacher-forced on the
    // sequences' own greedy tokens, batched logits must match within BF16 tolerance and give the
    // same greedy token wherever the margin is clear.
    // FP8: alone runs the FP8 GEMV, ten together run cuBLASLt FP8.
    let Some(g) = gpu() else { return };
    let Some(dirs) = hf_dirs() else { return };
    for fp8 in [false, true] {
        let dir = &dirs[0];
        let source = ModelSource::open(dir).expect("open");
        let config = source.config().expect("config");
        let options = CudaLlamaOptions { fp8, max_seqs: 16, ..small_options(true) };
        let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), options).expect("load");
        let vocab = config.vocab_size as u32;
        let v = config.vocab_size;
        let lengths: &[usize] = if fp8 { &[37, 5, 70, 16, 1, 9, 23, 2, 41, 12] } else { &[37, 5, 70, 16, 1] };
        let prompts: Vec<Vec<u32>> = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| ((i * 7919 + j * 104_729) as u32) % vocab).collect())
            .collect();
        const STEPS: usize = 12;
        // Alone: greedy, keeping every step's logits.
        let alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts
            .iter()
            .map(|p| {
                let table: Vec<u32> = (0..8).collect();
                let mut b = ForwardBatch::new(16);
                b.push_sequence(p, 0, &table, Logits::Last).expect("batch");
                let mut logits = vec![model.forward(&b).expect("prefill")];
                let mut toks = vec![argmax(&logits[0])];
                for i in 0..STEPS - 1 {
                    let mut b = ForwardBatch::new(16);
                    b.push_sequence(&[toks[i]], p.len() + i, &table, Logits::Last).expect("batch");
                    logits.push(model.forward(&b).expect("decode"));
                    toks.push(argmax(logits.last().expect("logits")));
                }
                (toks, logits)
            })
            .collect();
        // Together: one prefill batch, then batched decode steps fed the same tokens.
        let tables: Vec<Vec<u32>> =
            (0..prompts.len()).map(|s| ((8 * s + 8) as u32..(8 * s + 16) as u32).collect()).collect();
        let mut b = ForwardBatch::new(16);
        for (p, t) in prompts.iter().zip(&tables) {
            b.push_sequence(p, 0, t, Logits::Last).expect("batch");
        }
        let mut steps = vec![model.forward(&b).expect("prefill")];
        for i in 0..STEPS - 1 {
            let mut b = ForwardBatch::new(16);
            for (s, (p, t)) in prompts.iter().zip(&tables).enumerate() {
                b.push_sequence(&[alone[s].0[i]], p.len() + i, t, Logits::Last).expect("batch");
            }
            steps.push(model.forward(&b).expect("decode"));
        }
        let mut clear = 0;
        for (i, step) in steps.iter().enumerate() {
            for (s, (toks, logits)) in alone.iter().enumerate() {
                let what = format!("sequence {s} step {i} (fp8 {fp8}), batched");
                let (_, checked) = check_against_alone(&step[s * v..(s + 1) * v], &logits[i], toks[i], fp8, &what);
                clear += usize::from(checked);
            }
        }
        eprintln!(
            "batched decode (fp8 {fp8}): {} sequence-steps within tolerance, {clear} clear-margin tokens equal",
            steps.len() * prompts.len()
        );
        assert!(model.n_graphs() > 0, "decode steps should have used CUDA graphs");
    }
}

#[test]
fn mixed_steps_match_each_sequence_alone() {
    // A serving step mixes running decodes (leading single-token sequences: the split-K decode
    // kernel) with a prompt chunk (prefill tiles) and, after it, another decode (a lone query in a
    // prefill tile). Each row's logits must match the same sequence run alone within BF16 (FP8)
    // tolerance, and the greedy token wherever the margin is clear.
    let Some(g) = gpu() else { return };
    let Some(dirs) = hf_dirs() else { return };
    for fp8 in [false, true] {
        let source = ModelSource::open(&dirs[0]).expect("open");
        let config = source.config().expect("config");
        let model =
            CudaLlama::load(Arc::clone(&g), &source, config.clone(), CudaLlamaOptions { fp8, ..small_options(false) })
                .expect("load");
        let vocab = config.vocab_size as u32;
        let prompt =
            |i: usize, n: usize| -> Vec<u32> { (0..n).map(|j| ((i * 6151 + j * 7919 + 3) as u32) % vocab).collect() };
        let prompts = [prompt(0, 37), prompt(1, 70), prompt(2, 5), prompt(3, 45)];
        let table = |slot: usize| -> Vec<u32> { ((8 * slot) as u32..(8 * slot + 8) as u32).collect() };
        let one = |tokens: &[u32], start: usize, t: &[u32]| -> Vec<f32> {
            let mut b = ForwardBatch::new(16);
            b.push_sequence(tokens, start, t, Logits::Last).expect("batch");
            model.forward(&b).expect("forward")
        };
        // Alone: sequences 0..3 prefill then take one decode step; sequence 3 is only a prompt.
        let mut next = Vec::new();
        let mut alone = Vec::new();
        for (i, p) in prompts.iter().enumerate().take(3) {
            let t = argmax(&one(p, 0, &table(i)));
            next.push(t);
            alone.push(one(&[t], p.len(), &table(i)));
        }
        alone.push(one(&prompts[3], 0, &table(3)));
        // Together, in fresh blocks: the three prompts in one prefill, then the mixed step.
        let mut b = ForwardBatch::new(16);
        for (i, p) in prompts.iter().enumerate().take(3) {
            b.push_sequence(p, 0, &table(4 + i), Logits::Last).expect("batch");
        }
        model.forward(&b).expect("prefill");
        let mut b = ForwardBatch::new(16);
        b.push_sequence(&[next[0]], prompts[0].len(), &table(4), Logits::Last).expect("batch");
        b.push_sequence(&[next[1]], prompts[1].len(), &table(5), Logits::Last).expect("batch");
        b.push_sequence(&prompts[3], 0, &table(7), Logits::Last).expect("batch");
        b.push_sequence(&[next[2]], prompts[2].len(), &table(6), Logits::Last).expect("batch");
        let mixed = model.forward(&b).expect("mixed step");
        let v = config.vocab_size;
        // Rows of the mixed step: sequences 0, 1, 3 (the prompt), 2.
        for (row, seq) in [0, 1, 3, 2].into_iter().enumerate() {
            let what = format!("sequence {seq} (fp8 {fp8}) in the mixed step");
            let (e, _) =
                check_against_alone(&mixed[row * v..(row + 1) * v], &alone[seq], argmax(&alone[seq]), fp8, &what);
            eprintln!("mixed step (fp8 {fp8}): sequence {seq} rel err {e:.3e}");
        }
    }
}

/// SmolLM2 (the default model, Q4_1 GGUF dequantized to BF16) on the GPU against the committed
/// reference whose tokens the CPU engine reproduces exactly: teacher-forced on the reference's
/// tokens, the GPU's greedy choice must equal the reference's at every step whose top-2 margin is
/// clear of BF16 noise. Needs the GGUF: `FLINT_MODEL` or `models/`.
#[test]
fn smollm2_greedy_tokens_match_the_cpu_reference() {
    let Some(g) = gpu() else { return };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = std::env::var_os("FLINT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !path.exists() {
        assert!(
            std::env::var_os("FLINT_REQUIRE_SMOLLM2").is_none(),
            "FLINT_REQUIRE_SMOLLM2 is set but {} is missing",
            path.display()
        );
        eprintln!("skipped: {} not found", path.display());
        return;
    }
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/data/smollm2_reference.json")).expect("reference"),
    )
    .expect("json");
    let source = ModelSource::open(&path).expect("open");
    let config = source.config().expect("config");
    let model = CudaLlama::load(Arc::clone(&g), &source, config, small_options(true)).expect("load");
    let (mut checked, mut close) = (0, 0);
    for case in reference["cases"].as_array().expect("cases") {
        let ids =
            |k: &str| case[k].as_array().expect(k).iter().map(|v| v.as_u64().expect("id") as u32).collect::<Vec<_>>();
        let (prompt, tokens) = (ids("prompt_token_ids"), ids("token_ids"));
        let margins: Vec<f64> =
            case["margins"].as_array().expect("margins").iter().map(|v| v.as_f64().expect("m")).collect();
        let got = run_gpu(&model, &prompt, &tokens[..tokens.len() - 1]);
        for (step, l) in got.iter().enumerate() {
            if margins[step] > 0.5 {
                checked += 1;
                assert_eq!(argmax(l), tokens[step], "{:?}: step {step} (margin {:.3})", case["prompt"], margins[step]);
            } else {
                close += 1;
            }
        }
    }
    eprintln!(
        "SmolLM2 on the GPU: {checked} greedy steps equal to the reference, {close} steps with margins under 0.5 not compared"
    );
    assert!(checked > 100, "too few steps compared: {checked}");
}

/// FP8 on the GPU (per-channel weights, per-token activations; BF16 and FP8 KV cache) against
/// the CPU's FP8 emulation of the same scheme, on the transformers checkpoints: prefill
/// (cuBLASLt FP8, the prefill attention kernel) and decode (the FP8 GEMV, the split-K decode
/// kernel), with and without graphs. Batched FP8 decode is checked by
/// `batched_decode_matches_each_sequence_alone`.
#[test]
fn fp8_model_matches_the_cpu_emulation() {
    let Some(g) = gpu() else { return };
    let Some(dirs) = hf_dirs() else { return };
    for dir in dirs {
        let r = read_reference(&dir);
        let source = ModelSource::open(&dir).expect("open checkpoint");
        let config = source.config().expect("config");
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let forced = &r.tokens[..16.min(r.tokens.len() - 1)];
        let bf16_model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), small_options(true)).expect("load");
        let bf16_logits = run_gpu(&bf16_model, &r.prompt, forced);
        drop(bf16_model);
        let mut bf16_cache_logits = None;
        for kv_fp8 in [false, true] {
            let backend = CpuBackend::new();
            let mut cpu = Llama::load(&source, config.clone(), &backend, DType::BF16, &mut |_| {}).expect("cpu load");
            let spec = flint_model::Fp8Spec { kv_cache: kv_fp8, ..flint_model::Fp8Spec::SERVING };
            cpu.quantize_fp8(&backend, spec).expect("fp8");
            let want = run_cpu(&cpu, &backend, &r.prompt, forced);
            drop(cpu);
            let kv = if kv_fp8 { "fp8" } else { "bf16" };
            for graphs in [false, true] {
                let options = CudaLlamaOptions { fp8: true, kv_fp8, ..small_options(graphs) };
                let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), options).expect("load fp8");
                let got = run_gpu(&model, &r.prompt, forced);
                let mut worst = 0f64;
                let mut agree = 0;
                for (step, (a, b)) in got.iter().zip(&want).enumerate() {
                    let e = rel_err(a, b);
                    worst = worst.max(e);
                    // One BF16 rounding apart (the GPU's activations are BF16, the CPU's f32), an
                    // activation can land on the other side of an FP8 rounding boundary: a 6%
                    // step in that element. Measured worst (H100, llama-gqa4-hd128): 5.3e-2 to
                    // 7.0e-2 with the BF16 cache, 7.2e-2 to 7.8e-2 with the FP8 one.
                    assert!(
                        e <= 1e-1,
                        "{name} fp8 kv {kv} graphs={graphs}: step {step} vs CPU emulation rel err {e:.3e}"
                    );
                    agree += (argmax(a) == argmax(&bf16_logits[step])) as usize;
                }
                let vs_bf16 = got.iter().zip(&bf16_logits).map(|(a, b)| rel_err(a, b)).fold(0.0, f64::max);
                eprintln!(
                    "{name} fp8 kv {kv} graphs={graphs}: {} steps, worst rel err vs CPU FP8 emulation {worst:.2e}; vs GPU BF16 {vs_bf16:.2e}, greedy agreement {agree}/{}",
                    got.len(),
                    got.len()
                );
                // Weights as the checkpoint's and FP8 weights differ: the FP8 model really is FP8.
                assert!(vs_bf16 > worst.min(1e-3), "{name}: FP8 logits equal BF16's");
                // And the FP8 cache really holds codes: its logits are not the BF16 cache's.
                match &bf16_cache_logits {
                    None => bf16_cache_logits = Some(got),
                    Some(prev) if kv_fp8 => {
                        let d = got.iter().zip(prev).map(|(a, b)| rel_err(a, b)).fold(0.0, f64::max);
                        assert!(d > 1e-4, "{name}: FP8-cache logits equal the BF16 cache's ({d:.1e})");
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

/// FP8 decode steps whose O and down GEMVs quantize their inputs themselves (the default) give
/// the logits of the steps with a quantization kernel before each, bit for bit: one sequence (the
/// fused steps), then two and three decoded together (past `FUSED_QUANTIZATION_MAX_TOKENS`, so
/// the option must leave them alone); BF16 and FP8 caches, with and without graphs.
#[test]
fn fused_fp8_quantization_changes_no_logit() {
    let Some((g, r, source, config)) = first_checkpoint() else { return };
    let forced = &r.tokens[..12.min(r.tokens.len() - 1)];
    for kv_fp8 in [false, true] {
        for graphs in [false, true] {
            let run = |fuse: bool| {
                // (The split norm runs only with the fused quantization: off here, both sides keep
                // the norm tail.)
                let options = CudaLlamaOptions {
                    fp8: true,
                    kv_fp8,
                    fuse_fp8_quantization: fuse,
                    split_norm: false,
                    ..small_options(graphs)
                };
                let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), options).expect("load fp8");
                let alone = run_gpu(&model, &r.prompt, forced);
                let together = run_batched(&|b| model.forward(b).expect("step"), &r.prompt, 8);
                // Two sequences decoding together.
                let p = &r.prompt;
                let per = (p.len() + forced.len() + 1).div_ceil(16) as u32;
                let tables = [(0..per).collect::<Vec<u32>>(), (per..2 * per).collect()];
                let mut b = ForwardBatch::new(16);
                b.push_sequence(p, 0, &tables[0], Logits::Last).expect("batch");
                b.push_sequence(&p[..p.len() / 2], 0, &tables[1], Logits::Last).expect("batch");
                let mut pair = vec![model.forward(&b).expect("prefill")];
                for i in 0..forced.len() {
                    let mut b = ForwardBatch::new(16);
                    b.push_sequence(&[forced[i]], p.len() + i, &tables[0], Logits::Last).expect("batch");
                    b.push_sequence(&[forced[(i + 1) % forced.len()]], p.len() / 2 + i, &tables[1], Logits::Last)
                        .expect("batch");
                    pair.push(model.forward(&b).expect("decode"));
                }
                (alone, together, pair)
            };
            let (fused, separate) = (run(true), run(false));
            let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
            let what = format!("kv fp8 {kv_fp8} graphs {graphs}");
            assert_eq!(bits(&fused.0), bits(&separate.0), "{what}: one sequence's logits differ");
            assert_eq!(bits(&fused.1), bits(&separate.1), "{what}: three sequences' logits differ");
            assert_eq!(bits(&fused.2), bits(&separate.2), "{what}: two sequences' logits differ");
        }
    }
    eprintln!("fused FP8 quantization: logits bit-equal to the separate kernels'");
}

/// Decode steps whose attention ropes the queries and writes the new keys and values itself give
/// the logits of a RoPE + KV-write kernel before the attention, bit for bit, on every reference
/// checkpoint (head dims 64 and 128, GQA 1 to 8, the QKV bias), in the runs of
/// [`assert_fusion_changes_no_logit`]; BF16 and FP8 models over BF16 and FP8 caches.
#[test]
fn fused_rope_attention_changes_no_logit() {
    let dtypes = [(false, false), (false, true), (true, true)];
    assert_fusion_changes_no_logit("fused RoPE attention", &dtypes, |o, on| o.fuse_rope_attention = on);
}

/// FP8 steps of one token whose O and down GEMVs run the residual add + RMSNorm + quantize in
/// their last block give the logits of the norm kernels, bit for bit, on every reference
/// checkpoint (hidden sizes and their GEMV variants), in the runs of
/// [`assert_fusion_changes_no_logit`] (steps of two and three tokens, past
/// `NORM_TAIL_MAX_TOKENS`, must be left alone); BF16 and FP8 caches, with and without the fused
/// quantization.
/// (The tail in the last block, not the split norm, which is not bit for bit the kernels'.)
#[test]
fn norm_tail_changes_no_logit() {
    let dtypes = [(true, false), (true, true)];
    assert_fusion_changes_no_logit("norm tail", &dtypes, |o, on| {
        o.fuse_norm_tail = on;
        o.split_norm = false;
    });
    assert_fusion_changes_no_logit("norm tail, separate quantization", &dtypes, |o, on| {
        o.fuse_norm_tail = on;
        o.fuse_fp8_quantization = false;
    });
}

/// FP8 steps of one token whose norms are split over the O or down GEMV and the GEMV after it
/// (the default) against the norm tail, on every reference checkpoint, BF16 and FP8 caches: the
/// same logits within FP8 tolerance and the same greedy token wherever the tail's top-2 margin is
/// clear (the RMS and scales can differ in the last bits, which moves some codes a step), and,
/// with and without graphs, the same bits from run to run.
#[test]
fn split_norm_matches_the_norm_tail() {
    let Some(g) = gpu() else { return };
    for dir in hf_dirs().expect("checkpoints") {
        let r = read_reference(&dir);
        let source = ModelSource::open(&dir).expect("open checkpoint");
        let config = source.config().expect("config");
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let forced = &r.tokens[..12.min(r.tokens.len() - 1)];
        for kv_fp8 in [false, true] {
            let run = |split: bool, graphs: bool| {
                let options = CudaLlamaOptions { fp8: true, kv_fp8, split_norm: split, ..small_options(graphs) };
                let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), options).expect("load fp8");
                run_gpu(&model, &r.prompt, forced)
            };
            let tail = run(false, true);
            let split = run(true, true);
            let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&run(true, false)), bits(&split), "{name} kv fp8 {kv_fp8}: graphs change the split norm");
            assert_eq!(
                bits(&run(true, true)),
                bits(&split),
                "{name} kv fp8 {kv_fp8}: the split norm is not repeatable"
            );
            let (mut worst, mut clear) = (0f64, 0);
            // The prefill's logits come before any one-token step: bit-equal.
            assert_eq!(bits(&split[..1]), bits(&tail[..1]), "{name}: prefill logits differ");
            for (step, (a, b)) in split.iter().zip(&tail).enumerate().skip(1) {
                let what = format!("{name} kv fp8 {kv_fp8} step {step}: split norm");
                let (e, c) = check_against_alone(a, b, argmax(b), true, &what);
                worst = worst.max(e);
                clear += c as usize;
            }
            eprintln!(
                "{name} kv fp8 {kv_fp8}: split norm vs tail worst rel err {worst:.2e}, {clear}/{} clear-margin tokens equal",
                split.len() - 1
            );
        }
    }
}

/// On every reference checkpoint, for each (fp8, kv_fp8) of `dtypes`, with and without graphs:
/// the logits with a fusion on (`set(options, true)`) equal those with it off, bit for bit, for
/// one sequence (prefill, then decode-only steps), three decoding together, and a prompt joining
/// a decode mid-way (a mixed step, after which two sequences decode).
fn assert_fusion_changes_no_logit(name: &str, dtypes: &[(bool, bool)], set: fn(&mut CudaLlamaOptions, bool)) {
    let Some(g) = gpu() else { return };
    let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    for dir in hf_dirs().expect("checkpoints") {
        let r = read_reference(&dir);
        let source = ModelSource::open(&dir).expect("open checkpoint");
        let config = source.config().expect("config");
        let forced = &r.tokens[..12.min(r.tokens.len() - 1)];
        for &(fp8, kv_fp8) in dtypes {
            for graphs in [false, true] {
                let run = |fuse: bool| {
                    let mut options = CudaLlamaOptions { fp8, kv_fp8, ..small_options(graphs) };
                    set(&mut options, fuse);
                    let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), options).expect("load");
                    let alone = run_gpu(&model, &r.prompt, forced);
                    let together = run_batched(&|b| model.forward(b).expect("step"), &r.prompt, 8);
                    // Sequence 0 decodes; at step 3 sequence 1's prompt joins it (a mixed step),
                    // and both decode after it.
                    let p = &r.prompt;
                    let per = (p.len() + forced.len() + 1).div_ceil(16) as u32;
                    let tables = [(0..per).collect::<Vec<u32>>(), (per..2 * per).collect()];
                    let mut b = ForwardBatch::new(16);
                    b.push_sequence(p, 0, &tables[0], Logits::Last).expect("batch");
                    let mut mixed = vec![model.forward(&b).expect("prefill")];
                    for (i, &t) in forced.iter().enumerate() {
                        let mut b = ForwardBatch::new(16);
                        b.push_sequence(&[t], p.len() + i, &tables[0], Logits::Last).expect("batch");
                        match i {
                            0..3 => {}
                            3 => b.push_sequence(&p[..p.len() / 2], 0, &tables[1], Logits::Last).expect("batch"),
                            _ => b.push_sequence(&[t], p.len() / 2 + i - 4, &tables[1], Logits::Last).expect("batch"),
                        }
                        mixed.push(model.forward(&b).expect("step"));
                    }
                    (alone, together, mixed)
                };
                let (fused, separate) = (run(true), run(false));
                let what = format!("{name}: {} fp8 {fp8} kv fp8 {kv_fp8} graphs {graphs}", dir.display());
                assert_eq!(bits(&fused.0), bits(&separate.0), "{what}: one sequence's logits differ");
                assert_eq!(bits(&fused.1), bits(&separate.1), "{what}: three sequences' logits differ");
                assert_eq!(bits(&fused.2), bits(&separate.2), "{what}: the mixed run's logits differ");
            }
        }
    }
    eprintln!("{name}: logits bit-equal with the fusion on and off");
}

/// Early launch (the small kernels let the next one launch as they enter, the GEMVs load and
/// L2-prefetch weights before they wait) changes no logit: BF16 and FP8 models (FP8 cache, the
/// fused quantization), one sequence and three decoding together, with and without graphs, give
/// bit for bit the logits of every kernel waiting first; the budgets cover none, some and every
/// block of each GEMV.
#[test]
fn early_launch_changes_no_logit() {
    let Some((g, r, source, config)) = first_checkpoint() else { return };
    let forced = &r.tokens[..12.min(r.tokens.len() - 1)];
    let off = flint_cuda::LaunchTuning { early_launch: false, l2_prefetch_budget: 0 };
    let tunings = [
        flint_cuda::LaunchTuning::default(),
        flint_cuda::LaunchTuning { early_launch: true, l2_prefetch_budget: 32 << 20 },
        flint_cuda::LaunchTuning { early_launch: true, l2_prefetch_budget: 1 << 16 },
        flint_cuda::LaunchTuning { early_launch: true, l2_prefetch_budget: 1 << 30 },
    ];
    let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    for fp8 in [false, true] {
        for graphs in [false, true] {
            let options = CudaLlamaOptions { fp8, kv_fp8: fp8, ..small_options(graphs) };
            let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), options).expect("load");
            let run = |tuning: flint_cuda::LaunchTuning| {
                g.set_launch_tuning(tuning).expect("tuning");
                let alone = run_gpu(&model, &r.prompt, forced);
                let together = run_batched(&|b| model.forward(b).expect("step"), &r.prompt, 8);
                (bits(&alone), bits(&together))
            };
            let want = run(off);
            for tuning in tunings {
                let got = run(tuning);
                let what = format!("fp8 {fp8} graphs {graphs} tuning {tuning:?}");
                assert!(got.0 == want.0, "{what}: one sequence's logits differ from every kernel waiting first");
                assert!(got.1 == want.1, "{what}: three sequences' logits differ from every kernel waiting first");
            }
        }
    }
    g.set_launch_tuning(flint_cuda::LaunchTuning::default()).expect("tuning");
    eprintln!("early launch: logits bit-equal to every kernel waiting first");
}

/// Three sequences of different lengths prefilled together, then decoded together (a graph
/// bucket of 4 with a padding row): logits of every step, `[3, vocab]` each.
fn run_batched(forward: &dyn Fn(&ForwardBatch) -> Vec<f32>, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    three_sequences(prompt, steps, false).iter().map(|round| forward(&round[0])).collect()
}

/// [`run_batched`]'s rounds, each one batch of the three sequences or (`apart`) a batch per
/// sequence.
fn three_sequences(prompt: &[u32], steps: usize, apart: bool) -> Vec<Vec<ForwardBatch>> {
    let lens = [prompt.len(), prompt.len() / 2, 5];
    let per = (prompt.len() + steps + 1).div_ceil(16);
    let tables: Vec<Vec<u32>> = (0..3).map(|s| ((s * per) as u32..((s + 1) * per) as u32).collect()).collect();
    (0..=steps)
        .map(|round| {
            let mut batches = vec![ForwardBatch::new(16)];
            for s in 0..3 {
                if apart && s > 0 {
                    batches.push(ForwardBatch::new(16));
                }
                let b = batches.last_mut().expect("a batch");
                if round == 0 {
                    b.push_sequence(&prompt[..lens[s]], 0, &tables[s], Logits::Last).expect("batch");
                } else {
                    let step = round - 1;
                    b.push_sequence(&[prompt[(step + s) % prompt.len()]], lens[s] + step, &tables[s], Logits::Last)
                        .expect("batch");
                }
            }
            batches
        })
        .collect()
}

/// [`run_batched`]'s sequences as a step each, `in_flight` steps submitted to the group before
/// the oldest is collected (as the scheduler keeps a pipeline full): the rounds' logits.
fn run_pipelined(group: &flint_model::TpGroup, prompt: &[u32], steps: usize, in_flight: usize) -> Vec<Vec<f32>> {
    let rounds = three_sequences(prompt, steps, true);
    let mut tickets = std::collections::VecDeque::new();
    let mut singles = Vec::new();
    for b in rounds.iter().flatten() {
        if tickets.len() == in_flight {
            singles.push(group.collect(tickets.pop_front().expect("in flight")).expect("collect"));
        }
        tickets.push_back(group.submit(b).expect("submit"));
    }
    for t in tickets {
        singles.push(group.collect(t).expect("collect"));
    }
    singles.chunks(3).map(|c| c.concat()).collect()
}

/// Tensor-parallel ranks x pipeline stages this machine can run (beyond one GPU).
/// `(tp, pp)` layouts of `candidates` that fit this machine's GPUs; `None` (skipped, or a
/// failure under FLINT_REQUIRE_TP) when none does.
fn layouts_here(candidates: &[(usize, usize)], what: &str) -> Option<Vec<(usize, usize)>> {
    let n_gpus = flint_cuda::device_count();
    let layouts: Vec<_> = candidates.iter().copied().filter(|(t, p)| t * p <= n_gpus).collect();
    if layouts.is_empty() {
        assert!(std::env::var_os("FLINT_REQUIRE_TP").is_none(), "FLINT_REQUIRE_TP is set but there is one GPU");
        eprintln!("skipped: {what} needs 2 GPUs, this machine has {n_gpus}");
        return None;
    }
    Some(layouts)
}

/// A reference checkpoint with what one GPU computes on it (teacher-forced).
struct OneGpuCase {
    r: Reference,
    source: Arc<ModelSource>,
    config: flint_model::ModelConfig,
    name: String,
    one_logits: Vec<Vec<f32>>,
}

impl OneGpuCase {
    fn load(g: &Arc<Gpu>, dir: &Path) -> (Self, CudaLlama) {
        let r = read_reference(dir);
        let source = Arc::new(ModelSource::open(dir).expect("open checkpoint"));
        let config = source.config().expect("config");
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let one = CudaLlama::load(Arc::clone(g), &source, config.clone(), small_options(true)).expect("load");
        let one_logits = run_gpu(&one, &r.prompt, &r.tokens[..r.tokens.len() - 1]);
        (OneGpuCase { r, source, config, name, one_logits }, one)
    }

    fn forced(&self) -> &[u32] {
        &self.r.tokens[..self.r.tokens.len() - 1]
    }
}

const PARALLEL_LAYOUTS: [(usize, usize); 5] = [(2, 1), (4, 1), (1, 2), (2, 2), (1, 4)];

/// `pp` stages of about equal layer counts.
fn even_stages(n_layers: usize, pp: usize) -> Vec<std::ops::Range<usize>> {
    (0..pp).map(|s| s * n_layers / pp..(s + 1) * n_layers / pp).collect()
}

#[test]
fn tensor_parallel_matches_one_gpu_and_transformers() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let Some(g) = gpu() else { return };
    let Some(dirs) = hf_dirs() else { return };
    let Some(layouts) = layouts_here(&PARALLEL_LAYOUTS, "tensor parallelism") else { return };
    for dir in dirs {
        let (case, one) = OneGpuCase::load(&g, &dir);
        let OneGpuCase { r, source, config, name, one_logits } = &case;
        let forced = case.forced();
        let one_batched = run_batched(&|b| one.forward(b).expect("step"), &r.prompt, 8);
        drop(one);
        for &(tp, pp) in &layouts {
            if let Err(e) = flint_model::Shard::check(tp, config) {
                eprintln!("{name} TP {tp}: not split ({e})");
                continue;
            }
            if pp > config.n_layers {
                eprintln!("{name} PP {pp}: {} layers", config.n_layers);
                continue;
            }
            use flint_comm::P2pLink::{Flags, Lamport};
            for (graphs, link) in [(false, Some(Flags)), (true, Some(Flags)), (true, Some(Lamport)), (true, None)] {
                if tp == 1 && link != Some(Flags) {
                    continue;
                }
                let p2p = link.map_or("none", |l| l.name());
                let what = format!("{name} TP {tp} x PP {pp} graphs={graphs} p2p={p2p}");
                eprintln!("{what}: loading");
                let weights = flint_model::cuda::GroupWeights::Checkpoint(Arc::clone(source));
                let options = CudaLlamaOptions {
                    p2p_all_reduce: link.is_some(),
                    p2p_link: link.unwrap_or_default(),
                    ..small_options(graphs)
                };
                let stages = even_stages(config.n_layers, pp);
                let group = flint_model::TpGroup::cuda_stages(config.clone(), tp, stages, 2, options, weights)
                    .expect("parallel group");
                let got = run_forced(&|b| group.forward(b).expect("step"), &r.prompt, forced);
                let (mut worst_ref, mut worst_one, mut clear) = (0f64, 0f64, 0);
                for (step, l) in got.iter().enumerate() {
                    let (e_ref, e_one) = (rel_err(l, &r.logits[step]), rel_err(l, &one_logits[step]));
                    worst_ref = worst_ref.max(e_ref);
                    worst_one = worst_one.max(e_one);
                    assert!(e_ref <= 2e-2, "{what}: step {step} vs transformers {e_ref:.3e}");
                    assert!(e_one <= 2e-2, "{what}: step {step} vs one GPU {e_one:.3e}");
                    if r.margins[step] > 0.1 {
                        clear += 1;
                        assert_eq!(argmax(l), r.tokens[step], "{what}: greedy token at step {step}");
                    }
                }
                let batched = run_batched(&|b| group.forward(b).expect("step"), &r.prompt, 8);
                let worst_batched = batched.iter().zip(&one_batched).map(|(a, b)| rel_err(a, b)).fold(0f64, f64::max);
                assert!(worst_batched <= 2e-2, "{what}: batched steps vs one GPU {worst_batched:.3e}");
                if pp > 1 {
                    // A step per stage in flight (and one more), each a sequence of its own.
                    let piped = run_pipelined(&group, &r.prompt, 8, pp + 1);
                    let worst = piped.iter().zip(&one_batched).map(|(a, b)| rel_err(a, b)).fold(0f64, f64::max);
                    assert!(worst <= 2e-2, "{what}: steps in flight vs one GPU {worst:.3e}");
                    eprintln!("{what}: {} steps in flight, worst rel err {worst:.2e} vs one GPU", pp + 1);
                }
                // Steps asked for candidates: each rank's top k of its vocabulary part, gathered
                // and merged, equal to the top k of the same steps' gathered logits.
                let vocab = config.vocab_size;
                for k in [1, 4] {
                    let cands = run_batched(
                        &|b| {
                            let mut b = b.clone();
                            b.set_candidates(Some(k)).expect("k");
                            group.forward(&b).expect("step")
                        },
                        &r.prompt,
                        8,
                    );
                    for (step, (c, l)) in cands.iter().zip(&batched).enumerate() {
                        let want = flint_model::top_candidates(l, vocab, 0, k);
                        let same = c.len() == want.len()
                            && c.iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                        assert!(same, "{what}: k {k} step {step}: gathered candidates differ from the logits' top k");
                    }
                }
                eprintln!(
                    "{what}: {} steps, worst rel err {worst_ref:.2e} vs transformers, {worst_one:.2e} vs one GPU, \
                     batched {worst_batched:.2e}; {clear} clear-margin tokens equal",
                    got.len()
                );
            }
            if pp > 1 {
                continue;
            }
            // FP8 (weights, activations, KV cache) at this TP degree, all-reduced through the
            // peer-to-peer kernel (fused with the residual add, RMSNorm and quantization) and
            // through NCCL: the two agree closely, and both stay within FP8 tolerance of one GPU.
            let fp8 = CudaLlamaOptions { fp8: true, kv_fp8: true, ..small_options(true) };
            let one8 = CudaLlama::load(Arc::clone(&g), source, config.clone(), fp8.clone()).expect("load fp8");
            let one8_logits = run_gpu(&one8, &r.prompt, forced);
            drop(one8);
            let mut by_link = Vec::new();
            for link in [Some(Flags), Some(Lamport), None] {
                let what = format!("{name} FP8 TP {tp} p2p={}", link.map_or("none", |l| l.name()));
                let weights = flint_model::cuda::GroupWeights::Checkpoint(Arc::clone(source));
                let options = CudaLlamaOptions {
                    p2p_all_reduce: link.is_some(),
                    p2p_link: link.unwrap_or_default(),
                    ..fp8.clone()
                };
                let group = flint_model::TpGroup::cuda_stages(
                    config.clone(),
                    tp,
                    even_stages(config.n_layers, 1),
                    1,
                    options,
                    weights,
                )
                .expect("fp8 group");
                let got = run_forced(&|b| group.forward(b).expect("step"), &r.prompt, forced);
                let worst = got.iter().zip(&one8_logits).map(|(a, b)| rel_err(a, b)).fold(0f64, f64::max);
                assert!(worst <= 1e-1, "{what}: vs one GPU FP8 rel err {worst:.3e}");
                eprintln!("{what}: {} steps, worst rel err {worst:.2e} vs one GPU FP8", got.len());
                by_link.push(got);
            }
            for (i, link) in ["flags", "lamport"].into_iter().enumerate() {
                let e = by_link[i].iter().zip(&by_link[2]).map(|(a, b)| rel_err(a, b)).fold(0f64, f64::max);
                assert!(e <= 2e-2, "{name} FP8 TP {tp}: p2p ({link}) vs NCCL all-reduce rel err {e:.3e}");
                eprintln!("{name} FP8 TP {tp}: p2p ({link}) vs NCCL all-reduce worst rel err {e:.2e}");
            }
            // The two links sum the same values in the same order, and up to rows of 4096 their
            // fused kernels run the same threads (so the same RMSNorm sums).
            if config.hidden_size <= 4096 {
                assert_eq!(by_link[0], by_link[1], "{name} FP8 TP {tp}: the flag and lamport links' logits differ");
            }
        }
    }
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

fn from_bf16_bits(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect()
}

/// Rank `r`'s input of call `call`: bf16 values in [-2, 2).
fn p2p_input(rank: usize, call: usize, len: usize) -> Vec<f32> {
    let mut x = (rank as u64 + 1) * 0x9e37_79b9 + call as u64 * 0x85eb_ca6b;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16_round(((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0)
        })
        .collect()
}

#[test]
fn p2p_all_reduce_matches_the_host_sum() {
    use flint_comm::{LocalComm, P2pAllReduce};
    if gpu().is_none() {
        return;
    }
    let n_gpus = flint_cuda::device_count();
    let worlds: Vec<usize> = [2, 4].into_iter().filter(|&w| w <= n_gpus).collect();
    if worlds.is_empty() {
        assert!(std::env::var_os("FLINT_REQUIRE_TP").is_none(), "FLINT_REQUIRE_TP is set but there is one GPU");
        eprintln!("skipped: the peer-to-peer all-reduce needs 2 GPUs, this machine has {n_gpus}");
        return;
    }
    for world in worlds {
        let hosts = Arc::new(LocalComm::members(world, std::time::Duration::from_secs(60)));
        let threads: Vec<_> = (0..world)
            .map(|rank| {
                let hosts = Arc::clone(&hosts);
                std::thread::spawn(move || {
                    let host = hosts.take(rank).expect("host member");
                    let gpu = Gpu::new(rank).expect("open GPU");
                    for link in [flint_comm::P2pLink::Flags, flint_comm::P2pLink::Lamport] {
                    let p2p = P2pAllReduce::new(Arc::clone(&gpu), &host, 2 * 64 * 8192, link).expect("p2p setup");
                    let link = link.name();
                    // Plain sums of several sizes (one to several blocks), alternating slots:
                    // bit-exact against the host's f32 sum in rank order rounded to bf16.
                    for (call, len) in [8usize, 4096, 3 * 4096 + 8, 64 * 8192].into_iter().enumerate() {
                        let out = gpu.alloc(2 * len).expect("alloc");
                        let slot = call % 2;
                        gpu.write_ptr(p2p.input(slot), &to_bf16_bits(&p2p_input(rank, call, len))).expect("write");
                        host.barrier().expect("inputs written");
                        p2p.sum(slot, out.ptr(), len).expect("sum");
                        let mut got = vec![0u16; len];
                        gpu.read(out.ptr(), &mut got).expect("read");
                        let inputs: Vec<Vec<f32>> = (0..world).map(|r| p2p_input(r, call, len)).collect();
                        let want: Vec<u16> = (0..len)
                            .map(|i| half::bf16::from_f32(inputs.iter().map(|v| v[i]).sum::<f32>()).to_bits())
                            .collect();
                        let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                        assert_eq!(bad, 0, "world {world} rank {rank} {link}: {bad} of {len} sums differ");
                        host.barrier().expect("outputs read");
                    }
                    // Every rank sends -0 (the lamport link's empty mark): the flag link sums
                    // to -0, the lamport link sends +0 and sums to +0, and neither waits forever.
                    {
                        let len = 4096;
                        let out = gpu.alloc(2 * len).expect("alloc");
                        gpu.write_ptr(p2p.input(0), &vec![0x8000u16; len]).expect("write");
                        host.barrier().expect("inputs written");
                        p2p.sum(0, out.ptr(), len).expect("sum");
                        let mut got = vec![0u16; len];
                        gpu.read(out.ptr(), &mut got).expect("read");
                        let want = if link == "lamport" { 0 } else { 0x8000 };
                        let bad = got.iter().filter(|&&g| g != want).count();
                        assert_eq!(bad, 0, "world {world} rank {rank} {link}: {bad} of {len} sums of -0 are not {want:#x}");
                        host.barrier().expect("outputs read");
                        // The next call writes slot 1 (the flag link's alternation).
                        p2p.sum(1, out.ptr(), 8).expect("sum");
                        gpu.synchronize().expect("sync");
                        host.barrier().expect("call done");
                    }
                    // Fused with the residual add and RMSNorm, twice (slots 0 and 1), then 40
                    // more alternating calls from a CUDA graph replayed twice; rows of 1024 run
                    // one block per row, rows of 8192 a cluster of blocks per row.
                    for (rows, hidden) in [(5usize, 1024usize), (5, 8192), (11, 8192)] {
                        let n = rows * hidden;
                        let residual0: Vec<f32> = p2p_input(99, 0, n);
                        let weight: Vec<f32> = p2p_input(98, 0, hidden).iter().map(|w| 1.0 + w / 4.0).collect();
                        let res = gpu.upload(&to_bf16_bits(&residual0)).expect("residual");
                        let w = gpu.upload(&weight).expect("weight");
                        let normed = gpu.alloc(2 * n).expect("alloc");
                        let mut want_res = residual0.clone();
                        let mut want_out = Vec::new();
                        let step = |slot: usize, want_res: &mut Vec<f32>, want_out: &mut Vec<f32>| {
                            let inputs: Vec<Vec<f32>> = (0..world).map(|r| p2p_input(r, 10 + slot, n)).collect();
                            for i in 0..n {
                                let s = bf16_round(inputs.iter().map(|v| v[i]).sum::<f32>());
                                want_res[i] = bf16_round(want_res[i] + s);
                            }
                            want_out.clear();
                            for row in want_res.chunks(hidden) {
                                let ms = row.iter().map(|x| x * x).sum::<f32>() / hidden as f32;
                                let r = 1.0 / (ms + 1e-5).sqrt();
                                want_out
                                    .extend(row.iter().zip(&weight).map(|(x, w)| bf16_round(w * bf16_round(x * r))));
                            }
                        };
                        for slot in 0..2 {
                            gpu.write_ptr(p2p.input(slot), &to_bf16_bits(&p2p_input(rank, 10 + slot, n)))
                                .expect("write");
                        }
                        host.barrier().expect("inputs written");
                        let check = |want_res: &[f32], want_out: &[f32], what: &str| {
                            let mut got = vec![0u16; n];
                            gpu.read(res.ptr(), &mut got).expect("read");
                            let got_res = from_bf16_bits(&got);
                            let bad = got_res.iter().zip(want_res).filter(|(a, b)| a != b).count();
                            assert_eq!(bad, 0, "world {world} rank {rank} {what}: {bad} residuals differ");
                            gpu.read(normed.ptr(), &mut got).expect("read");
                            let e = rel_err(&from_bf16_bits(&got), want_out);
                            assert!(e <= 1e-2, "world {world} rank {rank} {what}: normed rel err {e:.3e}");
                        };
                        for slot in 0..2 {
                            let out = NormOut::Bf16(normed.ptr());
                            p2p.add_rms_norm(slot, res.ptr(), w.ptr(), out, rows, hidden, 1e-5).expect("fused");
                            step(slot, &mut want_res, &mut want_out);
                            check(&want_res, &want_out, &format!("hidden {hidden}: fused call on slot {slot}"));
                        }
                        let graph = gpu
                            .capture(|| {
                                for i in 0..40 {
                                    let out = NormOut::Bf16(normed.ptr());
                                    p2p.add_rms_norm(i % 2, res.ptr(), w.ptr(), out, rows, hidden, 1e-5)
                                        .map_err(|e| flint_cuda::Error::Unsupported(e.to_string()))?;
                                }
                                Ok(())
                            })
                            .expect("capture");
                        for replay in 0..2 {
                            graph.launch().expect("replay");
                            for i in 0..40 {
                                step(i % 2, &mut want_res, &mut want_out);
                            }
                            check(&want_res, &want_out, &format!("hidden {hidden}: graph replay {replay}"));
                        }
                        // FP8 output (an FP8 model's next activation): the same residual, and the
                        // normalised rows quantized per row as the host quantizes them.
                        let (codes, scales) = (gpu.alloc(n).expect("alloc"), gpu.alloc(4 * rows).expect("alloc"));
                        for slot in 0..2 {
                            let out = NormOut::Fp8 { codes: codes.ptr(), scales: scales.ptr() };
                            p2p.add_rms_norm(slot, res.ptr(), w.ptr(), out, rows, hidden, 1e-5).expect("fused fp8");
                            step(slot, &mut want_res, &mut want_out);
                            let mut got = vec![0u16; n];
                            gpu.read(res.ptr(), &mut got).expect("read");
                            let bad = from_bf16_bits(&got).iter().zip(&want_res).filter(|(a, b)| a != b).count();
                            assert_eq!(bad, 0, "world {world} rank {rank} hidden {hidden} fp8 slot {slot}: residuals");
                            let mut c = vec![0u8; n];
                            let mut sc = vec![0f32; rows];
                            gpu.read(codes.ptr(), &mut c).expect("read");
                            gpu.read(scales.ptr(), &mut sc).expect("read");
                            let got = flint_quant::Fp8Matrix {
                                codes: c,
                                scales: sc,
                                rows,
                                cols: hidden,
                                granularity: flint_quant::Granularity::Channel,
                                format: flint_quant::Fp8Format::E4M3,
                            };
                            let want = flint_quant::Fp8Matrix::quantize(
                                &want_out,
                                rows,
                                hidden,
                                flint_quant::Granularity::Channel,
                                flint_quant::Fp8Format::E4M3,
                            );
                            let e = rel_err(&got.dequantize(), &want.dequantize());
                            let same = got.codes.iter().zip(&want.codes).filter(|(a, b)| a == b).count();
                            assert!(
                                e <= 1e-2 && same * 100 >= n * 99,
                                "world {world} rank {rank} hidden {hidden} fp8 slot {slot}: rel err {e:.3e}, \
                                 {same} of {n} codes equal"
                            );
                        }
                        // Peers may still read this rank's inputs: the next shape writes them
                        // only after every rank is done.
                        gpu.synchronize().expect("sync");
                        host.barrier().expect("shape done");
                    }
                    gpu.synchronize().expect("sync");
                    host.barrier().expect("done");
                    eprintln!(
                        "world {world} rank {rank} {link} link: p2p sums bit-exact, fused add + RMSNorm (bf16 and FP8 \
                         out) within 1e-2"
                    );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a rank failed");
        }
    }
}

/// `ops::top_candidates` on the GPU against `flint_model::top_candidates` on the host, bit for
/// bit: logits on a coarse grid (ties everywhere, broken by the lower id), fine random ones,
/// NaN (never taken), -0 and +0, rows with fewer valid entries than k (padding), id offsets.
#[test]
fn device_top_candidates_match_the_host() {
    let Some(g) = gpu() else { return };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    eprintln!("seed {seed}");
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    // (rows, width, id offset, k, coarse grid, NaN one in how many)
    let cases = [
        (3, 128_256, 0, 1, true, 97),
        (5, 128_256, 0, 40, true, 1000),
        (4, 128_256, 0, 256, false, 50),
        (2, 32_064, 96_192, 256, true, 7),
        (4, 100, 7, 256, false, 3),
        (3, 5000, 0, 256, true, 2),
        (6, 49_152, 0, 3, false, 1_000_000),
    ];
    for (rows, width, offset, k, coarse, nan_every) in cases {
        let logits: Vec<f32> = (0..rows * width)
            .map(|_| {
                let r = next();
                match r % nan_every {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => 0.0,
                    _ if coarse => ((r >> 16) % 64) as f32 / 8.0 - 4.0,
                    _ => {
                        f32::from_bits(((r >> 16) as u32 & 0x007f_ffff) | 0x3f80_0000)
                            * if r & 1 == 0 { 1.0 } else { -3.0 }
                    }
                }
            })
            .collect();
        let want = flint_model::top_candidates(&logits, width, offset, k);
        let lb = g.upload(&logits).expect("logits");
        let out = g.alloc(4 * rows * 2 * k).expect("out");
        flint_cuda::ops::top_candidates(&g, lb.ptr(), rows, width, width, offset, k, out.ptr()).expect("launch");
        let mut got = vec![0f32; rows * 2 * k];
        g.read(out.ptr(), &mut got).expect("read");
        let what = format!("{rows} rows of {width}, offset {offset}, k {k}, coarse {coarse}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(same, "{what}: slot {i} (row {}, pair {}): {a} vs {b}", i / (2 * k), i % (2 * k) / 2);
        }
        eprintln!("top_candidates {what}: equal to the host's");
        // The same rows read as the first `part` entries of rows `width` apart (a rank's
        // vocabulary part, padding rows left out), ids offset by the part's start.
        let part = width.div_ceil(3);
        let narrow: Vec<f32> = logits.chunks(width).flat_map(|r| r[..part].to_vec()).collect();
        let want = flint_model::top_candidates(&narrow, part, offset + 5, k);
        flint_cuda::ops::top_candidates(&g, lb.ptr(), rows, part, width, offset + 5, k, out.ptr()).expect("launch");
        g.read(out.ptr(), &mut got).expect("read");
        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same, "{what}: the first {part} of each row differ from the host's");
    }
}

/// The GPU and the first checkpoint of `FLINT_HF_MODELS` with its reference, opened; `None`
/// (skipped) without either.
fn first_checkpoint() -> Option<(Arc<flint_cuda::Gpu>, Reference, ModelSource, flint_model::ModelConfig)> {
    let g = gpu()?;
    let dirs = hf_dirs()?;
    let r = read_reference(&dirs[0]);
    let source = ModelSource::open(&dirs[0]).expect("open checkpoint");
    let config = source.config().expect("config");
    Some((g, r, source, config))
}

/// A step asked for candidates returns, from the device, exactly the host's `top_candidates` of
/// the same step's logits (prefill and decode steps, with and without graphs).
#[test]
fn model_steps_return_device_candidates() {
    let Some((g, r, source, config)) = first_checkpoint() else { return };
    let vocab = config.vocab_size;
    let forced = &r.tokens[..8.min(r.tokens.len() - 1)];
    for graphs in [false, true] {
        let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), small_options(graphs)).expect("load");
        let full = run_gpu(&model, &r.prompt, forced);
        drop(model);
        for k in [1, 5, 256] {
            let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), small_options(graphs)).expect("load");
            let got = run_forced(
                &|b| {
                    let mut b = b.clone();
                    b.set_candidates(Some(k)).expect("k");
                    model.forward(&b).expect("step")
                },
                &r.prompt,
                forced,
            );
            for (step, (c, l)) in got.iter().zip(&full).enumerate() {
                let want = flint_model::top_candidates(l, vocab, 0, k);
                assert_eq!(c.len(), want.len(), "graphs {graphs} k {k} step {step}");
                let same = c.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "graphs {graphs} k {k} step {step}: device candidates differ from the host's");
            }
        }
    }
    eprintln!("device candidates equal the host's top k of the same logits");
}

/// Steps that draw some rows on the device and bring others' logits back (rows sampled on the
/// host): each drawn row's token is what `Draw::pick` takes from the same step's logits, each
/// host row's logits equal the plain step's bit for bit, row by row in one output.
#[test]
fn model_steps_mix_drawn_and_host_rows() {
    use flint_model::Draw;
    let Some((g, r, source, config)) = first_checkpoint() else { return };
    let vocab = config.vocab_size;
    let sampled = |u: f64| Draw { temperature: 0.8, top_k: 0, top_p: 0.9, min_p: 0.0, u };
    for graphs in [false, true] {
        let model = CudaLlama::load(Arc::clone(&g), &source, config.clone(), small_options(graphs)).expect("load");
        for (round, batches) in three_sequences(&r.prompt, 6, false).iter().enumerate() {
            let b = &batches[0];
            // Both runs write the same keys and values into the same slots.
            let plain = model.forward(b).expect("plain step");
            let draws = match round % 3 {
                0 => vec![Some(Draw::GREEDY), None, Some(sampled(0.37))],
                1 => vec![None, Some(sampled(0.91)), None],
                _ => vec![None, None, None],
            };
            let mut drawn = b.clone();
            drawn.set_draws(Some(draws.clone())).expect("draws");
            let got = model.forward(&drawn).expect("drawn step");
            assert_eq!(got.len(), flint_model::drawn_output_len(&draws, vocab), "graphs {graphs} round {round}");
            let mut at = 0;
            for (row, d) in draws.iter().enumerate() {
                let logits = &plain[row * vocab..(row + 1) * vocab];
                match d {
                    Some(d) => {
                        assert_eq!(got[at], d.pick(logits) as f32, "graphs {graphs} round {round} row {row}: drawn");
                        at += 1;
                    }
                    None => {
                        let same = got[at..at + vocab].iter().zip(logits).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "graphs {graphs} round {round} row {row}: host row's logits differ");
                        at += vocab;
                    }
                }
            }
        }
    }
    eprintln!("mixed steps: drawn tokens as the host draws them, host rows' logits as a plain step's");
}

/// A free TCP port on this machine whose next port is free too (the job's collectives and
/// control link).
fn free_master_addr() -> String {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
}

/// Pipeline stages (and TP x PP with 4 GPUs) over two "processes": node 0 leads with its ranks
/// as threads, node 1 follows over the control link, and their ranks meet through the TCP host
/// group and NCCL ids passed through it, exactly as `flint serve --pp P --nnodes 2` does across
/// processes or hosts. Logits against one GPU; then the leader leaves and the follower ends.
#[test]
fn pipeline_over_nodes_matches_one_gpu() {
    let Some(g) = gpu() else { return };
    let Some(dirs) = hf_dirs() else { return };
    let Some(layouts) = layouts_here(&[(1, 2), (2, 2)], "pipeline stages over nodes") else { return };
    for dir in dirs {
        let (case, one) = OneGpuCase::load(&g, &dir);
        drop(one);
        let OneGpuCase { r, source, config, name, one_logits } = &case;
        let forced = case.forced();
        for &(tp, pp) in &layouts {
            if flint_model::Shard::check(tp, config).is_err() || pp > config.n_layers {
                continue;
            }
            let what = format!("{name} TP {tp} x PP {pp} over 2 nodes");
            let layout =
                flint_model::cuda::NodeLayout { tp, stages: even_stages(config.n_layers, pp), micro_batches: pp };
            let master_addr = free_master_addr();
            let nodes = |node_rank: usize| flint_model::remote::Nodes {
                nnodes: 2,
                node_rank,
                master_addr: master_addr.clone(),
                timeout: std::time::Duration::from_secs(120),
            };
            let make = |node_rank: usize| -> Box<flint_model::remote::MakeRank<'static>> {
                let (c, l, n, s) = (config.clone(), layout.clone(), nodes(node_rank), Arc::clone(source));
                Box::new(move |rank| {
                    let weights = flint_model::cuda::GroupWeights::Checkpoint(Arc::clone(&s));
                    // One machine stands in for both nodes: rank r on GPU r.
                    let (m, info) =
                        flint_model::cuda::CudaRank::for_node(&c, &l, rank, rank, &n, &small_options(true), &weights)?;
                    Ok((Box::new(m) as Box<dyn flint_model::RankModel>, info))
                })
            };
            let follower = {
                let (make1, n1) = (make(1), nodes(1));
                std::thread::spawn(move || flint_model::remote::follow_node(tp * pp, &n1, make1.as_ref()))
            };
            let group = flint_model::TpGroup::leader(config.clone(), tp, pp, &nodes(0), make(0)).expect("leader");
            let got = run_forced(&|b| group.forward(b).expect("step"), &r.prompt, forced);
            let worst = got.iter().zip(one_logits).map(|(a, b)| rel_err(a, b)).fold(0f64, f64::max);
            assert!(worst <= 2e-2, "{what}: vs one GPU rel err {worst:.3e}");
            for (step, l) in got.iter().enumerate() {
                if r.margins[step] > 0.1 {
                    assert_eq!(argmax(l), r.tokens[step], "{what}: greedy token at step {step}");
                }
            }
            drop(group);
            follower.join().expect("follower thread").expect("the follower ends when the leader leaves");
            eprintln!("{what}: {} steps, worst rel err {worst:.2e} vs one GPU; the follower left cleanly", got.len());
        }
    }
}
