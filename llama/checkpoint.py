"""Reading checkpoint folders into a Transformer: Meta's (params.json and consolidated.NN.pth) or Hugging Face's
(config.json and *.safetensors), on any model-parallel size that divides or is divided by the number of shards,
each rank reading only its own share of the weights and holding no second copy of them."""

import copy
import json
import pickle
import re
import typing
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Optional, Union

import torch

from llama import checkpoint_llama4 as llama4
from llama.model import ModelArgs, MoEArgs, Transformer, swiglu_hidden_dim
from llama.moe import moe_hidden_dim

# How Meta splits each weight across model-parallel ranks (keyed by the module name before ".weight").
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # split along dim 0 (output features)
ROW_PARALLEL = ("wo", "w2")  # split along dim 1 (input features)
# Llama 4's experts are split along their hidden size F: w1, w3 (E, D, F) along dim 2, w2 (E, F, D) along dim 1;
# the router (D, E) is replicated. Meta's released files store some weights fused or flat: llama/checkpoint_llama4.py.
# tok_embeddings: Llama 2 splits it along dim 1 (hidden), Llama 3 along dim 0 (vocabulary); this model
# always splits the vocabulary, and the shard shapes tell which layout a checkpoint has. Norms are replicated.
UNUSED_KEYS = ("rope.freqs",)  # Llama 2 stores its RoPE table; the model recomputes it

# Hugging Face's names for Meta's weights (LlamaForCausalLM); per layer under "model.layers.N.".
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
HF_UNUSED_SUFFIXES = (".rotary_emb.inv_freq",)  # older exports store their RoPE table; recomputed here
HF_INDEX = "model.safetensors.index.json"
_HF_SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
# Meta's Llama 3.1 RoPE scaling, which model.py implements; HF configs spell it out and must agree.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PathLike = Union[str, Path]


def _locate(ckpt_dir: PathLike) -> tuple[str, Path]:
    """("meta", folder of params.json and the shards) or ("hf", folder of config.json and the safetensors)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "params.json").is_file():
        return "meta", ckpt_dir
    original = ckpt_dir / "original"
    # HF repositories of Meta's models carry Meta's own files under original/: no conversion, Meta's sharding.
    if (original / "params.json").is_file() and (original / "consolidated.00.pth").is_file():
        return "meta", original
    if (ckpt_dir / "config.json").is_file():
        return "hf", ckpt_dir
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {ckpt_dir} does not exist: pass the folder download.sh made (params.json, "
            "consolidated.00.pth, ...), e.g. Meta-Llama-3-8B/, or a Hugging Face model folder (config.json, *.safetensors)"
        )
    raise FileNotFoundError(
        f"{ckpt_dir} holds neither params.json (Meta's format) nor config.json (Hugging Face's): "
        "ckpt_dir must be a model folder, e.g. Meta-Llama-3-8B/ or Llama-3.1-8B-Instruct/; did the download finish?"
    )


def settings_file(ckpt_dir: PathLike) -> Path:
    """The file that holds the model's settings: Meta's params.json or Hugging Face's config.json."""
    kind, folder = _locate(ckpt_dir)
    return folder / ("params.json" if kind == "meta" else "config.json")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object of model settings, got {type(value).__name__}")
    return value


def read_params(ckpt_dir: PathLike) -> dict:
    """params.json's settings; for a Hugging Face folder, config.json's mapped to params.json's names.

    A folder with Meta's files under original/ is read from there, with a warning saying so."""
    kind, folder = _locate(ckpt_dir)
    if kind == "hf":
        return hf_params(_read_json(folder / "config.json"), str(folder / "config.json"))
    if folder != Path(ckpt_dir):
        warnings.warn(
            f"{ckpt_dir} holds Meta's checkpoint under original/: loading {folder}/params.json and "
            "consolidated.*.pth, not config.json and the safetensors files",
            stacklevel=2,
        )
    return _read_json(folder / "params.json")


