"""Generation speed of a Meta model shape with random weights (no download), against transformers and
against the memory-bandwidth roofline, in one table.

    python benchmarks/bench_generate.py --model llama3.2-1b --repeats 5          # the README's table
    python benchmarks/bench_generate.py --model llama3-8b --layers 2 --repeats 1  # a quick look at a big shape

Measures, for each system and batch size: time to first token and prefill tokens/s for a prompt of
--prompt_len tokens, decode tokens/s over --new_tokens tokens (greedy), and peak memory. Systems: "ours"
(Transformer.forward with the KV cache, one token at a time with last_only, argmax, as Llama.generate
does), "compiled" (llama.fast.compile_decode), "graphs" (CUDA graphs, llama.fast.cuda_graph_decode; GPU
only), "int8" and "int4" (llama.quantize) and each with "+compiled" and "+graphs", each built as Llama.build
builds it (llama.cpu.choose_cpu_matmul on a CPU); "F.linear" (ours with every product left to PyTorch's F.linear, as
gpt-fast's eager decoding and transformers run them); "hf" (transformers' LlamaForCausalLM holding the
same weights, through its own generate, greedy, min_new_tokens = max_new_tokens); "meta" (Meta's reference
model, llama_models.llama3.model from the llama-models package, same weights, driven by the loop "ours"
runs; it computes logits for every prompt position, as it does in Meta's generate); and "generate"
(Llama.generate, timed against ours' bare loop). Also measures the memory bandwidth this machine reaches
reading a large weight matrix, which bounds decoding: each token reads every weight once, so tokens/s <=
bandwidth / bytes read per step. Prints the CPU and the matrix-product path the library chose per shape.
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.checkpoint import model_args  # noqa: E402
from llama.cpu import PackedExperts, PackedLinear, choose_cpu_matmul, packed_linear  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.moe import MoE  # noqa: E402
from llama.tiny import random_state_dict  # noqa: E402

# params.json of Meta's releases. Llama 3.2 1B and 3B tie the output projection to the embedding.
SHAPES = {
    "llama2-7b": dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-05, vocab_size=32000),
    "llama2-13b": dict(dim=5120, multiple_of=256, n_heads=40, n_layers=40, norm_eps=1e-05, vocab_size=32000),
    "llama3-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0,
    ),
    "llama3.1-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True,
    ),
    "llama3.1-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
        ffn_dim_multiplier=1.3, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True,
    ),
    "llama3.2-1b": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
        multiple_of=256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True,
    ),
    "llama3.2-3b": dict(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.0,
        multiple_of=256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True,
    ),
    # Llama 4 Scout's layout scaled down to fit this kind of machine beside transformers' copy: 16 experts, top-1,
    # a shared expert, MoE in every layer, NoPE every 4th layer, chunked attention, QK norm, scaled RoPE (Scout:
    # dim 5120, 48 layers, 40 heads, F 8192, vocab 202048). A 32K vocabulary, so that the output projection
    # takes about the share of a step it takes in Scout, not most of it.
    "llama4-scout-small": dict(
        dim=2048, n_layers=4, n_heads=16, n_kv_heads=8, vocab_size=32768, multiple_of=256, ffn_dim_multiplier=1.2,
        ffn_exp=4.0, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True,
        moe_args=dict(num_experts=16, top_k=1, interleave_moe_layer_step=1), nope_layer_interval=4,
        use_qk_norm=True, attention_chunk_size=8192, attn_temperature_tuning=True,
    ),
}  # fmt: skip
TIED = ("llama3.2-1b", "llama3.2-3b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- Timing and memory -------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class RunMemory:
    """Bytes a run adds on top of what was resident before it (activations, caches that grow)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:  # reset the process's peak RSS (Linux)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.extra = max(0, peak_rss() - self.base)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers (shared ones counted once)."""
    seen, total = set(), packed_bytes(module)
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def packed_bytes(module: torch.nn.Module, batch: int = 0) -> int:
    """Bytes of llama.cpu's packed weights (oneDNN tensors: no storage to look at, and not parameters); with a
    batch, those of the experts that many tokens can be routed to (top_k each), the active ones."""
    total = sum(m.packed.numel() * m.packed.element_size() for m in module.modules() if isinstance(m, PackedLinear))
    for m in module.modules():
        if isinstance(m, MoE) and isinstance(m.experts, PackedExperts):
            per_expert = sum(p.numel() * p.element_size() for p in m.experts.packed[0])
            total += per_expert * (len(m.experts.packed) if not batch else min(len(m.experts.packed), batch * m.top_k))
    return total


