"""Llama 4's checkpoint names: the fused and flat keys of Meta's released consolidated.NN.pth files and Hugging
Face's Llama4ForCausalLM / Llama4ForConditionalGeneration names, mapped to the model's own (Meta's module names)."""

import math
import re
import warnings
from typing import Any, Callable, Optional

import torch

from llama.model import ModelArgs, swiglu_hidden_dim
from llama.moe import moe_hidden_dim

# Keys of Meta's released files that the text model does not use: dropped with one warning line per kind.
SKIPPED = {
    "vision": (
        re.compile(r"(vision_embeddings|vision_projection)\..*|vision_projection"),
        "this library runs the text model; the vision tower's weights (vision_embeddings.*, vision_projection.*) "
        "are skipped",
    ),
    "router statistics": (
        re.compile(r"layers\.\d+\.feed_forward\.(global_gate_stats_3E|running_gate_stats_3E|expert_activation_DE)"),
        "skipping the router statistics training left in the files (global_gate_stats_3E, running_gate_stats_3E, "
        "expert_activation_DE): they are not weights, and Meta's loader ignores them too",
    ),
}
# Training bookkeeping of the modules Meta's load hooks name (Transformer Engine's extra state): not weights,
# dropped without a word, as Meta's loader drops them.
EXTRA_STATE = re.compile(
    r"layers\.\d+\.(attention\.wqkv|attention\.wo|feed_forward\.experts\.mlp|feed_forward\.mlp_shared)\._extra_state"
)

# Packed names in Meta's released files (accepted by the reference's load hooks) -> the model's names, per layer.
RENAMED = {
    "attention.wqkv.layer_norm_weight": "attention_norm.weight",
    "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",  # dense layers
    "feed_forward.norm.weight": "ffn_norm.weight",  # MoE layers
    "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
    "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight",
}
# The experts flattened for storage: w1, w3 (E, D, F) stored as (E·D, F); w2 (E, F, D) as (E·F, D).
FLAT_EXPERTS = {
    "feed_forward.experts.moe_w_in_eD_F": "feed_forward.experts.w1",
    "feed_forward.experts.moe_w_swiglu_eD_F": "feed_forward.experts.w3",
    "feed_forward.experts.moe_w_out_eF_D": "feed_forward.experts.w2",
}
_LAYER_KEY = re.compile(r"(layers\.\d+\.)(.+)")


