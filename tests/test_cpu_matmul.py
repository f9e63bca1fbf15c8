"""llama/cpu.py: packed oneDNN products agree with F.linear within bfloat16 rounding, the choice follows the
measurement, a packed model gives the plain model's greedy tokens (eager, under torch.compile, on two ranks)
and its state dict, and nothing in a build or a forward touches a process-wide switch."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed import torchrun
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from generation_helpers import one_thread, teacher_forced  # noqa: F401 (a fixture)

import llama.cpu
from llama.cpu import PackedLinear, choose_cpu_matmul, pack, packed_linear
from llama.fast import compile_decode
from llama.model import ModelArgs, Transformer
from llama.tiny import random_state_dict

PARAMS = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64, ffn_dim_multiplier=1.3)
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # generation_helpers': tiny products on a shared machine


def build(dtype: torch.dtype = torch.bfloat16, std: float = 0.5, seed: int = 0) -> Transformer:
    args = ModelArgs(**PARAMS, max_seq_len=64, max_batch_size=2)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=seed, std=std, dtype=dtype), strict=True, assign=True)
    model.setup_caches(torch.device("cpu"), dtype)
    return model.eval()


def measured(winner: str):
    """A stand-in for llama.cpu.faster that reports `winner` ("packed" or "F.linear") as the faster path."""
    return lambda a, b, *args: (a is packed_linear) == (winner == "packed")


@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("shape", [(96, 64), (300, 200), (64, 1000)])
def test_packed_product_is_f_linear_within_bfloat16_rounding(rows, shape):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g).bfloat16()
    x = torch.randn(2, rows, shape[1], generator=g).bfloat16()
    exact = F.linear(x.double(), w.double())
    got = packed_linear(x, pack(w))
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, shape[0])
    # float32 accumulation, one rounding to bfloat16 (2^-8 relative), as F.linear's own result
    bound = 2**-8 * exact.abs() + 1e-4 * exact.abs().max()
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((F.linear(x, w).double() - exact).abs() <= bound).all()


def paths(model: Transformer) -> dict[tuple, set]:
    """The products each weight shape of model's linear layers runs: {"packed"} or {"F.linear"} once chosen."""
    found: dict[tuple, set] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            found.setdefault(tuple(m.packed.shape), set()).add("packed")
        elif isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            found.setdefault(tuple(m.weight.shape), set()).add("F.linear")
    return found


def test_the_choice_follows_the_measurement_shape_by_shape(monkeypatch):
    monkeypatch.setattr(llama.cpu, "faster", measured("packed"))
    model = choose_cpu_matmul(build())
    assert not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 7 * PARAMS["n_layers"] + 1
    assert isinstance(model.layers[0].attention.wq, PackedLinear) and (64 * 8, 256) in paths(model)  # wq's shape

    monkeypatch.setattr(llama.cpu, "faster", measured("F.linear"))
    model = choose_cpu_matmul(build())
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert set.union(*paths(model).values()) == {"F.linear"}

    # float32 products are MKL's, not oneDNN's: nothing to choose, even where packing would measure faster
    monkeypatch.setattr(llama.cpu, "faster", measured("packed"))
    model = choose_cpu_matmul(build(torch.float32))
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_measuring_on_this_machine_picks_a_path_for_every_shape():
    model = choose_cpu_matmul(build())
    shapes = {
        tuple(m.weight.shape) for m in build().modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
    }
    assert set(paths(model)) == shapes and all(len(p) == 1 for p in paths(model).values())


def test_a_packed_model_gives_the_plain_greedy_tokens_and_state_dict(monkeypatch):
    monkeypatch.setattr(llama.cpu, "faster", measured("packed"))
    plain, packed = build(), choose_cpu_matmul(build())
    sequence = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(1))
    want, got = teacher_forced(plain, sequence, 10).float(), teacher_forced(packed, sequence, 10).float()
    scale = want.std().item()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * scale)
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1 * scale
    assert clear.float().mean() > 0.5
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    # Meta's keys, the weights as they were
    state, plain_state = packed.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state if "cache" not in k)


