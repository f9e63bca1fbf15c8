"""Llama 4 with images: the logits of image+text prompts equal transformers' Llama4ForConditionalGeneration given the
same weights and pixels, the vision encoder and adapter equal Meta's reference (llama-models), a text prompt reads
the same with or without the vision tower, wrong image inputs get a ValueError; Meta's released folders (any number
of shards, one or two ranks) and Hugging Face folders load the tower and give the same image-prompt logits."""

import contextlib
import importlib.util
import shutil

import pytest
import test_llama4_model as llama4_model
import torch
from distributed import torchrun_logits_many
from hf_reference import hf_llama4

from llama.args import model_args
from llama.checkpoint import build_transformer, read_params
from llama.model import ModelArgs, Transformer
from llama.tiny import TINY_LLAMA4_PARAMS, llama4_tokenizer, random_state_dict, write_checkpoint
from llama.tokenizer import Tokenizer

VOCAB, PATCH_ID = 256, 200  # PATCH_ID plays <|patch|>
# A tile of 32 x 32 pixels in patches of 8: a 4 x 4 grid, pixel-shuffled by 0.5 into 4 tokens per tile. mlp_ratio
# 4 = 1 / ratio², as in Scout (transformers sizes its adapter's input by the encoder's feed-forward).
VISION = dict(
    image_size={"height": 32, "width": 32},
    patch_size={"height": 8, "width": 8},
    dim=32,
    n_layers=2,
    n_heads=2,
    mlp_ratio=4.0,
    output_dim=48,
    pixel_shuffle_ratio=0.5,
)
# Scout's text layout scaled down (tests/test_llama4_model.py's), with MoE every second layer and the vision tower.
SCOUT = dict(
    llama4_model.SCOUT,
    vocab_size=VOCAB,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2),
    vision_args=VISION,
    max_seq_len=32,
    max_batch_size=2,
)
ATOL = 1e-4


