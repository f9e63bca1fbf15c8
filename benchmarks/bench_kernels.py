"""Speed of the Triton kernels on a GPU against their PyTorch fallbacks and PyTorch's scaled_dot_product_attention
(flash backend), over Llama shapes from 3.2 1B to 3 70B and contexts from 128 to 32k, in bfloat16.

    python benchmarks/bench_kernels.py                  # every shape; prints markdown tables for the README
    python benchmarks/bench_kernels.py --quick          # two models, three contexts
    python benchmarks/bench_kernels.py --sweep          # also try other tile sizes, to tune the defaults

RMSNorm and decode attention are memory-bound: GB/s, and the fraction of the bandwidth that a large
device-to-device copy reaches here. Prefill attention is compute-bound: TFLOP/s (causal: 2 s^2 d per head),
against a large bfloat16 matmul and against SDPA's flash backend. Decode times are per layer, for one new
token, replayed in a CUDA graph over as many layers' caches as a model has (at least 512 MB of them, so the
L2 cache does not hold them); eager times, with Python's launch overhead, are shown beside them. Every row also
checks the kernel's output against the fallback's. On a machine without CUDA it says so and exits with 0.
"""

import argparse
import math
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # name: (dim, n_heads, n_kv_heads, n_layers)
    "3.2-1B": (2048, 32, 8, 16),
    "3.2-3B": (3072, 24, 8, 28),
    "3.1-8B": (4096, 32, 8, 32),
    "3-70B": (8192, 64, 8, 80),
}
CONTEXTS = [128, 512, 2048, 4096, 8192, 16384, 32768]
NORM_ROWS = [1, 32, 4096, 16384]  # decode at batch 1 and 32, prefill of 4k and 16k tokens
DTYPE = torch.bfloat16
MAX_ERROR = 0.02  # a few bfloat16 ulps; a wrong tile or mask is far off
GiB = 1 << 30


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds, L2 flushed before each run (Triton's do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn replayed as a CUDA graph: GPU time without Python's launch overhead."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read plus write): the reachable HBM bandwidth."""
    src = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * GiB / (ms * 1e-3)


def matmul_flops() -> float:
    """FLOP per second of an 8192^3 bfloat16 matmul: the reachable tensor-core throughput."""
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3)