def module_names(
    shard: dict[str, torch.Tensor], args: ModelArgs, source: str, warned: Optional[set] = None
) -> dict[str, torch.Tensor]:
    """One shard's tensors under the model's names. Fused tensors are split per shard (wqkv is this shard's
    [wq; wk; wv], fc1_weight its [w1; w3]) and flat experts reshaped, all as views of the shard (no copy), so the
    pieces reshard like any other weight. Skipped kinds warn once each (kinds already in `warned` stay quiet)."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # the model's name -> the file's key it came from

    def put(name: str, tensor: torch.Tensor, key: str) -> None:
        if name in out:
            raise ValueError(
                f"{source} holds both '{origin[name]}' and '{key}', two names for the weight {name}: "
                "is it two checkpoints merged into one file? Use the files as Meta released them"
            )
        out[name], origin[name] = tensor, key

    for key, tensor in shard.items():
        kind = next((kind for kind, (pattern, _) in SKIPPED.items() if pattern.fullmatch(key)), None)
        if kind is not None:
            if warned is not None and kind not in warned:
                warned.add(kind)
                warnings.warn(f"{source}: {SKIPPED[kind][1]}", stacklevel=3)
            continue
        if EXTRA_STATE.fullmatch(key):
            continue
        m = _LAYER_KEY.fullmatch(key)
        prefix, name = m.groups() if m else ("", key)
        if name in RENAMED:
            put(prefix + RENAMED[name], tensor, key)
        elif name == "attention.wqkv.weight":
            head_dim, rest = divmod(tensor.shape[0], args.n_heads + 2 * args.n_kv_heads)  # this shard's share
            if rest or tensor.dim() != 2:
                raise ValueError(
                    f"{source}: '{key}' has shape {tuple(tensor.shape)}, which does not split into n_heads "
                    f"{args.n_heads} + 2 * n_kv_heads {args.n_kv_heads} heads; is params.json from the same model?"
                )
            sizes = [head_dim * args.n_heads, head_dim * args.n_kv_heads, head_dim * args.n_kv_heads]
            for w, part in zip(("wq", "wk", "wv"), tensor.split(sizes, dim=0)):
                put(f"{prefix}attention.{w}.weight", part, key)
        elif name == "feed_forward.mlp.fc1_weight":
            if tensor.dim() != 2 or tensor.shape[0] % 2:
                raise ValueError(f"{source}: '{key}' has shape {tuple(tensor.shape)}, not [w1; w3] stacked rows")
            w1, w3 = tensor.chunk(2, dim=0)
            put(prefix + "feed_forward.w1.weight", w1, key)
            put(prefix + "feed_forward.w3.weight", w3, key)
        elif name in FLAT_EXPERTS:
            put(prefix + FLAT_EXPERTS[name], _unflatten_experts(key, tensor, args, source), key)
        else:
            put(key, tensor, key)
    return out


def _unflatten_experts(key: str, tensor: torch.Tensor, args: ModelArgs, source: str) -> torch.Tensor:
    if args.moe_args is None:
        raise ValueError(
            f"{source} holds expert weights ('{key}') but params.json has no moe_args: is it this model's?"
        )
    n, dim = args.moe_args.num_experts, args.dim
    # (E·D, F) -> (E, D, F) for w1, w3; (E·F, D) -> (E, F, D) for w2
    rows_ok = tensor.shape[0] == n * dim if key.endswith("eD_F") else tensor.shape[-1] == dim
    if tensor.dim() != 2 or tensor.shape[0] % n or not rows_ok:
        raise ValueError(
            f"{source}: '{key}' has shape {tuple(tensor.shape)}, not {n} experts of dim {dim} stored flat; "
            "is params.json (moe_args.num_experts, dim) from the same model?"
        )
    return tensor.view(n, dim, -1) if key.endswith("eD_F") else tensor.view(n, -1, dim)


def released_names(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of module_names: one shard under the names of Meta's released Llama 4 files (fused attention
    and dense feed-forward, flat experts, packed norm names). Copies; for writing checkpoints."""
    out, layers = {}, {}
    for key, tensor in shard.items():
        m = _LAYER_KEY.fullmatch(key)
        if m is None:
            out[key] = tensor
        else:
            layers.setdefault(m.group(1), {})[m.group(2)] = tensor
    for prefix, w in layers.items():
        p = prefix
        moe = "feed_forward.router_DE" in w
        out[p + "attention.wqkv.weight"] = torch.cat([w.pop(f"attention.{n}.weight") for n in ("wq", "wk", "wv")])
        out[p + "attention.wo.weight"] = w.pop("attention.wo.weight")
        out[p + "attention.wqkv.layer_norm_weight"] = w.pop("attention_norm.weight")
        if moe:
            out[p + "feed_forward.norm.weight"] = w.pop("ffn_norm.weight")
            out[p + "feed_forward.router_DE"] = w.pop("feed_forward.router_DE")
            for flat, name in FLAT_EXPERTS.items():
                expert = w.pop(name)
                out[p + flat] = expert.reshape(-1, expert.shape[-1]).clone()  # (E·D, F) or (E·F, D)
            for packed, name in RENAMED.items():
                if name.startswith("feed_forward.shared_expert."):
                    out[p + packed] = w.pop(name)
        else:
            out[p + "feed_forward.mlp.layer_norm_weight"] = w.pop("ffn_norm.weight")
            out[p + "feed_forward.mlp.fc1_weight"] = torch.cat(
                [w.pop("feed_forward.w1.weight"), w.pop("feed_forward.w3.weight")]
            )
            out[p + "feed_forward.mlp.fc2_weight"] = w.pop("feed_forward.w2.weight")
        assert not w, f"released_names left {sorted(w)} of {prefix}"
    return out


# --- Hugging Face ---------------------------------------------------------------------------------------------

HF_ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
# Hugging Face's names for the model's, per layer (after "model.layers.N." or "language_model.model.layers.N.").
# gate_up_proj, down_proj (experts) and router.weight are handled apart: they are split or transposed.
HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",  # no rotary permutation, unlike Llama 3's conversion
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "feed_forward.gate_proj.weight": "feed_forward.w1.weight",
    "feed_forward.up_proj.weight": "feed_forward.w3.weight",
    "feed_forward.down_proj.weight": "feed_forward.w2.weight",
    "feed_forward.shared_expert.gate_proj.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.shared_expert.down_proj.weight": "feed_forward.shared_expert.w2.weight",
    "feed_forward.experts.down_proj": "feed_forward.experts.w2",  # (E, F, D), as the model's
}
HF_VISION = re.compile(r"(vision_model|multi_modal_projector)\..*")
# Llama4TextConfig's defaults, for keys a config.json leaves out
HF_DEFAULTS = dict(
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    no_rope_layer_interval=4,
    use_qk_norm=True,
    attention_chunk_size=8192,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
)


