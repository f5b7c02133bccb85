"""Summarises an `ncu --csv --page raw` export of decode steps (tests/gpu/profile-step.sh): the
kernels of each step (a step starts at flint_embedding), grouped by name and launch shape, with
their isolated time, DRAM traffic and its rate against the copy bandwidth (GB/s, argv[2])."""
import csv
import sys
from collections import OrderedDict


def main(path, bandwidth_gbs):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = rows[0]
    col = {name: i for i, name in enumerate(head)}
    data = [r for r in rows[2:] if len(r) == len(head)]  # rows[1] holds the units
    units = dict(zip(head, rows[1]))

    def num(r, name, scale_to=None):
        v = float(r[col[name]].replace(",", ""))
        u = units.get(name, "")
        if scale_to == "us":
            v *= {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(u, 1.0)
        if scale_to == "B":
            v *= {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(u, 1.0)
        return v

    steps = []
    for r in data:
        name = r[col["Kernel Name"]].split("(")[0]
        if name == "flint_embedding" or not steps:
            steps.append([])
        steps[-1].append((name, r))
    bw = float(bandwidth_gbs) if bandwidth_gbs else 0.0
    for i, step in enumerate(steps):
        groups = OrderedDict()
        for name, r in step:
            key = (name, r[col["launch__grid_size"]], r[col["launch__block_size"]])
            g = groups.setdefault(key, {"n": 0, "us": 0.0, "rd": 0.0, "wr": 0.0, "regs": r[col["launch__registers_per_thread"]]})
            g["n"] += 1
            g["us"] += num(r, "gpu__time_duration.sum", "us")
            g["rd"] += num(r, "dram__bytes_read.sum", "B")
            g["wr"] += num(r, "dram__bytes_write.sum", "B")
        total = sum(g["us"] for g in groups.values())
        print(f"step {i + 1}: {len(step)} kernels, {total:.1f} us with each kernel alone")
        print(f"  {'kernel':44} {'grid':>6} {'block':>5} {'regs':>4} {'n':>3} {'us each':>8} {'us all':>8} {'MB read':>8} {'GB/s':>6} {'of bw':>5}")
        for (name, grid, block), g in sorted(groups.items(), key=lambda kv: -kv[1]["us"]):
            each = g["us"] / g["n"]
            rate = (g["rd"] + g["wr"]) / (g["us"] * 1e-6) / 1e9 if g["us"] else 0.0
            frac = f"{rate / bw:.2f}" if bw else "-"
            print(f"  {name[:44]:44} {grid:>6} {block:>5} {g['regs']:>4} {g['n']:>3} {each:8.2f} {g['us']:8.1f} {g['rd'] / g['n'] / 1e6:8.2f} {rate:6.0f} {frac:>5}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
