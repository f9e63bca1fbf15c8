"""A minimal, readable Llama inference library, drop-in for Meta's llama and llama3 repositories."""

from llama.chat_format import ChatFormat, Dialog, Message
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = ["ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "Tokenizer", "Transformer"]
