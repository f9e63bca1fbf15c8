"""Llama 4's mixture-of-experts feed-forward: a router picks top_k experts per token, a sigmoid of its score
scales the token on its way in, and a shared expert runs on every token. Only the experts a token was routed to
run on it (Meta's reference runs every expert on every token, scoring the others 0).

Shape suffixes as in Meta's reference: a tokens, D model dim, E experts, F the experts' hidden size (this
rank's share of it), K experts per token.
"""

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region
from torch import nn

from llama.args import MoEArgs


class Experts(nn.Module):
    """E SwiGLU feed-forwards stacked, used as x @ W: w1, w3 (E, D, F), w2 (E, F, D); F split over ranks.

    Loaded weights are laid out in memory as nn.Linear's are, (E, F, D) and (E, D, F), behind views of Meta's
    shapes: a product with a few tokens then runs the same matrix-vector kernels as the other layers, which
    on CPUs read weights markedly faster in that layout.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        local_hidden = hidden_dim // fs_init.get_model_parallel_world_size()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, local_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, local_hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, local_hidden))
        self.register_load_state_dict_post_hook(Experts._linear_layout)

    @staticmethod
    def _linear_layout(module: "Experts", incompatible_keys) -> None:
        for name in ("w1", "w2", "w3"):
            w = getattr(module, name)
            if w.stride(-2) != 1 and w.device.type != "meta":
                setattr(module, name, nn.Parameter(w.detach().mT.contiguous().mT, requires_grad=False))

    def forward(self, x_aD: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on tokens x_aD: this rank's partial sum (a, D)."""
        w1, w2, w3 = self.w1[e].mT, self.w2[e].mT, self.w3[e].mT  # (F, D), (D, F), (F, D)
        return F.linear(F.silu(F.linear(x_aD, w1)) * F.linear(x_aD, w3), w2)


class MoE(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, moe_args: MoEArgs, shared_expert: nn.Module):
        super().__init__()
        self.top_k = moe_args.top_k
        self.router_DE = nn.Parameter(torch.empty(dim, moe_args.num_experts))  # replicated on every rank
        self.experts = Experts(moe_args.num_experts, dim, hidden_dim)
        self.shared_expert = shared_expert

    def forward(self, x_bsD: torch.Tensor) -> torch.Tensor:
        bs, slen, D = x_bsD.shape
        x_aD = x_bsD.reshape(-1, D)
        scores_aE = x_aD @ self.router_DE
        top_aK, experts_aK = torch.topk(scores_aE, self.top_k, dim=1)
        gates_aK = torch.sigmoid(top_aK.float()).type_as(x_aD)  # the other experts' gates are 0: they are skipped
        routed_aD = self.routed(x_aD, experts_aK, gates_aK)
        if fs_init.get_model_parallel_world_size() > 1:
            routed_aD = reduce_from_model_parallel_region(routed_aD)  # each rank has a share of F
        return (self.shared_expert(x_aD) + routed_aD).view(bs, slen, D)

    # Which experts run depends on the data: llama/fast.py keeps this out of torch.compile's graphs.
    def routed(self, x_aD: torch.Tensor, experts_aK: torch.Tensor, gates_aK: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum for each token, this rank's share."""
        # Group the (token, expert) pairs by expert; one host sync tells how many tokens each expert has.
        order = experts_aK.flatten().argsort()
        counts = torch.bincount(experts_aK.flatten(), minlength=self.router_DE.shape[1]).tolist()
        routed_aD = torch.zeros_like(x_aD)
        start = 0
        for e, n in enumerate(counts):
            if n:
                pairs = order[start : start + n]
                tokens = pairs // self.top_k
                x_in = x_aD[tokens] * gates_aK.flatten()[pairs, None]  # the gate scales the expert's input
                routed_aD.index_add_(0, tokens, self.experts(x_in, e))
                start += n
        return routed_aD
