"""The weights' memory per rank (llama.quantize.weight_bytes, memory_table) for Llama 4 Scout and Maverick in
bfloat16, int8 and int4, against sizes written out by hand from the published model sizes; and the table in
docs/quantization.md is the one the function gives."""

from pathlib import Path

import pytest

from llama.model import ModelArgs
from llama.quantize import LLAMA4_PARAMS, memory_table, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
# From the Hugging Face configs of meta-llama/Llama-4-Scout-17B-16E and -Maverick-17B-128E: hidden 5120, 48 layers,
# 40 query and 8 key/value heads of 128, vocabulary 202048, experts' (and shared expert's) hidden size 8192, dense
# layers' 16384; Scout: 16 experts in every layer, Maverick: 128 in every second layer (the others dense).
D, LAYERS, VOCAB, F, DENSE_F, QKV = 5120, 48, 202048, 8192, 16384, (40 + 2 * 8) * 128
MODELS = {"Llama 4 Scout 17B-16E": (16, 1), "Llama 4 Maverick 17B-128E": (128, 2)}


def by_hand(experts: int, step: int, matrix_bytes) -> tuple[int, int]:
    """(split, replicated) bytes with matrix_bytes(out, in, n) the bytes of n (out, in) linear matrices."""
    split = 2 * VOCAB * D  # the embedding, bfloat16 in every mode
    split += matrix_bytes(VOCAB, D, 1)  # the output projection
    whole = 2 * D  # the final norm
    for layer in range(LAYERS):
        split += matrix_bytes(QKV, D, 1) + matrix_bytes(D, 40 * 128, 1)  # wq, wk, wv; wo
        whole += 2 * 2 * D  # attention_norm, ffn_norm
        if layer % step == step - 1:  # MoE: routed experts and the shared expert; the router, replicated
            split += (experts + 1) * (2 * matrix_bytes(F, D, 1) + matrix_bytes(D, F, 1))
            whole += 2 * D * experts
        else:
            split += 2 * matrix_bytes(DENSE_F, D, 1) + matrix_bytes(D, DENSE_F, 1)
    return split, whole


MATRIX_BYTES = {
    None: lambda out, inp, n: 2 * out * inp * n,
    "int8": lambda out, inp, n: (out * inp + 2 * out) * n,  # one bfloat16 scale a row
    "int4": lambda out, inp, n: (out * inp // 2 + 2 * 2 * out * inp // 128) * n,  # scale and zero a group of 128
}


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
@pytest.mark.parametrize("name", list(MODELS))
def test_weight_bytes_are_the_published_shapes_sizes(name, mode):
    assert weight_bytes(ModelArgs(**LLAMA4_PARAMS[name]), mode) == by_hand(*MODELS[name], MATRIX_BYTES[mode])


def test_scout_in_int4_fits_one_80_gb_gpu_and_in_bfloat16_needs_four():
    split, whole = weight_bytes(ModelArgs(**LLAMA4_PARAMS["Llama 4 Scout 17B-16E"]), "int4")
    assert split + whole < 60e9
    split, whole = weight_bytes(ModelArgs(**LLAMA4_PARAMS["Llama 4 Scout 17B-16E"]), None)
    assert split / 2 + whole > 80e9 > split / 4 + whole


def test_the_docs_table_is_the_computed_one():
    assert memory_table() in (ROOT / "docs" / "quantization.md").read_text()
