"""Shared fixtures: a single-process model-parallel group, and tiny random checkpoints in Meta's format."""

import pytest
import torch

from llama.generation import init_distributed


@pytest.fixture(scope="session", autouse=True)
def model_parallel_group():
    # Transformer's fairscale layers need a model-parallel group; with one process it is a group of one.
    init_distributed(1, torch.device("cpu"))
