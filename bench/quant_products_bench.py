"""Would weight-only int8 or int4 products make decode faster here? Measured against the kernels
the engine uses, on SmolLM2-135M's 210 layer weights, in one run.

    .venv/bin/python bench/quant_products_bench.py

Why ask: batch-1 decode reads every weight once per token, so fewer weight bytes should mean
proportionally less time, and the built-in SmolLM2 comes from a 4-bit GGUF (Q4_1: 32 weights per
block, one scale and one minimum each), which torch's int4 format (groups of 32, a scale and a
zero each) could hold without loss. Kernels compared, each over the 30 layers' q, k, v, o,
gate, up and down weights (random values, the served shapes), chained as one step would:

* ``F.linear`` fp32: the engine's default product (baseline of every ratio);
* packed bf16 (oneDNN ``_linear_pointwise`` on a weight reordered once): the opt-in
  ``decode_bf16_min_rows`` product;
* ``_weight_int8pack_mm`` (int8 weight, one scale per output row), bf16 and fp32 activations;
* ``_weight_int4pack_mm_for_cpu`` (int4 weight, groups of 32), fp32 activations: checked
  first to reproduce the Q4_1 dequantisation to fp32 rounding.

Rows 1, 4 and 16 (the decode batch), median of ``--runs`` chained passes.
"""

from __future__ import annotations

import argparse
import statistics
import time

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
GROUP = 32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rows", default="1,4,16")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = LAYER * 30
    fp32, bf16, int8, int8_scales, int4, int4_scales = [], [], [], [], [], []
    worst = 0.0
    for n, k in shapes:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        d = (torch.rand(n, k // GROUP) * 0.01 + 0.001).half().float()  # Q4_1 keeps fp16 scales and minima
        m = (-torch.rand(n, k // GROUP) * 0.05).half().float()
        w = q.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)  # Q4_1's dequantisation
        fp32.append(w)
        bf16.append(torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None))
        scale = w.abs().amax(dim=1) / 127
        int8.append(torch.round(w / scale[:, None]).to(torch.int8))
        int8_scales.append(scale)
        int4.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # torch's int4 reads w = (q - 8) * scale + zero, so zero = m + 8 d
        int4_scales.append(torch.stack([d.t(), (m + 8 * d).t()], dim=-1).contiguous())
        if len(fp32) <= 7:
            x = torch.randn(4, k)
            exact = x @ w.t()
            got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4[-1], GROUP, int4_scales[-1])
            worst = max(worst, float((got - exact).abs().max() / exact.abs().max()))
    weight_mb = sum(w.numel() for w in fp32) * 4 / 1e6
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {len(shapes)} SmolLM2-135M layer weights ({weight_mb:.0f} MB in fp32), "
          f"{args.threads} threads, median of {args.runs}; int4 against Q4_1's fp32 weights: max relative "
          f"error {worst:.1e}")

    def kernels(rows: int) -> dict:
        inputs = {k: torch.randn(rows, k) for k in (576, 1536)}
        narrow = {k: v.bfloat16() for k, v in inputs.items()}
        scales_bf16 = [s.bfloat16() for s in int8_scales]
        return {
            "F.linear fp32 (engine default)": lambda i, k: F.linear(inputs[k], fp32[i]),
            "packed bf16 (opt-in)": lambda i, k: torch.ops.mkldnn._linear_pointwise(narrow[k], bf16[i], None, "none",
                                                                                   [], ""),
            "int8 weights, bf16 activations": lambda i, k: torch.ops.aten._weight_int8pack_mm(narrow[k], int8[i],
                                                                                              scales_bf16[i]),
            "int8 weights, fp32 activations": lambda i, k: torch.ops.aten._weight_int8pack_mm(inputs[k], int8[i],
                                                                                              int8_scales[i]),
            "int4 weights (groups of 32), fp32 activations": lambda i, k: torch.ops.aten._weight_int4pack_mm_for_cpu(
                inputs[k], int4[i], GROUP, int4_scales[i]),
        }

    print("| rows | kernel | ms per step | speed-up over F.linear fp32 |")
    print("|---:|---|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        table = kernels(rows)
        times: dict[str, list[float]] = {name: [] for name in table}
        for product in table.values():
            for i, (_n, k) in enumerate(shapes):  # warm-up, and oneDNN's first-call setup
                product(i, k)
        for _ in range(args.runs):  # alternated run by run, so a slow moment hits every kernel
            for name, product in table.items():
                started = time.perf_counter()
                for i, (_n, k) in enumerate(shapes):
                    product(i, k)
                times[name].append(time.perf_counter() - started)
        base = statistics.median(times["F.linear fp32 (engine default)"])
        for name, spent in times.items():
            median = statistics.median(spent)
            print(f"| {rows} | {name} | {median * 1e3:.1f} | {base / median:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
