//! flint-model integration tests: GGUF and safetensors loading of the same tiny random Llama,
//! and a fuzz of the GGUF reader with truncated and mutated files.

mod fp8;
mod fuzz;
mod loaders;
mod support;
