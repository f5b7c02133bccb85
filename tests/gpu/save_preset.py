"""Saves a random-weight preset (the real shapes of a released Llama) as a Hugging Face BF16
safetensors checkpoint, built by transformers on the GPU. For the start-up measurement."""

import argparse
import os
import sys
import time

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../bench"))
from hf_eager import config_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config_of(args.preset))
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="5GB")
    print(f"saved {args.preset} to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
