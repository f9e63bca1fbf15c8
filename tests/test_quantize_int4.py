"""int4 weight-only quantization (llama/quantize.py): within a stated bound of the plain model for Llama 3 and
Llama 4 shapes, prompts and cached decoding; ATen's kernel against the plain dequantize-then-multiply path; the
state dict round trip; two model-parallel ranks against one; and the errors and warning for bad input.

Bound (float32 and bfloat16 models, random weights of std 0.02, groups of 128 or less): over every position of a
prompt and of cached decoding after it, root-mean-square logit difference <= 0.15 x the logits' standard deviation,
max |difference| <= 0.75 x it, argmax (greedy token) the same at >= 75% of positions. Measured: rms 0.08-0.10,
max 0.36-0.52, 81-88% equal; group size 32 gives rms 0.08, 128 gives 0.10. Random weights have no outliers and
their logits small margins: the figures show int4's rounding (16 levels a group), not a trained model's quality.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from distributed import torchrun
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from generation_helpers import one_thread  # noqa: F401 (a fixture, used by pytestmark)
from test_quantize import LLAMA4, PARAMS, assert_same_greedy_tokens, build, weights

import llama.quantize
from llama.model import ModelArgs, Transformer
from llama.quantize import (
    Int4Experts,
    Int4Linear,
    pack_for,
    pack_pairs,
    quantize_groups,
    quantize_int4,
    quantize_model,
    unpack_from,
)
from llama.tiny import random_state_dict

RMS_DIFF, MAX_DIFF, AGREE = 0.15, 0.75, 0.75


pytestmark = pytest.mark.usefixtures("one_thread")  # generation_helpers': tiny products on a shared machine


def build4(state: dict, dtype: torch.dtype) -> Transformer:
    """A Llama 4 shape (MoE every layer: experts and shared expert) holding state."""
    args = ModelArgs(**LLAMA4, max_seq_len=128, max_batch_size=2)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.setup_caches(torch.device("cpu"), dtype)
    return model.eval()


def llama4_weights(seed: int = 2) -> dict:
    return random_state_dict(ModelArgs(**LLAMA4), seed=seed, std=0.02, dtype=torch.float32)


SHAPES = {"llama3": (build, weights), "llama4": (build4, llama4_weights)}


def prompt_then_decode(model: Transformer, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of a prompt, then of each later token fed one at a time through the KV cache, float32."""
    logits = [model(tokens[:, :prompt_len], 0)]
    logits += [model(tokens[:, p : p + 1], p) for p in range(prompt_len, tokens.shape[1])]
    return torch.cat(logits, dim=1).float()


def tokens(seed: int, n: int = 100) -> torch.Tensor:
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(seed))


def assert_within_bound(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale, diff = expected.std(), got - expected
    assert diff.pow(2).mean().sqrt() <= RMS_DIFF * scale
    assert diff.abs().max() <= MAX_DIFF * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= AGREE
    assert diff.pow(2).mean().sqrt() > 0.01 * scale  # and it is not the plain model: the test could tell


# -- Groups --------------------------------------------------------------------------------------------------------


def test_groups_round_trip_within_half_a_step_of_their_own_scale():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 1, 64)[:, None]
    w[3, 32:64] = 0.5  # a constant group must not divide by zero
    q, scales, zeros = quantize_groups(w, 32)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scales.dtype == zeros.dtype == torch.bfloat16
    assert scales.shape == zeros.shape == (64, 8)
    step = scales.float().repeat_interleave(32, dim=1)
    got = (q.float() - 8) * step + zeros.float().repeat_interleave(32, dim=1)
    assert ((got - w).abs() <= 0.5 * step + 1e-6).all()
    assert (got[3, 32:64] == 0.5).all()
    ranged = torch.ones(64, 8, dtype=torch.bool)
    ranged[3, 1] = False
    groups = q.unflatten(1, (8, 32))
    assert (groups.amax(-1)[ranged] >= 14).all() and (groups.amin(-1)[ranged] <= 1).all()  # all 16 levels used


