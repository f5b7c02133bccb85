//! Compiles `proto/flint/v1/*.proto` into Rust with tonic and prost, and writes the file
//! descriptor set that server reflection serves. Uses the vendored `protoc` unless `PROTOC` is set.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("flint/v1/inference.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("flint_v1_descriptor.bin");
    tonic_prost_build::configure()
        .codec_path("crate::codec::FlintCodec")
        .file_descriptor_set_path(&descriptor)
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