def _has_type(value, hint) -> bool:
    if typing.get_origin(hint) is Union:  # Optional[X]
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is MoEArgs:
        if not isinstance(value, dict):
            return False
        hints = typing.get_type_hints(MoEArgs)
        return set(value) <= set(hints) and all(_has_type(v, hints[k]) for k, v in value.items())
    return isinstance(value, hint)


def rope_scaling(params: dict) -> dict:
    """RoPE scaling settings a scaled model's params.json leaves out: Meta's code uses factor 8 (Llama 3.1)
    for every Llama 3 model, but Llama 3.2 1B and 3B were trained with 32 (Meta confirmed it; their Hugging
    Face configs say 32); Llama 4 (Scout) uses 16, with no smoothing band (high_freq_factor 1)."""
    if not params.get("use_scaled_rope"):
        return {}
    if params.get("moe_args") is not None:  # Llama 4, as Meta's llama4 ModelArgs fills them in
        defaults = {"rope_scaling_factor": 16.0, "rope_high_freq_factor": 1.0}
    elif (params.get("dim"), params.get("n_layers")) in ((2048, 16), (3072, 28)):
        defaults = {"rope_scaling_factor": 32.0}
    else:
        defaults = {}
    return {k: v for k, v in defaults.items() if params.get(k) is None}


