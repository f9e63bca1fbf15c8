"""Reading checkpoint folders into a Transformer: Meta's (params.json and consolidated.NN.pth) or Hugging Face's
(config.json and *.safetensors), on any model-parallel size that divides or is divided by the number of shards,
each rank reading only its own share of the weights and holding no second copy of them.

The steps, in order: resolve (a folder into a Checkpoint: its kind, settings and files, read once), key names
(each family's names translated to the model's; Llama 4's in llama/checkpoint_llama4.py), RankShares (this rank's
share of every weight, planned from the first shard's shapes, then read shard by shard) and build_transformer
(a meta-device Transformer given each share as it is read)."""

import copy
import importlib.util
import json
import pickle
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from llama import checkpoint_llama4 as llama4
from llama.args import ModelArgs, config_params, is_llama4_config, model_args, text_config
from llama.cpu import release
from llama.model import Transformer
from llama.quantize import load_quantized, quantize_model, quantized_weight_keys

# How Meta splits each weight across model-parallel ranks (keyed by the module name before ".weight"). Llama 4's
# vision tower: the same for its attention, c_fc, conv1._linear and vision_projection as column, c_proj as row;
# a column-parallel layer's bias is split as its weight, a row-parallel layer's is replicated (added after the sum).
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output", "c_fc", "_linear", "vision_projection")  # along dim 0
ROW_PARALLEL = ("wo", "w2", "c_proj")  # split along dim 1 (input features)
# Llama 4's experts are split along their hidden size F: w1, w3 (E, D, F) along dim 2, w2 (E, F, D) along dim 1;
# the router (D, E) is replicated. Meta's released files store some weights fused or flat: llama/checkpoint_llama4.py.
# tok_embeddings: Llama 2 splits it along dim 1 (hidden), Llama 3 along dim 0 (vocabulary); this model
# always splits the vocabulary, and the shard shapes tell which layout a checkpoint has. Norms are replicated.
UNUSED_KEYS = ("rope.freqs",)  # Llama 2 stores its RoPE table; the model recomputes it
VISION_KEYS = ("vision_embeddings.", "vision_projection.")  # Llama 4's vision tower: read for a model with one

HF_INDEX = "model.safetensors.index.json"
_HF_SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")

PathLike = Union[str, Path]


# --- resolving a folder ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint folder resolved once: the steps that follow read this, never the folder's layout again."""

    path: Path  # the folder as given
    folder: Path  # where the settings and weights are: path, or path/original (Meta's files in a HF repository)
    kind: str  # "meta", "meta-llama4" (Meta's files, Llama 4's names: released or module names), "hf", "hf-llama4"
    settings: Path  # params.json or config.json
    config: dict  # that file's contents
    params: dict  # the settings under params.json's names (config.json's mapped to them)
    shards: tuple[Path, ...]  # consolidated.NN.pth in order, or the safetensors files
    weight_map: Optional[dict[str, Path]]  # Hugging Face's index: tensor name -> file; None without one
    tokenizer: Optional[Path]  # tokenizer.model in the folder, under original/ or beside it

    @property
    def is_hf(self) -> bool:
        return self.kind.startswith("hf")

    @property
    def is_llama4(self) -> bool:
        return self.kind.endswith("llama4")

    def model_args(self, **overrides) -> ModelArgs:
        """ModelArgs from the settings, checked; overrides (max_seq_len, max_batch_size) win."""
        return model_args(self.params, str(self.settings), **overrides)


