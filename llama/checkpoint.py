"""Reading Meta's checkpoint folders (params.json and consolidated.NN.pth) into a Transformer, on any
model-parallel size that divides or is divided by the number of shards, without a second copy in memory."""

import json
import pickle
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Optional, Union
from unittest import mock

import fairscale.nn.model_parallel.layers as fs_layers
import torch

from llama.model import ModelArgs, Transformer

# How Meta splits each weight across model-parallel ranks (keyed by the module name before ".weight").
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # split along dim 0 (output features)
ROW_PARALLEL = ("wo", "w2")  # split along dim 1 (input features)
# tok_embeddings: Llama 2 splits it along dim 1 (hidden), Llama 3 along dim 0 (vocabulary); this model
# always splits the vocabulary, and the shard shapes tell which layout a checkpoint has. Norms are replicated.
UNUSED_KEYS = ("rope.freqs",)  # Llama 2 stores its RoPE table; the model recomputes it

PathLike = Union[str, Path]


def read_params(ckpt_dir: PathLike) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: ckpt_dir must be a folder of Meta's files (params.json, consolidated.00.pth, ...)"
        )
    try:
        params = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object of model settings, got {type(params).__name__}")
    return params


def model_args(params: dict, source: str = "params.json", **overrides) -> ModelArgs:
    """ModelArgs from params.json's dict, with its types checked; unknown keys are dropped with a warning."""
    known = {f.name: f for f in fields(ModelArgs)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        warnings.warn(f"{source}: ignoring keys this model does not use: {', '.join(unknown)}", stacklevel=2)
    kwargs = {k: v for k, v in params.items() if k in known}
    kwargs.update(overrides)
    for key, value in kwargs.items():
        expected = known[key].type
        if value is None and "Optional" in str(expected):
            continue
        if "bool" in str(expected):
            ok = isinstance(value, bool)
        elif "int" in str(expected):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # float
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"{source}: '{key}' must be {expected}, got {value!r}")
    try:
        return ModelArgs(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def shard_paths(ckpt_dir: PathLike) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {ckpt_dir} does not exist: pass the folder download.sh made, e.g. Meta-Llama-3-8B/"
        )
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(
            f"no consolidated.NN.pth files in {ckpt_dir}: is this the model folder, and did the download finish?"
        )
    expected = [ckpt_dir / f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if paths != expected:
        missing = sorted(set(expected) - set(paths))
        raise FileNotFoundError(
            f"shards of {ckpt_dir} are not numbered 00..{len(paths) - 1:02d}; missing {', '.join(p.name for p in missing)}"
        )
    return paths


def find_tokenizer(ckpt_dir: PathLike) -> Path:
    """The tokenizer.model that came with a checkpoint: in its folder, under original/, or beside it (Llama 2)."""
    ckpt_dir = Path(ckpt_dir)
    for candidate in (
        ckpt_dir / "tokenizer.model",
        ckpt_dir / "original" / "tokenizer.model",
        ckpt_dir.parent / "tokenizer.model",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in or beside {ckpt_dir}: pass tokenizer_path")


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A state dict mapped from disk: tensors only (nothing else is unpickled) and no copy in memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects other than tensors, which could run code when loaded; refusing it. "
            f"Use checkpoints from Meta's download, or re-save a trusted one as a plain state dict ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(
            f"{path} cannot be read as a PyTorch checkpoint ({str(e).splitlines()[0]}); it may be truncated: download it again"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def _split_dim(key: str) -> Optional[int]:
    module = key.rsplit(".", 2)[-2] if key.count(".") else key
    if module in COLUMN_PARALLEL or module == "tok_embeddings":
        return 0
    if module in ROW_PARALLEL:
        return 1
    return None


def _take(pieces: list[torch.Tensor], src_dim: int, dst_dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank's share along dst_dim of torch.cat(pieces, src_dim), reading only the pieces' parts it needs."""
    full = pieces[0].shape[dst_dim] if src_dim != dst_dim else sum(p.shape[dst_dim] for p in pieces)
    size = full // world
    lo, hi = rank * size, (rank + 1) * size
    parts, offset = [], 0
    for p in pieces:
        if src_dim != dst_dim:
            parts.append(p.narrow(dst_dim, lo, size))
            continue
        n = p.shape[src_dim]
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            parts.append(p.narrow(src_dim, a - offset, b - a))
        offset += n
    return parts[0] if len(parts) == 1 else torch.cat(parts, src_dim)


def check_parallel_size(args: ModelArgs, n_shards: int, world: int, ckpt_dir: PathLike) -> None:
    if n_shards % world and world % n_shards:
        raise ValueError(
            f"{ckpt_dir} has {n_shards} shards, which cannot be split over {world} model-parallel ranks: "
            f"use a model_parallel_size (torchrun --nproc_per_node) that divides {n_shards} or is a multiple of it"
        )
    for name in ("n_heads", "n_kv_heads", "vocab_size"):
        if getattr(args, name) % world:
            raise ValueError(
                f"{name}={getattr(args, name)} is not divisible by model_parallel_size={world}; use a smaller one"
            )


def load_state_dict(ckpt_dir: PathLike, args: ModelArgs, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's weights from Meta's shards, resharded from their count to `world` ranks."""
    paths = shard_paths(ckpt_dir)
    check_parallel_size(args, len(paths), world, ckpt_dir)
    # Every shard is mapped, not read: a rank reads from disk only the bytes of its own share.
    shards = [load_shard(path) for path in paths]
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))
            raise ValueError(f"{path} and {paths[0]} hold different keys ({', '.join(diff[:5])}): mixed-up downloads?")
    state = {}
    for key, tensor in shards[0].items():
        dim = _split_dim(key)
        if key in UNUSED_KEYS:
            continue
        if dim is None:  # replicated on every rank
            state[key] = tensor
            continue
        src = dim
        if key == "tok_embeddings.weight" and len(shards) > 1 and tensor.shape[1] != args.dim:
            src = 1  # Llama 2 layout: the hidden dimension is split; this model splits the vocabulary
        state[key] = _take([shard[key] for shard in shards], src, dim, rank, world)
    return state


@contextmanager
def _no_fairscale_init() -> Iterator[None]:
    # fairscale builds a full-size master weight per layer to initialise shards; ours come from the checkpoint.
    with mock.patch.object(fs_layers, "_initialize_affine_weight", lambda *args, **kwargs: None):
        yield


def build_transformer(
    ckpt_dir: PathLike, args: ModelArgs, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1
) -> Transformer:
    """A Transformer holding this rank's weights: built on the meta device, then given the mapped
    tensors themselves (cast or moved one at a time only where dtype or device differ)."""
    with torch.device("meta"), _no_fairscale_init():
        model = Transformer(args)
    state = load_state_dict(ckpt_dir, args, rank, world)
    expected = model.state_dict()
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        tied = True  # Llama 3.2 1B/3B style: the output projection is the embedding matrix
    else:
        tied = False
    missing = sorted(set(expected) - set(state) - ({"output.weight"} if tied else set()))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_dir} does not match params.json: missing {missing[:8] or 'none'}, unexpected {unexpected[:8] or 'none'}. "
            "Is params.json from the same model as the shards?"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            files = ", ".join(str(p) for p in shard_paths(ckpt_dir))
            raise ValueError(
                f"{files}: '{key}' has shape {tuple(tensor.shape)} but params.json implies {tuple(expected[key].shape)} "
                f"on {world} model-parallel rank(s); is params.json from the same model as the shards?"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{ckpt_dir}: '{key}' holds {tensor.dtype}, not floating-point weights")
        state[key] = tensor.to(device=device, dtype=dtype)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.setup_caches(device, dtype)
    return model.eval()