@dataclass
class Timing:
    ttft: list = field(default_factory=list)  # seconds from the prompt to the first new token, per run
    steps: list = field(default_factory=list)  # seconds of each decode step after the first token, all runs
    total: list = field(default_factory=list)  # seconds of each whole run
    extra_mem: list = field(default_factory=list)


# -- The systems ----------------------------------------------------------------------------------------------------


def build_ours(args: ModelArgs, state: dict, device: torch.device, dtype: torch.dtype) -> Transformer:
    """As llama.checkpoint.build_transformer, from a state dict in memory: the tensors themselves, no copy."""
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if "output.weight" not in state or state["output.weight"] is state["tok_embeddings.weight"]:
        model.output.weight = model.tok_embeddings.weight
    model.setup_caches(device, dtype)
    return model.eval()


def build_meta(args: ModelArgs, state: dict, device: torch.device, dtype: torch.dtype):
    """Meta's reference Transformer (llama_models.llama3.model) holding the same weights. Its KV cache and
    RoPE table are plain attributes, made here on the device, as its own __init__ would without .cuda()."""
    from llama_models.llama3 import model as meta

    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    params |= {k: getattr(args, k) for k in ("multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")}
    margs = meta.ModelArgs(**params, use_scaled_rope=args.use_scaled_rope, max_seq_len=args.max_seq_len,
                           max_batch_size=args.max_batch_size)  # fmt: skip
    with torch.device("meta"):
        model = meta.Transformer(margs)
    w = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    w.setdefault("output.weight", w["tok_embeddings.weight"])  # tied: the same tensor
    model.load_state_dict(w, strict=True, assign=True)
    head_dim = args.dim // args.n_heads
    for layer in model.layers:
        attn = layer.attention
        shape = (args.max_batch_size, args.max_seq_len, attn.n_local_kv_heads, head_dim)
        attn.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        attn.cache_v = torch.zeros(shape, device=device, dtype=dtype)
    with torch.device(device):
        model.freqs_cis = meta.precompute_freqs_cis(
            head_dim, args.max_seq_len * 2, args.rope_theta, args.use_scaled_rope
        )
    return model.eval()