def resolve(ckpt_dir: Union[PathLike, Checkpoint]) -> Checkpoint:
    """The checkpoint in ckpt_dir: its settings read and its weight files listed (a Checkpoint is returned as it
    is). A folder with Meta's files under original/ is read from there, with a warning saying so.
    FileNotFoundError for a missing folder or weight file, ValueError for unreadable or unsupported settings."""
    if isinstance(ckpt_dir, Checkpoint):
        return ckpt_dir
    path = Path(ckpt_dir)
    form, folder = _locate(path)
    weight_map = None
    if form == "hf":
        if importlib.util.find_spec("safetensors") is None:
            raise ModuleNotFoundError(
                f"{folder} is a Hugging Face folder (config.json, *.safetensors), which needs the safetensors package: "
                "pip install safetensors"
            )
        settings = folder / "config.json"
        config = _read_json(settings)
        params = config_params(config, str(settings))
        kind = "hf-llama4" if is_llama4_config(config) else "hf"
        weight_map = _hf_weight_map(folder)
        shards = _hf_weight_files(folder, weight_map)
    else:
        if folder != path:
            warnings.warn(
                f"{path} holds Meta's checkpoint under original/: loading {folder}/params.json and "
                "consolidated.*.pth, not config.json and the safetensors files",
                stacklevel=2,
            )
        settings = folder / "params.json"
        config = params = _read_json(settings)
        kind = "meta-llama4" if params.get("moe_args") is not None else "meta"
        shards = _consolidated_files(folder)
    tokenizers = [p / "tokenizer.model" for p in (path, path / "original", path.parent)]
    return Checkpoint(
        path=path,
        folder=folder,
        kind=kind,
        settings=settings,
        config=config,
        params=params,
        shards=tuple(shards),
        weight_map=weight_map,
        tokenizer=next((p for p in tokenizers if p.is_file()), None),
    )


def _locate(ckpt_dir: Path) -> tuple[str, Path]:
    """("meta", folder of params.json and the shards) or ("hf", folder of config.json and the safetensors)."""
    if (ckpt_dir / "params.json").is_file():
        return "meta", ckpt_dir
    original = ckpt_dir / "original"
    # HF repositories of Meta's models carry Meta's own files under original/: no conversion, Meta's sharding.
    if (original / "params.json").is_file() and (original / "consolidated.00.pth").is_file():
        return "meta", original
    if (ckpt_dir / "config.json").is_file():
        return "hf", ckpt_dir
    if ckpt_dir.is_file():
        hf = (ckpt_dir.parent / "config.json").is_file() and not (ckpt_dir.parent / "params.json").is_file()
        holds = "config.json" if hf else "params.json"
        raise ValueError(
            f"{ckpt_dir} is a file, and ckpt_dir is a folder: pass the folder that holds {holds}: {ckpt_dir.parent}"
        )
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {ckpt_dir} does not exist: pass the folder download.sh made (params.json, "
            "consolidated.00.pth, ...), e.g. Meta-Llama-3-8B/, or a Hugging Face model folder (config.json, *.safetensors)"
        )
    raise FileNotFoundError(
        f"{ckpt_dir} holds neither params.json (Meta's format) nor config.json (Hugging Face's): "
        "ckpt_dir must be a model folder, e.g. Meta-Llama-3-8B/ or Llama-3.1-8B-Instruct/; did the download finish?"
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object of model settings, got {type(value).__name__}")
    return value


def read_params(ckpt_dir: PathLike) -> dict:
    """params.json's settings; for a Hugging Face folder, config.json's mapped to params.json's names."""
    return resolve(ckpt_dir).params


def _consolidated_files(folder: Path) -> list[Path]:
    """Meta's consolidated.NN.pth in order; FileNotFoundError naming any that is missing, from the numbering and
    from checklist.chk (download.sh's list of the files it fetched) where the folder has one."""
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(
            f"no consolidated.NN.pth files in {folder}: is this the model folder, and did the download finish?"
        )
    listed = re.findall(r"consolidated\.(\d+)\.pth", _read_checklist(folder / "checklist.chk"))
    count = max([len(paths), *(int(i) + 1 for i in listed)])
    expected = [folder / f"consolidated.{i:02d}.pth" for i in range(count)]
    if paths != expected:
        raise _missing_shards(folder, sorted(set(expected) - set(paths)))
    return paths


def _read_checklist(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # no checklist (a hand-made or Hugging Face folder): the numbering alone says what is missing
        return ""


def _missing_shards(folder: Path, missing: list[Path], why: str = "") -> FileNotFoundError:
    names = ", ".join(p.name for p in missing)
    return FileNotFoundError(
        f"{names} {'is' if len(missing) == 1 else 'are'} missing from {folder}{why}: the download was interrupted? "
        "re-run download.sh"
    )


def _hf_weight_map(folder: Path) -> Optional[dict[str, Path]]:
    index = folder / HF_INDEX
    if not index.is_file():
        return None
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map of tensor names to files; download it again")
    return {name: folder / file for name, file in weight_map.items()}


def _hf_weight_files(folder: Path, weight_map: Optional[dict[str, Path]]) -> list[Path]:
    """The safetensors files of a Hugging Face folder: those its index names, else model-0000N-of-0000M or
    model.safetensors; FileNotFoundError naming any that is missing."""
    if weight_map is not None:
        files, named_by = sorted(set(weight_map.values())), HF_INDEX
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
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        found = f"; its {', '.join(other[:3])} {'is' if len(other) == 1 else 'are'} not read here" if other else ""
        raise FileNotFoundError(
            f"{folder} has config.json but no model.safetensors or model-0000N-of-0000M.safetensors files{found}: "
            "download the safetensors weights (e.g. `huggingface-cli download <repo> --include '*.safetensors' "
            "'*.json'`), or Meta's files (params.json, consolidated.NN.pth) under original/"
        )
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}, named by {named_by}: the download is incomplete; download it again"
        )
    return files


