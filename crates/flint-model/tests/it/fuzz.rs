//! Truncated and mutated GGUF files: the reader and the loader return errors, never panic, and
//! never allocate by a size the file merely claims.

use flint_cpu::CpuBackend;
use flint_model::{Llama, ModelSource, gguf};
use flint_tensor::DType;
use proptest::prelude::*;

use crate::support::*;

/// Opens and, when the header is sound, fully loads the bytes as a model. Errors are fine.
fn try_everything(bytes: &[u8], name: &str) {
    let dir = temp_dir(name);
    let path = dir.join("m.gguf");
    std::fs::write(&path, bytes).expect("write");
    if let Ok(source) = ModelSource::open(&path) {
        let _ = source.stored_tensors();
        if let Ok(config) = source.config() {
            let backend = CpuBackend::new();
            if let Ok(model) = Llama::load(&source, config, &backend, DType::F32, &mut |_| {})
                && let Ok(mut cache) = model.new_kv_cache(&backend, 8)
            {
                let _ = model.forward(&backend, &[1, 2, 3], &mut cache, false);
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_tiny_gguf_is_valid() {
    let bytes = tiny_gguf();
    let (meta, tensors) = gguf::parse_header(&bytes).expect("parses");
    assert_eq!(tensors.len(), 3 + 9 * LAYERS);
    assert_eq!(meta.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = tiny_gguf();
    // The last tensor (the LM head, a multiple of 32 bytes) ends exactly at the end of the file,
    // so every shorter file lacks some header field or tensor byte.
    assert_eq!((VOCAB * HIDDEN * 4) % 32, 0);
    for len in 0..bytes.len() {
        assert!(gguf::parse_header(&bytes[..len]).is_err(), "a file cut at {len} of {} parsed", bytes.len());
    }
    assert!(gguf::parse_header(&bytes).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn mutated_headers_never_panic(
        flips in proptest::collection::vec((0usize..1200, any::<u8>()), 1..6),
        cut in proptest::option::of(0usize..4000),
    ) {
        let mut bytes = tiny_gguf();
        for (pos, value) in flips {
            // Mostly the header (where sizes live), sometimes anywhere.
            let pos = pos % bytes.len();
            bytes[pos] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.min(bytes.len()));
        }
        let _ = gguf::parse_header(&bytes);
        try_everything(&bytes, "mutated");
    }

    #[test]
    fn huge_claimed_counts_are_rejected(count in (1u64 << 20)..u64::MAX) {
        let mut bytes = tiny_gguf();
        // Tensor count, then metadata count, right after magic and version.
        bytes[8..16].copy_from_slice(&count.to_le_bytes());
        prop_assert!(gguf::parse_header(&bytes).is_err());
        let mut bytes = tiny_gguf();
        bytes[16..24].copy_from_slice(&count.to_le_bytes());
        prop_assert!(gguf::parse_header(&bytes).is_err());
    }
}
