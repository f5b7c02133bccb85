//! FP8 checkpoints: `quantize_checkpoint` writes the Hugging Face fine-grained FP8 layout at every
//! granularity; the reader takes that layout, compressed-tensors and ModelOpt back to the exact
//! values quantized; a model loaded from an FP8 checkpoint computes what the FP8 emulation of the
//! original computes.

use std::path::Path;

use flint_cpu::CpuBackend;
use flint_model::fp8_checkpoint::{is_quantized_weight, quantize_checkpoint};
use flint_model::{Fp8Spec, Llama, ModelSource};
use flint_quant::{Fp8Format, Fp8Matrix, Granularity, ScaleRule};
use flint_tensor::{Backend, DType};
use safetensors::SafeTensors;

use crate::support::*;

fn logits(model: &Llama, backend: &CpuBackend, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_kv_cache(backend, CONTEXT).expect("cache");
    backend.to_f32_vec(&model.forward(backend, tokens, &mut cache, true).expect("forward")).expect("read")
}

const TOKENS: [u32; 6] = [3, 9, 27, 4, 31, 12];

fn quantized(granularity: Granularity, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    quantized_with(granularity, ScaleRule::Max, name)
}

fn quantized_with(granularity: Granularity, rule: ScaleRule, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = temp_dir(name);
    let input = dir.join("in");
    let output = dir.join("out");
    std::fs::create_dir_all(&input).expect("dir");
    write_hf_dir(&input, 2);
    let report = quantize_checkpoint(&input, &output, granularity, rule, &mut |_| {}).expect("quantizes");
    assert!(report.quantized > 0 && report.copied > 0);
    (input, output)
}

#[test]
fn every_granularity_round_trips_to_the_quantized_values() {
    let cases = [Granularity::Tensor, Granularity::Channel, Granularity::Block(128)]
        .into_iter()
        .flat_map(|g| [(g, ScaleRule::Max), (g, ScaleRule::Mse)]);
    for (i, (g, rule)) in cases.enumerate() {
        let (input, output) = quantized_with(g, rule, &format!("fp8-roundtrip-{i}"));
        let mut searched_scales_moved = false;
        let config = std::fs::read_to_string(output.join("config.json")).expect("config");
        let json: serde_json::Value = serde_json::from_str(&config).expect("json");
        assert_eq!(json["quantization_config"]["quant_method"], "fp8");
        assert_eq!(json["quantization_config"]["activation_scheme"], "dynamic");
        let original = ModelSource::open(&input).expect("opens");
        let fp8 = ModelSource::open(&output).expect("opens");
        let cfg = original.config().expect("config");
        assert!(fp8.quant_config().is_some());
        for t in original.stored_tensors().expect("list") {
            let want = original.tensor(&t.name, &cfg).expect("reads").expect("present");
            let got = fp8.tensor(&t.name, &cfg).expect("reads").expect("present");
            assert_eq!(got.dims, want.dims, "{}", t.name);
            if is_quantized_weight(&t.name) {
                let m = Fp8Matrix::quantize_with(&want.data, want.dims[0], want.dims[1], g, Fp8Format::E4M3, rule);
                assert_eq!(got.data, m.dequantize(), "{} ({g:?}, {rule:?})", t.name);
                let stored = fp8.fp8_tensor(&t.name).expect("reads").expect("fp8");
                // A matrix within one block has one scale: per tensor, the same thing.
                let single = m.scales.len() == 1 && stored.granularity == Granularity::Tensor;
                assert!(stored.granularity == g || single, "{}: {:?}", t.name, stored.granularity);
                assert_eq!(stored.codes, m.codes);
                assert_eq!(stored.scales, m.scales, "{}: the scales as chosen", t.name);
                let max = Fp8Matrix::quantize(&want.data, want.dims[0], want.dims[1], g, Fp8Format::E4M3);
                searched_scales_moved |= max.scales != m.scales;
            } else {
                assert_eq!(got.data, want.data, "{} copied as stored", t.name);
                assert!(fp8.fp8_tensor(&t.name).expect("reads").is_none());
            }
        }
        // The least-error rule wrote other scales than the largest magnitude's.
        assert_eq!(searched_scales_moved, rule == ScaleRule::Mse, "{g:?}, {rule:?}");
    }
}

#[test]
fn fp8_checkpoint_computes_what_the_emulation_computes() {
    for rule in [ScaleRule::Max, ScaleRule::Mse] {
        checkpoint_computes_what_the_emulation_computes(rule);
    }
}

