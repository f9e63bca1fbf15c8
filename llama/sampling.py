"""Choosing the next token from the model's logits: greedy, or nucleus (top-p) sampling as Meta's sample_top_p;
and the log-probability of given tokens."""

from typing import Optional

import torch

# On a CPU, sorting a 128K-token vocabulary takes tens of milliseconds a step, more than a small model's
# forward; the nucleus is nearly always among the few most likely tokens, so look there first.
CPU_NUCLEUS_CANDIDATES = 1024


def nucleus(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of probs (bs, vocab): (probabilities, token ids), most likely first, with
    the tokens outside the nucleus given probability 0. The nucleus is the most likely tokens taken until
    their total reaches p (the token that crosses p is kept), as in Meta's sample_top_p."""
    vocab_size = probs.shape[-1]
    k = vocab_size if probs.is_cuda else min(vocab_size, CPU_NUCLEUS_CANDIDATES)
    if k < vocab_size:
        probs_sort, probs_idx = torch.topk(probs, k, dim=-1)
        if bool((probs_sort.sum(dim=-1) <= p).any()):  # a nucleus may reach past the candidates: sort all
            k = vocab_size
    if k == vocab_size:
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    return probs_sort.masked_fill(mass_before > p, 0.0), probs_idx


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The next token of each row of logits (bs, vocab): the most likely at temperature 0, else drawn from the
    nucleus of softmax(logits / temperature). Returns (bs,)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    # Subtract the maximum before dividing, and divide by no less than float32's smallest normal number: a tiny
    # temperature then gives the other tokens -inf (probability 0), never 0 / 0.
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(logits.dtype).tiny)
    return sample_top_p(torch.softmax(scaled, dim=-1), top_p, generator).reshape(-1)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: one token id per row of probs (bs, vocab), drawn from the smallest set of most
    likely tokens whose probabilities add up to p. Returns (bs, 1), as Meta's does."""
    if p >= 1:  # every token is in the nucleus: no sorting needed
        return torch.multinomial(probs, num_samples=1, generator=generator)
    probs_sort, probs_idx = nucleus(probs, p)
    # multinomial draws in proportion to the weights, so the nucleus needs no renormalising
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position: logits (bs, n, vocab), tokens (bs, n) -> (bs, n)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
