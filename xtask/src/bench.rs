//! `cargo xtask bench`: Flint's model benchmark on the local GPU with Hugging Face transformers
//! eager on the same preset in the same run; one JSON report, a table and a PNG chart.
//!
//! `cargo xtask bench [--preset P] [--dtype bf16|fp8] [--out DIR] [--flint PATH] [--batches ..] [--lengths ..]`

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::{cargo, python, run, workspace_root};

struct Options {
    preset: String,
    out: PathBuf,
    flint: Option<PathBuf>,
    batches: String,
    lengths: String,
    hf_runs: String,
    dtype: String,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        preset: "llama-3.1-8b".into(),
        out: workspace_root().join("bench/out"),
        flint: None,
        batches: "1,8,32,128".into(),
        lengths: "128:128,2048:256".into(),
        hf_runs: "1:128:128,8:128:128,1:2048:256".into(),
        dtype: "bf16".into(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--preset" => o.preset = value()?,
            "--out" => o.out = PathBuf::from(value()?),
            "--flint" => o.flint = Some(PathBuf::from(value()?)),
            "--batches" => o.batches = value()?,
            "--lengths" => o.lengths = value()?,
            "--hf-runs" => o.hf_runs = value()?,
            "--dtype" => o.dtype = value()?,
            other => {
                bail!("unknown flag {other:?} (--preset, --out, --flint, --batches, --lengths, --hf-runs, --dtype)")
            }
        }
    }
    Ok(o)
}

pub fn bench(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let flint = match &o.flint {
        Some(p) => p.clone(),
        None => {
            crate::kernels::build()?;
            let mut b = cargo();
            b.args(["build", "--release", "-p", "flint-cli"]);
            run(b, "cargo build --release -p flint-cli")?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("release/flint")
        }
    };
    let flint_json = o.out.join(format!("flint-{}.json", o.preset));
    let mut cmd = Command::new(&flint);
    cmd.args(["bench", "--preset", &o.preset, "--dtype", &o.dtype, "--batches", &o.batches, "--lengths", &o.lengths])
        .arg("--json-out")
        .arg(&flint_json);
    run(cmd, &format!("flint bench --preset {}", o.preset))?;
    let flint_report: Value = serde_json::from_str(&std::fs::read_to_string(&flint_json)?)?;

    let hf_json = o.out.join(format!("transformers-{}.json", o.preset));
    let script = workspace_root().join("bench/hf_eager.py");
    let hf = Command::new(python())
        .arg(&script)
        .args(["--preset", &o.preset, "--runs", &o.hf_runs, "--json"])
        .arg(&hf_json)
        .status();
    let hf_report: Value = match hf {
        Ok(s) if s.success() => serde_json::from_str(&std::fs::read_to_string(&hf_json)?)?,
        Ok(s) => json!({"error": format!("bench/hf_eager.py exited with {s}")}),
        Err(e) => json!({"error": format!("could not run python: {e}")}),
    };

    // The bundle's revision when run from one (the GPU machine's copy of the tree has no
    // reliable git state), else the checkout's.
    let revision = std::fs::read_to_string(workspace_root().join(".gpu/bundle/REVISION"))
        .ok()
        .filter(|_| o.flint.is_some())
        .map(|r| r.trim().to_string())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .current_dir(workspace_root())
                .output()
                .ok()?;
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let report = json!({
        "preset": o.preset,
        "gpu": flint_report["gpu"],
        "revision": revision,
        "date": date,
        "flint": flint_report,
        "transformers": hf_report,
    });
    let path = o.out.join(format!("bench-{}.json", o.preset));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    print_comparison(&report);
    let png = o.out.join(format!("bench-{}.png", o.preset));
    if let Err(e) = chart(&report, &png) {
        eprintln!("chart not drawn: {e}");
    } else {
        eprintln!("chart: {}", png.display());
    }
    eprintln!("report: {}", path.display());
    Ok(())
}