def find_tokenizer(ckpt: Checkpoint) -> Path:
    """The tokenizer.model that came with a checkpoint: in its folder, under original/, or beside it (Llama 2)."""
    if ckpt.tokenizer is not None:
        return ckpt.tokenizer
    if (ckpt.path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{ckpt.path} has Hugging Face's tokenizer.json but no tokenizer.model, which is what this library reads: "
            "pass Meta's tokenizer.model as tokenizer_path (Hugging Face repositories of Llama 3 models have it under "
            "original/, e.g. `huggingface-cli download meta-llama/Llama-3.1-8B-Instruct original/tokenizer.model`)"
        )
    raise FileNotFoundError(f"no tokenizer.model in or beside {ckpt.path}: pass tokenizer_path")


# --- reading the files, under the model's names ---------------------------------------------------------------


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


# Hugging Face's names for Llama 1-3's weights (LlamaForCausalLM); per layer under "model.layers.N.".
LLAMA_HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LLAMA_HF_LAYER_NAMES = {
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
LLAMA_HF_UNUSED_SUFFIXES = (".rotary_emb.inv_freq",)  # older exports store their RoPE table; recomputed here


def _llama_name(hf_name: str) -> Optional[str]:
    """The model's key for a Hugging Face Llama 1-3 tensor name; "" for tensors the model does not need; None if
    unknown."""
    if hf_name.endswith(LLAMA_HF_UNUSED_SUFFIXES):
        return ""
    if hf_name in LLAMA_HF_NAMES:
        return LLAMA_HF_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in LLAMA_HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{LLAMA_HF_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # HF's conversion reorders each head's query/key rows so that RoPE rotates halves (i, i + head_dim/2);
    # Meta's model rotates interleaved pairs (2i, 2i+1). Undo it: row h * head_dim/2 + i goes back to 2i + h.
    rows, dim = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
        stored = self._slice.get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} holds {stored} values, which this library does not read: "
                "is it a quantized checkpoint? Only plain Llama weights load here"
            )
        self.dtype = SAFETENSORS_DTYPES[stored]
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