fn checkpoint_computes_what_the_emulation_computes(rule: ScaleRule) {
    let (input, output) = quantized_with(Granularity::Channel, rule, &format!("fp8-emulation-{rule:?}"));
    let backend = CpuBackend::new();
    let original = ModelSource::open(&input).expect("opens");
    let mut emulated =
        Llama::load(&original, original.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads");
    let spec = Fp8Spec { kv_cache: false, weight_scales: rule, ..Fp8Spec::SERVING };
    emulated.quantize_fp8(&backend, spec).expect("quantizes");
    let fp8 = ModelSource::open(&output).expect("opens");
    let from_checkpoint =
        Llama::load(&fp8, fp8.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads");
    assert!(from_checkpoint.fp8().activations, "FP8 checkpoints quantize activations");
    let (a, b) = (logits(&emulated, &backend, &TOKENS), logits(&from_checkpoint, &backend, &TOKENS));
    assert_eq!(a, b);
    // And the emulation really changes the numbers.
    let plain =
        Llama::load(&original, original.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads");
    let c = logits(&plain, &backend, &TOKENS);
    let diff = a.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = c.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(diff > 0.0 && diff < 0.2 * scale, "FP8 moves logits by {diff} (of {scale})");
}

#[derive(Clone, Copy, PartialEq)]
enum Scales {
    AsWritten,
    Scalar,
    Transposed,
}

/// Rewrites an FP8 checkpoint's scales and config into another tool's layout.
fn relayout(dir: &Path, scale_suffix: &str, quantization_config: serde_json::Value, scales: Scales) {
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("parse");
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            let (name, shape) = match name.strip_suffix(".weight_scale_inv") {
                Some(m) => {
                    let shape = match scales {
                        Scales::AsWritten => view.shape().to_vec(),
                        Scales::Scalar => vec![],
                        Scales::Transposed => view.shape().iter().rev().copied().collect(),
                    };
                    (format!("{m}{scale_suffix}"), shape)
                }
                None => (name.clone(), view.shape().to_vec()),
            };
            tensors.push((name, view.dtype(), shape, view.data().to_vec()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view")))
            .collect();
        safetensors::serialize_to_file(views, None, &path).expect("write");
    }
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json");
    config["quantization_config"] = quantization_config;
    std::fs::write(&config_path, config.to_string()).expect("write");
}

#[test]
fn compressed_tensors_and_modelopt_layouts_load() {
    let backend = CpuBackend::new();
    // compressed-tensors, per channel: `weight_scale` [rows, 1].
    let (_, ct) = quantized(Granularity::Channel, "fp8-ct");
    let reference = {
        let s = ModelSource::open(&ct).expect("opens");
        logits(
            &Llama::load(&s, s.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads"),
            &backend,
            &TOKENS,
        )
    };
    relayout(
        &ct,
        ".weight_scale",
        serde_json::json!({
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, "dynamic": false},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": true, "dynamic": true}}},
            "ignore": ["lm_head"]}),
        Scales::AsWritten,
    );
    let s = ModelSource::open(&ct).expect("opens");
    let got = logits(
        &Llama::load(&s, s.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads"),
        &backend,
        &TOKENS,
    );
    assert_eq!(got, reference);

    // ModelOpt FP8: per-tensor scalar `weight_scale`.
    let (_, mo) = quantized(Granularity::Tensor, "fp8-modelopt");
    let reference = {
        let s = ModelSource::open(&mo).expect("opens");
        logits(
            &Llama::load(&s, s.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads"),
            &backend,
            &TOKENS,
        )
    };
    relayout(
        &mo,
        ".weight_scale",
        serde_json::json!({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": null,
            "exclude_modules": ["lm_head"]}),
        Scales::Scalar,
    );
    let s = ModelSource::open(&mo).expect("opens");
    let got = logits(
        &Llama::load(&s, s.config().expect("config"), &backend, DType::F32, &mut |_| {}).expect("loads"),
        &backend,
        &TOKENS,
    );
    assert_eq!(got, reference);
}

#[test]
fn bad_fp8_checkpoints_are_clear_errors() {
    let (_, out) = quantized(Granularity::Channel, "fp8-bad");
    // Quantizing an FP8 checkpoint again is refused.
    let again =
        quantize_checkpoint(&out, &out.with_extension("again"), Granularity::Channel, ScaleRule::Max, &mut |_| {});
    assert!(again.unwrap_err().to_string().contains("quantized already"));
    // An unknown method is named.
    let config_path = out.join("config.json");
    let text = std::fs::read_to_string(&config_path).expect("read");
    std::fs::write(&config_path, text.replace("\"quant_method\": \"fp8\"", "\"quant_method\": \"awq\""))
        .expect("write");
    let err = ModelSource::open(&out).unwrap_err().to_string();
    assert!(err.contains("awq"), "{err}");
    std::fs::write(&config_path, text).expect("write");
    // Scales that do not fit the weight.
    relayout(
        &out,
        ".weight_scale",
        serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]}),
        Scales::Transposed,
    );
    let s = ModelSource::open(&out).expect("opens");
    let cfg = s.config().expect("config");
    let err = s.tensor("model.layers.0.self_attn.q_proj.weight", &cfg).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
}
