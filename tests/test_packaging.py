"""The library shares a Python environment with transformers and the rest: none of its import names is
another package's, `import llama` works from any folder, and transformers imports from the repository root.

Each check runs in a fresh interpreter, as a user's own script would, so that the working directory and
sys.path are those a user has, not pytest's.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_IMPORT_NAMES = ("llama", "llama_kernels")


def python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMA_KERNELS")}
    env.update(OMP_NUM_THREADS="1", LLAMA_DEVICE="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"in {cwd}:\n{code}\nfailed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def test_no_other_installed_package_provides_our_import_names():
    # packages_distributions maps each top-level import name to the distributions that install it.
    owners = importlib.metadata.packages_distributions()
    ours = {dist for name in OUR_IMPORT_NAMES for dist in owners.get(name, [])}
    assert len(ours) == 1, f"{OUR_IMPORT_NAMES} are installed by {ours}: expected this project alone"
    for name in OUR_IMPORT_NAMES:
        assert set(owners.get(name, [])) == ours, f"import name {name!r} is also installed by {owners[name]}"
    taken = {name for name, dists in owners.items() if ours.issuperset(dists)}
    assert taken == set(OUR_IMPORT_NAMES), f"this project installs other top-level names: {taken}"


def test_first_completion_from_a_folder_outside_the_repository_with_transformers_imported_first(tmp_path):
    out = python(
        "import transformers\n"
        "from transformers import LlamaForCausalLM\n"
        "import llama, llama_kernels\n"
        "from llama import Llama\n"
        "from llama.tiny import main as write_tiny\n"
        "write_tiny(out_dir='tiny')\n"
        "generator = Llama.build('tiny', 'tiny/tokenizer.model', max_seq_len=64, max_batch_size=1)\n"
        "[result] = generator.text_completion(['Hello'], max_gen_len=4, temperature=0)\n"
        "assert isinstance(result['generation'], str), result\n"
        "print('llama', llama.__file__)\n"
        "print('llama_kernels', llama_kernels.__file__)\n",
        cwd=tmp_path,
    )
    files = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("llama ", "llama_kernels ")))
    assert Path(files["llama"]).resolve().parent == ROOT / "llama"
    assert Path(files["llama_kernels"]).resolve().parent == ROOT / "kernels" / "llama_kernels"


def test_transformers_llama_classes_import_from_the_repository_root():
    out = python(
        "from transformers import LlamaForCausalLM, Llama4ForCausalLM, Llama4ForConditionalGeneration\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None) or list(kernels.__path__))\n",
        cwd=ROOT,
    )
    # Whatever `import kernels` finds from here, it is not this repository's kernels/ folder: Hugging Face's
    # package where transformers installed it, else an empty namespace.
    assert str(ROOT / "kernels") not in out or "kernels" not in importlib.metadata.packages_distributions(), out