def _hf_tensors(ckpt: Checkpoint) -> dict[str, _LazyTensor]:
    """The folder's tensors under the model's names, mapped, not read: only a rank's share of each is ever read."""
    from safetensors import safe_open  # only Hugging Face folders need it (pip install safetensors)

    handles = {}
    for path in ckpt.shards:
        try:
            handles[path] = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors' own error type for a damaged header
            raise ValueError(
                f"{path} cannot be read as safetensors ({e}); it may be truncated: download it again"
            ) from None
    where = ckpt.weight_map or {name: path for path, handle in handles.items() for name in handle.keys()}
    if ckpt.is_llama4:
        architecture = "Llama 4"
        tensors, unknown = llama4.hf_tensors(
            list(where), lambda name: _LazyTensor(handles[where[name]], name, where[name])
        )
        tied = text_config(ckpt.config).get("tie_word_embeddings", ckpt.config.get("tie_word_embeddings"))
    else:
        architecture, tensors, unknown = "LlamaForCausalLM", {}, []
        for hf_name, path in where.items():
            name = _llama_name(hf_name)
            if name is None:
                unknown.append(hf_name)
            elif name:
                tensors[name] = _LazyTensor(handles[path], hf_name, path)
        tied = ckpt.config.get("tie_word_embeddings")
    if tied:
        tensors.pop("output.weight", None)  # HF uses the embedding matrix whatever lm_head.weight holds
    if unknown:
        raise ValueError(
            f"{ckpt.folder} holds tensors that are not {architecture} weights ({', '.join(sorted(unknown)[:5])}): "
            "is it a quantized, adapter or other architecture's checkpoint? Only plain Llama weights load here"
        )
    if "output.weight" not in tensors and not tied:
        raise ValueError(
            f"{ckpt.folder} has no lm_head.weight but config.json says tie_word_embeddings is false: download it again"
        )
    return tensors


def _shard_reader(ckpt: Checkpoint, args: ModelArgs) -> tuple[list[str], Callable[[int], dict]]:
    """(the shards' names, read(i): shard i's tensors under the model's names, mapped from disk, not read). A
    Hugging Face folder counts as one unsharded shard; Llama 4's fused and flat keys are split per shard."""
    if ckpt.is_hf:
        tensors = _hf_tensors(ckpt)
        return [str(ckpt.folder)], lambda i: tensors
    names = [str(p) for p in ckpt.shards]
    if not ckpt.is_llama4:
        return names, lambda i: load_shard(ckpt.shards[i])
    warned: set[str] = set()  # one warning per kind of skipped key, not one per shard
    return names, lambda i: llama4.module_names(load_shard(ckpt.shards[i]), args, names[i], warned)


# --- resharding -----------------------------------------------------------------------------------------------


def split_dim(key: str) -> Optional[int]:
    """The dimension along which Meta splits the weight `key` (the model's names) over ranks; None: replicated."""
    if re.fullmatch(r"layers\.\d+\.feed_forward\.experts\.w[123]", key):  # Llama 4: (E, D, F), (E, F, D): along F
        return 1 if key.endswith(".w2") else 2
    module = key.rsplit(".", 2)[-2] if key.count(".") else key
    if module in COLUMN_PARALLEL or module == "tok_embeddings":
        return 0
    if module in ROW_PARALLEL and not key.endswith(".bias"):
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
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size}
    sizes["the feed-forward hidden size"] = args.ffn_hidden_dim
    if args.moe_args is not None:
        sizes["the experts' hidden size"] = args.expert_hidden_dim
    if args.vision_args is not None:
        vision = args.vision_args
        sizes |= {"dim": args.dim, "vision_args.n_heads": vision.n_heads, "vision_args.output_dim": vision.output_dim}
        sizes["the vision encoder's feed-forward hidden size"] = int(vision.mlp_ratio * vision.dim)

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


