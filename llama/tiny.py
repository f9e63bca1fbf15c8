"""Write a tiny random-weight checkpoint in Meta's on-disk format, to try the library without a download.

    python -m llama.tiny --out_dir tiny-llama3        # params.json, consolidated.00.pth, tokenizer.model

Its weights are random, so it writes random text; it exists to run the examples and the tests end to end.
"""

import base64
import json
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import COLUMN_PARALLEL, ROW_PARALLEL
from llama.model import ModelArgs, swiglu_hidden_dim

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


def random_state_dict(
    args: ModelArgs,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
    tied: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Unsharded weights under Meta's key names; norms near 1, everything else normal(0, std), drawn on device."""
    g = torch.Generator(device).manual_seed(seed)
    head_dim = args.dim // args.n_heads
    hidden = swiglu_hidden_dim(4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)

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
        state[p + "feed_forward.w1.weight"] = normal(hidden, args.dim)
        state[p + "feed_forward.w2.weight"] = normal(args.dim, hidden)
        state[p + "feed_forward.w3.weight"] = normal(hidden, args.dim)
        state[p + "attention_norm.weight"] = norm()
        state[p + "ffn_norm.weight"] = norm()
    state["norm.weight"] = norm()
    if not tied:
        state["output.weight"] = normal(args.vocab_size, args.dim)
    return state


def shard_state_dict(state: dict[str, torch.Tensor], n: int, embedding_dim: int = 0) -> list[dict[str, torch.Tensor]]:
    """Split as Meta does for n model-parallel ranks. embedding_dim: 0 for Llama 3 (vocabulary), 1 for Llama 2."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, tensor in state.items():
        module = key.rsplit(".", 2)[-2]
        dim = 0 if module in COLUMN_PARALLEL else 1 if module in ROW_PARALLEL else None
        if module == "tok_embeddings":
            dim = embedding_dim
        for i in range(n):
            shards[i][key] = tensor.clone() if dim is None else tensor.chunk(n, dim)[i].clone()
    return shards


def write_checkpoint(
    out_dir: Path, params: dict, state: dict[str, torch.Tensor], n_shards: int = 1, embedding_dim: int = 0
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    for i, shard in enumerate(shard_state_dict(state, n_shards, embedding_dim)):
        torch.save(shard, out_dir / f"consolidated.{i:02d}.pth")


def write_byte_tokenizer(path: Path) -> None:
    """A tiktoken BPE file of the 256 single bytes and no merges: a valid Llama 3-format tokenizer."""
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


def main(
    out_dir: str = "tiny-llama",
    n_shards: int = 1,
    seed: int = 0,
    tokenizer_path: Optional[str] = None,
) -> None:
    """Write params.json, consolidated.NN.pth and tokenizer.model of a random-weight Llama 3-style model.

    tokenizer_path: a real tokenizer.model to copy in (the vocabulary size follows it); by default a
    byte-level tokenizer of 256 + 256 special tokens is written.
    """
    from llama.tokenizer import Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_file = out / "tokenizer.model"
    if tokenizer_path:
        tok_file.write_bytes(Path(tokenizer_path).read_bytes())
    else:
        write_byte_tokenizer(tok_file)
    params = dict(TINY_PARAMS, vocab_size=Tokenizer(str(tok_file)).n_words)
    state = random_state_dict(ModelArgs(**params), seed=seed)
    write_checkpoint(out, params, state, n_shards)
    print(f"Wrote a random-weight model to {out}/ (it writes random text). Try:")
    print(f"  python example_chat_completion.py --ckpt_dir {out} --tokenizer_path {tok_file}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
