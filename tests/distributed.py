"""Helpers for tests that run the model across several CPU processes with torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, worker_args: list[str], script: Path = ROOT / "tests" / "mp_worker.py") -> None:
    """`torchrun --nproc_per_node nproc script *worker_args` on the CPU; fails the test, with the output, if it fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(script), *worker_args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def torchrun_logits(ckpt_dir: Path, tokens: torch.Tensor, nproc: int, tmp_path: Path) -> torch.Tensor:
    """Logits of tokens from `torchrun --nproc_per_node nproc tests/mp_worker.py` on ckpt_dir (CPU, float32)."""
    tokens_path, out_path = tmp_path / f"tokens-{nproc}.pt", tmp_path / f"logits-{nproc}.pt"
    torch.save(tokens, tokens_path)
    torchrun(nproc, [str(ckpt_dir), str(tokens_path), str(out_path)])
    return torch.load(out_path, weights_only=True)


def torchrun_logits_many(ckpt_dirs: list[Path], tokens: torch.Tensor, nproc: int, tmp_path: Path) -> list[torch.Tensor]:
    """torchrun_logits for several checkpoints in one launch (each launch costs seconds): one list entry per folder."""
    tokens_path, out_dir = tmp_path / f"tokens-{nproc}.pt", tmp_path / f"logits-many-{nproc}"
    out_dir.mkdir(exist_ok=True)
    torch.save(tokens, tokens_path)
    torchrun(nproc, ["--many", str(tokens_path), str(out_dir), *map(str, ckpt_dirs)])
    return [torch.load(out_dir / f"{i}.pt", weights_only=True) for i in range(len(ckpt_dirs))]