def meta_step_fn(model: torch.nn.Module) -> Callable:
    def step(tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return model(tokens, start_pos)[:, -1:].argmax(dim=-1)

    return step


def ours_step_fn(model: Callable) -> Callable:
    def step(tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return model(tokens, start_pos, last_only=True)[:, -1].argmax(dim=-1, keepdim=True)

    return step


def run_ours(step: Callable, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, list]:
    """The generation loop's work: prefill with last_only, then one token at a time through the KV cache.
    Returns (seconds to the first token, seconds of each later step)."""
    bsz, n = prompt.shape
    steps = []
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        token = step(prompt, 0)  # (bs, 1)
        sync(device)
        ttft = time.perf_counter() - t0
        for pos in range(n, n + new_tokens - 1):
            t = time.perf_counter()
            token = step(token, pos)
            sync(device)
            steps.append(time.perf_counter() - t)
    return ttft, steps


def build_hf(args: ModelArgs, state: dict, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM (Llama4ForCausalLM for a Llama 4 shape) holding the same weights (shared
    with `state` where the layout agrees)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_reference import hf_llama4, permute_for_hf

    if args.moe_args is not None:
        with torch.device(device):
            return hf_llama4(args, state, dtype)

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = dict(
            rope_type="llama3", rope_theta=args.rope_theta, factor=args.rope_scaling_factor,
            low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192,
        )  # fmt: skip
    tied = "output.weight" not in state
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=max(args.max_seq_len, 131072),
        rms_norm_eps=args.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    w = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    hf = {"model.embed_tokens.weight": w["tok_embeddings.weight"], "model.norm.weight": w["norm.weight"]}
    hf["lm_head.weight"] = w["tok_embeddings.weight"] if tied else w["output.weight"]
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf[h + "self_attn.q_proj.weight"] = permute_for_hf(w[m + "attention.wq.weight"], args.n_heads)
        hf[h + "self_attn.k_proj.weight"] = permute_for_hf(w[m + "attention.wk.weight"], args.n_kv_heads)
        hf[h + "self_attn.v_proj.weight"] = w[m + "attention.wv.weight"]
        hf[h + "self_attn.o_proj.weight"] = w[m + "attention.wo.weight"]
        hf[h + "mlp.gate_proj.weight"] = w[m + "feed_forward.w1.weight"]
        hf[h + "mlp.up_proj.weight"] = w[m + "feed_forward.w3.weight"]
        hf[h + "mlp.down_proj.weight"] = w[m + "feed_forward.w2.weight"]
        hf[h + "input_layernorm.weight"] = w[m + "attention_norm.weight"]
        hf[h + "post_attention_layernorm.weight"] = w[m + "ffn_norm.weight"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(hf, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were built on the meta device
    return model.eval()


def run_hf(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, list]:
    """transformers' own generate; a logits processor notes when each step's logits are ready."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync(device)
            stamps.append(time.perf_counter())
            return scores

    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([Stamp()]),
    )
    sync(device)
    t2 = time.perf_counter()
    assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
    assert len(stamps) == new_tokens and t2 > stamps[-1]
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def run_llama_generate(llama, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Llama.generate, greedy, over the same prompt: total seconds."""
    tokens = prompt.tolist()
    sync(device)
    t0 = time.perf_counter()
    out, _ = llama.generate(tokens, max_gen_len=new_tokens, temperature=0)
    sync(device)
    assert all(len(t) == new_tokens for t in out), [len(t) for t in out]
    return time.perf_counter() - t0


def make_llama(model: Transformer):
    """A Llama object over the model, with a byte-level tokenizer and no stop tokens (None if not importable)."""
    try:
        from llama.generation import Llama
        from llama.tiny import write_byte_tokenizer
        from llama.tokenizer import Tokenizer
    except ImportError:
        return None
    path = Path(tempfile.mkdtemp()) / "tokenizer.model"
    write_byte_tokenizer(path)
    llama = Llama(model, Tokenizer(str(path)))
    llama.stop_tokens = []  # random weights: never stop early, so every run makes new_tokens tokens
    return llama


# -- Roofline ------------------------------------------------------------------------------------------------------


def bandwidth_probes(dtype: torch.dtype, device: torch.device, gib: float = 1.0) -> dict[str, float]:
    """GB/s reading `gib` GiB: a plain sum in float32, and a matrix-vector product over a weight matrix of
    that size in `dtype` (through each CPU matmul path); caches are far smaller than the buffers."""
    results = {}
    n = int(gib * 2**30)

    def timed(fn: Callable, nbytes: int) -> float:  # the fastest of three reads, after a warm-up
        fn()
        seconds = []
        for _ in range(3):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            seconds.append(time.perf_counter() - t)
        return nbytes / min(seconds) / 1e9

    buf = torch.ones(n // 4, dtype=torch.float32, device=device)
    results["sum float32"] = timed(buf.sum, n)
    del buf
    k = 2048
    weight = torch.ones(n // torch.finfo(dtype).bits * 8 // k, k, dtype=dtype, device=device)
    x = torch.ones(1, k, dtype=dtype, device=device)
    nbytes = weight.numel() * weight.element_size()
    name = f"GEMV {str(dtype).removeprefix('torch.')}"
    if device.type == "cpu":
        results[name + " oneDNN"] = timed(lambda: F.linear(x, weight), nbytes)  # PyTorch's default
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        results[name + " packed"] = timed(lambda: packed_linear(x, packed), nbytes)  # llama.cpu's
        del packed
        # ATen's own kernel, which PyTorch reaches only with oneDNN switched off for the whole process (the
        # library never does that); a bound on what this CPU can read, taken here in the benchmark's process.
        torch.backends.mkldnn.enabled = False
        try:
            results[name + " ATen"] = timed(lambda: F.linear(x, weight), nbytes)
        finally:
            torch.backends.mkldnn.enabled = True
    else:
        results[name] = timed(lambda: F.linear(x, weight), nbytes)
    return results


def bytes_per_step(model: torch.nn.Module, args: ModelArgs, batch: int, context: int, kv_dtype: torch.dtype) -> int:
    """Bytes one decode step reads: every weight but the embedding table (one row per token) and the experts no
    token is routed to (Llama 4: at most batch x top_k of them per layer), plus the KV cache."""
    embedding = model.tok_embeddings.weight
    seen, total = {embedding.untyped_storage().data_ptr()}, packed_bytes(model, batch)
    moe = args.moe_args
    active = min(moe.num_experts, batch * moe.top_k) / moe.num_experts if moe else 1.0
    if getattr(model.output, "weight", None) is embedding:
        seen = set()  # tied: the output projection reads the whole table
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "cache" in name or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.numel() * t.element_size() * (active if ".experts." in name else 1)
    head_dim = args.dim // args.n_heads
    kv = 2 * args.n_layers * args.n_kv_heads * head_dim * context * kv_dtype.itemsize
    return int(total + batch * kv + batch * args.dim * embedding.element_size())


# -- Main ------------------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            have = next(line for line in f if line.startswith("flags")).split()
        flags = " ".join(
            f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in have
        )
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} logical cores ({flags}), {mem:.0f} GiB RAM; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (quick runs)")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--batch_sizes", default="1,4")
    p.add_argument(
        "--systems",
        default="ours,compiled,int8,int8+compiled,int4,int4+compiled,F.linear,hf,meta,generate",
        help="any of ours,compiled,graphs,int8,int8+compiled,int8+graphs,int4,int4+compiled,int4+graphs,F.linear,"
        "hf,meta,generate (Llama.generate "
        "against the bare loop); graphs (CUDA graphs, llama.fast.cuda_graph_decode) only on a GPU",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system and batch size (medians)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="default", choices=["default", *DTYPES])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()

    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    from llama.generation import default_dtype

    dtype = default_dtype(device) if opts.dtype == "default" else DTYPES[opts.dtype]
    systems = opts.systems.split(",")
    batches = [int(b) for b in opts.batch_sizes.split(",")]
    params = dict(SHAPES[opts.model])
    if opts.layers:
        params["n_layers"] = opts.layers
    # as params.json is read: the Llama 3.2 1B/3B shapes get their RoPE factor of 32
    args = model_args(params, max_seq_len=opts.prompt_len + opts.new_tokens, max_batch_size=max(batches))

    from llama.generation import init_distributed

    init_distributed(1, device)
    load0 = os.getloadavg()
    t = time.perf_counter()
    state = random_state_dict(args, seed=opts.seed, std=0.02, dtype=dtype, tied=opts.model in TIED, device=device)
    print(f"# random {opts.model} weights ({args.n_layers} layers, {dtype}) in {time.perf_counter() - t:.0f} s")

    built: dict[str, object] = {}
    step_fns: dict[str, Callable] = {}
    compile_s: dict[str, float] = {}
    t = time.perf_counter()
    ours = choose_cpu_matmul(build_ours(args, state, device, dtype))  # as Llama.build does
    chose_s = time.perf_counter() - t
    if "ours" in systems or "generate" in systems:
        built["ours"] = ours
        step_fns["ours"] = ours_step_fn(ours)
    from llama.fast import compile_decode, cuda_graph_decode
    from llama.quantize import quantize_model

    for mode in ("int8", "int4"):  # each built as Llama.build builds it
        if mode in systems:
            built[mode] = choose_cpu_matmul(quantize_model(build_ours(args, state, device, dtype), mode))
            step_fns[mode] = ours_step_fn(built[mode])
        if mode + "+compiled" in systems:
            built[mode + "+compiled"] = choose_cpu_matmul(quantize_model(build_ours(args, state, device, dtype), mode))
            step_fns[mode + "+compiled"] = ours_step_fn(compile_decode(built[mode + "+compiled"]))
    if "compiled" in systems:
        built["compiled"] = choose_cpu_matmul(build_ours(args, state, device, dtype))
        step_fns["compiled"] = ours_step_fn(compile_decode(built["compiled"]))
    for name in ("graphs", "int8+graphs", "int4+graphs"):
        if name in systems and device.type == "cuda":
            mode = name.split("+")[0] if "+" in name else None
            built[name] = quantize_model(build_ours(args, state, device, dtype), mode)
            step_fns[name] = ours_step_fn(cuda_graph_decode(built[name]))
    if "F.linear" in systems:
        built["F.linear"] = build_ours(args, state, device, dtype)  # same weights, own cache
        step_fns["F.linear"] = ours_step_fn(built["F.linear"])
    if "hf" in systems:
        built["hf"] = build_hf(args, state, device, dtype)
    if "meta" in systems and args.moe_args is not None:
        print("# meta left out: the peer is Meta's Llama 3 reference model; its Llama 4 one runs only on CUDA")
    elif "meta" in systems:
        built["meta"] = build_meta(args, state, device, dtype)
        step_fns["meta"] = meta_step_fn(built["meta"])
    llama = make_llama(ours) if "generate" in systems else None

    probes: list[dict[str, float]] = []
    timings: dict[tuple[str, int], Timing] = {}
    gen_times: dict[int, list] = {}
    prompts = {b: torch.randint(0, args.vocab_size, (b, opts.prompt_len), device=device) for b in batches}
    all_names = ("ours", "compiled", "graphs", "int8", "int8+compiled", "int8+graphs", "int4", "int4+compiled",
                 "int4+graphs", "F.linear", "hf", "meta")  # fmt: skip
    names = [s for s in all_names if s in built]

    def run(name: str, b: int, new_tokens: int) -> tuple[float, float]:
        if name == "hf":
            return run_hf(built["hf"], prompts[b], new_tokens, device)
        return run_ours(step_fns[name], prompts[b], new_tokens, device)

    # Warm up (and compile) on every shape, then interleave the systems so that noise hits them alike.
    for name in list(names):
        t = time.perf_counter()
        try:
            for b in batches:
                run(name, b, 3)
        except Exception as e:  # one system failing (a compiler error, say) leaves the others' figures
            print(f"# {name} failed and is left out: {type(e).__name__}: {str(e).strip()[:500]}", flush=True)
            names.remove(name)
            continue
        if "compiled" in name or "graphs" in name:
            compile_s[name] = time.perf_counter() - t
        print(f"  {name}: warmed up in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    for r in range(opts.repeats):
        probes.append(bandwidth_probes(dtype, device))
        for b in batches:
            for name in names[r % len(names) :] + names[: r % len(names)]:  # a different system goes first
                with RunMemory(device) as mem:
                    t = time.perf_counter()
                    ttft, steps = run(name, b, opts.new_tokens)
                    total = time.perf_counter() - t
                timing = timings.setdefault((name, b), Timing())
                timing.ttft.append(ttft)
                timing.steps.extend(steps)
                timing.total.append(total)
                timing.extra_mem.append(mem.extra)
                print(f"  {name}, batch {b}: {total:.1f} s", file=sys.stderr, flush=True)
            if llama is not None:
                gen_times.setdefault(b, []).append(run_llama_generate(llama, prompts[b], opts.new_tokens, device))
    load1 = os.getloadavg()

    # -- Report --------------------------------------------------------------------------------------------------
    med_probes = {k: statistics.median(p[k] for p in probes) for k in probes[0]}
    bandwidth = max(med_probes.values())
    best_probe = max(med_probes, key=med_probes.get)
    context = opts.prompt_len + opts.new_tokens // 2
    print(f"# machine: {machine(device)}")
    if device.type == "cpu":
        from llama.parallel import ColumnParallelLinear, RowParallelLinear

        chosen = {tuple(m.packed.shape): "packed" for m in ours.modules() if isinstance(m, PackedLinear)}
        for m in ours.modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.weight.dtype == torch.bfloat16:
                chosen.setdefault(tuple(m.weight.shape), "F.linear")
        paths = ", ".join(f"{o}x{i} {path}" for (o, i), path in chosen.items()) or "F.linear (not bfloat16)"
        print(f"# matrix products chosen by llama.cpu.choose_cpu_matmul in {chose_s:.2f} s: {paths}")
    print(
        f"# {opts.model}: {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}; {dtype}; prompt "
        f"{opts.prompt_len} tokens, {opts.new_tokens} new tokens (greedy); medians of {opts.repeats} runs; "
        f"load average {load0[0]:.1f} before, {load1[0]:.1f} after"
    )
    print(
        "# memory bandwidth reading 1 GiB (fastest of 3 reads, median over runs, GB/s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in med_probes.items())
        + f". Roofline: {bandwidth:.1f} GB/s ({best_probe}) / bytes read per decode step"
    )
    for name, seconds in compile_s.items():
        print(f"# {name}: the first calls (compilation) took {seconds:.0f} s")
    header = (
        f"{'system':<14}{'batch':>6}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}{'roofline tok/s':>16}"
        f"{'of roofline':>13}{'decode vs hf':>14}{'prefill vs hf':>15}{'weights GB':>12}{'peak GB':>9}"
    )
    print(header)
    print("-" * len(header))
    gemv_name = max((k for k in med_probes if k.startswith("GEMV")), key=med_probes.get)
    vs_gemv = []  # decode bandwidth against the fastest GEMV probe, batch 1
    for b in batches:
        hf_t = timings.get(("hf", b))
        for name in names:
            tm = timings[(name, b)]
            ttft = statistics.median(tm.ttft)
            prefill = b * opts.prompt_len / ttft
            decode = b / statistics.median(tm.steps)
            model = built[name]
            if name in ("hf", "meta"):  # the same weights: the bytes the plain model reads
                step_bytes = bytes_per_step(ours, args, b, context, dtype)
            else:
                step_bytes = bytes_per_step(model, args, b, context, dtype)
            roof = b * bandwidth * 1e9 / step_bytes
            if b == 1 and "int" not in name:
                vs_gemv.append(f"{name} {decode * step_bytes / 1e9 / med_probes[gemv_name]:.0%}")
            weights = tensor_bytes(model)
            peak = weights + statistics.median(tm.extra_mem)
            vs_dec = vs_pre = ""
            if hf_t is not None:
                vs_dec = f"{statistics.median(hf_t.steps) / statistics.median(tm.steps):.2f}x"
                vs_pre = f"{statistics.median(hf_t.ttft) / ttft:.2f}x"
            print(
                f"{name:<14}{b:>6}{ttft * 1e3:>10.0f}{prefill:>15.1f}{decode:>14.2f}{roof:>16.2f}{decode / roof:>13.0%}"
                f"{vs_dec:>14}{vs_pre:>15}{weights / 1e9:>12.2f}{peak / 1e9:>9.2f}"
            )
    if vs_gemv:
        print(
            f"# batch 1 decode against the {gemv_name} probe ({med_probes[gemv_name]:.1f} GB/s): " + ", ".join(vs_gemv)
        )
    for b, times in gen_times.items():
        loop = statistics.median(timings[("ours", b)].total)
        print(
            f"# Llama.generate (batch {b}, greedy): {statistics.median(times):.2f} s for the run that takes "
            f"{loop:.2f} s as a bare loop of forward + argmax ({statistics.median(times) / loop - 1:+.1%})"
        )
    print(
        "# decode tok/s: sequences / median step time over every step after the first token of every run; "
        "TTFT (prefill + first token): median of runs; "
        "weights GB: the system's parameters and buffers (KV cache included); peak GB adds the most a run "
        f"allocated on top ({'peak RSS' if device.type == 'cpu' else 'max_memory_allocated'})."
    )


if __name__ == "__main__":
    main()
