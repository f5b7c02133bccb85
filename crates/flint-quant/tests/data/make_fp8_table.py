"""Reference FP8 table from PyTorch: the value of every E4M3 (float8_e4m3fn) and E5M2 code, and
PyTorch's cast (round to nearest even) of probe values around every code, at the midpoints
between neighbours (ties), in the subnormal range and out of range. Writes fp8_table.json."""

import json
import math

import torch


def probes(values):
    out = set()
    finite = sorted(v for v in values if math.isfinite(v))
    for a, b in zip(finite, finite[1:]):
        mid = (a + b) / 2
        for v in (a, b, mid, math.nextafter(mid, -math.inf), math.nextafter(mid, math.inf)):
            out.add(float(torch.tensor(v, dtype=torch.float32)))
    top = finite[-1]
    for v in (top * 1.01, top * 1.05, top * 1.07, top * 2, 1e30, 3.4e38, 1e-30, 1e-45, 0.0):
        out.add(float(torch.tensor(v, dtype=torch.float32)))
        out.add(-float(torch.tensor(v, dtype=torch.float32)))
    return sorted(out)


def table(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    values = codes.to(torch.float32).tolist()
    xs = probes(values)
    enc = torch.tensor(xs, dtype=torch.float32).to(dtype).view(torch.uint8).tolist()
    # JSON has no infinities: they are written as the strings "inf" and "-inf".
    return {
        "decode": [None if math.isnan(v) else (v if math.isfinite(v) else ("inf" if v > 0 else "-inf")) for v in values],
        "encode": [[x, c] for x, c in zip(xs, enc)],
    }


json.dump({"generator": f"torch {torch.__version__}", "e4m3": table(torch.float8_e4m3fn),
           "e5m2": table(torch.float8_e5m2)}, open("fp8_table.json", "w"))
