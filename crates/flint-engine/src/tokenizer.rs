//! The tokenizer: a `tokenizers::Tokenizer` loaded from `tokenizer.json`, or built from GGUF
//! metadata (byte-level BPE: tokens, merges, token types, special tokens), plus the model's
//! chat template and special token ids.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;

use flint_model::gguf::{GgufFile, Value};
use flint_model::{ModelConfig, ModelSource};
use serde_json::{Value as Json, json};

use crate::chat::ChatTemplate;
use crate::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Pre-tokenizer regexes of the BPE families llama.cpp names in `tokenizer.ggml.pre`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer, its special tokens and its chat template.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<(u32, String)>,
    eos_token: Option<(u32, String)>,
    /// Every id that ends generation (eos, end-of-turn).
    stop_ids: BTreeSet<u32>,
    chat_template: Option<ChatTemplate>,
}

fn tok_err(context: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{context}: {e}"))
}

/// BPE merges recovered from a SentencePiece vocabulary and its scores, as Hugging Face's
/// converters recover them: every split of a token into two vocabulary tokens, ranked by the
/// merged token's score (highest first), then by the pieces' lengths in characters.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<Json> {
    let mut ids: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str, f32)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    // A stable sort on the reversed key keeps equal keys in order, as Python's `reverse=True` does.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(chars(b.0).cmp(&chars(a.0))).then(chars(b.1).cmp(&chars(a.1))));
    merges.into_iter().map(|(l, r, _)| json!([l, r])).collect()
}

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    if printable(b) {
        return b as char;
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or('?')
}

impl Tokenizer {
    /// A tokenizer of raw bytes: id `b` is byte `b`; ids from 256 up decode to nothing. For
    /// random-weight models, which come without a vocabulary.
    pub fn byte_level() -> Result<Self> {
        let vocab: serde_json::Map<String, Json> =
            (0..=255u8).map(|b| (byte_char(b).to_string(), json!(b as u32))).collect();
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        let inner =
            tokenizers::Tokenizer::from_str(&spec.to_string()).map_err(tok_err("building the byte tokenizer"))?;
        Ok(Tokenizer { inner, bos_token: None, eos_token: None, stop_ids: BTreeSet::new(), chat_template: None })
    }

    /// The tokenizer that belongs to an opened checkpoint.
    pub fn for_source(source: &ModelSource, config: &ModelConfig) -> Result<Self> {
        match source {
            ModelSource::Gguf(file) => Self::from_gguf(file, config),
            ModelSource::Safetensors(_) if !source.path().join("tokenizer.json").exists() => {
                // Checkpoints made for tests and benchmarks often come without one.
                tracing::warn!(dir = %source.path().display(), "no tokenizer.json: using a byte tokenizer");
                Self::byte_level()
            }
            ModelSource::Safetensors(_) => Self::from_hf_dir(source.path(), config),
        }
    }