def test_no_process_wide_switch_is_touched_by_choosing_or_running(monkeypatch):
    flips = []
    real = torch._C._set_mkldnn_enabled
    monkeypatch.setattr(torch._C, "_set_mkldnn_enabled", lambda *a: flips.append(a) or real(*a))
    model = choose_cpu_matmul(build())  # measured for real on this machine
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    model(tokens, 0)
    model(tokens[:, :1], 12)
    assert flips == [] and torch.backends.mkldnn.enabled


def test_a_packed_model_compiles_and_decodes_as_eager(monkeypatch):
    # compile_decode leaves PackedLinear in place; torch.compile calls llama::packed_linear as an opaque op.
    # Weights of a trained model's size (std 0.02): inductor's fused bfloat16 ops round differently, which
    # peaked logits (std 0.5) would blow up.
    monkeypatch.setattr(llama.cpu, "faster", measured("packed"))
    sequence = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    eager = teacher_forced(choose_cpu_matmul(build(std=0.02)), sequence, 10).float()
    compiled = teacher_forced(compile_decode(choose_cpu_matmul(build(std=0.02))), sequence, 10).float()
    scale = eager.std().item()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0.05 * scale)
    top2 = eager.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1 * scale
    assert torch.equal(compiled.argmax(-1)[clear], eager.argmax(-1)[clear])


def test_two_ranks_pack_their_shards_and_keep_the_communication(tmp_path):
    from llama.tiny import write_checkpoint

    params = dict(PARAMS, norm_eps=1e-5)
    args = ModelArgs(**params)
    state = random_state_dict(args, seed=4, std=0.5, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "ckpt", params, state, n_shards=2)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(4))
    torch.save(tokens, tmp_path / "tokens.pt")
    torchrun(2, [str(tmp_path / "ckpt"), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")], Path(__file__))
    plain, packed = torch.load(tmp_path / "logits.pt", weights_only=True)
    # the same ranks and communication, F.linear or packed: bfloat16 sums of shards round as they did
    torch.testing.assert_close(packed, plain, rtol=0, atol=0.01 * plain.std().item())
    assert (packed.argmax(-1) == plain.argmax(-1)).float().mean() > 0.95


def _rank_main(ckpt_dir: str, tokens_path: str, out_path: str) -> None:
    """Under torchrun: rank 0's logits from this rank's bfloat16 shard, as loaded and with every layer packed."""
    from llama.checkpoint import build_transformer, model_args, read_params
    from llama.generation import init_distributed

    llama.cpu.faster = measured("packed")
    tokens = torch.load(tokens_path, weights_only=True)
    rank, world = init_distributed(None, torch.device("cpu"))
    args = model_args(read_params(ckpt_dir), max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0])
    model = build_transformer(ckpt_dir, args, torch.device("cpu"), torch.bfloat16, rank, world)
    plain = model(tokens, 0)
    choose_cpu_matmul(model)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 7 * args.n_layers + 1
    packed = model(tokens, 0)
    if torch.distributed.get_rank() == 0:
        torch.save((plain, packed), out_path)


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])


@pytest.mark.parametrize("winner", ["packed", "F.linear"])
def test_llama4_experts_follow_the_choice_and_keep_the_logits_and_state_dict(monkeypatch, winner):
    monkeypatch.setattr(llama.cpu, "faster", measured(winner))
    params = dict(PARAMS, n_layers=2, ffn_exp=2.0, ffn_dim_multiplier=1.2, moe_args=dict(num_experts=4, top_k=1),
                  nope_layer_interval=2, attention_chunk_size=8)  # fmt: skip
    args = ModelArgs(**params, max_seq_len=64, max_batch_size=2)
    state = random_state_dict(args, seed=3, std=0.5, dtype=torch.bfloat16)

    def build4() -> Transformer:
        with torch.device("meta"):
            model = Transformer(args)
        model.load_state_dict(state, strict=True, assign=True)
        model.setup_caches(torch.device("cpu"), torch.bfloat16)
        return model.eval()

    plain, chosen = build4(), choose_cpu_matmul(build4())
    experts = [layer.feed_forward.experts for layer in chosen.layers]
    assert all(isinstance(e, llama.cpu.PackedExperts) == (winner == "packed") for e in experts)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    want, got = plain(tokens, 0), chosen(tokens, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.std().item())
    got_state = chosen.state_dict()
    assert got_state.keys() == plain.state_dict().keys()
    assert all(torch.equal(got_state[k], v) for k, v in state.items())
