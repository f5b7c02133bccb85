"""Builds tests/data/smollm2_reference.json: the independent reference for Flint's CPU engine.

Run once, outside the project, in a throwaway venv with `torch transformers gguf`:

    python tests/data/make_reference.py models/SmolLM2-135M-Instruct.Q4_1.gguf tests/data/smollm2_reference.json

It loads the GGUF through Hugging Face transformers' own GGUF loader (dequantized to f32), and
records the tokenizer's ids for a set of strings and greedy generations for raw and
chat-templated prompts, with each step's top-2 logit margin.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path = sys.argv[1]
out_path = sys.argv[2]
directory, name = os.path.split(os.path.abspath(gguf_path))

torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
model.eval()

TOKENIZER_STRINGS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "naïve café, Straße, 東京, emoji 🦀🔥 and ‘quotes’",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi<|im_end|>\n",
    "I'm sure they'll've done it, won't they?",
]

RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three most important inventions of the 20th century were",
]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain how photosynthesis works in a few sentences.",
    "Write a short story about a robot who learns to paint.",
]

N_NEW = 64


def greedy(ids):
    ids = torch.tensor([ids])
    out, margins = [], []
    past = None
    with torch.no_grad():
        for _ in range(N_NEW):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1]
            top = torch.topk(logits, 2)
            margins.append(float(top.values[0] - top.values[1]))
            nxt = int(top.indices[0])
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.tensor([[nxt]])
    return out, margins


cases = []
for p in RAW_PROMPTS:
    ids = tok(p, add_special_tokens=False)["input_ids"]
    gen, margins = greedy(ids)
    cases.append({"kind": "raw", "prompt": p, "prompt_token_ids": ids, "token_ids": gen, "margins": margins,
                  "text": tok.decode(gen)})
for p in CHAT_PROMPTS:
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    gen, margins = greedy(ids)
    cases.append({"kind": "chat", "prompt": p, "rendered": text, "prompt_token_ids": ids, "token_ids": gen,
                  "margins": margins, "text": tok.decode(gen)})

with torch.no_grad():
    ids = cases[0]["prompt_token_ids"]
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits, 10)

ref = {
    "model": name,
    "generator": "transformers %s, torch %s, float32, greedy" % (__import__("transformers").__version__, torch.__version__),
    "tokenizer": [{"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]} for s in TOKENIZER_STRINGS],
    "first_prompt_top10": {"ids": top.indices.tolist(), "logits": top.values.tolist()},
    "cases": cases,
}
with open(out_path, "w") as f:
    json.dump(ref, f, indent=1, ensure_ascii=False)
for c in cases:
    print(c["kind"], repr(c["prompt"]), len(c["token_ids"]), "min margin %.4f" % min(c["margins"]), repr(c["text"][:80]))