def max_error(a: torch.Tensor, b: torch.Tensor) -> str:
    """Largest difference relative to 1 + |b|: rounding flips of bfloat16 stay near 0.004 at any scale."""
    err = ((a.float() - b.float()).abs() / (1 + b.float().abs())).max().item()
    return f"{err:.4f}" + ("" if err <= MAX_ERROR else " MISMATCH")


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Callable[[], torch.Tensor]:
    """SDPA with the flash backend on (bs, heads, seq, hd) tensors, GQA included; raises if it cannot run."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    run()  # fails here, not in the middle of a timing, if the backend refuses these inputs
    return run


def rms_norm_row(name: str, rows: int, bandwidth: float) -> str:
    from llama_kernels import fallback, triton_ops

    dim = MODELS[name][0]
    x = torch.randn(rows, dim, dtype=DTYPE, device="cuda")
    w = torch.randn(dim, dtype=DTYPE, device="cuda")
    bytes_moved = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()  # read x, write y
    t_triton = bench(partial(triton_ops.rms_norm, x, w, 1e-5))
    t_torch = bench(partial(fallback.rms_norm, x, w, 1e-5))
    gbs = bytes_moved / (t_triton * 1e-3)
    err = max_error(triton_ops.rms_norm(x, w, 1e-5), fallback.rms_norm(x, w, 1e-5))
    return (
        f"| {name} | {rows} x {dim} | {t_triton * 1e3:.1f} | {gbs / 1e9:.0f} | {gbs / bandwidth:.0%} "
        f"| {t_torch * 1e3:.1f} | {t_torch / t_triton:.2f}x | {err} |"
    )


def decode_caches(bs: int, ctx: int, n_kv: int, hd: int, n_layers: int) -> list[tuple[torch.Tensor, ...]]:
    """K, V views of ctx positions for enough layers that they outgrow L2, laid out as llama/model.py lays
    them out: (bs, n_kv_heads, max_seq_len, head_dim) buffers, seen as (bs, ctx, n_kv_heads, head_dim)."""
    per_layer = 2 * bs * ctx * n_kv * hd * DTYPE.itemsize
    count = max(1, min(1024, max(n_layers, math.ceil(GiB / 2 / per_layer)), 16 * GiB // per_layer))
    caches = []
    for _ in range(count):
        k = torch.randn(bs, n_kv, ctx, hd, dtype=DTYPE, device="cuda")
        v = torch.randn(bs, n_kv, ctx, hd, dtype=DTYPE, device="cuda")
        caches.append((k.transpose(1, 2), v.transpose(1, 2)))
    return caches


def every_layer(
    attn: Callable, q: torch.Tensor, caches: list, start_pos: int, **kwargs
) -> Callable[[], list]:
    """One decode step's attention for every layer's cache, as a model runs it."""
    return lambda: [attn(q, k, v, start_pos, **kwargs) for k, v in caches]


def decode_row(name: str, bs: int, ctx: int, bandwidth: float) -> str:
    from llama_kernels import fallback, triton_ops

    dim, n_heads, n_kv, n_layers = MODELS[name]
    hd = dim // n_heads
    caches = decode_caches(bs, ctx, n_kv, hd, n_layers)
    q = torch.randn(bs, 1, n_heads, hd, dtype=DTYPE, device="cuda")
    pos, n = ctx - 1, len(caches)
    t_triton = bench_graph(every_layer(triton_ops.attention, q, caches, pos)) / n
    t_eager = bench(every_layer(triton_ops.attention, q, caches, pos)) / n
    t_torch = bench_graph(every_layer(fallback.attention, q, caches, pos)) / n
    try:
        flash = [
            sdpa_flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), False) for k, v in caches
        ]
        t_sdpa = f"{bench_graph(lambda: [f() for f in flash]) / n * 1e3:.1f}"
    except RuntimeError as e:  # the flash backend may refuse GQA or a shape
        t_sdpa = f"n/a ({str(e).splitlines()[0][:40]})"
    bytes_moved = 2 * bs * ctx * n_kv * hd * DTYPE.itemsize + 2 * q.numel() * q.element_size()
    gbs = bytes_moved / (t_triton * 1e-3)
    k, v = caches[0]
    err = max_error(triton_ops.attention(q, k, v, pos), fallback.attention(q, k, v, pos))
    return (
        f"| {name} | {bs} | {ctx} | {t_triton * 1e3:.1f} | {gbs / 1e9:.0f} | {gbs / bandwidth:.0%} "
        f"| {t_eager * 1e3:.1f} | {t_torch * 1e3:.1f} | {t_sdpa} | {err} |"
    )


def prefill_inputs(ctx: int, n_heads: int, n_kv: int, hd: int) -> tuple[torch.Tensor, ...]:
    q = torch.randn(1, ctx, n_heads, hd, dtype=DTYPE, device="cuda")
    k = torch.randn(1, n_kv, ctx, hd, dtype=DTYPE, device="cuda").transpose(1, 2)  # the model's cache layout
    v = torch.randn(1, n_kv, ctx, hd, dtype=DTYPE, device="cuda").transpose(1, 2)
    return q, k, v


def prefill_flops(ctx: int, n_heads: int, hd: int) -> int:
    return 2 * ctx * ctx * hd * n_heads  # QK^T and PV at 2 FLOP a multiply-add, half of them masked


def prefill_row(name: str, ctx: int, peak_flops: float) -> str:
    from llama_kernels import fallback, triton_ops

    dim, n_heads, n_kv, _ = MODELS[name]
    hd = dim // n_heads
    q, k, v = prefill_inputs(ctx, n_heads, n_kv, hd)
    t_triton = bench(partial(triton_ops.attention, q, k, v, 0))
    t_torch = bench(partial(fallback.attention, q, k, v, 0))
    try:
        t_sdpa = bench(sdpa_flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True))
        sdpa_cols = f"{t_sdpa / t_triton:.0%} | {t_sdpa:.3f}"
    except RuntimeError as e:
        sdpa_cols = f"n/a | n/a ({str(e).splitlines()[0][:40]})"
    tflops = prefill_flops(ctx, n_heads, hd) / (t_triton * 1e-3)
    err = max_error(triton_ops.attention(q, k, v, 0), fallback.attention(q, k, v, 0))
    return (
        f"| {name} | {ctx} | {t_triton:.3f} | {tflops / 1e12:.0f} | {tflops / peak_flops:.0%} | {sdpa_cols} "
        f"| {t_torch:.3f} | {err} |"
    )


PREFILL_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)]
PREFILL_CONFIGS += [(64, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 2), (64, 32, 4, 4)]
DECODE_CONFIGS = [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 2)]
PROGRAMS_PER_SM = [1, 2, 4]


def sweep_prefill_row(name: str, ctx: int) -> str:
    from llama_kernels.triton_attention import attention_prefill

    dim, n_heads, n_kv, _ = MODELS[name]
    hd = dim // n_heads
    q, k, v = prefill_inputs(ctx, n_heads, n_kv, hd)
    cells = []
    for config in PREFILL_CONFIGS:
        try:
            ms = bench(partial(attention_prefill, q, k, v, 0, config=config))
            cells.append(f"{prefill_flops(ctx, n_heads, hd) / (ms * 1e-3) / 1e12:.0f}")
        except Exception as e:  # out of shared memory or registers with this config
            cells.append(type(e).__name__)
    return f"| {name} | {ctx} | " + " | ".join(cells) + " |"


def sweep_decode_row(name: str, ctx: int, bandwidth: float) -> str:
    from llama_kernels.triton_attention import attention_decode

    dim, n_heads, n_kv, n_layers = MODELS[name]
    hd = dim // n_heads
    caches = decode_caches(1, ctx, n_kv, hd, n_layers)
    q = torch.randn(1, 1, n_heads, hd, dtype=DTYPE, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bytes_moved = 2 * ctx * n_kv * hd * DTYPE.itemsize
    cells = []
    for config in DECODE_CONFIGS:
        for per_sm in PROGRAMS_PER_SM:
            # The launcher's rule with per_sm programs per SM instead of 2.
            block_n = config[0]
            split = math.ceil(math.ceil(ctx / math.ceil(per_sm * sms / n_kv)) / block_n) * block_n
            step = every_layer(attention_decode, q, caches, ctx - 1, split_len=split, config=config)
            try:
                ms = bench_graph(step) / len(caches)
                cells.append(f"{bytes_moved / (ms * 1e-3) / bandwidth:.0%}")
            except Exception as e:
                cells.append(type(e).__name__)
    return f"| {name} | {ctx} | " + " | ".join(cells) + " |"


def table(title: str, header: list[str], rows) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print(row, flush=True)
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="two models (1B, 70B), contexts 512, 4096, 16384"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also time other tile sizes, to tune the defaults"
    )
    parser.add_argument("--decode_batch", type=int, nargs="+", default=[1], help="batch sizes for decode")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_kernels.py needs CUDA: no GPU is visible to PyTorch here, so there is nothing to measure."
        )
        return 0

    import triton

    models = ["3.2-1B", "3-70B"] if args.quick else list(MODELS)
    contexts = [512, 4096, 16384] if args.quick else CONTEXTS
    props = torch.cuda.get_device_properties(0)
    bandwidth, peak = copy_bandwidth(), matmul_flops()
    print(f"## Kernel benchmark on {props.name} ({props.multi_processor_count} SMs)\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}.")
    print(f"Measured: 1 GiB copy {bandwidth / 1e9:.0f} GB/s; 8192^3 bf16 matmul {peak / 1e12:.0f} TFLOP/s.")
    table(
        "RMSNorm (bfloat16 activations and weight)",
        ["model", "rows x hidden", "triton µs", "GB/s", "of copy bw", "torch µs", "speedup", "max rel err"],
        (rms_norm_row(name, rows, bandwidth) for name in models for rows in NORM_ROWS),
    )
    table(
        "Decode attention (one new token over the KV cache, per layer, CUDA graph)",
        ["model", "bs", "context", "triton µs", "GB/s", "of copy bw", "triton eager µs", "torch µs"]
        + ["sdpa flash µs", "max rel err"],
        (decode_row(n, bs, ctx, bandwidth) for n in models for bs in args.decode_batch for ctx in contexts),
    )
    table(
        "Prefill attention (a prompt of `context` tokens at start_pos 0, batch 1, causal)",
        ["model", "context", "triton ms", "TFLOP/s", "of matmul peak", "of sdpa flash", "sdpa flash ms"]
        + ["torch ms", "max rel err"],
        (prefill_row(name, ctx, peak) for name in models for ctx in contexts),
    )
    if args.sweep:
        table(
            "Sweep: prefill TFLOP/s by config (BLOCK_M, BLOCK_N, num_warps, num_stages)",
            ["model", "context"] + [str(c) for c in PREFILL_CONFIGS],
            (sweep_prefill_row(name, ctx) for name in ("3.2-1B", "3-70B") for ctx in (4096, 16384)),
        )
        table(
            "Sweep: decode fraction of copy bw by config (BLOCK_N, num_warps, num_stages) x programs per SM",
            ["model", "context"] + [f"{c} x{p}" for c in DECODE_CONFIGS for p in PROGRAMS_PER_SM],
            (sweep_decode_row(name, ctx, bandwidth) for name in ("3.2-1B", "3-70B") for ctx in (4096, 32768)),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