def model_args(params: dict, source: str = "params.json", **overrides) -> ModelArgs:
    """ModelArgs from params.json's dict, with its types checked; unknown keys are dropped with a warning."""
    known = typing.get_type_hints(ModelArgs)
    # vision_args (Llama 4): the loader says that the vision tower's weights are skipped, once, as it skips them
    unknown = sorted(set(params) - set(known) - {"vision_args"})
    if unknown:
        warnings.warn(f"{source}: ignoring keys this model does not use: {', '.join(unknown)}", stacklevel=2)
    # null in params.json means the default (Llama 4's rope_scaling_factor, for one)
    kwargs = {k: v for k, v in params.items() if k in known and v is not None}
    kwargs.update(rope_scaling(params))
    kwargs.update(overrides)
    for key, value in kwargs.items():
        if not _has_type(value, known[key]):
            expected = "an object with keys among " + ", ".join(f.name for f in fields(MoEArgs))
            if known[key] is not MoEArgs:
                expected = " or ".join(
                    getattr(h, "__name__", str(h)) for h in typing.get_args(known[key]) or [known[key]]
                )
            raise ValueError(f"{source}: '{key}' must be {expected}, got {value!r}")
    try:
        return ModelArgs(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def shard_paths(ckpt_dir: PathLike) -> list[Path]:
    """The weight files: Meta's consolidated.NN.pth in order, or a Hugging Face folder's safetensors files;
    FileNotFoundError naming any that is missing."""
    kind, ckpt_dir = _locate(ckpt_dir)
    if kind == "hf":
        return hf_weight_files(ckpt_dir)
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
    if (ckpt_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{ckpt_dir} has Hugging Face's tokenizer.json but no tokenizer.model, which is what this library reads: "
            "pass Meta's tokenizer.model as tokenizer_path (Hugging Face repositories of Llama 3 models have it under "
            "original/, e.g. `huggingface-cli download meta-llama/Llama-3.1-8B-Instruct original/tokenizer.model`)"
        )
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


# --- Hugging Face folders -------------------------------------------------------------------------------------


def _ffn_shape(dim: int, intermediate_size: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's SwiGLU rule gives exactly intermediate_size."""
    base = int(2 * 4 * dim / 3)
    # Llama 2 7B and 13B: the rule rounded up to multiple_of 256 without a multiplier, as in Meta's params.json;
    # else the largest power of two dividing intermediate_size may do.
    for multiple_of in (256, intermediate_size & -intermediate_size):
        if swiglu_hidden_dim(4 * dim, multiple_of, None) == intermediate_size:
            return multiple_of, None
    # Otherwise a multiplier that lands between intermediate_size and the next integer, rounded down to it.
    multiplier = (intermediate_size + 0.5) / base
    assert swiglu_hidden_dim(4 * dim, 1, multiplier) == intermediate_size
    return 1, multiplier


def refuse_variants(config: dict, source: str, family: str, defaults: dict) -> None:
    """ValueError for variants a Hugging Face config can express but Meta's architecture cannot (each key of
    defaults must keep its default, head_dim must be hidden_size / heads): refused, never computed wrongly."""
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    checks = {key: (config.get(key, wanted), wanted) for key, wanted in defaults.items()}
    if dim % n_heads == 0:
        checks["head_dim"] = (config.get("head_dim") or dim // n_heads, dim // n_heads)
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ValueError(f"{source}: {key}={value!r} is not supported; Meta's {family} architecture has {wanted!r}")


def hf_params(config: dict, source: str = "config.json") -> dict:
    """params.json's settings for a Hugging Face LlamaForCausalLM or Llama 4 config.json; ValueError for anything
    else."""
    if llama4.is_llama4_config(config):
        params = llama4.hf_params(config, source)
        model_args(params, source)  # type and shape errors now, naming config.json
        return params
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type not in (None, "llama") or (architectures and "LlamaForCausalLM" not in architectures):
        found = ", ".join(architectures) if architectures else f"model_type {model_type!r}"
        raise ValueError(
            f"{source}: unsupported architecture {found}; only Llama models (LlamaForCausalLM, model_type 'llama'; "
            "Llama4ForCausalLM, Llama4ForConditionalGeneration) load here"
        )
    if model_type is None and not architectures:
        raise ValueError(f"{source} names no architecture or model_type: is it a Llama model's config.json?")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: it is not a complete Llama config; download it again")
    for key in (*required, "num_key_value_heads"):
        value = config.get(key)
        if key == "num_key_value_heads" and value is None:
            continue  # multi-head attention, as in LlamaConfig
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    refuse_variants(config, source, "Llama", {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False})

    # transformers 5 keeps RoPE settings in rope_parameters; older configs have rope_theta and rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    params = dict(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),  # LlamaConfig's default
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
    )
    params["multiple_of"], params["ffn_dim_multiplier"] = _ffn_shape(dim, config["intermediate_size"])
    if rope_type == "llama3":
        for key, value in LLAMA3_ROPE.items():
            if rope.get(key, value) != value:
                raise ValueError(
                    f"{source}: llama3 RoPE scaling with {key}={rope[key]!r} is not supported (Meta's is {value})"
                )
        if "factor" not in rope:
            raise ValueError(f"{source}: llama3 RoPE scaling without a factor; Llama 3.1 uses 8, Llama 3.2 1B/3B 32")
        params.update(use_scaled_rope=True, rope_scaling_factor=rope["factor"])
    elif rope_type not in (None, "default"):
        raise ValueError(f"{source}: RoPE type {rope_type!r} is not supported; Llama uses 'default' or 'llama3'")
    model_args(params, source)  # type and shape errors now, naming config.json
    return params


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: those its index names, else model-0000N-of-0000M or
    model.safetensors; FileNotFoundError naming any that is missing."""
    index = folder / HF_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map of tensor names to files; download it again")
        files, named_by = sorted({folder / name for name in weight_map.values()}), index.name
    elif numbered := [m for p in folder.glob("model-*-of-*.safetensors") if (m := _HF_SHARD_NAME.fullmatch(p.name))]:
        totals = {m.group(2) for m in numbered}
        if len(totals) > 1:
            raise ValueError(f"{folder} mixes safetensors files of {' and '.join(sorted(totals))} shards; keep one set")
        total = totals.pop()
        files = [folder / f"model-{i:0{len(total)}d}-of-{total}.safetensors" for i in range(1, int(total) + 1)]
        named_by = "the shard numbering"
    elif (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{folder} has config.json but no model.safetensors or model-0000N-of-0000M.safetensors files: "
            "did the download finish?"
        )
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}, named by {named_by}: the download is incomplete; download it again"
        )
    return files


class _LazyTensor:
    """A tensor in a mapped safetensors file; narrowing it gives a view of the mapped bytes (safetensors' slice),
    so only the part a rank uses is ever read from disk."""

    def __init__(self, handle, name: str, path: Path):
        try:
            self._slice = handle.get_slice(name)
        except Exception as e:  # safetensors raises its own error type for a name the file lacks
            raise ValueError(
                f"{path} lacks tensor {name!r} that {HF_INDEX} places there ({e}); download it again"
            ) from None
        self.shape = torch.Size(self._slice.get_shape())
        self._start = [0] * len(self.shape)  # where this tensor lies in the stored one (see part)

    def part(self, dim: int, start: int, length: int) -> "_LazyTensor":
        """A narrowed _LazyTensor, still not read: e.g. w1 out of Llama 4's gate_up_proj."""
        piece = copy.copy(self)
        piece._start = list(self._start)
        piece._start[dim] += start
        piece.shape = self.shape[:dim] + (length,) + self.shape[dim + 1 :]
        return piece

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(a, a + n) for a, n in zip(self._start, self.shape)]
        index[dim] = slice(self._start[dim] + start, self._start[dim] + start + length)
        return self._slice[tuple(index)]


def _meta_name(hf_name: str) -> Optional[str]:
    """Meta's key for a Hugging Face tensor name; "" for tensors the model does not need; None if unknown."""
    if hf_name.endswith(HF_UNUSED_SUFFIXES):
        return ""
    if hf_name in HF_NAMES:
        return HF_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}"
    return None


def _hf_tensors(folder: Path) -> dict[str, _LazyTensor]:
    """The folder's tensors under Meta's names, mapped, not read: only a rank's share of each is ever read."""
    from safetensors import safe_open  # only Hugging Face folders need it (pip install safetensors)

    handles = {}
    for path in hf_weight_files(folder):
        try:
            handles[path] = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors' own error type for a damaged header
            raise ValueError(
                f"{path} cannot be read as safetensors ({e}); it may be truncated: download it again"
            ) from None
    index = folder / HF_INDEX
    if index.is_file():
        where = {name: folder / file for name, file in _read_json(index)["weight_map"].items()}
    else:
        where = {name: path for path, handle in handles.items() for name in handle.keys()}
    config = _read_json(folder / "config.json")
    if llama4.is_llama4_config(config):
        architecture = "Llama 4"
        tensors, unknown = llama4.hf_tensors(
            list(where), lambda name: _LazyTensor(handles[where[name]], name, where[name]), str(folder)
        )
        tied = llama4.hf_text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings"))
    else:
        architecture, tensors, unknown = "LlamaForCausalLM", {}, []
        for hf_name, path in where.items():
            name = _meta_name(hf_name)
            if name is None:
                unknown.append(hf_name)
            elif name:
                tensors[name] = _LazyTensor(handles[path], hf_name, path)
        tied = config.get("tie_word_embeddings")
    if tied:
        tensors.pop("output.weight", None)  # HF uses the embedding matrix whatever lm_head.weight holds
    if unknown:
        raise ValueError(
            f"{folder} holds tensors that are not {architecture} weights ({', '.join(sorted(unknown)[:5])}): "
            "is it a quantized, adapter or other architecture's checkpoint? Only plain Llama weights load here"
        )
    if "output.weight" not in tensors and not tied:
        raise ValueError(
            f"{folder} has no lm_head.weight but config.json says tie_word_embeddings is false: download it again"
        )
    return tensors


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # HF's conversion reorders each head's query/key rows so that RoPE rotates halves (i, i + head_dim/2);
    # Meta's model rotates interleaved pairs (2i, 2i+1). Undo it: row h * head_dim/2 + i goes back to 2i + h.
    rows, dim = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


# --- resharding -----------------------------------------------------------------------------------------------


def split_dim(key: str) -> Optional[int]:
    """The dimension along which Meta splits the weight `key` (the model's names) over ranks; None: replicated."""
    if re.fullmatch(r"layers\.\d+\.feed_forward\.experts\.w[123]", key):  # Llama 4: (E, D, F), (E, F, D): along F
        return 1 if key.endswith(".w2") else 2
    module = key.rsplit(".", 2)[-2] if key.count(".") else key
    if module in COLUMN_PARALLEL or module == "tok_embeddings":
        return 0
    if module in ROW_PARALLEL:
        return 1
    return None


Span = tuple[int, int, int]  # (dim, start, length), the arguments of Tensor.narrow


def _plan(
    shape: torch.Size, n: int, src: int, dst: int, rank: int, world: int
) -> tuple[list[int], list[tuple[int, Span, Span]]]:
    """Where rank's share along dst of the tensor whose n equal pieces of `shape` are concatenated along src
    comes from: (share's shape, [(piece index, span in the piece, span in the share), ...])."""
    share = list(shape)
    if src != dst:
        share[src] *= n  # every piece holds part of each row (or column) of the share
    full = shape[dst] * n if src == dst else shape[dst]
    size = full // world
    lo, hi = rank * size, (rank + 1) * size
    share[dst] = size
    parts = []
    for i in range(n):
        if src != dst:
            parts.append((i, (dst, lo, size), (src, i * shape[src], shape[src])))
            continue
        a, b = max(lo, i * shape[dst]), min(hi, (i + 1) * shape[dst])
        if a < b:
            parts.append((i, (dst, a - i * shape[dst], b - a), (dst, a - lo, b - a)))
    return share, parts


def check_parallel_size(args: ModelArgs, n_shards: int, world: int, ckpt_dir: PathLike) -> None:
    """ValueError unless the checkpoint's n_shards can be resharded onto `world` model-parallel ranks."""
    ffn_hidden = swiglu_hidden_dim(4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size}
    sizes["the feed-forward hidden size"] = ffn_hidden
    if args.moe_args is not None:
        sizes["the experts' hidden size"] = moe_hidden_dim(args)

    def fits(m: int) -> bool:
        return not (n_shards % m and m % n_shards) and all(v % m == 0 for v in sizes.values())

    valid = ", ".join(str(m) for m in range(1, args.n_heads + 1) if fits(m))
    if n_shards % world and world % n_shards:
        raise ValueError(
            f"{ckpt_dir} has {n_shards} shards, which cannot be split over {world} model-parallel ranks: "
            f"use a model_parallel_size (torchrun --nproc_per_node) that divides {n_shards} or is a multiple of it "
            f"(this model runs on {valid})"
        )
    for name, value in sizes.items():
        if value % world:
            raise ValueError(
                f"{name}={value} is not divisible by model_parallel_size={world}, so the ranks cannot share it: "
                f"use a model_parallel_size (torchrun --nproc_per_node) among {valid}"
            )


def load_state_dict(ckpt_dir: PathLike, args: ModelArgs, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's weights under Meta's keys, resharded from the checkpoint's shards to `world` ranks.

    Shards are mapped from disk (torch.load mmap): a share that lies in one shard stays a view of the file,
    and a share spread over several is copied shard by shard, each file unmapped before the next, so a rank
    holds about its share of the model and no more. A Hugging Face folder counts as one unsharded shard,
    mapped through safetensors' slices, whose query/key rows are put back into Meta's rotary order (a copy; not
    for Llama 4, whose conversion keeps Meta's order). Llama 4's fused and flat keys are split per shard first."""
    kind, folder = _locate(ckpt_dir)
    if kind == "hf":
        hf = _hf_tensors(folder)
        names, load = [str(folder)], lambda i: hf
        permuted = not llama4.is_llama4_config(_read_json(folder / "config.json"))
    else:
        paths = shard_paths(folder)
        warned: set[str] = set()  # one warning per kind of skipped key, not one per shard
        names = [str(p) for p in paths]
        load = lambda i: llama4.module_names(load_shard(paths[i]), args, names[i], warned)  # noqa: E731
    check_parallel_size(args, len(names), world, folder)

    first = load(0)
    shapes = {key: tensor.shape for key, tensor in first.items()}
    del first  # read again below like every other shard, so that no reference keeps its file mapped
    plans = {}
    for key, shape in shapes.items():
        if key in UNUSED_KEYS:
            continue
        dim = split_dim(key)
        if dim is None or dim >= len(shape):  # replicated (or a stray key, which build_transformer names): shard 0's copy, on every rank
            plans[key] = _plan(shape, 1, 0, 0, 0, 1)
            continue
        src = dim
        if key == "tok_embeddings.weight" and len(names) > 1 and shape[1] != args.dim:
            src = 1  # Llama 2 layout: the hidden dimension is split; this model splits the vocabulary
        plans[key] = _plan(shape, len(names), src, dim, rank, world)

    state: dict[str, torch.Tensor] = {}
    for i in sorted({part[0] for _, parts in plans.values() for part in parts}):
        shard = load(i)
        if set(shard) != set(shapes):
            diff = sorted(set(shard) ^ set(shapes))
            raise ValueError(
                f"{names[i]} and {names[0]} hold different keys ({', '.join(diff[:5])}): mixed-up downloads?"
            )
        for key, (share, parts) in plans.items():
            for j, span, out_span in parts:
                if j != i:
                    continue
                if shard[key].shape != shapes[key]:
                    raise ValueError(
                        f"{names[i]}: '{key}' has shape {tuple(shard[key].shape)} but {names[0]} has "
                        f"{tuple(shapes[key])}; are the shards from one model? Download them again"
                    )
                piece = shard[key].narrow(*span)
                if len(parts) == 1:  # the share lies in one shard: keep the mapped view, no copy
                    # ... unless shards are being merged: then every other weight is copied out of the files,
                    # and a view of a replicated norm would keep shard 0 and all its read pages mapped.
                    state[key] = piece.clone() if world < len(names) else piece
                    continue
                if key not in state:
                    state[key] = torch.empty(share, dtype=piece.dtype)
                state[key].narrow(*out_span).copy_(piece)
        shard = piece = None  # the file is unmapped once no view into it is kept: its pages leave the rank's memory

    if kind == "hf" and permuted:
        head_dim = args.dim // args.n_heads
        for key, n_heads in (("attention.wq.weight", args.n_heads), ("attention.wk.weight", args.n_kv_heads)):
            for i in range(args.n_layers):
                name, local_heads = f"layers.{i}.{key}", n_heads // world  # a rank's share is whole heads
                if name in state and state[name].shape[0] == local_heads * head_dim:  # else build_transformer says
                    state[name] = _unpermute_rotary(state[name], local_heads)
    return state


def build_transformer(
    ckpt_dir: PathLike, args: ModelArgs, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1
) -> Transformer:
    """A Transformer holding this rank's weights: built on the meta device, then given the mapped
    tensors themselves (cast or moved one at a time only where dtype or device differ)."""
    # On the meta device nothing is allocated, fairscale's full-size master weights included.
    with torch.device("meta"):
        model = Transformer(args)
    state = load_state_dict(ckpt_dir, args, rank, world)
    source = "config.json" if _locate(ckpt_dir)[0] == "hf" else "params.json"
    expected = model.state_dict()
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        tied = True  # Llama 3.2 1B/3B style: the output projection is the embedding matrix
    else:
        tied = False
    missing = sorted(set(expected) - set(state) - ({"output.weight"} if tied else set()))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_dir} does not match {source}: missing {missing[:8] or 'none'}, unexpected {unexpected[:8] or 'none'}. "
            f"Is {source} from the same model as the weights?"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            files = ", ".join(str(p) for p in shard_paths(ckpt_dir))
            raise ValueError(
                f"{files}: '{key}' has shape {tuple(tensor.shape)} but {source} implies {tuple(expected[key].shape)} "
                f"on {world} model-parallel rank(s); is {source} from the same model as the weights?"
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
