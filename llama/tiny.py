"""Write a tiny random-weight checkpoint in Meta's on-disk format, to try the library without a download.

    python -m llama.tiny --out_dir tiny-llama3        # params.json, consolidated.00.pth, tokenizer.model
    python -m llama.tiny --llama4 --out_dir tiny-llama4 --n_shards 2   # Llama 4 (MoE, images), as Meta released Scout

Its weights are random, so it writes random text; it exists to run the examples and the tests end to end.
"""

import base64
import importlib.util
import json
from pathlib import Path
from typing import Optional

import torch

from llama.args import ModelArgs
from llama.checkpoint import split_dim
from llama.checkpoint_llama4 import released_names

TINY_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 512,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
# Llama 4 Scout's params.json scaled down, with Maverick's alternation of dense and MoE layers so that both kinds
# are there: NoPE every 4th layer, RoPE layers attending within chunks of 8 positions with QK norm, temperature
# tuning from position 8 on; a vision tower whose tiles are 56 pixels (4 x 4 patches of 14, 4 tokens after pixel
# shuffle; Scout's are 336, 144 tokens), so that an image fits a short prompt. vocab_size follows the tokenizer.
TINY_LLAMA4_PARAMS = {
    "dim": 64,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 202048,
    "multiple_of": 16,
    "ffn_dim_multiplier": 1.2,
    "ffn_exp": 4.0,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "nope_layer_interval": 4,
    "use_qk_norm": True,
    "attention_chunk_size": 8,
    "attn_temperature_tuning": True,
    "floor_scale": 8,
    "attn_scale": 0.1,
    "moe_args": {
        "num_experts": 4,
        "capacity_factor": 1.0,
        "auto_scale_F": True,
        "top_k": 1,
        "interleave_moe_layer_step": 2,
    },
    "vision_args": {
        "image_size": {"height": 56, "width": 56},
        "patch_size": {"height": 14, "width": 14},
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "mlp_ratio": 4.0,
        "output_dim": 64,
        "pixel_shuffle_ratio": 0.5,
    },
}


def random_state_dict(
    args: ModelArgs,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
    tied: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Unsharded weights under Meta's key names; norms near 1, Llama 4's router normal(0, 1) (so that tokens spread
    over the experts), everything else normal(0, std), drawn on device."""
    g = torch.Generator(device).manual_seed(seed)
    head_dim = args.head_dim

    def normal(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(args.dim, generator=g, device=device)).to(dtype)

    state = {"tok_embeddings.weight": normal(args.vocab_size, args.dim, scale=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state[p + "attention.wq.weight"] = normal(args.n_heads * head_dim, args.dim)
        state[p + "attention.wk.weight"] = normal(args.n_kv_heads * head_dim, args.dim)
        state[p + "attention.wv.weight"] = normal(args.n_kv_heads * head_dim, args.dim)
        state[p + "attention.wo.weight"] = normal(args.dim, args.n_heads * head_dim)
        if args.is_moe_layer(i):
            n, f = args.moe_args.num_experts, args.expert_hidden_dim
            state[p + "feed_forward.router_DE"] = normal(args.dim, n, scale=1.0)
            state[p + "feed_forward.experts.w1"] = normal(n, args.dim, f)
            state[p + "feed_forward.experts.w2"] = normal(n, f, args.dim)
            state[p + "feed_forward.experts.w3"] = normal(n, args.dim, f)
            ffn, size = "feed_forward.shared_expert.", f
        else:
            ffn, size = "feed_forward.", args.ffn_hidden_dim
        state[p + ffn + "w1.weight"] = normal(size, args.dim)
        state[p + ffn + "w2.weight"] = normal(args.dim, size)
        state[p + ffn + "w3.weight"] = normal(size, args.dim)
        state[p + "attention_norm.weight"] = norm()
        state[p + "ffn_norm.weight"] = norm()
    state["norm.weight"] = norm()
    if not tied:
        state["output.weight"] = normal(args.vocab_size, args.dim)
    if args.vision_args is not None:
        state |= random_vision_state(args, g, std, dtype, device)
    return state


def random_vision_state(
    args: ModelArgs, g: torch.Generator, std: float, dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Llama 4's vision tower and projection under Meta's key names: LayerNorm weights near 1, the rest normal."""
    v = args.vision_args

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    def layer_norm(prefix: str) -> dict[str, torch.Tensor]:
        weight = (1 + 0.1 * torch.randn(v.dim, generator=g, device=device)).to(dtype)
        return {prefix + ".weight": weight, prefix + ".bias": normal(v.dim)}

    def linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> dict[str, torch.Tensor]:
        weights = {prefix + ".weight": normal(out_features, in_features)}
        return weights | ({prefix + ".bias": normal(out_features)} if bias else {})

    e = "vision_embeddings.vision_encoder."
    grid, hidden = v.image_size.height // v.patch_size.height, int(v.mlp_ratio * v.dim)
    state = linear(e + "conv1._linear", v.dim, 3 * v.patch_size.height * v.patch_size.width, bias=False)
    state[e + "class_embedding"] = normal(v.dim)
    state[e + "positional_embedding_vlm"] = normal(grid * grid + 1, v.dim)
    state |= layer_norm(e + "ln_pre") | layer_norm(e + "ln_post")
    for i in range(v.n_layers):
        p = f"{e}transformer.resblocks.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            state |= linear(p + "attn." + w, v.dim, v.dim)
        state |= layer_norm(p + "ln_1") | layer_norm(p + "ln_2")
        state |= linear(p + "mlp.c_fc", hidden, v.dim) | linear(p + "mlp.c_proj", v.dim, hidden)
    adapter = "vision_embeddings.vision_adapter.mlp."
    state |= linear(adapter + "c_fc", v.output_dim, int(v.dim / v.pixel_shuffle_ratio**2), bias=False)
    state |= linear(adapter + "c_proj", v.output_dim, v.output_dim, bias=False)
    return state | linear("vision_projection", args.dim, v.output_dim, bias=False)


def shard_state_dict(state: dict[str, torch.Tensor], n: int, embedding_dim: int = 0) -> list[dict[str, torch.Tensor]]:
    """Split as Meta does for n model-parallel ranks. embedding_dim: 0 for Llama 3 (vocabulary), 1 for Llama 2."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, tensor in state.items():
        dim = embedding_dim if key == "tok_embeddings.weight" else split_dim(key)
        for i in range(n):
            shards[i][key] = tensor.clone() if dim is None else tensor.chunk(n, dim)[i].clone()
    return shards


def write_checkpoint(
    out_dir: Path,
    params: dict,
    state: dict[str, torch.Tensor],
    n_shards: int = 1,
    embedding_dim: int = 0,
    released: bool = False,
) -> None:
    """params.json and consolidated.NN.pth; released: Llama 4 under the names of Meta's released files (fused
    wqkv and fc1, flat experts, packed norm names), each shard's pieces fused as Meta's shards are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    for i, shard in enumerate(shard_state_dict(state, n_shards, embedding_dim)):
        torch.save(released_names(shard) if released else shard, out_dir / f"consolidated.{i:02d}.pth")


