"""Random-weight Llama checkpoints built by Hugging Face transformers, and their outputs.

For each configuration: builds the model from a config on the GPU in BF16 with weights scaled so
activations stay O(1) (HF's 0.02 init makes every next-token distribution almost flat, which
tests nothing), saves it with `save_pretrained` (safetensors), then runs the reference: eager
attention, greedy decoding of 64 tokens after a random prompt, keeping the logits of the prefill's
last position and of every decode step.

Writes <out>/<name>/ (config.json, model.safetensors, reference.json, logits.f32).
"""

import argparse
import json
import math
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

CASES = {
    # GQA 4, head_dim 128, Llama 3.1 rope scaling, untied head.
    "llama-gqa4-hd128": dict(
        cls="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, vocab_size=4096, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    # GQA 8, head_dim 64, tied embeddings.
    "llama-gqa8-hd64": dict(
        cls="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=1, head_dim=64, vocab_size=3000, rope_theta=10000.0, tie_word_embeddings=True,
    ),
    # Multi-head (GQA 1), head_dim 64, Qwen2 with Q/K/V biases.
    "qwen2-mha-hd64-bias": dict(
        cls="qwen2", hidden_size=512, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=2500, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
}
PROMPT_LEN = 100
DECODE = 64


def build(name, spec, out, seed):
    spec = dict(spec)
    kind = spec.pop("cls")
    torch.manual_seed(seed)
    common = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16",
                  attn_implementation="eager", **spec)
    if kind == "llama":
        config = LlamaConfig(**common)
        cls = LlamaForCausalLM
    else:
        config = Qwen2Config(**common)
        cls = Qwen2ForCausalLM
    with torch.device("cuda"):
        model = cls(config).to(torch.bfloat16)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed" in pname else 1.0 / math.sqrt(p.shape[1])
                p.normal_(0.0, std)
            elif "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # biases
                p.normal_(0.0, 0.1)
    model.eval()
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    prompt = torch.randint(0, config.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
    ids = torch.tensor([prompt], device="cuda")
    logits_all = []
    tokens = []
    margins = []
    with torch.no_grad():
        out_ = model(input_ids=ids, use_cache=True)
        past = out_.past_key_values
        step_logits = out_.logits[0, -1].float()
        for step in range(DECODE + 1):
            logits_all.append(step_logits.cpu())
            top2 = torch.topk(step_logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            nxt = int(top2.indices[0])
            tokens.append(nxt)
            if step == DECODE:
                break
            out_ = model(input_ids=torch.tensor([[nxt]], device="cuda"), past_key_values=past, use_cache=True)
            past = out_.past_key_values
            step_logits = out_.logits[0, -1].float()
    torch.stack(logits_all).numpy().astype("<f4").tofile(os.path.join(d, "logits.f32"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"generator": f"transformers {__import__('transformers').__version__} eager bf16 on "
                                f"{torch.cuda.get_device_name()}",
                   "prompt": prompt, "tokens": tokens, "margins": margins, "vocab_size": config.vocab_size,
                   "steps": len(logits_all)}, f)
    print(f"{name}: {sum(p.numel() for p in model.parameters())/1e6:.1f}M parameters, "
          f"smallest top-2 margin {min(margins):.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    args = ap.parse_args()
    print(f"seed {args.seed}")
    for i, (name, spec) in enumerate(CASES.items()):
        build(name, spec, args.out, args.seed + 100 * i)


if __name__ == "__main__":
    main()