    /// Builds the tokenizer described by GGUF `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile, config: &ModelConfig) -> Result<Self> {
        let fail = |m: String| Error::Tokenizer(format!("{}: {m}", file.path().display()));
        let model = file.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        let sentencepiece = match model {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(fail(format!(
                    "tokenizer model {other:?} is not supported in GGUF files (\"gpt2\" byte-level BPE and \
                     \"llama\" SentencePiece BPE are); use the model's Hugging Face directory with tokenizer.json"
                )));
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr = file
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| fail(format!("{key} is missing or not an array")))?;
            arr.iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| fail(format!("{key} holds a non-string"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = match (file.get("tokenizer.ggml.merges"), sentencepiece) {
            (Some(_), _) | (None, false) => strings("tokenizer.ggml.merges")?
                .iter()
                .map(|m| {
                    let (a, b) = m.split_once(' ').ok_or_else(|| fail(format!("merge {m:?} has no space")))?;
                    Ok(json!([a, b]))
                })
                .collect::<Result<Vec<Json>>>()?,
            (None, true) => {
                let scores: Vec<f32> = file
                    .get("tokenizer.ggml.scores")
                    .and_then(Value::as_array)
                    .ok_or_else(|| fail("tokenizer.ggml.scores is missing: merges cannot be recovered".to_string()))?
                    .iter()
                    .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| fail("a token score is not a number".into())))
                    .collect::<Result<_>>()?;
                if scores.len() != tokens.len() {
                    return Err(fail(format!("{} scores for {} tokens", scores.len(), tokens.len())));
                }
                merges_from_scores(&tokens, &scores)
            }
        };
        let types: Vec<u64> = match file.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(arr) => arr.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(fail(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        if tokens.len() > config.vocab_size {
            return Err(fail(format!("{} tokens for a vocabulary of {}", tokens.len(), config.vocab_size)));
        }

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, (token, ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(token.clone(), json!(id));
            if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL,
                }));
            }
        }

        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        let pre = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let pre_tokenizer = match pre {
            _ if sentencepiece => {
                json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false})
            }
            "llama3" | "llama-v3" | "llama-bpe" => {
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]})
            }
            "qwen2" | "deepseek-r1-qwen" => {
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]})
            }
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "default" | "gpt-2" | "gpt2" => byte_level(true),
            other => {
                tracing::warn!(pre = other, "unknown GGUF pre-tokenizer, using GPT-2 byte-level splitting");
                byte_level(true)
            }
        };

        let token_of = |key: &str| -> Option<(u32, String)> {
            let id = file.get(key)?.as_u64()?;
            let text = tokens.get(usize::try_from(id).ok()?)?;
            Some((id as u32, text.clone()))
        };
        let bos_token = token_of("tokenizer.ggml.bos_token_id");
        let eos_token = token_of("tokenizer.ggml.eos_token_id");
        // llama.cpp adds a BOS to SentencePiece vocabularies that do not say otherwise.
        let add_bos = file.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(sentencepiece);
        let post_processor = match (&bos_token, add_bos) {
            (Some((id, text)), true) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {text.as_str(): {"id": text, "ids": [id], "tokens": [text]}},
            }),
            _ => Json::Null,
        };
        let decoder = if sentencepiece {
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]})
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": sentencepiece, "byte_fallback": sentencepiece,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            },
        });
        let inner =
            tokenizers::Tokenizer::from_str(&spec.to_string()).map_err(tok_err("building the GGUF tokenizer"))?;

        let mut stop_ids: BTreeSet<u32> = config.eos_token_ids.iter().copied().collect();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some((id, _)) = token_of(key) {
                stop_ids.insert(id);
            }
        }
        let chat_template = file
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(|t| ChatTemplate::new(t.to_string()))
            .transpose()?;
        Ok(Tokenizer { inner, bos_token, eos_token, stop_ids, chat_template })
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens) from a
    /// Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer(format!(
                "{} not found: the model directory needs its tokenizer",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let tok_config: Json = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", config_path.display())))?;
            serde_json::from_str(&text).map_err(|e| Error::Tokenizer(format!("{}: {e}", config_path.display())))?
        } else {
            Json::Null
        };
        // Special tokens are given as strings or as {"content": ...} objects.
        let token_named = |key: &str| -> Option<(u32, String)> {
            let v = tok_config.get(key)?;
            let text = v.as_str().or_else(|| v.get("content").and_then(Json::as_str))?;
            Some((inner.token_to_id(text)?, text.to_string()))
        };
        let bos_token =
            token_named("bos_token").or_else(|| config.bos_token_id.and_then(|id| Some((id, inner.id_to_token(id)?))));
        let eos_token = token_named("eos_token").or_else(|| {
            let id = *config.eos_token_ids.first()?;
            Some((id, inner.id_to_token(id)?))
        });
        let mut stop_ids: BTreeSet<u32> = config.eos_token_ids.iter().copied().collect();
        if let Some((id, _)) = &eos_token {
            stop_ids.insert(*id);
        }
        let gen_config = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_config)
            && let Ok(value) = serde_json::from_str::<Json>(&text)
        {
            match value.get("eos_token_id") {
                Some(Json::Number(n)) => stop_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Json::Array(a)) => stop_ids.extend(a.iter().filter_map(Json::as_u64).map(|v| v as u32)),
                _ => {}
            }
        }
        let template_text = match tok_config.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let chat_template = template_text.map(ChatTemplate::new).transpose()?;
        Ok(Tokenizer { inner, bos_token, eos_token, stop_ids, chat_template })
    }

    /// Token ids of `text`. `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (a BOS for Llama 3): set it for raw prompts, not for chat-templated ones, whose template
    /// writes the BOS itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(tok_err("encode"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are left out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err("decode"))
    }

    /// The tokenizer in the `tokenizer.json` format.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err("serializing"))
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids that end generation.
    pub fn stop_ids(&self) -> &BTreeSet<u32> {
        &self.stop_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_ref().map(|(_, t)| t.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_ref().map(|(_, t)| t.as_str())
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The chat template rendered over `messages`, ending with the assistant's turn opened.
    pub fn apply_chat_template(&self, messages: &[crate::ChatMessage]) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::InvalidRequest("the model has no chat template: send a raw prompt instead".to_string())
        })?;
        template.render(messages, true, self.bos_token(), self.eos_token())
    }
}