def write_byte_tokenizer(path: Path) -> None:
    """A tiktoken BPE file of the 256 single bytes and no merges: a valid Llama 3-format tokenizer."""
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


def llama4_tokenizer() -> Optional[Path]:
    """Meta's Llama 4 tokenizer.model, where the llama-models package (Meta's reference) is installed."""
    spec = importlib.util.find_spec("llama_models")
    for folder in (spec and spec.submodule_search_locations) or []:
        path = Path(folder) / "llama4" / "tokenizer.model"
        if path.is_file():
            return path
    return None


def main(
    out_dir: str = "tiny-llama",
    n_shards: int = 1,
    seed: int = 0,
    tokenizer_path: Optional[str] = None,
    llama4: bool = False,
) -> None:
    """Write params.json, consolidated.NN.pth and tokenizer.model of a random-weight Llama 3-style model, or with
    --llama4 a Llama 4 one (mixture of experts, NoPE layers, chunked attention, a vision tower) in Meta's released
    layout.

    tokenizer_path: a real tokenizer.model to copy in (the vocabulary size follows it); by default a
    byte-level tokenizer of 256 + 256 special tokens is written, or for Llama 4 Meta's Llama 4 tokenizer
    when the llama-models package is installed.
    """
    from llama.tokenizer import Tokenizer

    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_file = out / "tokenizer.model"
    if llama4 and not tokenizer_path:
        tokenizer_path = llama4_tokenizer()
        if tokenizer_path is None:
            print(
                "Meta's Llama 4 tokenizer was not found (pip install llama-models, or pass --tokenizer_path): "
                "writing a byte-level tokenizer instead"
            )
    if tokenizer_path:
        if not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"no tokenizer file at {tokenizer_path}: pass a tokenizer.model")
        tok_file.write_bytes(Path(tokenizer_path).read_bytes())
    else:
        write_byte_tokenizer(tok_file)
    tokenizer = Tokenizer(str(tok_file))
    params = dict(TINY_LLAMA4_PARAMS if llama4 else TINY_PARAMS, vocab_size=tokenizer.n_words)
    if "<|patch|>" not in getattr(tokenizer, "special_tokens", {}):  # no image tokens: a text-only Llama 4
        params.pop("vision_args", None)
    state = random_state_dict(ModelArgs(**params), seed=seed)
    write_checkpoint(out, params, state, n_shards, released=llama4)
    print(f"Wrote a random-weight model to {out}/ (it writes random text). Try:")
    print(f"  python example_chat_completion.py --ckpt_dir {out} --tokenizer_path {tok_file}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
