//! flint-engine integration tests: a SentencePiece-style GGUF tokenizer (`tokenizer.ggml.model
//! == "llama"`, merges recovered from scores, byte fallback) against the ids Hugging Face
//! transformers' GGUF conversion gives (`tests/data/make_spm_reference.py`).

use std::path::PathBuf;

use flint_engine::Tokenizer;
use flint_model::ModelConfig;
use flint_model::gguf::GgufFile;

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(serde::Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

#[test]
fn sentencepiece_gguf_tokenizer_matches_transformers() {
    let file = GgufFile::open(&data("spm_tokenizer.gguf")).expect("test GGUF opens");
    let n_tokens = file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map_or(0, <[_]>::len);
    let config = ModelConfig::from_hf_json(
        &format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": {n_tokens}, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 2}}"#
        ),
        "test",
    )
    .expect("config");
    let tokenizer = Tokenizer::from_gguf(&file, &config).expect("builds");
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(data("spm_reference.json")).expect("reference")).expect("parses");
    assert!(reference.cases.len() >= 6);
    for case in &reference.cases {
        let ids = tokenizer.encode(&case.text, true).expect("encodes");
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        assert_eq!(tokenizer.decode(&ids, true).expect("decodes"), case.decoded, "decode of {:?}", case.text);
    }
    assert_eq!(tokenizer.bos_token(), Some("<s>"));
    assert!(tokenizer.stop_ids().contains(&2));
}
