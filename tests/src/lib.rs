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
