"""Peak resident memory while Llama.build loads a Meta-format checkpoint, against the checkpoint's size.

    python benchmarks/load_memory.py [--dtype bfloat16|float32] [--quantize int8|int4] [--dim 1024 --n_layers 12]

Writes a random-weight bfloat16 checkpoint (about 320 MB by default) to a temporary folder, then in a
fresh process builds the model and runs one forward pass (which touches every weight), and prints the
growth of peak RSS (VmHWM) over the process's baseline, as a multiple of the checkpoint's size. With
--quantize, also the bytes of the quantized model itself, which quantizing while loading should not exceed
by much more than one layer's weights in bfloat16.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, json, torch
sys.path.insert(0, {root!r})
from llama import Llama

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
# Start counting after what any run pays regardless of the model's size: the process group, oneDNN's set-up.
from llama.generation import init_distributed
init_distributed(1, torch.device("cpu"))
torch.nn.functional.linear(torch.ones(4, 64, dtype=torch.bfloat16), torch.ones(64, 64, dtype=torch.bfloat16))
base = status("VmHWM")
llama = Llama.build({ckpt!r}, None, max_seq_len=16, max_batch_size=1, device="cpu", dtype={dtype!r},
                    quantize={quantize!r})
after_build, build_peak = status("VmRSS"), status("VmHWM")
llama.model(torch.tensor([[1, 2, 3]]), 0)
# The model's own bytes (each tensor's, not its storage's: a tensor mapped from the file has the whole file's)
model_bytes = sum(t.numel() * t.element_size() for t in [*llama.model.parameters(), *llama.model.buffers()])
print(json.dumps(dict(base=base, after_build=after_build - base, build_peak=build_peak - base,
                      peak=status("VmHWM") - base, model_bytes=model_bytes)))
"""


def measure(ckpt_dir: Path, dtype: str, quantize: Optional[str] = None) -> dict:
    code = CHILD.format(root=str(ROOT), ckpt=str(ckpt_dir), dtype=dtype, quantize=quantize)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_model(out: Path, dim: int, n_layers: int, vocab_size: int) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from llama.model import ModelArgs
    from llama.tiny import random_state_dict, write_byte_tokenizer, write_checkpoint

    params = dict(
        dim=dim,
        n_layers=n_layers,
        n_heads=dim // 64,
        n_kv_heads=dim // 256,
        vocab_size=vocab_size,
        multiple_of=256,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
    )
    write_checkpoint(out, params, random_state_dict(ModelArgs(**params), dtype=torch.bfloat16))
    write_byte_tokenizer(out / "tokenizer.model")
    return (out / "consolidated.00.pth").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--n_layers", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        size = write_model(Path(tmp), args.dim, args.n_layers, 512)  # 512: the byte tokenizer's vocabulary
        r = measure(Path(tmp), args.dtype, args.quantize)
    mb = 1 << 20
    print(
        f"checkpoint {size / mb:.0f} MB (bfloat16) loaded as {args.dtype}"
        + (f", {args.quantize}:" if args.quantize else ":")
    )
    if args.quantize:
        print(
            f"  the {args.quantize} model's own bytes {r['model_bytes'] / mb:7.0f} MB  ({r['model_bytes'] / size:.2f}x checkpoint)"
        )
        print(f"  peak RSS growth during the build {r['build_peak'] / mb:7.0f} MB")
    print(f"  RSS growth after build  {r['after_build'] / mb:7.0f} MB  ({r['after_build'] / size:.2f}x checkpoint)")
    print(f"  peak RSS growth         {r['peak'] / mb:7.0f} MB  ({r['peak'] / size:.2f}x checkpoint)")


if __name__ == "__main__":
    main()
