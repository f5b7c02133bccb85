"""Checks that FP8 checkpoints written by `flint quantize` load in Hugging Face transformers.

Usage: python tests/fp8/hf_load.py FLINT_BINARY WORK_DIR

Builds a random Llama (GQA, dims divisible by 128 so every granularity applies) with
transformers, saves it in BF16, converts it with `flint quantize --fp8 --granularity G` for
tensor, channel and block, loads each result with `AutoModelForCausalLM.from_pretrained` (on a
CPU transformers dequantizes FP8 to BF16) and checks (1) every dequantized weight equals code *
scale read back with the `safetensors` library, and (2) the logits stay close to the BF16 model's.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

flint, work = sys.argv[1], Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.05)
bf16_dir = work / "bf16"
model.save_pretrained(bf16_dir)
ids = torch.randint(0, 512, (1, 24))
with torch.no_grad():
    ref = model(ids).logits.float()

for g in ["tensor", "channel", "block"]:
    out = work / f"fp8-{g}"
    subprocess.run([flint, "quantize", "--fp8", "--granularity", g, str(bf16_dir), str(out)], check=True)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8", qc
    state = loaded.state_dict()
    checked = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if not name.endswith(".weight_scale_inv"):
                    continue
                w_name = name.replace(".weight_scale_inv", ".weight")
                codes = st.get_tensor(w_name)
                assert codes.dtype == torch.float8_e4m3fn, (w_name, codes.dtype)
                scale = st.get_tensor(name).float()
                rows, cols = codes.shape
                sr, sc = scale.shape
                full = scale.repeat_interleave(-(-rows // sr), 0)[:rows].repeat_interleave(-(-cols // sc), 1)[:, :cols]
                want = (codes.float() * full).to(torch.bfloat16)
                got = state[w_name]
                assert got.dtype == torch.bfloat16 and torch.equal(got, want), (g, w_name)
                checked += 1
    assert checked == 2 * 7, checked
    with torch.no_grad():
        logits = loaded(ids).logits.float()
    rel = ((logits - ref).norm() / ref.norm()).item()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{g}: transformers loaded {checked} FP8 weights; logits vs BF16: relative error {rel:.4f}, "
          f"top-1 agreement {agree:.3f}")
    # Random weights give near-flat logits: the error bound is loose, the weight check above is exact.
    assert rel < 0.15, rel
print("ok")
