"""Hugging Face transformers eager on a random-weight preset: the reference a user would
otherwise run. Same shapes as Flint's presets; BF16; greedy; DynamicCache; times with CUDA
synchronisation. Prints one JSON object (or writes it with --json)."""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         head_dim=64, tie_word_embeddings=True, factor=32.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         head_dim=128, tie_word_embeddings=False, factor=8.0),
    "llama-3.3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          head_dim=128, tie_word_embeddings=False, factor=8.0),
}


def config_of(name):
    p = dict(PRESETS[name])
    factor = p.pop("factor")
    return LlamaConfig(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, torch_dtype="bfloat16", attn_implementation="eager",
                       rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **p)


def run(model, vocab, batch, prompt_len, output_len):
    ids = torch.randint(0, vocab, (batch, prompt_len), device="cuda")
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        past = out.past_key_values
        times = []
        for _ in range(output_len - 1):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return {"prompt_len": prompt_len, "output_len": output_len, "batch": batch, "ttft_ms": ttft * 1e3,
            "decode_ms_per_token": ms, "tok_s_per_user": 1e3 / ms, "tok_s_total": batch * 1e3 / ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--runs", default="1:128:128,8:128:128,1:2048:256", help="BATCH:PROMPT:OUTPUT,...")
    ap.add_argument("--json")
    args = ap.parse_args()
    config = config_of(args.preset)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    startup = time.perf_counter() - t0
    rows = []
    run(model, config.vocab_size, 1, 16, 4)  # warm-up
    for spec in args.runs.split(","):
        b, p, o = (int(x) for x in spec.split(":"))
        rows.append(run(model, config.vocab_size, b, p, o))
        print(f"transformers eager {args.preset} {p}/{o} batch {b}: {rows[-1]['decode_ms_per_token']:.2f} ms/token",
              flush=True)
    report = {"engine": f"transformers {transformers.__version__} eager, torch {torch.__version__}",
              "gpu": torch.cuda.get_device_name(), "preset": args.preset, "init_s": startup, "rows": rows}
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
