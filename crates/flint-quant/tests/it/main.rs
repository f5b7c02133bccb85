//! flint-quant integration tests: ggml dequantization against vectors from the `gguf` package.

mod fp8;

use flint_quant::{GgmlType, dequantize};
use proptest::prelude::*;

#[derive(serde::Deserialize)]
struct Vector {
    #[serde(rename = "type")]
    name: String,
    id: u32,
    n_elements: usize,
    bytes_hex: String,
    values: Vec<f64>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

#[test]
fn every_type_matches_the_gguf_reference() {
    let vectors: Vec<Vector> =
        serde_json::from_str(include_str!("../data/ggml_vectors.json")).expect("vector file parses");
    let mut seen = Vec::new();
    for v in &vectors {
        let ty = GgmlType::from_id(v.id).expect("type supported");
        assert_eq!(ty.name(), v.name);
        let got = dequantize(ty, &hex(&v.bytes_hex), v.n_elements).expect("decodes");
        assert_eq!(got.len(), v.values.len());
        for (i, (g, want)) in got.iter().zip(&v.values).enumerate() {
            let want = *want as f32;
            let tol = 1e-6 * want.abs().max(1e-3);
            assert!((g - want).abs() <= tol, "{}: element {i}: got {g}, want {want}", v.name);
        }
        seen.push(v.name.clone());
    }
    for must in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] {
        assert!(seen.iter().any(|s| s == must), "no vector for {must}");
    }
}

const ALL: [u32; 13] = [0, 1, 30, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14];

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(type_index in 0usize..ALL.len(), bytes in proptest::collection::vec(any::<u8>(), 0..700), n in 0usize..600) {
        let ty = GgmlType::from_id(ALL[type_index]).expect("supported");
        match dequantize(ty, &bytes, n) {
            Ok(values) => prop_assert_eq!(values.len(), n),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