def random_weights(args: ModelArgs, seed: int = 0, std: float = 0.15) -> dict:
    """Every parameter, random: norms near 1, biases and the router spread out, the rest normal(0, std)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight") or (".ln_" in key and key.endswith(".weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("router_DE") or key.endswith(".bias"):
            state[key] = torch.randn(shape, generator=g) * (1.0 if key.endswith("router_DE") else 0.1)
        else:
            state[key] = torch.randn(shape, generator=g) * std
    return state


def image_prompt(seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two rows of 20 tokens: row 0 holds an image of 2 tiles (8 patch tokens) amid text, row 1 two images of one
    tile each (4 patch tokens each). Returns the tokens and the images' pixels, in the order of their patches."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, PATCH_ID, (2, 20), generator=g)
    tokens[0, 5:13] = PATCH_ID
    tokens[1, 2:6] = PATCH_ID
    tokens[1, 11:15] = PATCH_ID
    images = [torch.randn(n, 3, 32, 32, generator=g) for n in (2, 1, 1)]
    return tokens, images


def our_model(args: ModelArgs, state: dict) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_vision_names(state: dict) -> dict:
    """Our vision tower's weights (Meta's names) under transformers' Llama4ForConditionalGeneration names."""
    top = {
        "vision_embeddings.vision_encoder.conv1._linear.weight": "vision_model.patch_embedding.linear.weight",
        "vision_embeddings.vision_encoder.class_embedding": "vision_model.class_embedding",
        "vision_embeddings.vision_encoder.positional_embedding_vlm": "vision_model.positional_embedding_vlm",
        "vision_embeddings.vision_adapter.mlp.c_fc.weight": "vision_model.vision_adapter.mlp.fc1.weight",
        "vision_embeddings.vision_adapter.mlp.c_proj.weight": "vision_model.vision_adapter.mlp.fc2.weight",
        "vision_projection.weight": "multi_modal_projector.linear_1.weight",
    }
    for ours, theirs in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")):
        for p in ("weight", "bias"):
            top[f"vision_embeddings.vision_encoder.{ours}.{p}"] = f"vision_model.{theirs}.{p}"
    block = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj"}
    block |= {"attn.wo": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    block |= {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
    hf = {}
    for key, tensor in state.items():
        if key in top:
            hf[top[key]] = tensor
        elif key.startswith("vision_embeddings.vision_encoder.transformer.resblocks."):
            i, rest = key.removeprefix("vision_embeddings.vision_encoder.transformer.resblocks.").split(".", 1)
            module, p = rest.rsplit(".", 1)
            hf[f"vision_model.model.layers.{i}.{block[module]}.{p}"] = tensor
    return hf


def hf_model(args: ModelArgs, state: dict):
    """transformers' Llama4ForConditionalGeneration holding the same weights: the text model as hf_llama4 maps it,
    the vision tower as hf_vision_names does."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text_state = {k: v for k, v in state.items() if not k.startswith("vision_")}
    text = hf_llama4(args, text_state)
    v = args.vision_args
    vision_config = dict(
        hidden_size=v.dim,
        num_hidden_layers=v.n_layers,
        num_attention_heads=v.n_heads,
        intermediate_size=int(v.mlp_ratio * v.dim),
        image_size=v.image_size.height,
        patch_size=v.patch_size.height,
        pixel_shuffle_ratio=v.pixel_shuffle_ratio,
        vision_output_dim=v.output_dim,
        projector_input_dim=v.output_dim,
        projector_output_dim=v.output_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config = Llama4Config(text_config=text.config.to_dict(), vision_config=vision_config, image_token_index=PATCH_ID)
    config._attn_implementation = "eager"
    model = Llama4ForConditionalGeneration(config).float().eval()
    hf = {f"language_model.{k}": t for k, t in text.state_dict().items()} | hf_vision_names(state)
    model.load_state_dict(hf, strict=True)
    return model


@pytest.fixture(scope="module")
def vision_model():
    args = ModelArgs(**SCOUT)
    state = random_weights(args)
    return args, state, our_model(args, state)


def test_image_prompt_logits_equal_transformers(vision_model):
    pytest.importorskip("transformers")
    args, state, ours = vision_model
    tokens, images = image_prompt()
    expected = hf_model(args, state)(input_ids=tokens, pixel_values=torch.cat(images)).logits
    got = ours(tokens, 0, images=images, image_mask=tokens == PATCH_ID)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The images count: other pixels give other logits from the first patch token on, the same before it.
    other = ours(tokens, 0, images=[torch.randn_like(i) for i in images], image_mask=tokens == PATCH_ID)
    torch.testing.assert_close(other[1, :2], got[1, :2], atol=ATOL, rtol=0)
    assert (other[1, 2:] - got[1, 2:]).abs().max() > 1e-2


def test_image_prompt_in_pieces_equals_one_prefill(vision_model):
    # The prompt fed in two calls, each with the image whose patches it holds, then a decoding step: as one call.
    args, state, ours = vision_model
    tokens, images = image_prompt()
    row = tokens[1:]
    whole = ours(row, 0, images=images[1:], image_mask=row == PATCH_ID)
    first = ours(row[:, :8], 0, images=images[1:2], image_mask=row[:, :8] == PATCH_ID)
    second = ours(row[:, 8:19], 8, images=images[2:], image_mask=row[:, 8:19] == PATCH_ID)
    last = ours(row[:, 19:], 19)
    torch.testing.assert_close(torch.cat([first, second, last], dim=1), whole, atol=ATOL, rtol=0)


def test_text_prompt_reads_the_same_with_and_without_the_vision_tower(vision_model):
    args, state, ours = vision_model
    text_args = ModelArgs(**{**SCOUT, "vision_args": None})
    text_only = our_model(text_args, {k: v for k, v in state.items() if not k.startswith("vision_")})
    assert not any(k.startswith("vision_") for k in text_only.state_dict())
    tokens, _ = image_prompt()
    torch.testing.assert_close(ours(tokens, 0), text_only(tokens, 0), atol=0, rtol=0)


def test_wrong_image_inputs_raise_value_errors(vision_model):
    args, state, ours = vision_model
    tokens, images = image_prompt()
    mask = tokens == PATCH_ID
    with pytest.raises(ValueError, match="patches"):  # one image left out
        ours(tokens, 0, images=images[:2], image_mask=mask)
    with pytest.raises(ValueError, match="pass both or neither"):
        ours(tokens, 0, images=images)
    with pytest.raises(ValueError, match="bool tensor"):
        ours(tokens, 0, images=images, image_mask=mask.long())
    with pytest.raises(ValueError, match=r"\(n_chunks, 3, 32, 32\)"):
        ours(tokens, 0, images=[i[:, :, :16] for i in images], image_mask=mask)
    text_only = Transformer(ModelArgs(**{**SCOUT, "vision_args": None}))
    with pytest.raises(ValueError, match="no vision encoder"):
        text_only(tokens, 0, images=images, image_mask=mask)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(image_size={"height": 32}), "image_size"),
        (dict(patch_size={"height": 6, "width": 6}), "square grid"),
        (dict(n_heads=16), "divisible by 4"),
        (dict(pixel_shuffle_ratio=0.3), "pixel_shuffle_ratio"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_bad_vision_args_raise_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{**SCOUT, "vision_args": {**VISION, **change}})


@contextlib.contextmanager
def _cuda_is_cpu():
    # Meta's encoder reuses its text Attention, which allocates a KV cache with .cuda(): on a machine without a
    # GPU, let that call leave the tensor where it is, just while the reference is built.
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def test_vision_embeddings_equal_meta_reference(vision_model):
    for package in ("llama_models", "pydantic"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed: Meta's vision encoder, the witness here, needs it")
    from llama_models.llama4.args import VisionArgs as MetaVisionArgs
    from llama_models.llama4.vision.embedding import VisionEmbeddings as MetaVisionEmbeddings

    args, state, ours = vision_model
    prefix = "vision_embeddings."
    with _cuda_is_cpu():
        meta = MetaVisionEmbeddings(MetaVisionArgs(**VISION)).float().eval()
    # The same names: the released files' keys load into either without renaming.
    meta.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    tokens, images = image_prompt()
    mask = (tokens == PATCH_ID)[..., None]  # (bs, seqlen, 1), as Meta's generation passes it
    with torch.inference_mode():
        expected = meta([images[:1], images[1:]], mask, torch.zeros(2, 20, args.dim))  # (bs, seqlen, output_dim)
        patches = ours.vision_embeddings(images)  # (n_chunks, patches_per_chunk, output_dim)
    got = torch.zeros_like(expected).masked_scatter(mask, patches.flatten(0, 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


FAST_PATHS = ("int8", "packed bfloat16", "plain layers for torch.compile")


@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_paths_swap_the_language_models_layers_and_leave_the_vision_tower(vision_model, monkeypatch, path):
    # Weight-only int8 (as Meta's quantization), packed CPU weights and compile's plain layers are for the language
    # model's layers; the tower, whose biases the replacements would not add, keeps its own.
    import llama.cpu
    from llama.fast import without_fairscale
    from llama.quantize import quantize_int8

    monkeypatch.setattr(llama.cpu, "faster", lambda *args: True)  # pack every shape, as if measured faster
    make = dict(zip(FAST_PATHS, (quantize_int8, llama.cpu.choose_cpu_matmul, without_fairscale)))[path]
    dtype = torch.bfloat16 if path == "packed bfloat16" else torch.float32
    args, state, _ = vision_model
    reference = our_model(args, state).to(dtype)
    model = make(our_model(args, state).to(dtype))
    assert type(model.layers[0].attention.wq) is not type(reference.layers[0].attention.wq)
    tower, reference_tower = model.vision_embeddings, reference.vision_embeddings
    assert [type(m) for m in tower.modules()] == [type(m) for m in reference_tower.modules()]
    assert type(model.vision_projection) is type(reference.vision_projection)
    tokens, images = image_prompt()
    torch.testing.assert_close(tower(images), reference_tower(images), atol=0, rtol=0)
    logits = model(tokens, 0, images=images, image_mask=tokens == PATCH_ID)
    assert logits.isfinite().all()
    if path == "plain layers for torch.compile":  # the same products
        expected = reference(tokens, 0, images=images, image_mask=tokens == PATCH_ID)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


# --- checkpoints ----------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(args, unsharded state, {n: folder}): python -m llama.tiny --llama4's model (56-pixel tiles, 4 tokens each)
    in Meta's released layout, in 1 and 2 shards, with Meta's Llama 4 tokenizer (its image tokens)."""
    tokenizer = llama4_tokenizer()
    if tokenizer is None:
        pytest.skip("llama-models is not installed: a Llama 4 with images needs Meta's Llama 4 tokenizer")
    root = tmp_path_factory.mktemp("llama4-vision")
    params = dict(TINY_LLAMA4_PARAMS, vocab_size=Tokenizer(str(tokenizer)).n_words)
    args = model_args(params, max_seq_len=24, max_batch_size=2)
    state = random_state_dict(args, seed=3, std=0.15, dtype=torch.float32)
    folders = {n: root / f"released-{n}" for n in (1, 2)}
    for n, folder in folders.items():
        write_checkpoint(folder, params, state, n, released=True)
        shutil.copy(tokenizer, folder / "tokenizer.model")
    return args, state, folders


def tiny_image_prompt() -> dict:
    """Transformer.forward's inputs: row 0 with an image of two 56-pixel tiles, row 1 with one of one tile."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 500, (2, 24), generator=g)
    tokens[0, 4:12] = tokens[1, 15:19] = 510
    images = [torch.randn(n, 3, 56, 56, generator=g) for n in (2, 1)]
    return dict(tokens=tokens, images=images, image_mask=tokens == 510)


def test_released_folders_give_the_image_prompt_logits_of_their_weights_on_one_and_two_ranks(released, tmp_path):
    args, state, folders = released
    inputs = tiny_image_prompt()
    tokens, images, mask = inputs.values()
    expected = our_model(args, state)(tokens, 0, images=images, image_mask=mask)
    for folder in folders.values():
        got = build_transformer(folder, args, CPU, torch.float32)(tokens, 0, images=images, image_mask=mask)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Two ranks (torchrun, gloo): the encoder's heads, feed-forward and adapter split as Meta splits them.
    for got in torchrun_logits_many(list(folders.values()), inputs, 2, tmp_path):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_hugging_face_folder_gives_the_image_prompt_logits_of_transformers(vision_model, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    args, state, _ = vision_model
    hf = hf_model(args, state)
    hf.save_pretrained(tmp_path)
    loaded_args = model_args(read_params(tmp_path), max_seq_len=args.max_seq_len, max_batch_size=2)
    assert loaded_args.vision_args == args.vision_args
    model = build_transformer(tmp_path, loaded_args, CPU, torch.float32)
    tokens, images = image_prompt()
    expected = hf(input_ids=tokens, pixel_values=torch.cat(images)).logits
    got = model(tokens, 0, images=images, image_mask=tokens == PATCH_ID)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_text_only_build_skips_the_tower_and_says_how_much_it_saves(released):
    args, state, folders = released
    tokens = tiny_image_prompt()["tokens"]
    full = build_transformer(folders[2], args, CPU, torch.float32)
    text_args = model_args(read_params(folders[2]), max_seq_len=24, max_batch_size=2, vision_args=None)
    n = sum(tensor.numel() for key, tensor in state.items() if key.startswith("vision_"))
    with pytest.warns(UserWarning, match="text-only build: the vision tower's weights") as record:
        text_only = build_transformer(folders[2], text_args, CPU, torch.float32)
    assert len(record) == 1 and f"{n:,} parameters on each rank, {n * 4 / 2**20:.1f} MiB in float32" in str(
        record[0].message
    )
    assert not any(key.startswith("vision_") for key in text_only.state_dict())
    torch.testing.assert_close(text_only(tokens, 0), full(tokens, 0), atol=0, rtol=0)
