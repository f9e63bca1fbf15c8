"""The README's shell commands run as written: those that need no downloaded weights are run, in order, in a
fresh folder with the virtual environment's bin/ first on PATH (what `source .venv/bin/activate` does);
every other command must be one this file knows to need weights, a GPU or the network, so that a command
added to the README is either run here or classified on purpose."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Commands that cannot run here, by what they start with: they need Meta's weights, the network, or are
# the set-up and test commands that CI itself runs.
NOT_RUN_HERE = (
    "bash install.sh",  # CI's first command
    ".venv/bin/python -m pytest tests",  # CI's second command: this very test suite
    "source .venv/bin/activate",  # what PATH below stands for
    "./download.sh",  # Meta's signed URL
    "LLAMA_URL=",
    "huggingface-cli download",
    "torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/",
    "torchrun --nproc_per_node 4 example_",
    "python example_chat_completion.py --ckpt_dir Meta-Llama-3-70B-Instruct/",
    "python example_text_completion.py --ckpt_dir Meta-Llama-3-8B/",
    "python example_chat_completion.py --ckpt_dir llama-2-7b-chat/",
)


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def runs_without_weights(command: str) -> bool:
    return "llama.tiny" in command or re.search(r"--ckpt_dir tiny-llama4?\b", command) is not None


def test_every_readme_command_is_run_here_or_known_to_need_weights():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands, "no shell commands found in README.md"
    unknown = [c for c in commands if not runs_without_weights(c) and not c.startswith(NOT_RUN_HERE)]
    assert not unknown, f"README commands neither run by this test nor known to need weights: {unknown}"


def test_readme_commands_that_need_no_weights_run_as_written(tmp_path):
    commands = [c for c in readme_commands((ROOT / "README.md").read_text()) if runs_without_weights(c)]
    assert any(c.startswith("torchrun") for c in commands) and any("--llama4" in c for c in commands)
    for script in ROOT.glob("example_*.py"):
        shutil.copy(script, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMA_KERNELS")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", LLAMA_DEVICE="cpu")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for command in commands:
        result = subprocess.run(
            shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"`{command}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