@pytest.mark.parametrize("rows", [16, 48, 64, 208, 4160])
def test_the_cpu_layout_unpacks_exactly_what_aten_packed(rows, monkeypatch):
    # ATen's CPU packing is a layout of its own (blocks of 64 rows on AVX-512); the state dict's portable layout is
    # read back from it. Packing a slice of rows at a time gives ATen's packing of the whole.
    monkeypatch.setattr(llama.quantize, "ELEMENTS_AT_ONCE", 128 * 96)  # slices of 128 rows
    q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = pack_for("cpu", q)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
    assert torch.equal(unpack_from("cpu", packed, 96, 32), pack_pairs(q))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_cpu_layout_is_recognised_on_other_instruction_sets(capability):
    # ATen packs for the instruction set it runs with (ATEN_CPU_CAPABILITY lowers it): the layout is found, the
    # state dict reads back, and the kernel gives the plain path's product.
    code = """
import torch, llama.quantize as q
assert q.cpu_layout() is not None, "no layout"
v = torch.randint(0, 16, (208, 256), dtype=torch.uint8)
assert torch.equal(q.unpack_from("cpu", q.pack_for("cpu", v), 256, 32), q.pack_pairs(v))
w = torch.randn(208, 256) * 0.02
x = torch.randn(3, 256)
m = q.Int4Matrices(1, 208, 256, 32, torch.device("cpu"), torch.float32, "w")
p, sz = m.empty("cpu"); m.quantize_(p, sz, 0, w)
plain = q.int4_plain_linear(x, q.pack_pairs(q.quantize_groups(w, 32)[0]), sz[0])
torch.testing.assert_close(q.int4_linear(x, "cpu", p[0], sz[0], 32), plain, rtol=1e-5, atol=1e-5)
print(torch.backends.cpu.get_cpu_capability(), q.cpu_layout())
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == capability.upper()


# -- The model against the plain one --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["llama3", "llama4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_logits_stay_within_the_stated_bound(shape, dtype):
    make, state = SHAPES[shape][0], SHAPES[shape][1](seed=1)
    t = tokens(1)
    expected = prompt_then_decode(make(state, dtype), t, 90)
    got = prompt_then_decode(quantize_int4(make(state, dtype)), t, 90)
    assert_within_bound(got, expected)


def test_every_linear_layer_and_expert_becomes_int4_at_a_quarter_of_the_bytes():
    for make, state in ((build, weights()), (build4, llama4_weights())):
        model = make(state, torch.bfloat16)
        embedding = model.tok_embeddings.weight
        plain = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "tok_embeddings" not in n)
        plain -= sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n or "router" in n)
        quantize_int4(model)
        assert not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules())
        assert model.tok_embeddings.weight is embedding and embedding.dtype == torch.bfloat16  # a lookup, untouched
        linear = {n for n, m in model.named_modules() if isinstance(m, Int4Linear)}
        n_layers = PARAMS["n_layers"]
        if make is build:
            assert len(linear) == 7 * n_layers + 1 and "output" in linear
        else:  # attention 4, shared expert 3 per layer, output; the experts
            assert len(linear) == 7 * n_layers + 1 and "layers.0.feed_forward.shared_expert.w2" in linear
            assert all(isinstance(layer.feed_forward.experts, Int4Experts) for layer in model.layers)
        int4 = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "cache" not in n)
        int4 -= sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "freqs" in n)
        assert int4 < 0.29 * plain  # 4 bits a weight and 32 bits a group of 128: 0.27 of bfloat16


def int4_plain_path(monkeypatch) -> list:
    """Make every int4 layer built from now on take the plain path; returns a list that counts its products."""
    calls = []
    plain = llama.quantize.int4_plain_linear

    def counted(*args):
        calls.append(1)
        return plain(*args)

    monkeypatch.setattr(llama.quantize, "int4_kernel", lambda *args: None)
    monkeypatch.setattr(llama.quantize, "int4_plain_linear", counted)
    return calls


@pytest.mark.parametrize("shape", ["llama3", "llama4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_kernel_gives_the_plain_paths_logits(shape, dtype, monkeypatch):
    # Both quantize the same weights alike; ATen's kernel multiplies in its layout, the plain path dequantizes
    # (in the model's dtype) and multiplies. float32: the same to rounding; bfloat16: the plain path rounds each
    # dequantized weight to bfloat16 first, the kernel does not.
    make, state = SHAPES[shape][0], SHAPES[shape][1](seed=3)
    t = tokens(3, 60)
    kernel_model = quantize_int4(make(state, dtype))
    assert all(m.int4.kernel == "cpu" for m in kernel_model.modules() if isinstance(m, Int4Linear))
    kernel = prompt_then_decode(kernel_model, t, 50)
    calls = int4_plain_path(monkeypatch)
    with pytest.warns(UserWarning, match="no int4 kernel"):
        plain_model = quantize_int4(make(state, dtype))
    plain = prompt_then_decode(plain_model, t, 50)
    assert len(calls) > 0
    scale = plain.std().item()
    if dtype == torch.float32:
        torch.testing.assert_close(kernel, plain, rtol=0, atol=1e-4 * scale)
    else:
        torch.testing.assert_close(kernel, plain, rtol=0, atol=0.05 * scale)
        top2 = plain.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 0.1 * scale
        assert clear.float().mean() > 0.5
        assert torch.equal(kernel.argmax(-1)[clear], plain.argmax(-1)[clear])


def test_compiled_int4_decoding_gives_the_eager_logits():
    from llama.fast import compile_decode

    state, t = weights(seed=5), tokens(5, 30)
    eager = prompt_then_decode(quantize_int4(build(state, torch.bfloat16)), t, 20)
    compiled = prompt_then_decode(compile_decode(quantize_int4(build(state, torch.bfloat16))), t, 20)
    assert_same_greedy_tokens(compiled, eager, tolerance=0.05)  # bfloat16: a rounding apart at most


# -- State dict ------------------------------------------------------------------------------------------------------


def load_into_skeleton(shape: str, state: dict, dtype: torch.dtype, group_size=None) -> Transformer:
    """An int4 model made on the meta device, then given state as Llama.build gives a model its checkpoint."""
    args = ModelArgs(**(PARAMS if shape == "llama3" else LLAMA4), max_seq_len=128, max_batch_size=2)
    with torch.device("meta"):
        model = Transformer(args)
    quantize_int4(model, group_size, device="cpu", dtype=dtype)  # an int4 skeleton: nothing in it yet
    model.load_state_dict(state, strict=True, assign=True)  # the int4 layers quantize or unpack into theirs
    model.setup_caches(torch.device("cpu"), dtype)
    return model.eval()


@pytest.mark.parametrize("shape", ["llama3", "llama4"])
def test_a_saved_int4_model_loads_back_to_the_same_logits(shape, tmp_path):
    make, state = SHAPES[shape][0], SHAPES[shape][1](seed=6)
    model = quantize_int4(make(state, torch.bfloat16))
    t = tokens(6, 40)
    expected = prompt_then_decode(model, t, 30)
    torch.save(model.state_dict(), tmp_path / "int4.pth")
    saved = torch.load(tmp_path / "int4.pth", weights_only=True, mmap=True)
    assert saved["layers.0.attention.wq.weight"].dtype == torch.uint8
    assert saved["layers.0.attention.wq.weight"].shape == (PARAMS["dim"], PARAMS["dim"] // 2)
    assert saved["layers.0.attention.wq.scales"].shape == (PARAMS["dim"], PARAMS["dim"] // 128)
    if shape == "llama4":
        assert saved["layers.0.feed_forward.experts.w1"].shape[0] == LLAMA4["moe_args"]["num_experts"]
        assert "layers.0.feed_forward.experts.w2_zeros" in saved
    loaded = load_into_skeleton(shape, saved, torch.bfloat16)
    assert torch.equal(prompt_then_decode(loaded, t, 30), expected)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())


def test_a_state_dict_saved_through_the_kernel_loads_into_the_plain_path(monkeypatch, tmp_path):
    # The state dict's layout is the kernel's own neither on the CPU nor on CUDA: it loads where there is no kernel.
    state = weights(seed=7)
    saved = quantize_int4(build(state, torch.float32)).state_dict()
    int4_plain_path(monkeypatch)
    with pytest.warns(UserWarning, match="no int4 kernel"):
        plain = quantize_int4(build(state, torch.float32))
    with pytest.warns(UserWarning, match="no int4 kernel"):
        loaded = load_into_skeleton("llama3", saved, torch.float32)
    t = tokens(7, 30)
    assert torch.equal(prompt_then_decode(loaded, t, 20), prompt_then_decode(plain, t, 20))


@pytest.mark.parametrize("shape", ["llama3", "llama4"])
def test_meta_weights_loaded_into_an_int4_model_are_quantized_as_they_are_read(shape):
    # Loading Meta's floating-point state dict into the int4 layers quantizes each weight there: the model
    # quantizing after a normal load, exactly.
    make, state = SHAPES[shape][0], SHAPES[shape][1](seed=8)
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    t = tokens(8, 30)
    expected = prompt_then_decode(quantize_int4(make(state, torch.bfloat16)), t, 20)
    assert torch.equal(prompt_then_decode(load_into_skeleton(shape, state, torch.bfloat16), t, 20), expected)


def test_a_state_dict_of_other_groups_is_refused_naming_the_key():
    saved = quantize_int4(build(weights(seed=9), torch.float32), group_size=64).state_dict()
    with pytest.raises(
        RuntimeError,
        match=r"layers\.0\.attention\.wq\.scales: shape \(256, 4\), expected \(256, 8\) for int4 in groups of 32",
    ):
        load_into_skeleton("llama3", saved, torch.float32, group_size=32)
    del saved["layers.1.feed_forward.w2.zeros"]
    with pytest.raises(RuntimeError, match=r"Missing key.*layers\.1\.feed_forward\.w2\.zeros"):
        load_into_skeleton("llama3", saved, torch.float32, group_size=64)


# -- Model parallelism: two ranks under torchrun -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_quantize_their_shards_as_one_rank_does(tmp_path):
    # Groups never straddle a shard, and 32 divides every shard's input features, so each rank's int4 weights,
    # scales and zeros are exactly its share of one rank's, and the logits are one rank's up to the order of sums.
    from llama.tiny import write_checkpoint

    ckpts, expected = [], []
    t = tokens(10, 40)
    for shape in ("llama3", "llama4"):
        make, state = SHAPES[shape][0], SHAPES[shape][1](seed=10)
        write_checkpoint(tmp_path / shape, PARAMS if shape == "llama3" else LLAMA4, state, n_shards=2)
        ckpts.append(str(tmp_path / shape))
        model = quantize_int4(make(state, torch.float32), group_size=32)
        expected.append((prompt_then_decode(model, t, 30), model.state_dict()))
    torch.save(t, tmp_path / "tokens.pt")
    torchrun(2, [str(tmp_path / "tokens.pt"), str(tmp_path), *ckpts], Path(__file__))
    for i, (logits, state) in enumerate(expected):
        shards = [torch.load(tmp_path / f"state-{i}-{rank}.pt", weights_only=True) for rank in range(2)]
        assert shards[0].keys() == state.keys()
        for key, whole in state.items():
            a, b = shards[0][key], shards[1][key]
            split = [d for d in range(whole.dim()) if a.shape[d] != whole.shape[d]]
            assert torch.equal(torch.cat([a, b], dim=split[0]) if split else a, whole), key
        # The plain float32 Llama 4 model's logits on two ranks differ from one rank's by up to 7e-4 x their std
        # on this shape (its MoE sums in another order); Llama 3's by 1e-6 x.
        tolerance = 1e-5 if i == 0 else 2e-3
        torch.testing.assert_close(
            torch.load(tmp_path / f"logits-{i}.pt"), logits, rtol=0, atol=tolerance * logits.std().item()
        )


def _rank_main(tokens_path: str, out_dir: str, *ckpt_dirs: str) -> None:
    """Under torchrun: each checkpoint loaded as this rank's shard in float32, quantized to int4 in groups of 32;
    every rank saves its state dict, rank 0 the logits of a prompt and cached decoding."""
    from llama.checkpoint import build_transformer, model_args, read_params
    from llama.generation import init_distributed

    t = torch.load(tokens_path, weights_only=True)
    rank, world = init_distributed(None, torch.device("cpu"))
    for i, ckpt_dir in enumerate(ckpt_dirs):
        args = model_args(read_params(ckpt_dir), max_seq_len=t.shape[1], max_batch_size=t.shape[0])
        model = quantize_int4(build_transformer(ckpt_dir, args, torch.device("cpu"), torch.float32, rank, world), 32)
        logits = prompt_then_decode(model, t, 30)
        torch.save(model.state_dict(), Path(out_dir) / f"state-{i}-{rank}.pt")
        if rank == 0:
            torch.save(logits, Path(out_dir) / f"logits-{i}.pt")


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])


# -- Bad input ---------------------------------------------------------------------------------------------------------


def test_an_unknown_quantize_mode_is_refused_naming_the_modes():
    with pytest.raises(ValueError, match="quantize='int2' is not supported: use None, 'int8' or 'int4'"):
        quantize_model(build(weights(), torch.float32), "int2")


def test_a_group_size_that_does_not_divide_a_shard_is_refused_naming_the_layer():
    hidden = build(weights(), torch.float32).layers[0].feed_forward.w2.weight.shape[1]  # 896
    with pytest.raises(ValueError, match=rf"256 input features do not divide the {hidden} input features of layers\.0\.feed_forward\.w2 on this model-parallel rank"):  # fmt: skip
        quantize_int4(build(weights(), torch.float32), group_size=256)
    with pytest.raises(ValueError, match="group_size=48 is not supported: use one of 32, 64, 128, 256"):
        quantize_int4(build(weights(), torch.float32), group_size=48)
    odd = dict(PARAMS, multiple_of=16, ffn_dim_multiplier=1.0)  # hidden 688: 16 x 43, no group of 32 fits
    args = ModelArgs(**odd, max_seq_len=16, max_batch_size=1)
    model = Transformer(args)
    with pytest.raises(ValueError, match="int4 needs groups of 32, 64 or 128 input features, but layers.0.feed_forward.w2 has 688"):  # fmt: skip
        quantize_int4(model)


def test_by_default_each_layer_takes_the_largest_group_that_fits():
    model = quantize_int4(build(weights(), torch.float32))
    assert model.layers[0].attention.wq.int4.group_size == 128  # 256 input features
    assert model.layers[0].feed_forward.w2.int4.group_size == 128  # 896 = 7 x 128
    small = dict(PARAMS, multiple_of=32, ffn_dim_multiplier=1.0)  # hidden 704 = 11 x 64
    model = quantize_int4(Transformer(ModelArgs(**small, max_seq_len=16, max_batch_size=1)))
    assert model.layers[0].feed_forward.w2.int4.group_size == 64


def test_int4_without_a_kernel_warns_once_and_takes_the_plain_path(monkeypatch):
    monkeypatch.setattr(llama.quantize, "cpu_layout", lambda: None)  # as on a CPU whose packing is not known
    state, t = weights(seed=11), tokens(11, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = quantize_int4(build(state, torch.float32))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no int4 kernel" in messages[0] and "dequantize" in messages[0], messages
    assert all(m.int4.kernel is None for m in model.modules() if isinstance(m, Int4Linear))
    monkeypatch.undo()
    expected = quantize_int4(build(state, torch.float32))(t, 0)
    torch.testing.assert_close(model(t, 0), expected, rtol=0, atol=1e-4 * expected.std().item())


def test_build_with_int4_swaps_the_layers_and_stays_within_the_bound(tmp_path):
    from llama import Llama
    from llama.tiny import TINY_PARAMS, write_byte_tokenizer, write_checkpoint

    args = ModelArgs(**TINY_PARAMS)
    write_checkpoint(tmp_path, TINY_PARAMS, random_state_dict(args, seed=12, std=0.02), 1)
    write_byte_tokenizer(tmp_path / "tokenizer.model")
    plain = Llama.build(str(tmp_path), None, 64, 2, device="cpu", dtype="bfloat16")
    int4 = Llama.build(str(tmp_path), None, 64, 2, device="cpu", dtype="bfloat16", quantize="int4")
    assert isinstance(int4.model.layers[0].attention.wq, Int4Linear) and isinstance(int4.model.output, Int4Linear)
    t = tokens(12, 60)
    assert_within_bound(prompt_then_decode(int4.model, t, 50), prompt_then_decode(plain.model, t, 50))
    assert int4.text_completion(["hi"], max_gen_len=4, temperature=0)[0]["generation"] is not None


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("shape", ["llama3", "llama4"])
def test_a_build_that_quantizes_while_loading_equals_quantizing_after(shape, mode, tmp_path):
    # llama/checkpoint.py quantizes each weight as it is read: the model of a normal load quantized afterwards,
    # exactly; with the output projection tied to the embedding (Llama 3.2 1B/3B) and with shards merged.
    from llama.checkpoint import build_transformer
    from llama.tiny import write_checkpoint

    params = PARAMS if shape == "llama3" else LLAMA4
    args = ModelArgs(**params, max_seq_len=64, max_batch_size=2)
    state = random_state_dict(args, seed=13, std=0.02, dtype=torch.bfloat16, tied=shape == "llama3")
    write_checkpoint(tmp_path, params, state, n_shards=2)
    cpu = torch.device("cpu")
    expected = quantize_model(build_transformer(tmp_path, args, cpu, torch.bfloat16), mode)
    got = build_transformer(tmp_path, args, cpu, torch.bfloat16, quantize=mode)
    assert type(got.output) is type(expected.output) and got.tok_embeddings.weight.dtype == torch.bfloat16
    t = tokens(13, 40)
    assert torch.equal(prompt_then_decode(got, t, 30), prompt_then_decode(expected, t, 30))