fn rows(v: &Value) -> Vec<&Value> {
    v["rows"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn print_comparison(r: &Value) {
    let fl = &r["flint"];
    println!(
        "\n{} on {} — copy bandwidth {:.0} GB/s",
        r["preset"].as_str().unwrap_or("?"),
        r["gpu"].as_str().unwrap_or("?"),
        f(fl, "copy_bandwidth_gbs")
    );
    let peak = f(&fl["cublaslt_peak"], "tflops");
    println!("cuBLASLt BF16 best: {peak:.0} TFLOP/s");
    for g in fl["prefill_gemms"].as_array().into_iter().flatten() {
        println!(
            "  prefill GEMM {:8} at 2048 tokens: {:.0} TFLOP/s = {:.2} of it",
            g["name"].as_str().unwrap_or("?"),
            f(g, "tflops"),
            f(g, "tflops") / peak
        );
    }
    println!("start-up (random weights generated on the device): {:.1} s", f(fl, "startup_s"));
    println!(
        "{:>9} {:>5} | {:>9} {:>9} {:>10} {:>10} {:>8} | {:>9} {:>10} {:>8}",
        "len", "batch", "TTFT ms", "ms/tok", "tok/s/user", "tok/s tot", "roofline", "HF ms/tok", "HF tok/s", "speedup"
    );
    let hf_rows = rows(&r["transformers"]);
    for row in rows(fl) {
        let (p, o, b) = (row["prompt_len"].as_u64(), row["output_len"].as_u64(), row["batch"].as_u64());
        let hf = hf_rows
            .iter()
            .find(|h| h["prompt_len"].as_u64() == p && h["output_len"].as_u64() == o && h["batch"].as_u64() == b);
        let (hf_ms, hf_tps, speed) = match hf {
            Some(h) => (
                format!("{:.2}", f(h, "decode_ms_per_token")),
                format!("{:.1}", f(h, "tok_s_per_user")),
                format!("{:.1}x", f(h, "decode_ms_per_token") / f(row, "decode_ms_per_token")),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>9} {:>5} | {:>9.1} {:>9.3} {:>10.1} {:>10.0} {:>8.2} | {:>9} {:>10} {:>8}",
            format!("{}/{}", p.unwrap_or(0), o.unwrap_or(0)),
            b.unwrap_or(0),
            f(row, "ttft_ms"),
            f(row, "decode_ms_per_token"),
            f(row, "tok_s_per_user"),
            f(row, "tok_s_total"),
            f(row, "roofline_fraction"),
            hf_ms,
            hf_tps,
            speed
        );
    }
    if let Some(e) = r["transformers"]["error"].as_str() {
        println!("transformers: {e}");
    }
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn chart(r: &Value, path: &Path) -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| anyhow::anyhow!("bad font"))?;
    let fl_rows = rows(&r["flint"]);
    ensure!(!fl_rows.is_empty(), "no rows to chart");
    let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let max_batch = fl_rows.iter().filter_map(|r| r["batch"].as_u64()).max().unwrap_or(1) as f64;
    let max_tps = fl_rows.iter().map(|r| f(r, "tok_s_per_user")).fold(1.0, f64::max) * 1.15;
    let title = format!("{} on {}", r["preset"].as_str().unwrap_or("?"), r["gpu"].as_str().unwrap_or("?"));
    let mut c = ChartBuilder::on(&left)
        .caption(format!("{title}: decode tok/s per user"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0.8f64..max_batch * 1.25).log_scale(), 0f64..max_tps)?;
    c.configure_mesh().x_desc("batch").y_desc("tok/s per user").draw()?;
    let lengths: Vec<(u64, u64)> = {
        let mut v: Vec<(u64, u64)> = fl_rows
            .iter()
            .map(|r| (r["prompt_len"].as_u64().unwrap_or(0), r["output_len"].as_u64().unwrap_or(0)))
            .collect();
        v.dedup();
        v
    };
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (i, (p, o)) in lengths.iter().enumerate() {
        let pts: Vec<(f64, f64)> = fl_rows
            .iter()
            .filter(|r| r["prompt_len"].as_u64() == Some(*p) && r["output_len"].as_u64() == Some(*o))
            .map(|r| (f(r, "batch"), f(r, "tok_s_per_user")))
            .collect();
        let color = colors[i % colors.len()];
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("Flint {p}/{o}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        c.draw_series(pts.iter().map(|&pt| Circle::new(pt, 4, color.filled())))?;
        let hf: Vec<(f64, f64)> = rows(&r["transformers"])
            .iter()
            .filter(|h| h["prompt_len"].as_u64() == Some(*p) && h["output_len"].as_u64() == Some(*o))
            .map(|h| (f(h, "batch"), f(h, "tok_s_per_user")))
            .collect();
        if !hf.is_empty() {
            c.draw_series(hf.iter().map(|&pt| TriangleMarker::new(pt, 7, color.filled())))?
                .label(format!("transformers eager {p}/{o}"))
                .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 6, color.filled()));
        }
    }
    c.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).draw()?;

    let mut c2 = ChartBuilder::on(&right)
        .caption("decode: fraction of the bandwidth roofline", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0.8f64..max_batch * 1.25).log_scale(), 0f64..1.05)?;
    c2.configure_mesh().x_desc("batch").y_desc("bytes / bandwidth / step time").draw()?;
    for (i, (p, o)) in lengths.iter().enumerate() {
        let pts: Vec<(f64, f64)> = fl_rows
            .iter()
            .filter(|r| r["prompt_len"].as_u64() == Some(*p) && r["output_len"].as_u64() == Some(*o))
            .map(|r| (f(r, "batch"), f(r, "roofline_fraction")))
            .collect();
        let color = colors[i % colors.len()];
        c2.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("{p}/{o}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        c2.draw_series(pts.iter().map(|&pt| Circle::new(pt, 4, color.filled())))?;
    }
    c2.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).draw()?;
    root.present()?;
    Ok(())
}
