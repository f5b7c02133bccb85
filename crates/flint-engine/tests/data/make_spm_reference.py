"""Builds spm_tokenizer.gguf and spm_reference.json: a SentencePiece-style (llama.cpp
`tokenizer.ggml.model == "llama"`) tokenizer in a tensor-free GGUF, and the ids that Hugging Face
transformers' own GGUF tokenizer conversion gives for a set of strings.

Run once in a throwaway venv with `sentencepiece gguf transformers tokenizers`:

    python make_spm_reference.py TRAINING_TEXT_FILE
"""

import io
import json
import os
import sys
import tempfile

import gguf
import sentencepiece as spm
from transformers import AutoTokenizer

here = os.path.dirname(os.path.abspath(__file__))
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    input=sys.argv[1], model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
    character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, user_defined_symbols=["<tool>"],
)
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
tokens, scores, types = [], [], []
for i in range(sp.get_piece_size()):
    tokens.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    if sp.is_unknown(i):
        types.append(2)
    elif sp.is_control(i):
        types.append(3)
    elif sp.is_byte(i):
        types.append(6)
    elif sp.is_unused(i):
        types.append(5)
    elif tokens[-1] == "<tool>":
        types.append(4)
    else:
        types.append(1)

path = os.path.join(here, "spm_tokenizer.gguf")
w = gguf.GGUFWriter(path, "llama")
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores(scores)
w.add_token_types(types)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_unk_token_id(0)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

tok = AutoTokenizer.from_pretrained(here, gguf_file="spm_tokenizer.gguf")
STRINGS = [
    "Hello world",
    " leading space and  double  spaces",
    "The year 2024 had 366 days.",
    "naïve café, Straße, 東京 and 🦀",
    "line one\nline two\ttab",
    "<s>already has bos</s> and <tool> inside",
    "",
]
cases = [{"text": s, "ids": tok(s)["input_ids"], "decoded": tok.decode(tok(s)["input_ids"], skip_special_tokens=True)} for s in STRINGS]
with open(os.path.join(here, "spm_reference.json"), "w") as f:
    json.dump({"generator": "transformers GGUF tokenizer conversion", "cases": cases}, f, indent=1, ensure_ascii=False)
for c in cases:
    print(c)