def is_llama4_config(config: dict) -> bool:
    architectures = config.get("architectures") or []
    return config.get("model_type") in ("llama4", "llama4_text") or any(a in HF_ARCHITECTURES for a in architectures)


def hf_text_config(config: dict) -> dict:
    """The language model's settings: text_config of a Llama4ForConditionalGeneration config, else the config."""
    text = config.get("text_config", config)
    return text if isinstance(text, dict) else config


_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
_HF_TOP["lm_head.weight"] = "output.weight"


def hf_tensors(names: list[str], lazy: Callable[[str], Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """The model's tensors among a Hugging Face Llama 4 folder's (lazy(name): that tensor, mapped, not read), and
    the names that are no Llama 4 text weight. The vision tower's are skipped, with one warning line."""
    tensors: dict[str, Any] = {}
    unknown, vision = [], False
    for name in names:
        if HF_VISION.fullmatch(name):
            vision = True
            continue
        rest = name.removeprefix("language_model.")  # Llama4ForConditionalGeneration's text model
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", rest)
        layer, what = (f"layers.{m.group(1)}.", m.group(2)) if m else ("", "")
        if rest in _HF_TOP:
            tensors[_HF_TOP[rest]] = lazy(name)
        elif what in HF_LAYER_NAMES:
            tensors[layer + HF_LAYER_NAMES[what]] = lazy(name)
        elif what == "feed_forward.experts.gate_up_proj":  # (E, D, 2F): w1 and w3 side by side
            both = lazy(name)
            hidden = both.shape[-1] // 2
            tensors[layer + "feed_forward.experts.w1"] = both.part(2, 0, hidden)
            tensors[layer + "feed_forward.experts.w3"] = both.part(2, hidden, hidden)
        elif what == "feed_forward.router.weight":  # (E, D), a linear layer's weight; router_DE is (D, E)
            router = lazy(name)
            tensors[layer + "feed_forward.router_DE"] = router.narrow(0, 0, router.shape[0]).t().contiguous()
        else:
            unknown.append(name)
    if vision:
        warnings.warn(
            f"{source}: this library runs the text model; the vision tower's weights (vision_model.*, "
            "multi_modal_projector.*) are skipped",
            stacklevel=3,
        )
    return tensors, unknown


def _round_up(x: int, multiple: int) -> int:
    return x + -x % multiple


def ffn_shape(dim: int, intermediate_size: int, intermediate_size_mlp: int, source: str) -> dict:
    """multiple_of, ffn_dim_multiplier and ffn_exp for which Meta's sizing rules (llama/model.py, llama/moe.py)
    give exactly the experts' hidden size (intermediate_size) and the dense layers' (intermediate_size_mlp)."""
    base = int(2 * 4 * dim / 3)
    common = math.gcd(intermediate_size, intermediate_size_mlp)
    for multiple_of in (1 << k for k in range((common & -common).bit_length() - 1, -1, -1)):
        multiplier = (intermediate_size_mlp + 0.5) / base  # int(multiplier * base) is intermediate_size_mlp
        if swiglu_hidden_dim(4 * dim, multiple_of, multiplier) != intermediate_size_mlp:
            continue
        # The experts: int(multiplier * int(2 * int(ffn_exp * dim) / 3)), halved (auto_scale_F, capacity 1),
        # rounded up to multiple_of. Try the integers y = int(2 * int(ffn_exp * dim) / 3) around the target.
        guess = round(2 * intermediate_size / multiplier)
        for y in range(max(guess - 4, 1), guess + 5):
            if _round_up(int(int(multiplier * y) / 2), multiple_of) != intermediate_size:
                continue
            ffn_exp = ((3 * y + 1) // 2 + 0.5) / dim  # int(ffn_exp * dim) = ceil(3y / 2), whose 2/3 is y
            params = dict(multiple_of=multiple_of, ffn_dim_multiplier=multiplier, ffn_exp=ffn_exp)
            args = ModelArgs(dim=dim, n_heads=1, moe_args=dict(num_experts=1), **params)
            if moe_hidden_dim(args) == intermediate_size:
                return params
    raise ValueError(
        f"{source}: intermediate_size {intermediate_size} and intermediate_size_mlp {intermediate_size_mlp} cannot "
        f"both come from Meta's feed-forward sizing for hidden_size {dim}; not supported"
    )


def _layer_pattern(flags: list[bool], what: str, source: str) -> Optional[int]:
    """n such that exactly every n-th layer has the flag (None if no layer has it); ValueError otherwise."""
    flagged = [i for i, f in enumerate(flags) if f]
    if not flagged:
        return None
    n = flagged[0] + 1
    if [(i + 1) % n == 0 for i in range(len(flags))] != list(flags):
        raise ValueError(
            f"{source}: {what} at layers {flagged} is not every n-th layer, which is all Meta's Llama 4 "
            "(and this library) can express"
        )
    return n


def hf_params(config: dict, source: str) -> dict:
    """params.json's settings for a Hugging Face Llama 4 config.json (Llama4ForCausalLM, or the text model of
    Llama4ForConditionalGeneration)."""
    text = hf_text_config(config)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    required += ("intermediate_size_mlp", "vocab_size", "num_local_experts")
    missing = [key for key in required if key not in text]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: it is not a complete Llama 4 config; download it again")
    text = {**HF_DEFAULTS, **text}
    for key in (*required, "num_key_value_heads", "num_experts_per_tok", "interleave_moe_layer_step"):
        value = text[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    for key in ("use_qk_norm", "attn_temperature_tuning"):  # Scout's config.json says attn_temperature_tuning: 4
        if not isinstance(text[key], int):
            raise ValueError(f"{source}: '{key}' must be true or false, got {text[key]!r}")
    dim, n_heads, n_layers = text["hidden_size"], text["num_attention_heads"], text["num_hidden_layers"]
    from llama.checkpoint import refuse_variants  # llama.checkpoint imports this module

    refuse_variants(text, source, "Llama 4", {"hidden_act": "silu", "attention_bias": False})

    # HF: no_rope_layers[i] is 1 where layer i uses RoPE; Meta: every nope_layer_interval-th layer has none.
    interval = text["no_rope_layer_interval"]
    no_rope = text.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    if not isinstance(no_rope, list) or len(no_rope) < n_layers:
        raise ValueError(f"{source}: no_rope_layers must list one 0 or 1 per layer, got {no_rope!r}")
    nope_layer_interval = _layer_pattern([not f for f in no_rope[:n_layers]], "NoPE (no_rope_layers 0)", source)
    step = text["interleave_moe_layer_step"]
    moe_layers = text.get("moe_layers")
    moe_layers = list(range(step - 1, n_layers, step)) if moe_layers is None else moe_layers
    step = _layer_pattern([i in moe_layers for i in range(n_layers)], "moe_layers", source) or n_layers + 1
    chunk = text["attention_chunk_size"]
    layer_types = ["chunked_attention" if f and chunk is not None else "full_attention" for f in no_rope[:n_layers]]
    if text.get("layer_types") not in (None, layer_types):
        raise ValueError(
            f"{source}: layer_types {text['layer_types']} disagree with no_rope_layers; expected {layer_types}"
        )

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    params = dict(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=text["num_key_value_heads"],
        vocab_size=text["vocab_size"],
        norm_eps=text["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 500000.0)),
        nope_layer_interval=nope_layer_interval,
        use_qk_norm=bool(text["use_qk_norm"]),
        attention_chunk_size=chunk,
        attn_temperature_tuning=bool(text["attn_temperature_tuning"]),
        floor_scale=text["floor_scale"],
        attn_scale=text["attn_scale"],
        moe_args=dict(
            num_experts=text["num_local_experts"], top_k=text["num_experts_per_tok"], interleave_moe_layer_step=step
        ),
        **ffn_shape(dim, text["intermediate_size"], text["intermediate_size_mlp"], source),
    )
    if rope_type == "llama3":
        for key, value in {"low_freq_factor": 1.0, "original_max_position_embeddings": 8192}.items():
            if rope.get(key, value) != value:
                raise ValueError(
                    f"{source}: llama3 RoPE scaling with {key}={rope[key]!r} is not supported (Meta's is {value})"
                )
        if "factor" not in rope:
            raise ValueError(f"{source}: llama3 RoPE scaling without a factor; Llama 4 Scout uses 16")
        params.update(
            use_scaled_rope=True,
            rope_scaling_factor=rope["factor"],
            rope_high_freq_factor=rope.get("high_freq_factor", 1.0),
        )
    elif rope_type not in (None, "default"):
        raise ValueError(f"{source}: RoPE type {rope_type!r} is not supported; Llama 4 uses 'default' or 'llama3'")
    return params
