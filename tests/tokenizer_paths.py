"""Real tokenizer files for the tokenizer tests, found inside installed packages (never imported), and a
tiny byte-level tiktoken file like the one the tiny-checkpoint generator writes."""

import importlib.util
from pathlib import Path

import pytest

from llama.tiny import write_byte_tokenizer
from llama.tokenizer import Tokenizer


def package_file(package: str, relative: str) -> Path:
    """A data file shipped in an installed package; the test skips, saying why, when it is not there."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the {package} package, which ships {relative}, is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        pytest.skip(f"{path} is not in the installed {package} package")
    return path


@pytest.fixture(scope="session")
def llama3_path() -> Path:
    """Meta's Llama 3 tokenizer.model (tiktoken BPE, 128000 ranks), shipped in llama-models."""
    return package_file("llama_models", "llama3/tokenizer.model")


@pytest.fixture(scope="session")
def llama4_path() -> Path:
    """Meta's Llama 4 tokenizer.model (tiktoken BPE, 200000 ranks), shipped in llama-models."""
    return package_file("llama_models", "llama4/tokenizer.model")


@pytest.fixture(scope="session")
def llama2_path() -> Path:
    """A Llama 2-style SentencePiece model (32000 pieces, <s> = 1, </s> = 2), shipped in mistral-common."""
    return package_file("mistral_common", "data/tokenizer.model.v1")


@pytest.fixture(scope="session")
def byte_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("byte_tokenizer") / "tokenizer.model"
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def llama3(llama3_path) -> Tokenizer:
    return Tokenizer(llama3_path)


@pytest.fixture(scope="session")
def llama4(llama4_path) -> Tokenizer:
    return Tokenizer(llama4_path)


@pytest.fixture(scope="session")
def llama2(llama2_path) -> Tokenizer:
    return Tokenizer(llama2_path)


@pytest.fixture(scope="session")
def byte_tokenizer(byte_path) -> Tokenizer:
    return Tokenizer(byte_path)
