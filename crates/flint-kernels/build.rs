//! Embeds the fatbins that `cargo xtask kernels` writes to `kernels/build/` (or to
//! `$FLINT_KERNELS_DIR`). Without them the crate still builds: every module then reports that the
//! kernels were not built.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Every `kernels/<module>.cu` is one module, in name order.
fn module_names(kernels: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(kernels)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let path = e.path();
                    (path.extension().is_some_and(|x| x == "cu"))
                        .then(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
                        .flatten()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "build") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "cu" || e == "cuh") {
                println!("cargo:rerun-if-changed={}", path.display());
                let modified = entry.metadata().ok()?.modified().ok()?;
                newest = Some(newest.map_or(modified, |n: SystemTime| n.max(modified)));
            }
        }
    }
    newest
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels = manifest.join("../../kernels");
    println!("cargo:rerun-if-env-changed=FLINT_KERNELS_DIR");
    let dir = std::env::var_os("FLINT_KERNELS_DIR").map(PathBuf::from).unwrap_or_else(|| kernels.join("build"));
    // Watch only paths that exist (a missing one reruns this script on every build); the
    // folder that holds `dir` changes when `dir` is created.
    let watch = |path: &Path| {
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    };
    watch(&dir);
    if let Some(parent) = dir.parent() {
        watch(parent);
    }
    let newest = newest_source(&kernels);

    let modules = module_names(&kernels);
    let mut code = format!(
        "/// The names of every module the CUDA backend loads (one per `kernels/*.cu`).\npub const MODULE_NAMES: &[&str] = &{modules:?};\n\n"
    );
    code.push_str("/// Compiled modules: (name, fatbin).\npub static MODULES: &[(&str, &[u8])] = &[\n");
    let mut missing = Vec::new();
    for name in &modules {
        let path = dir.join(format!("{name}.fatbin"));
        watch(&path);
        match std::fs::metadata(&path) {
            Ok(meta) => {
                if let (Some(src), Ok(built)) = (newest, meta.modified())
                    && src > built
                {
                    println!("cargo:warning={name}.fatbin is older than the kernel sources: run `cargo xtask kernels`");
                }
                let abs = path.canonicalize().expect("an existing file has a canonical path");
                writeln!(code, "    ({name:?}, include_bytes!({:?})),", abs.display().to_string()).expect("string");
            }
            Err(_) => missing.push(name.as_str()),
        }
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("modules.rs");
    std::fs::write(out, code).expect("OUT_DIR is writable");
    if !missing.is_empty() && missing.len() < modules.len() {
        println!("cargo:warning=kernel modules missing from {}: {missing:?}", dir.display());
    }
}
