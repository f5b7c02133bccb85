//! `cargo xtask gpu-bundle`: everything the GPU machine needs, in one git-ignored folder.
//!
//! Builds the kernels, the release `flint` and `xtask` binaries and the GPU test executables
//! (release), strips them, and copies them with the run script into `.gpu/bundle/`, which the
//! device tool carries (`carry: [".gpu/bundle"]`, command `bash tests/gpu/run.sh`).

use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};

use crate::{cargo, kernels, run, workspace_root};

/// Test targets that exercise the GPU: (package, test target, name in the bundle's `tests/`).
const GPU_TESTS: &[(&str, &str, &str)] =
    &[("flint-cuda", "kernels", "kernels"), ("flint-model", "gpu", "gpu"), ("flint-engine", "gpu", "gpu-engine")];
const LIMIT: u64 = 60 << 20;

fn strip(path: &Path) {
    // Debug info is most of a test binary; without `strip` the bundle is only larger.
    let _ = Command::new("strip").arg("--strip-debug").arg(path).status();
}

pub fn gpu_bundle() -> anyhow::Result<PathBuf> {
    kernels::build()?;
    let mut build = cargo();
    build.args(["build", "--release", "-p", "flint-cli", "-p", "xtask"]);
    run(build, "cargo build --release -p flint-cli -p xtask")?;

    let mut tests = cargo();
    tests
        .args([
            "test",
            "--release",
            "--no-run",
            "--message-format=json",
            "-p",
            "flint-cuda",
            "-p",
            "flint-model",
            "-p",
            "flint-engine",
        ])
        .stdout(Stdio::piped());
    eprintln!("$ cargo test --release --no-run -p flint-cuda -p flint-model -p flint-engine");
    let mut child = tests.spawn().context("cargo test --no-run")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut executables = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str()) else { continue };
        let package = msg["package_id"].as_str().unwrap_or_default();
        if let Some((_, _, bundled)) =
            GPU_TESTS.iter().find(|(p, t, _)| package.contains(&format!("/{p}#")) && name == *t)
        {
            executables.push((bundled.to_string(), PathBuf::from(exe)));
        }
    }
    ensure!(child.wait()?.success(), "building the GPU tests failed");
    ensure!(executables.len() == GPU_TESTS.len(), "found test executables {executables:?}, expected {GPU_TESTS:?}");

    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bundle = root.join(".gpu/bundle");
    if bundle.exists() {
        fs::remove_dir_all(&bundle).with_context(|| format!("clearing {}", bundle.display()))?;
    }
    fs::create_dir_all(bundle.join("tests"))?;
    let copy = |from: &Path, to: PathBuf| -> anyhow::Result<()> {
        fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        strip(&to);
        Ok(())
    };
    copy(&target.join("release/flint"), bundle.join("flint"))?;
    copy(&target.join("release/xtask"), bundle.join("xtask"))?;
    for (name, exe) in &executables {
        copy(exe, bundle.join("tests").join(name))?;
    }
    let rev = Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(&root).output()?;
    fs::write(bundle.join("REVISION"), String::from_utf8_lossy(&rev.stdout).trim())?;
    let size: u64 = walk(&bundle)?.iter().map(|p| p.metadata().map(|m| m.len()).unwrap_or(0)).sum();
    ensure!(size < LIMIT, "the bundle is {} MiB, over {} MiB", size >> 20, LIMIT >> 20);
    eprintln!(
        "bundle ready: {} ({:.1} MiB); on the GPU machine: bash tests/gpu/run.sh",
        bundle.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(bundle)
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() { out.extend(walk(&p)?) } else { out.push(p) }
    }
    Ok(out)
}
