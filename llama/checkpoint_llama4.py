"""Llama 4's checkpoint names: the fused and flat keys of Meta's released consolidated.NN.pth files and Hugging
Face's Llama4ForCausalLM / Llama4ForConditionalGeneration names, mapped to the model's own (Meta's module names)."""

import re
import warnings
from typing import Any, Callable, Optional

import torch

from llama.args import ModelArgs

# Keys of Meta's released files that are no weights of the model: dropped with one warning line per kind.
SKIPPED = {
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

# Hugging Face's names for the model's, per layer (after "model.layers.N." or "language_model.model.layers.N.").
# gate_up_proj, down_proj (experts) and router.weight are handled apart: they are split or transposed.
LLAMA4_HF_LAYER_NAMES = {
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
# Hugging Face's names of the vision tower (Llama4ForConditionalGeneration) -> the model's, which are Meta's
_ENCODER = "vision_embeddings.vision_encoder."
HF_VISION_NAMES = {
    "vision_model.patch_embedding.linear.weight": _ENCODER + "conv1._linear.weight",
    "vision_model.class_embedding": _ENCODER + "class_embedding",
    "vision_model.positional_embedding_vlm": _ENCODER + "positional_embedding_vlm",
    "vision_model.layernorm_pre.weight": _ENCODER + "ln_pre.weight",
    "vision_model.layernorm_pre.bias": _ENCODER + "ln_pre.bias",
    "vision_model.layernorm_post.weight": _ENCODER + "ln_post.weight",
    "vision_model.layernorm_post.bias": _ENCODER + "ln_post.bias",
    "vision_model.vision_adapter.mlp.fc1.weight": "vision_embeddings.vision_adapter.mlp.c_fc.weight",
    "vision_model.vision_adapter.mlp.fc2.weight": "vision_embeddings.vision_adapter.mlp.c_proj.weight",
    "multi_modal_projector.linear_1.weight": "vision_projection.weight",
}
# per encoder layer (after "vision_model.model.layers.N."), each with .weight and .bias
HF_VISION_LAYER_NAMES = {
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
}
LLAMA4_HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_tensors(names: list[str], lazy: Callable[[str], Any]) -> tuple[dict[str, Any], list[str]]:
    """The model's tensors among a Hugging Face Llama 4 folder's (lazy(name): that tensor, mapped, not read), and
    the names that are no Llama 4 weight."""
    tensors: dict[str, Any] = {}
    unknown = []
    for name in names:
        vision_layer = re.fullmatch(r"vision_model\.model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name in HF_VISION_NAMES:
            tensors[HF_VISION_NAMES[name]] = lazy(name)
            continue
        if vision_layer and vision_layer.group(2) in HF_VISION_LAYER_NAMES:
            i, what, kind = vision_layer.groups()
            tensors[f"{_ENCODER}transformer.resblocks.{i}.{HF_VISION_LAYER_NAMES[what]}.{kind}"] = lazy(name)
            continue
        rest = name.removeprefix("language_model.")  # Llama4ForConditionalGeneration's text model
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", rest)
        layer, what = (f"layers.{m.group(1)}.", m.group(2)) if m else ("", "")
        if rest in LLAMA4_HF_NAMES:
            tensors[LLAMA4_HF_NAMES[rest]] = lazy(name)
        elif what in LLAMA4_HF_LAYER_NAMES:
            tensors[layer + LLAMA4_HF_LAYER_NAMES[what]] = lazy(name)
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
    return tensors, unknown
