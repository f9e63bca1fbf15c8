"""Hugging Face transformers' LlamaForCausalLM (and Llama4ForCausalLM) holding the same weights as a Meta-layout
state dict: the independent implementation the model is checked against."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama.model import ModelArgs


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Meta rotates interleaved pairs (2i, 2i+1); HF rotates halves (i, i + head_dim/2). Reorder each head's rows.
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_model(args: ModelArgs, state: dict[str, torch.Tensor], rope_factor: float | None = None) -> LlamaForCausalLM:
    """rope_factor: the llama3 rope_scaling factor for a use_scaled_rope model (HF's configs say 8 or 32)."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = {
            "rope_type": "llama3",
            "rope_theta": args.rope_theta,
            "factor": rope_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    tied = "output.weight" not in state
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=max(args.max_seq_len, 8193),
        rms_norm_eps=args.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = state["output.weight"]
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf[h + "self_attn.q_proj.weight"] = permute_for_hf(state[m + "attention.wq.weight"], args.n_heads)
        hf[h + "self_attn.k_proj.weight"] = permute_for_hf(state[m + "attention.wk.weight"], args.n_kv_heads)
        hf[h + "self_attn.v_proj.weight"] = state[m + "attention.wv.weight"]
        hf[h + "self_attn.o_proj.weight"] = state[m + "attention.wo.weight"]
        hf[h + "mlp.gate_proj.weight"] = state[m + "feed_forward.w1.weight"]
        hf[h + "mlp.up_proj.weight"] = state[m + "feed_forward.w3.weight"]
        hf[h + "mlp.down_proj.weight"] = state[m + "feed_forward.w2.weight"]
        hf[h + "input_layernorm.weight"] = state[m + "attention_norm.weight"]
        hf[h + "post_attention_layernorm.weight"] = state[m + "ffn_norm.weight"]
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if tied:
        model.tie_weights()
    return model


def hf_llama4(args: ModelArgs, state: dict, dtype: torch.dtype = torch.float32):
    """transformers' Llama4ForCausalLM with the same weights (its names: no q/k permutation for Llama 4;
    gate_up_proj is w1 and w3 side by side, router.weight is router_DE transposed)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig  # transformers 4.51+

    moe_layers = [i for i in range(args.n_layers) if args.is_moe_layer(i)]
    first = moe_layers[0]
    dense = next((i for i in range(args.n_layers) if i not in moe_layers), None)
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = dict(
            rope_type="llama3",
            rope_theta=args.rope_theta,
            factor=args.rope_scaling_factor,
            low_freq_factor=1.0,
            high_freq_factor=args.rope_high_freq_factor,
            original_max_position_embeddings=8192,
        )
    config = Llama4TextConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=state[f"layers.{first}.feed_forward.experts.w1"].shape[-1],
        intermediate_size_mlp=state[f"layers.{dense}.feed_forward.w1.weight"].shape[0] if dense is not None else 64,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.dim // args.n_heads,
        max_position_embeddings=max(args.max_seq_len, 8193),
        rms_norm_eps=args.norm_eps,
        num_experts_per_tok=args.moe_args.top_k,
        num_local_experts=args.moe_args.num_experts,
        moe_layers=moe_layers,
        interleave_moe_layer_step=args.moe_args.interleave_moe_layer_step,
        use_qk_norm=args.use_qk_norm,
        no_rope_layers=[int(not args.is_nope_layer(i)) for i in range(args.n_layers)],
        attention_chunk_size=args.attention_chunk_size,
        attn_temperature_tuning=args.attn_temperature_tuning,
        floor_scale=int(args.floor_scale),
        attn_scale=args.attn_scale,
        rope_parameters=rope,
        attn_implementation="eager",
    )
    hf = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in zip(("wq", "wk", "wv", "wo"), ("q_proj", "k_proj", "v_proj", "o_proj")):
            hf[h + f"self_attn.{theirs}.weight"] = state[m + f"attention.{ours}.weight"]
        hf[h + "input_layernorm.weight"] = state[m + "attention_norm.weight"]
        hf[h + "post_attention_layernorm.weight"] = state[m + "ffn_norm.weight"]
        ff = m + "feed_forward."
        if args.is_moe_layer(i):
            hf[h + "feed_forward.router.weight"] = state[ff + "router_DE"].T
            hf[h + "feed_forward.experts.gate_up_proj"] = torch.cat(
                [state[ff + "experts.w1"], state[ff + "experts.w3"]], dim=-1
            )
            hf[h + "feed_forward.experts.down_proj"] = state[ff + "experts.w2"]
            ff, prefix = ff + "shared_expert.", h + "feed_forward.shared_expert."
        else:
            prefix = h + "feed_forward."
        hf[prefix + "gate_proj.weight"] = state[ff + "w1.weight"]
        hf[prefix + "up_proj.weight"] = state[ff + "w3.weight"]
        hf[prefix + "down_proj.weight"] = state[ff + "w2.weight"]
    with torch.device("meta"):  # no random initialisation: every weight is given
        model = Llama4ForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in hf.items()}, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were made on the meta device
    return model.eval()