class RankShares:
    """This rank's share of every weight of a checkpoint, resharded from the checkpoint's shards to `world` ranks.

    Made from the first shard's shapes without reading a weight: `shapes` and `dtypes` say what each share will
    be. Iterating reads them, (the model's key, tensor), shard by shard: shards are mapped from disk (torch.load
    mmap), a share that lies in one shard stays a view of the file, and a share spread over several is copied
    piece by piece and given once whole, so a rank holds about its share of the model and no more. A Hugging
    Face Llama 1-3 folder's query/key rows are put back into Meta's rotary order (a copy; Llama 4's conversion
    keeps Meta's order)."""

    def __init__(self, ckpt: Checkpoint, args: ModelArgs, rank: int = 0, world: int = 1):
        check_parallel_size(args, 1 if ckpt.is_hf else len(ckpt.shards), world, ckpt.folder)
        self.ckpt, self.args, self.rank, self.world = ckpt, args, rank, world
        self.names, self._read = _shard_reader(ckpt, args)
        first = self._read(0)
        self._stored = {key: tensor.shape for key, tensor in first.items()}  # each shard's shapes
        if not ckpt.is_hf:
            self._check_shard_count()
        self.dtypes = {key: tensor.dtype for key, tensor in first.items() if key not in UNUSED_KEYS}
        del first  # read again below like every other shard, so that no reference keeps its file mapped
        n = len(self.names)
        self._plans = {}
        for key, shape in self._stored.items():
            if key in UNUSED_KEYS:
                continue
            dim = split_dim(key)
            if dim is None or dim >= len(shape):  # replicated (or a stray key, which build_transformer names)
                self._plans[key] = _plan(shape, 1, 0, 0, 0, 1)  # shard 0's copy, on every rank
                continue
            src = dim
            if key == "tok_embeddings.weight" and n > 1 and shape[1] != args.dim:
                src = 1  # Llama 2 layout: the hidden dimension is split; this model splits the vocabulary
            self._plans[key] = _plan(shape, n, src, dim, rank, world)
        # A text-only build of a model with images (no vision_args): the vision tower's weights are never read.
        vision = [key for key in self._plans if key.startswith(VISION_KEYS)] if args.vision_args is None else []
        self.skipped = {key: torch.Size(self._plans.pop(key)[0]) for key in vision}
        self.shapes = {key: torch.Size(share) for key, (share, _) in self._plans.items()}

    def _check_shard_count(self) -> None:
        """FileNotFoundError naming the missing shards when the first shard's share of the query projection says
        the checkpoint has more shards than the folder holds (a download interrupted between files)."""
        wq = self._stored.get("layers.0.attention.wq.weight")
        rows = self.args.n_heads * self.args.head_dim
        n = len(self.names)
        if wq is None or len(wq) != 2 or wq[1] != self.args.dim or wq[0] * n == rows or rows % wq[0]:
            return  # as many shards as the shapes imply, or shapes that build_transformer reports as a mismatch
        implied = rows // wq[0]
        if implied > n:
            folder = self.ckpt.folder
            missing = [folder / f"consolidated.{i:02d}.pth" for i in range(n, implied)]
            why = f" ({Path(self.names[0]).name}'s shapes and {self.ckpt.settings.name} make {implied} shards)"
            raise _missing_shards(folder, missing, why)

    def files(self, key: str) -> list[str]:
        """The files this rank's share of `key` is read from."""
        return [self.names[i] for i, _, _ in self._plans[key][1]]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        names, pending, partial = self.names, {}, {}
        for key, (_, parts) in self._plans.items():
            pending[key] = len(parts)
        for i in sorted({part[0] for _, parts in self._plans.values() for part in parts}):
            shard = self._read(i)
            if set(shard) != set(self._stored):
                diff = sorted(set(shard) ^ set(self._stored))
                raise ValueError(
                    f"{names[i]} and {names[0]} hold different keys ({', '.join(diff[:5])}): mixed-up downloads?"
                )
            for key, (share, parts) in self._plans.items():
                for j, span, out_span in parts:
                    if j != i:
                        continue
                    if shard[key].shape != self._stored[key]:
                        raise ValueError(
                            f"{names[i]}: '{key}' has shape {tuple(shard[key].shape)} but {names[0]} has "
                            f"{tuple(self._stored[key])}; are the shards from one model? Download them again"
                        )
                    piece = shard[key].narrow(*span)
                    if len(parts) == 1:  # the share lies in one shard: keep the mapped view, no copy
                        # ... unless shards are being merged: then every other weight is copied out of the files,
                        # and a view of a replicated norm would keep shard 0 and all its read pages mapped.
                        yield key, self._rotary_order(key, piece.clone() if self.world < len(names) else piece)
                        continue
                    if key not in partial:
                        partial[key] = torch.empty(share, dtype=piece.dtype)
                    partial[key].narrow(*out_span).copy_(piece)
                    pending[key] -= 1
                    if not pending[key]:
                        yield key, self._rotary_order(key, partial.pop(key))
            shard = piece = None  # the file is unmapped once no view into it is kept: its pages leave the rank's memory

    def _rotary_order(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        m = re.fullmatch(r"layers\.\d+\.attention\.w([qk])\.weight", key)
        if self.ckpt.kind != "hf" or m is None:
            return tensor
        local_heads = (self.args.n_heads if m.group(1) == "q" else self.args.n_kv_heads) // self.world
        if tensor.shape[0] != local_heads * self.args.head_dim:  # a rank's share is whole heads; else the build says
            return tensor
        return _unpermute_rotary(tensor, local_heads)


def load_state_dict(
    ckpt_dir: Union[PathLike, Checkpoint], args: ModelArgs, rank: int = 0, world: int = 1
) -> dict[str, torch.Tensor]:
    """This rank's weights under Meta's keys, resharded from the checkpoint's shards to `world` ranks."""
    return dict(RankShares(resolve(ckpt_dir), args, rank, world))


# --- building -------------------------------------------------------------------------------------------------


def build_transformer(
    ckpt_dir: Union[PathLike, Checkpoint],
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
    world: int = 1,
    quantize: Optional[str] = None,
) -> Transformer:
    """A Transformer holding this rank's weights: built on the meta device, its keys and shapes checked against
    the checkpoint's before any weight is read, then given the mapped tensors themselves as they are read (cast
    or moved one at a time only where dtype or device differ), each checked for NaN/inf as it is placed. A load
    that takes more than PROGRESS_AFTER_S seconds says how far it got on stderr (rank 0 only). quantize "int8" or
    "int4": the linear layers and experts are made empty in that form on the device first, and each weight is
    quantized into its layer as it is read, so that neither host memory nor the device holds the floating-point
    model (llama/quantize.py)."""
    ckpt = resolve(ckpt_dir)
    shares = RankShares(ckpt, args, rank, world)
    if shares.skipped:
        n = sum(shape.numel() for shape in shares.skipped.values())
        size = n * dtype.itemsize / 2**20
        size = f"{size / 1024:.2f} GiB" if size >= 1024 else f"{size:.1f} MiB"
        warnings.warn(
            f"{ckpt.path}: a text-only build: the vision tower's weights (vision_embeddings.*, vision_projection.*) "
            f"are skipped, {n:,} parameters on each rank, {size} in {str(dtype).removeprefix('torch.')}",
            stacklevel=2,
        )
    # On the meta device nothing is allocated, fairscale's full-size master weights included.
    with torch.device("meta"):
        model = Transformer(args)
    expected = {key: tensor.shape for key, tensor in model.state_dict().items()}
    source = ckpt.settings.name
    # Without output.weight the output projection is the embedding matrix (Llama 3.2 1B/3B)
    tied = "output.weight" not in shares.shapes and "tok_embeddings.weight" in shares.shapes
    missing = sorted(set(expected) - set(shares.shapes) - ({"output.weight"} if tied else set()))
    unexpected = sorted(set(shares.shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{ckpt.path} does not match {source}: missing {missing[:8] or 'none'}, unexpected {unexpected[:8] or 'none'}. "
            f"Is {source} from the same model as the weights?"
        )
    from_tokenizer = ckpt.params.get("vocab_size", -1) == -1  # Llama 2's params.json: the caller took the tokenizer's
    for key, shape in shares.shapes.items():
        if from_tokenizer and key in ("tok_embeddings.weight", "output.weight") and shape[1:] == expected[key][1:]:
            if shape[0] != expected[key][0]:
                raise ValueError(
                    f"the vocabulary taken from the tokenizer ({args.vocab_size} tokens, as {source} says "
                    f"vocab_size -1) does not match the {shape[0] * world} rows of '{key}' in {ckpt.path}: "
                    "pass the tokenizer shipped with these weights (tokenizer_path)"
                )
        if shape != expected[key]:
            files = ", ".join(str(p) for p in ckpt.shards)
            raise ValueError(
                f"{files}: '{key}' has shape {tuple(shape)} but {source} implies {tuple(expected[key])} "
                f"on {world} model-parallel rank(s); is {source} from the same model as the weights?"
            )
        if not shares.dtypes[key].is_floating_point:
            raise ValueError(f"{ckpt.path}: '{key}' holds {shares.dtypes[key]}, not floating-point weights")
    quantized = quantized_weight_keys(quantize_model(model, quantize, device=device, dtype=dtype)) if quantize else set()
    state = {}
    progress = _Progress(ckpt.path, args.n_layers, quiet=rank != 0)
    for key, tensor in shares:  # each weight, as it is read, is placed here, or quantized into its layer
        placed = tensor.to(device=device, dtype=dtype)
        check_finite(key, placed, shares.files(key), tensor)
        progress.placed(key, placed)
        if key in quantized:
            load_quantized(model, key, placed)
            release(tensor)  # its pages of the mapped file: read once, not kept
        else:
            state[key] = placed
    progress.done()
    if tied and "output.weight" in quantized:
        load_quantized(model, "output.weight", state["tok_embeddings.weight"])
    elif tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=not quantized, assign=True)  # keys checked above
    if tied and not quantized:
        model.output.weight = model.tok_embeddings.weight
    model.setup_caches(device, dtype)
    return model.eval()


def check_finite(key: str, tensor: torch.Tensor, files: list[str], stored: Optional[torch.Tensor] = None) -> None:
    """ValueError naming the file and the weight if `tensor` holds NaN or inf: bytes damaged on disk load silently
    and only fail at sampling. stored: the tensor as read, before a cast to `tensor`'s dtype.
    One aminmax per weight (a NaN propagates to it, an inf is its min or max): measured at 0.08-0.2 s per GB on two
    CPU cores with the file's pages in memory, where a float32 sum takes 2 s per GB. A weight left mapped from disk
    is read here rather than at the first forward pass."""
    if not tensor.is_floating_point() or not tensor.numel() or _finite(tensor):
        return
    if stored is not None and stored.dtype != tensor.dtype and _finite(stored):
        raise ValueError(
            f"'{key}' in {', '.join(files)} holds values too large for {tensor.dtype}: load it as {stored.dtype}"
        )
    bad = (~torch.isfinite(tensor)).sum().item()
    raise ValueError(
        f"{', '.join(files)}: '{key}' holds {bad} NaN or infinite value(s) of {tensor.numel()}: the file is damaged; "
        "download it again (re-run download.sh)"
    )


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


# Progress goes to stderr, and only once loading has taken this long: a small or fast load prints nothing.
PROGRESS_AFTER_S = 5.0


class _Progress:
    def __init__(self, path: Path, n_layers: int, quiet: bool):
        self.path, self.n_layers, self.quiet = path, n_layers, quiet
        self.start = self.last = time.monotonic()
        self.nbytes, self.printed = 0, False

    def placed(self, key: str, tensor: torch.Tensor) -> None:
        self.nbytes += tensor.nbytes
        now = time.monotonic()
        if self.quiet or now - self.last < PROGRESS_AFTER_S:
            return
        m = re.match(r"layers\.(\d+)\.", key)
        where = f", layer {int(m.group(1)) + 1}/{self.n_layers}" if m else ""
        self._say(f"loading {self.path}: {self.nbytes / 1e9:.1f} GB{where}, {now - self.start:.0f} s")
        self.last = now

    def done(self) -> None:
        if self.printed:
            self._say(f"loaded {self.path}: {self.nbytes / 1e9:.1f} GB in {time.monotonic() - self.start:.0f} s")

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.printed = True
