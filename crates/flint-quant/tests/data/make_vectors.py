"""Writes ggml_vectors.json: random blocks of every ggml type Flint decodes, with the values
that the reference `gguf` Python package (gguf.quants.dequantize) decodes them to.

Run once in a throwaway venv with `pip install gguf numpy`:

    python make_vectors.py ggml_vectors.json
"""

import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

rng = np.random.default_rng(20261121)

# Byte offsets of the f16 scale fields in each block, which must hold finite values.
HALF_FIELDS = {
    T.F16: [], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}

out = []
for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
           T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
    block_size, type_size = GGML_QUANT_SIZES[ty]
    n_blocks = 4 if block_size > 1 else 64
    if ty == T.F32:
        raw = rng.standard_normal(n_blocks).astype("<f4").tobytes()
    elif ty == T.F16:
        raw = rng.standard_normal(n_blocks).astype("<f2").tobytes()
    elif ty == T.BF16:
        raw = (rng.standard_normal(n_blocks).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    else:
        blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for off in HALF_FIELDS[ty]:
            scales = (rng.standard_normal(n_blocks) * 0.05).astype("<f2").view(np.uint8).reshape(n_blocks, 2)
            blocks[:, off:off + 2] = scales
        raw = blocks.tobytes()
    data = np.frombuffer(raw, dtype=np.uint8)
    values = dequantize(data, ty).astype(np.float32).reshape(-1)
    assert values.size == n_blocks * block_size
    out.append({
        "type": ty.name,
        "id": int(ty),
        "n_elements": int(values.size),
        "bytes_hex": raw.hex(),
        "values": [float(v) for v in values],
    })

with open(sys.argv[1], "w") as f:
    json.dump(out, f)
print("wrote", len(out), "types")
