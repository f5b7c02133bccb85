//! `cargo xtask kernels`: compile `kernels/*.cu` into fatbins with nvcc 13.0.
//!
//! nvcc is taken from `$NVCC`, else a CUDA 13.0 toolkit on the machine (`nvcc` on `PATH`,
//! `/usr/local/cuda/bin/nvcc`), else the PyPI packages of the 13.0 line installed into a venv
//! under the cache folder. The GPU driver is CUDA 13.0: a newer nvcc would emit PTX it rejects.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

use crate::{cache_dir, python, workspace_root};

/// The CUDA line kernels are built with.
const CUDA_LINE: &str = "13.0";
/// PyPI packages of nvcc 13.0 that work together (pinned as a set: nvcc alone pulls newer parts).
const NVCC_PACKAGES: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
];
/// Every module `flint-kernels` embeds: one per `kernels/<module>.cu`, in name order.
fn modules(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "cu")
            && let Some(stem) = path.file_stem()
        {
            names.push(stem.to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("release"))?;
    let release = line.split("release ").nth(1)?.split(',').next()?.trim().to_string();
    Some(release)
}

fn pypi_nvcc() -> anyhow::Result<PathBuf> {
    let venv = cache_dir().join(format!("cuda-{CUDA_LINE}"));
    let find = |venv: &Path| -> Option<PathBuf> {
        let lib = venv.join("lib");
        fs::read_dir(&lib).ok()?.flatten().find_map(|e| {
            let nvcc = e.path().join("site-packages/nvidia/cu13/bin/nvcc");
            nvcc.exists().then_some(nvcc)
        })
    };
    if let Some(nvcc) = find(&venv)
        && nvcc_version(&nvcc).as_deref() == Some(CUDA_LINE)
    {
        return Ok(nvcc);
    }
    eprintln!("installing nvcc {CUDA_LINE} from PyPI into {}", venv.display());
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("clearing {}", venv.display()))?;
    }
    let status = Command::new(python()).args(["-m", "venv"]).arg(&venv).status().context("python3 -m venv")?;
    ensure!(status.success(), "python3 -m venv {} failed", venv.display());
    let status = Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(NVCC_PACKAGES)
        .status()
        .context("pip install nvcc")?;
    ensure!(status.success(), "pip could not install {}", NVCC_PACKAGES.join(" "));
    find(&venv).with_context(|| format!("no nvcc under {} after installing", venv.display()))
}

/// An nvcc of the 13.0 line.
pub fn nvcc() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NVCC") {
        let path = PathBuf::from(path);
        match nvcc_version(&path) {
            Some(v) if v == CUDA_LINE => return Ok(path),
            Some(v) => bail!("$NVCC is CUDA {v}; kernels are built with CUDA {CUDA_LINE}"),
            None => bail!("$NVCC ({}) does not run", path.display()),
        }
    }
    for candidate in ["nvcc", "/usr/local/cuda/bin/nvcc"] {
        let path = PathBuf::from(candidate);
        if nvcc_version(&path).as_deref() == Some(CUDA_LINE) {
            return Ok(path);
        }
    }
    pypi_nvcc()
}

/// Compiles every module into `kernels/build/<module>.fatbin`.
pub fn build() -> anyhow::Result<PathBuf> {
    let nvcc = nvcc()?;
    let root = workspace_root().join("kernels");
    let out = root.join("build");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let modules = modules(&root)?;
    let jobs: Vec<_> = modules
        .iter()
        .map(|m| {
            let src = root.join(format!("{m}.cu"));
            let dst = out.join(format!("{m}.fatbin"));
            let mut cmd = Command::new(&nvcc);
            cmd.arg("-fatbin")
                .arg("-O3")
                .arg("-std=c++17")
                .arg("-Werror=all-warnings")
                .arg("-gencode=arch=compute_90a,code=sm_90a")
                .arg("-gencode=arch=compute_90a,code=compute_90a")
                .arg("-I")
                .arg(root.join("include"))
                .arg("-o")
                .arg(&dst)
                .arg(&src);
            (m, cmd)
        })
        .collect();
    eprintln!("compiling {} kernel modules with {}", jobs.len(), nvcc.display());
    let children: Vec<_> = jobs
        .into_iter()
        .map(|(m, mut cmd)| cmd.spawn().map(|c| (m, c)).with_context(|| format!("starting nvcc for {m}")))
        .collect::<anyhow::Result<_>>()?;
    let mut failed = Vec::new();
    for (m, mut child) in children {
        if !child.wait().with_context(|| format!("nvcc for {m}"))?.success() {
            failed.push(m.as_str());
        }
    }
    ensure!(failed.is_empty(), "nvcc failed on {}", failed.join(", "));
    eprintln!("kernels built into {}", out.display());
    Ok(out)
}
