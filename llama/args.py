"""Every configuration fact in one place: ModelArgs, MoEArgs and VisionArgs, params.json and Hugging Face's
config.json read into them, the RoPE defaults a params.json leaves out, and the sizes derived from them (head_dim,
hidden sizes)."""

import typing
import warnings
from dataclasses import dataclass, fields, is_dataclass
from typing import Optional, Union


@dataclass
class MoEArgs:
    """params.json's "moe_args" (Llama 4)."""

    num_experts: int = -1
    top_k: int = 1  # experts per token (1 in the released models)
    capacity_factor: float = 1.0
    auto_scale_F: bool = True  # Meta's name; divide the experts' hidden size by capacity_factor + 1
    interleave_moe_layer_step: int = 1  # every n-th layer is a MoE layer (Scout 1, Maverick 2)


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    # Meta's rule: two thirds of 4 * dim (SwiGLU has three matrices, not two), times the optional
    # multiplier, rounded up to a multiple of multiple_of.
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class Size:
    height: int
    width: int


@dataclass
class VisionArgs:
    """params.json's "vision_args" (Llama 4): the vision encoder (llama/vision.py). Sizes as {"height", "width"}."""

    image_size: Size  # one tile of the image, in pixels (Scout: 336 x 336)
    patch_size: Size  # one patch, in pixels (Scout: 14 x 14, so a tile is 24 x 24 patches)
    dim: int
    n_layers: int
    n_heads: int
    mlp_ratio: float  # the encoder's feed-forward has mlp_ratio * dim hidden features
    output_dim: int  # the adapter's output; vision_projection takes it to the language model's dim
    pixel_shuffle_ratio: float  # 0.5: each 2 x 2 block of patches becomes one token of 4 * dim features

    def __post_init__(self):
        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            value = Size(**value) if isinstance(value, dict) and set(value) == {"height", "width"} else value
            if not isinstance(value, Size) or not (positive_int(value.height) and positive_int(value.width)):
                raise ValueError(f'vision_args.{name} must be {{"height": H, "width": W}} in pixels, got {value!r}')
            setattr(self, name, value)
        for name in ("dim", "n_layers", "n_heads", "output_dim"):
            if not positive_int(getattr(self, name)):
                raise ValueError(f"vision_args.{name} must be a positive integer, got {getattr(self, name)!r}")
        h, w, ph, pw = self.image_size.height, self.image_size.width, self.patch_size.height, self.patch_size.width
        r = self.pixel_shuffle_ratio
        if h % ph or w % pw or h // ph != w // pw:
            raise ValueError(f"vision_args: a tile of {h} x {w} pixels must be a square grid of {ph} x {pw} patches")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ValueError(
                f"vision_args: dim {self.dim} must split into {self.n_heads} heads of a size divisible by 4 "
                "(2-D rotary positions turn half of each head's pairs with the column, half with the row)"
            )
        grid = h // ph
        if not 0 < r <= 1 or (grid * r) % 1 or (self.dim / r**2) % 1:
            raise ValueError(
                f"vision_args: pixel_shuffle_ratio {r} must shrink the {grid} x {grid} grid of patches and scale "
                f"dim {self.dim} up to whole numbers"
            )

    @property
    def patches_per_chunk(self) -> int:
        """Tokens one tile becomes: its patches, merged by pixel shuffle (Scout: 24 * 24 / 4 = 144)."""
        grid = self.image_size.height // self.patch_size.height
        return int(grid * self.pixel_shuffle_ratio) ** 2


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: one KV head per query head (Llama 1/2 multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_heads, the only value this architecture has
    vocab_size: int = -1  # -1 in Llama 2's params.json: take it from the tokenizer
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    # The dense feed-forward's hidden size; None: Meta's rule (swiglu_hidden_dim) on the three settings above.
    # Hugging Face's config.json states it (intermediate_size).
    ffn_hidden_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 2's params.json has none; Llama 3's says 500000
    use_scaled_rope: bool = False  # Llama 3.1+: slow the low RoPE frequencies down for a long context
    rope_scaling_factor: float = 8.0  # Llama 3.1; rope_defaults picks 32 for Llama 3.2 1B/3B, 16 for Llama 4
    rope_high_freq_factor: float = 4.0  # Llama 3.1; Llama 4: 1

    # Llama 4 (all off for Llama 1-3)
    moe_args: Optional[MoEArgs] = None
    ffn_exp: Optional[float] = None  # the experts' hidden size before Meta's SwiGLU rule, as a multiple of dim
    # The experts' (and shared expert's) hidden size; None: from ffn_exp (expert_hidden_dim). config.json states it.
    expert_hidden_dim: Optional[int] = None
    nope_layer_interval: Optional[int] = None  # every n-th layer has no RoPE (NoPE) and attends globally
    use_qk_norm: bool = False  # RMS-normalise q and k (no weight) after RoPE
    attention_chunk_size: Optional[int] = None  # RoPE layers attend within chunks of this many positions
    attn_temperature_tuning: bool = False  # NoPE layers scale q up with the position (long contexts)
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    vision_args: Optional[VisionArgs] = None  # the vision encoder, for images; None: a text-only model

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        # Settings left out get their derived values here, once: the model and the loaders read the fields.
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.moe_args, dict):
            self.moe_args = MoEArgs(**self.moe_args)
        if isinstance(self.vision_args, dict):
            try:
                self.vision_args = VisionArgs(**self.vision_args)
            except TypeError as e:  # a key missing or unknown
                raise ValueError(f"vision_args: {e}") from None
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            _check_positive(name, getattr(self, name))
        for name in ("ffn_hidden_dim", "expert_hidden_dim", "nope_layer_interval", "attention_chunk_size"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name), " or None")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of an even size")
        if self.head_dim not in (None, self.dim // self.n_heads):
            raise ValueError(
                f"head_dim {self.head_dim} is not dim / n_heads = {self.dim // self.n_heads}: not supported"
            )
        self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = swiglu_hidden_dim(4 * self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.moe_args is not None:
            moe = self.moe_args
            if moe.num_experts < 1 or not 1 <= moe.top_k <= moe.num_experts or moe.interleave_moe_layer_step < 1:
                raise ValueError(f"moe_args {moe} needs num_experts >= 1, 1 <= top_k <= num_experts, a step >= 1")
            if self.expert_hidden_dim is None:
                if self.ffn_exp is None or self.ffn_dim_multiplier is None:
                    raise ValueError("a mixture-of-experts model (moe_args) needs ffn_exp and ffn_dim_multiplier")
                self.expert_hidden_dim = self._expert_rule()

    def _expert_rule(self) -> int:
        """Meta's SwiGLU rule on ffn_exp * dim, shrunk by capacity_factor + 1 with auto_scale_F, rounded up to
        multiple_of (Scout: 8192)."""
        hidden_dim = int(2 * int(self.ffn_exp * self.dim) / 3)
        hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
        if self.moe_args.auto_scale_F:
            hidden_dim = int(hidden_dim / (self.moe_args.capacity_factor + 1))
        return hidden_dim + -hidden_dim % self.multiple_of

    def is_nope_layer(self, layer_id: int) -> bool:
        return self.nope_layer_interval is not None and (layer_id + 1) % self.nope_layer_interval == 0

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe_args is not None and (layer_id + 1) % self.moe_args.interleave_moe_layer_step == 0


def _check_positive(name: str, value, alternative: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelArgs.{name} must be a positive integer{alternative}, got {value!r}")


# --- params.json ----------------------------------------------------------------------------------------------


def rope_defaults(params: dict) -> dict:
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


def _has_type(value, hint) -> bool:
    if typing.get_origin(hint) is Union:  # Optional[X]
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if is_dataclass(hint):  # a nested object of params.json (moe_args)
        if not isinstance(value, dict):
            return False
        hints = typing.get_type_hints(hint)
        return set(value) <= set(hints) and all(_has_type(v, hints[k]) for k, v in value.items())
    return isinstance(value, hint)


def model_args(params: dict, source: str = "params.json", **overrides) -> ModelArgs:
    """ModelArgs from params.json's dict, with its types checked and the RoPE defaults filled in; unknown keys
    are dropped with a warning. overrides (max_seq_len, max_batch_size, ...) win over params."""
    known = typing.get_type_hints(ModelArgs)
    unknown = sorted(set(params) - set(known))
    if unknown:
        warnings.warn(f"{source}: ignoring keys this model does not use: {', '.join(unknown)}", stacklevel=2)
    # null in params.json means the default (Llama 4's rope_scaling_factor, for one)
    kwargs = {k: v for k, v in params.items() if k in known and v is not None}
    kwargs.update(rope_defaults(params))
    kwargs.update(overrides)
    for key, value in kwargs.items():
        if not _has_type(value, known[key]):
            hints = typing.get_args(known[key]) or [known[key]]
            nested = [h for h in hints if is_dataclass(h)]
            if nested:
                expected = "an object with keys among " + ", ".join(f.name for f in fields(nested[0]))
            else:
                expected = " or ".join(getattr(h, "__name__", str(h)) for h in hints)
            raise ValueError(f"{source}: '{key}' must be {expected}, got {value!r}")
    try:
        return ModelArgs(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# --- Hugging Face's config.json -------------------------------------------------------------------------------

LLAMA4_ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
# Meta's Llama 3.1 RoPE scaling, which model.py implements; HF configs spell it out and must agree.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Llama4TextConfig's defaults, for keys a config.json leaves out
LLAMA4_CONFIG_DEFAULTS = dict(
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
    return config.get("model_type") in ("llama4", "llama4_text") or any(
        a in LLAMA4_ARCHITECTURES for a in architectures
    )


def text_config(config: dict) -> dict:
    """The language model's settings: text_config of a Llama4ForConditionalGeneration config, else the config."""
    text = config.get("text_config", config)
    return text if isinstance(text, dict) else config


def config_params(config: dict, source: str = "config.json") -> dict:
    """params.json's settings for a Hugging Face LlamaForCausalLM or Llama 4 config.json; ValueError for anything
    else. The hidden sizes are carried as stated (ffn_hidden_dim, expert_hidden_dim)."""
    if is_llama4_config(config):
        params = _llama4_config_params(text_config(config), source)
        if config.get("vision_config") is not None:  # Llama4ForConditionalGeneration
            params["vision_args"] = _llama4_vision_params(config["vision_config"], source)
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
    _refuse_variants(config, source, "Llama", {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False})

    rope, rope_type = _rope_config(config, source)
    params = dict(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        ffn_hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),  # LlamaConfig's default
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
    )
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
    return params


def _rope_config(config: dict, source: str) -> tuple[dict, str]:
    # transformers 5 keeps RoPE settings in rope_parameters; older configs have rope_theta and rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    return rope, rope.get("rope_type", rope.get("type", "default"))


def _refuse_variants(config: dict, source: str, family: str, defaults: dict) -> None:
    """ValueError for variants a Hugging Face config can express but Meta's architecture cannot (each key of
    defaults must keep its default, head_dim must be hidden_size / heads): refused, never computed wrongly."""
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    checks = {key: (config.get(key, wanted), wanted) for key, wanted in defaults.items()}
    if dim % n_heads == 0:
        checks["head_dim"] = (config.get("head_dim") or dim // n_heads, dim // n_heads)
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ValueError(f"{source}: {key}={value!r} is not supported; Meta's {family} architecture has {wanted!r}")


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


def _llama4_config_params(text: dict, source: str) -> dict:
    """params.json's settings for the text model's part of a Hugging Face Llama 4 config.json."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    required += ("intermediate_size_mlp", "vocab_size", "num_local_experts")
    missing = [key for key in required if key not in text]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: it is not a complete Llama 4 config; download it again")
    text = {**LLAMA4_CONFIG_DEFAULTS, **text}
    for key in (*required, "num_key_value_heads", "num_experts_per_tok", "interleave_moe_layer_step"):
        value = text[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    for key in ("use_qk_norm", "attn_temperature_tuning"):  # Scout's config.json says attn_temperature_tuning: 4
        if not isinstance(text[key], int):
            raise ValueError(f"{source}: '{key}' must be true or false, got {text[key]!r}")
    n_layers = text["num_hidden_layers"]
    _refuse_variants(text, source, "Llama 4", {"hidden_act": "silu", "attention_bias": False})

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

    rope, rope_type = _rope_config(text, source)
    params = dict(
        dim=text["hidden_size"],
        n_layers=n_layers,
        n_heads=text["num_attention_heads"],
        n_kv_heads=text["num_key_value_heads"],
        vocab_size=text["vocab_size"],
        ffn_hidden_dim=text["intermediate_size_mlp"],  # the dense layers'
        expert_hidden_dim=text["intermediate_size"],
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
    )
    if rope_type == "llama3":
        for key in ("low_freq_factor", "original_max_position_embeddings"):
            if rope.get(key, LLAMA3_ROPE[key]) != LLAMA3_ROPE[key]:
                raise ValueError(
                    f"{source}: llama3 RoPE scaling with {key}={rope[key]!r} is not supported "
                    f"(Meta's is {LLAMA3_ROPE[key]})"
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


# Llama4VisionConfig's defaults, for keys a config.json leaves out
LLAMA4_VISION_CONFIG_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=34,
    num_attention_heads=16,
    intermediate_size=5632,
    vision_output_dim=7680,
    image_size=448,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=4096,
    projector_output_dim=4096,
)


def _llama4_vision_params(vision: dict, source: str) -> dict:
    """params.json's vision_args for the vision_config of a Hugging Face Llama4ForConditionalGeneration config."""
    if not isinstance(vision, dict):
        raise ValueError(f"{source}: vision_config must be an object, got {vision!r}")
    vision = {**LLAMA4_VISION_CONFIG_DEFAULTS, **vision}
    for key in LLAMA4_VISION_CONFIG_DEFAULTS:
        value = vision[key]
        if key != "pixel_shuffle_ratio" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{source}: vision_config '{key}' must be a positive integer, got {value!r}")
    dim, ratio, output_dim = vision["hidden_size"], vision["pixel_shuffle_ratio"], vision["vision_output_dim"]
    theta = (vision.get("rope_parameters") or {}).get("rope_theta", vision.get("rope_theta", 10000.0))
    # Variants transformers can express but Meta's encoder cannot: refused, never computed wrongly. Its adapter's
    # input is intermediate_size, which is the pixel-shuffled dim only when mlp_ratio is 1 / ratio² (Scout: 4).
    fixed = {
        "hidden_act": (vision.get("hidden_act", "gelu"), "gelu"),
        "num_channels": (vision.get("num_channels", 3), 3),
        "multi_modal_projector_bias": (vision.get("multi_modal_projector_bias", False), False),
        "rope_theta": (theta, 10000.0),
        "projector_input_dim": (vision["projector_input_dim"], output_dim),
        "projector_output_dim": (vision["projector_output_dim"], output_dim),
        "intermediate_size": (vision["intermediate_size"], int(dim / ratio**2)),
    }
    for key, (value, wanted) in fixed.items():
        if value != wanted:
            raise ValueError(f"{source}: vision_config {key}={value!r} is not supported; Meta's Llama 4 has {wanted!r}")
    return dict(
        image_size={"height": vision["image_size"], "width": vision["image_size"]},
        patch_size={"height": vision["patch_size"], "width": vision["patch_size"]},
        dim=dim,
        n_layers=vision["num_hidden_layers"],
        n_heads=vision["num_attention_heads"],
        mlp_ratio=vision["intermediate_size"] / dim,
        output_dim=output_dim,
        pixel_shuffle_ratio=ratio,
    )
