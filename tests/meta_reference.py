"""Meta's llama-models (installed as test data, never imported by the library) as an independent witness:
its Llama 3 and Llama 4 ChatFormat and tokenizers, and this library's plain-dict messages as its RawMessage.
Tests that use it skip, saying why, when llama-models or pydantic is not installed."""

import contextlib
import importlib
import importlib.util
import io
import os
import sys
import types
from pathlib import Path

import pytest


class _Stub(types.ModuleType):
    """A stand-in module whose every attribute is an empty class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


@contextlib.contextmanager
def _image_packages_stubbed():
    """llama-models' chat formats import PIL (and Llama 4's torchvision) at module level, for images only,
    which these text-only tests never give them. Where those packages are absent, stand-ins are put in
    sys.modules just for the import, then taken out, so no other code sees them."""
    stubs = {
        "PIL": ["PIL", "PIL.Image", "PIL.ImageFile"],
        "torchvision": ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"],
    }
    added = []
    for package, names in stubs.items():
        if importlib.util.find_spec(package) is None:
            for name in names:
                if name not in sys.modules:
                    sys.modules[name] = _Stub(name)
                    added.append(name)
    for name in added:  # `from PIL import Image` reads the attribute
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def meta(family: str):
    """(llama_models.datatypes, its <family>.chat_format, its <family>.tokenizer), or a skip."""
    for package in ("llama_models", "pydantic"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed: llama-models' chat format, the witness here, needs it")
    with _image_packages_stubbed(), _pil_flags_kept():
        datatypes = importlib.import_module("llama_models.datatypes")
        chat_format = importlib.import_module(f"llama_models.{family}.chat_format")
        tokenizer = importlib.import_module(f"llama_models.{family}.tokenizer")
    return datatypes, chat_format, tokenizer


@contextlib.contextmanager
def _pil_flags_kept():
    """llama-models' Llama 4 preprocess sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES when imported (so
    that truncated files load silently): it is put back, so that the tests see Pillow as users have it."""
    image_file = importlib.import_module("PIL.ImageFile") if importlib.util.find_spec("PIL") else None
    before = getattr(image_file, "LOAD_TRUNCATED_IMAGES", None)
    try:
        yield
    finally:
        if image_file is not None:
            image_file.LOAD_TRUNCATED_IMAGES = before


def raw_message(datatypes, message: dict):
    """A plain-dict message as llama-models' RawMessage (role "ipython" is its "tool")."""
    role = "tool" if message["role"] == "ipython" else message["role"]
    calls = [
        datatypes.ToolCall(call_id=c.get("call_id", "0"), tool_name=c["tool_name"], arguments=c["arguments"])
        for c in message.get("tool_calls", [])
    ]
    stop = message.get("stop_reason")
    content = message["content"]
    if not isinstance(content, str):
        content = [
            datatypes.RawTextItem(text=item["text"])
            if item["type"] == "text"
            else datatypes.RawMediaItem(data=_image_bytes(item["image"]))
            for item in content
        ]
    return datatypes.RawMessage(
        role=role,
        content=content,
        tool_calls=calls,
        stop_reason=None if stop is None else datatypes.StopReason(stop),
    )


def _image_bytes(image) -> bytes:
    """An image item's value (a path, bytes or a PIL image) as the bytes of a file, what llama-models takes."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    out = io.BytesIO()
    image.save(out, format="PNG")  # lossless: the same pixels
    return out.getvalue()


def plain_message(message) -> dict:
    """llama-models' decoded RawMessage as this library's plain dict, call ids left out."""
    return {
        "role": message.role,
        "content": message.content,
        "stop_reason": message.stop_reason.value,
        "tool_calls": [
            {"tool_name": getattr(c.tool_name, "value", c.tool_name), "arguments": c.arguments}
            for c in message.tool_calls
        ],
    }
