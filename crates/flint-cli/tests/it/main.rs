//! The `flint` binary as a user runs it: output on the real default model, and a clear one-line
//! error with a non-zero exit for every kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flint_e2e::{default_model_path, smollm2_reference};

fn flint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("FLINT_MODEL")
        .output()
        .expect("flint runs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flint-cli-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Asserts the run failed with one line on stderr containing `needle`, and did not panic.
fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "error is not one line: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
}

fn model() -> String {
    default_model_path().display().to_string()
}

#[test]
fn json_greedy_output_matches_the_reference() {
    let reference = smollm2_reference();
    let case = reference.cases.iter().find(|c| c.kind == "chat").expect("a chat case");
    let max = case.token_ids.len().to_string();
    let out = flint(&["generate", "--model", &model(), "--prompt", &case.prompt, "--max-tokens", &max, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).expect("token_ids");
    let prompt_ids: Vec<u32> = serde_json::from_value(json["prompt_token_ids"].clone()).expect("prompt ids");
    assert_eq!(ids, case.token_ids);
    assert_eq!(prompt_ids, case.prompt_token_ids);
    assert_eq!(json["text"], "The capital of France is Paris.");
    assert_eq!(json["finish_reason"], "stop");
    assert!(json["timings"]["prefill_ms"].as_f64().is_some_and(|v| v > 0.0));
    assert!(json["timings"]["decode_tokens_per_s"].as_f64().is_some());
}

#[test]
fn text_streams_to_stdout_and_raw_skips_the_template() {
    let reference = smollm2_reference();
    let case = reference.cases.iter().find(|c| c.kind == "raw" && c.token_ids.len() >= 48).expect("a raw case");
    let out = flint(&["generate", "--model", &model(), "--raw", "--prompt", &case.prompt, "--max-tokens", "48"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let json_out =
        flint(&["generate", "--model", &model(), "--raw", "--prompt", &case.prompt, "--max-tokens", "48", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json_out.stdout).expect("valid JSON");
    assert_eq!(stdout, format!("{}\n", json["text"].as_str().expect("text")));
    let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).expect("ids");
    assert_eq!(ids, case.token_ids[..48]);
    assert_eq!(json["finish_reason"], "length");
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let args = [
        "generate",
        "--prompt",
        "Tell me a joke.",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "1234",
        "--max-tokens",
        "16",
        "--json",
    ];
    let mut with_model: Vec<&str> = args.to_vec();
    let model = model();
    with_model.extend(["--model", &model]);
    let a: serde_json::Value = serde_json::from_slice(&flint(&with_model).stdout).expect("json");
    let b: serde_json::Value = serde_json::from_slice(&flint(&with_model).stdout).expect("json");
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_eq!(a["seed"], 1234);
}

#[test]
fn inspect_describes_the_model() {
    let out = flint(&["inspect", &model()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    for needle in
        ["architecture    llama", "layers          30", "Q4_1", "Q8_0", "heads           9 query, 3 key/value"]
    {
        assert!(text.contains(needle), "inspect output lacks {needle:?}:\n{text}");
    }
}

#[test]
fn invalid_flags_fail_cleanly() {
    assert_clean_failure(&flint(&["generate", "--prompt", "hi", "--bogus"]), "--bogus");
    assert_clean_failure(&flint(&["generate", "--prompt", "hi", "--max-tokens", "-3"]), "-3");
    assert_clean_failure(&flint(&["generate", "--prompt", "hi", "--max-tokens=0"]), "--max-tokens");
    assert_clean_failure(&flint(&["generate", "--prompt", "hi", "--max-tokens", "many"]), "many");
    assert_clean_failure(&flint(&["generate", "--prompt", "hi", "--device", "tpu"]), "tpu");
    assert_clean_failure(&flint(&["generate"]), "--prompt");
    assert_clean_failure(&flint(&["frobnicate"]), "frobnicate");
    let model = model();
    assert_clean_failure(&flint(&["generate", "--model", &model, "--prompt", "hi", "--top-p", "1.5"]), "top_p");
    assert_clean_failure(
        &flint(&["generate", "--model", &model, "--prompt", "hi", "--temperature", "-1"]),
        "temperature",
    );
    let cpu = ["generate", "--device", "cpu", "--model", &model, "--prompt", "hi"];
    assert_clean_failure(&flint(&[&cpu[..], &["--dtype", "fp8"]].concat()), "--dtype fp8 runs on the GPU");
    assert_clean_failure(
        &flint(&[&cpu[..], &["--kv-cache-dtype", "fp8"]].concat()),
        "--kv-cache-dtype fp8 runs on the GPU",
    );
    assert_clean_failure(&flint(&[&cpu[..], &["--kv-cache-dtype", "fp4"]].concat()), "fp4");
    let bench = ["bench", "--preset", "llama-3.1-8b", "--mixed"];
    assert_clean_failure(&flint(&[&bench[..], &["512"]].concat()), "DECODES:PROMPT_TOKENS");
    assert_clean_failure(&flint(&[&bench[..], &["512:0"]].concat()), "positive integers");
    assert_clean_failure(&flint(&[&bench[..], &["512:1024", "--pp", "2"]].concat()), "no --pp");
    let preset = ["bench", "--preset", "llama-3.1-8b", "--tp", "2"];
    assert_clean_failure(&flint(&[&preset[..], &["--p2p-link", "carrier-pigeon"]].concat()), "flags or lamport");
    assert_clean_failure(&flint(&[&preset[..], &["--p2p-link", "lamport", "--no-p2p"]].concat()), "--no-p2p");
    assert_clean_failure(&flint(&[&preset[..], &["--fp8-quantization", "sometimes"]].concat()), "fused");
    assert_clean_failure(&flint(&[&preset[..], &["--launch-tuning", "off,lots"]].concat()), "off or a number of MiB");
    assert_clean_failure(&flint(&[&preset[..], &["--launch-tuning", "off,32"]].concat()), "on one GPU");
    let load = ["bench", "--server", "127.0.0.1:1"];
    assert_clean_failure(&flint(&[&load[..], &["--temperature", "-1"]].concat()), "temperature >= 0");
    assert_clean_failure(&flint(&[&load[..], &["--temperature", "NaN"]].concat()), "temperature >= 0");
    assert_clean_failure(&flint(&[&load[..], &["--top-p", "1.5"]].concat()), "top-p in (0, 1]");
    assert_clean_failure(&flint(&[&load[..], &["--top-p", "0"]].concat()), "top-p in (0, 1]");
    assert_clean_failure(&flint(&[&load[..], &["--repetition-penalty", "0"]].concat()), "repetition penalty > 0");
    assert_clean_failure(&flint(&["quantize", "--fp8", "--scales", "lots", "in", "out"]), "lots");
    assert_clean_failure(&flint(&["eval", "--rounding-spread", "17"]), "17");
    assert_clean_failure(
        &flint(&["eval", "--device", "cuda", "--rounding-spread", "2"]),
        "--rounding-spread runs on the CPU",
    );
}

/// `--tp 3` splits SmolLM2 (9 heads, 3 KV heads) over three CPU ranks and gives the reference's
/// greedy answer; a rank count the heads do not divide is refused by name.
#[test]
fn tensor_parallel_generation_on_the_cpu() {
    let reference = smollm2_reference();
    let case = reference.cases.iter().find(|c| c.kind == "chat").expect("a chat case");
    let max = case.token_ids.len().to_string();
    let model = model();
    // The case's greedy tokens with `layout`'s ranks, and the device they report.
    let generate = |layout: &[&str]| -> (Vec<u32>, String) {
        let args = ["generate", "--device", "cpu", "--model", &model, "--prompt", &case.prompt];
        let out = flint(&[&args[..], layout, &["--max-tokens", &max, "--json"]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
        let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).expect("token_ids");
        (ids, json["device"].as_str().unwrap_or_default().to_string())
    };
    let (ids, device) = generate(&["--tp", "3"]);
    assert_eq!(ids, case.token_ids);
    assert!(device.starts_with("3 x cpu"), "{device}");
    // Two pipeline stages: the same tokens.
    let (ids, device) = generate(&["--pp", "2"]);
    assert_eq!(ids, case.token_ids);
    assert!(device.contains("2 pipeline stages"), "{device}");
    let out = flint(&["generate", "--device", "cpu", "--tp", "2", "--model", &model, "--prompt", "hi"]);
    assert_clean_failure(&out, "9 attention heads do not split over 2 ranks");
    assert_clean_failure(&flint(&["generate", "--tp", "0", "--prompt", "hi"]), "--tp");
}

#[test]
fn unavailable_device_is_a_clear_error() {
    assert_clean_failure(&flint(&["generate", "--model", &model(), "--prompt", "hi", "--device", "cuda"]), "cuda");
}

#[test]
fn missing_and_truncated_models_fail_cleanly() {
    assert_clean_failure(&flint(&["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"]), "not found");
    let dir = temp_dir("truncated");
    let full = std::fs::read(default_model_path()).expect("model");
    for (name, len) in [("header.gguf", 2_000), ("tokenizer.gguf", 900_000), ("data.gguf", 40_000_000)] {
        let path = dir.join(name);
        std::fs::write(&path, &full[..len]).expect("write");
        let p = path.display().to_string();
        assert_clean_failure(&flint(&["generate", "--model", &p, "--prompt", "hi"]), "truncated");
        assert_clean_failure(&flint(&["inspect", &p]), "truncated");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A GGUF file with one tensor of `ggml_type` and the given architecture.
fn write_gguf(path: &Path, architecture: &str, ggml_type: u32) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    let key = "general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&(architecture.len() as u64).to_le_bytes());
    b.extend_from_slice(architecture.as_bytes());
    let name = "token_embd.weight";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&256u64.to_le_bytes());
    b.extend_from_slice(&ggml_type.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend_from_slice(&[0u8; 1024]);
    std::fs::write(path, b).expect("write gguf");
}

#[test]
fn unsupported_types_and_architectures_fail_cleanly() {
    let dir = temp_dir("unsupported");
    let iq = dir.join("iq2.gguf");
    write_gguf(&iq, "llama", 16);
    assert_clean_failure(&flint(&["inspect", &iq.display().to_string()]), "IQ2_XXS");
    let arch = dir.join("arch.gguf");
    write_gguf(&arch, "rwkv6", 0);
    let p = arch.display().to_string();
    assert_clean_failure(&flint(&["inspect", &p]), "rwkv6");
    assert_clean_failure(&flint(&["generate", "--model", &p, "--prompt", "hi"]), "rwkv6");

    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).expect("dir");
    std::fs::write(
        hf.join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "hidden_size": 4,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}"#,
    )
    .expect("config");
    let mut st = 8u64.to_le_bytes().to_vec();
    st.extend_from_slice(b"{}      ");
    std::fs::write(hf.join("model.safetensors"), st).expect("safetensors");
    assert_clean_failure(
        &flint(&["generate", "--model", &hf.display().to_string(), "--prompt", "hi"]),
        "GPT2LMHeadModel",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_prompt_longer_than_the_context_fails_cleanly() {
    let long = "hello ".repeat(9000);
    assert_clean_failure(&flint(&["generate", "--model", &model(), "--raw", "--prompt", &long]), "8192");
}

/// A free loopback port (bound and released; the race with other processes is negligible here).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read");
    body
}

/// `flint serve` and `flint bench` as processes: the bench succeeds, metrics are exported, and
/// SIGTERM stops the server cleanly.
#[test]
fn serve_bench_metrics_and_sigterm() {
    let (port, metrics_port) = (free_port(), free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(["serve", "--model", &model(), "--port", &port.to_string(), "--metrics-port", &metrics_port.to_string()])
        .args(["--kv-cache-mb", "64", "--shutdown-grace-s", "20"])
        .env_remove("FLINT_AUTH_TOKEN")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("server starts");
    let addr = format!("127.0.0.1:{port}");
    let mut bench = None;
    for _ in 0..100 {
        let out = flint(&[
            "bench",
            "--server",
            &addr,
            "--num-requests",
            "6",
            "--concurrency",
            "3",
            "--prompt-len",
            "8:24",
            "--output-len",
            "4",
            "--json",
        ]);
        if out.status.success() {
            bench = Some(out);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let bench = bench.expect("bench ran against the server");
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).expect("bench JSON");
    assert_eq!(report["succeeded"], 6, "{report}");
    assert_eq!(report["output_tokens"], 24);
    assert!(report["ttft_ms"]["p50"].as_f64().is_some_and(|v| v > 0.0));

    // The gauges are published after the step that finished the requests, which may come a
    // moment after their last tokens reached the client.
    let names = [
        "flint_time_to_first_token_seconds",
        "flint_time_per_output_token_seconds",
        "flint_kv_blocks_used 0",
        "flint_steps_in_flight 0",
        "flint_steps_total",
        "flint_step_host_microseconds_total",
        "flint_generation_tokens_total 24",
    ];
    let mut metrics = http_get(metrics_port, "/metrics");
    for _ in 0..50 {
        if names.iter().all(|n| metrics.contains(n)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        metrics = http_get(metrics_port, "/metrics");
    }
    for name in names {
        assert!(metrics.contains(name), "/metrics lacks {name:?}:\n{metrics}");
    }

    let pid = server.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let status = server.wait().expect("server exits");
    assert!(status.success(), "server exited with {status}");
}

/// A port whose next port is free too (the job's master address uses both).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two free consecutive ports");
}

#[test]
fn tensor_parallel_over_three_processes_serves_the_reference() {
    use flint_proto::v1 as pb;
    let reference = smollm2_reference();
    let case = reference.cases.iter().find(|c| c.kind == "chat").expect("a chat case");
    let model = model();
    let (port, master) = (free_port(), free_port_pair());
    let master = format!("127.0.0.1:{master}");
    let node = |rank: u32, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_flint"))
            .args(["serve", "--device", "cpu", "--model", &model, "--tp", "3", "--nnodes", "3"])
            .args(["--node-rank", &rank.to_string(), "--master-addr", &master])
            .args(extra)
            .env_remove("FLINT_AUTH_TOKEN")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("node starts")
    };
    let followers = [node(2, &[]), node(1, &[])];
    let mut leader = node(0, &["--port", &port.to_string(), "--kv-cache-mb", "64", "--shutdown-grace-s", "5"]);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let ids = runtime.block_on(async {
        let mut client = None;
        for _ in 0..600 {
            if let Ok(c) = pb::inference_client::InferenceClient::connect(format!("http://127.0.0.1:{port}")).await {
                client = Some(c);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut client = client.expect("node 0 serves");
        let request = pb::GenerateRequest {
            messages: vec![pb::ChatMessage { role: "user".into(), content: case.prompt.clone() }],
            max_tokens: case.token_ids.len() as u32,
            ..Default::default()
        };
        let mut stream = client.generate(request).await.expect("generate").into_inner();
        let mut ids = Vec::new();
        while let Some(msg) = stream.message().await.expect("stream") {
            ids.extend(msg.token_ids);
        }
        ids
    });
    assert_eq!(ids, case.token_ids, "3 ranks in 3 processes against the transformers reference");

    // Node 0 stops on SIGTERM; the followers see the job closed and exit cleanly.
    let pid = leader.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    assert!(leader.wait().expect("node 0 exits").success());
    for mut f in followers {
        let out = f.wait().expect("a follower exits");
        let mut err = String::new();
        if let Some(mut e) = f.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        assert!(out.success(), "follower: {err}");
        assert!(err.contains("the leader closed the job"), "{err}");
    }
    // Flags that do not fit together are refused before anything starts.
    assert_clean_failure(&flint(&["serve", "--model", &model, "--tp", "3", "--nnodes", "3"]), "--master-addr");
    assert_clean_failure(
        &flint(&["serve", "--model", &model, "--tp", "2", "--nnodes", "3", "--master-addr", "127.0.0.1:1"]),
        "do not split evenly",
    );
    assert_clean_failure(&flint(&["serve", "--model", &model, "--steps-in-flight", "2"]), "goes with --pp or --tp");
    assert_clean_failure(&flint(&["serve", "--device", "cpu", "--random-weights", "llama-3.1-8b"]), "GPU only");
    assert_clean_failure(
        &flint(&["serve", "--model", &model, "--random-weights", "llama-3.1-8b"]),
        "cannot be used with",
    );
    // Pipeline stages across processes need GPUs (their activations cross over NCCL).
    assert_clean_failure(
        &flint(&[
            "serve",
            "--device",
            "cpu",
            "--model",
            &model,
            "--pp",
            "3",
            "--nnodes",
            "3",
            "--master-addr",
            "127.0.0.1:1",
        ]),
        "run on GPUs",
    );
}
