"""Llama 4's vision path, read top to bottom: each tile of an image through the vision encoder (a ViT with 2-D
rotary positions), pixel shuffle and the adapter MLP, into one embedding per <|patch|> token of the prompt.

Module and weight names are those of Meta's reference (llama-models, models/llama4/vision/), so the keys are those
of the released consolidated.NN.pth files; linear layers are fairscale's model-parallel ones, split as Meta splits
them. Transformer.vision_projection (llama/model.py) takes the result into the language model's embedding.
"""

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.args import VisionArgs
from llama.model import apply_rotary_emb
from llama.parallel import ColumnParallelLinear, RowParallelLinear


class ColumnParallelConv2dPatch(nn.Module):
    """The patch embedding: a convolution with stride = kernel = patch, computed as Meta does, as unfold (each
    patch's pixels in a row) and one linear layer, whose output features are split over the ranks."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: tuple[int, int]):
        super().__init__()
        self._unfold = nn.Unfold(kernel_size=patch_size, stride=patch_size)
        self._linear = ColumnParallelLinear(in_channels * patch_size[0] * patch_size[1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._unfold(x)  # (n, 3, S, S) -> (n, 3 * patch_h * patch_w, n_patches), patches row by row
        return self._linear(x.transpose(1, 2))  # (n, n_patches, dim)


def precompute_vision_freqs_cis(grid: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(grid * grid + 1, head_dim / 2, 2): cos and sin of the 2-D rotary angles of a tile's patches, row by row,
    then of the class token. Each head's first head_dim / 4 pairs turn with the patch's column, the others with its
    row (both counted from 1), at the frequencies of a head_dim / 2 RoPE; the class token is not turned."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2)[: head_dim // 4].float() / (head_dim // 2)))
    patch = torch.arange(grid * grid)
    column, row = (patch % grid + 1).float(), (patch // grid + 1).float()
    angles = torch.cat([torch.outer(column, freqs), torch.outer(row, freqs)], dim=-1)  # (grid², head_dim / 2)
    angles = torch.cat([angles, torch.zeros(1, head_dim // 2)])  # the class token, last
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


class VisionAttention(nn.Module):
    """Multi-head self-attention over one tile's patches and class token: every position sees every other (no
    mask, no cache); q and k turned by the 2-D rotary positions. With biases; heads split over the ranks."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_local_heads = n_heads // fs_init.get_model_parallel_world_size()
        self.head_dim = dim // n_heads
        self.wq = ColumnParallelLinear(dim, dim, gather_output=False, bias=True)
        self.wk = ColumnParallelLinear(dim, dim, gather_output=False, bias=True)
        self.wv = ColumnParallelLinear(dim, dim, gather_output=False, bias=True)
        self.wo = RowParallelLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        n, seqlen, _ = x.shape  # (n_tiles, n_patches + 1, dim)
        xq = self.wq(x).view(n, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(n, seqlen, self.n_local_heads, self.head_dim)
        xv = self.wv(x).view(n, seqlen, self.n_local_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        output = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2))
        return self.wo(output.transpose(1, 2).reshape(n, seqlen, -1))  # (n_tiles, n_patches + 1, dim)


class VisionFeedForward(nn.Module):
    """Linear, GELU, linear, with biases (c_fc split by output features, c_proj by input features)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.c_fc = ColumnParallelLinear(dim, hidden_dim, gather_output=False, bias=True)
        self.c_proj = RowParallelLinear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    """A pre-norm transformer block with LayerNorm (weight and bias)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attn = VisionAttention(args.dim, args.n_heads)
        self.ln_1 = nn.LayerNorm(args.dim)
        self.mlp = VisionFeedForward(args.dim, int(args.mlp_ratio * args.dim))
        self.ln_2 = nn.LayerNorm(args.dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), freqs_cis)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(args) for _ in range(args.n_layers))

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, freqs_cis)
        return x


class VisionEncoder(nn.Module):
    """Tiles (n, 3, S, S) -> one feature vector per patch (n, n_patches, dim): patch embedding, a class token
    appended, learned positions added, LayerNorm, the transformer, LayerNorm, the class token dropped."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.grid_size = args.image_size.height // args.patch_size.height  # patches per side of a tile
        n_patches = self.grid_size**2
        self.conv1 = ColumnParallelConv2dPatch(3, args.dim, (args.patch_size.height, args.patch_size.width))
        self.class_embedding = nn.Parameter(torch.empty(args.dim))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(n_patches + 1, args.dim))  # the class token last
        self.ln_pre = nn.LayerNorm(args.dim)
        self.ln_post = nn.LayerNorm(args.dim)
        self.transformer = VisionTransformer(args)
        # A plain attribute, not a buffer, as the language model's: the angles stay float32 whatever the dtype.
        with torch.device("cpu"):
            self.freqs_cis = precompute_vision_freqs_cis(self.grid_size, args.dim // args.n_heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # (n, n_patches, dim)
        x = torch.cat([x, self.class_embedding.expand(x.shape[0], 1, -1)], dim=1)  # (n, n_patches + 1, dim)
        x = self.ln_pre(x + self.positional_embedding_vlm)
        self.freqs_cis = self.freqs_cis.to(x.device)  # no-op once it is there
        x = self.ln_post(self.transformer(x, self.freqs_cis))
        return x[:, :-1]  # (n, n_patches, dim): the class token's output is not used


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(n, grid * grid, c) -> (n, (grid * ratio)², c / ratio²): each block of 1/ratio x 1/ratio neighbouring patches
    becomes one token holding their features side by side (ratio 0.5: 2 x 2 blocks, a quarter of the tokens)."""
    n, n_patches, c = x.shape
    grid = int(n_patches**0.5)
    x = x.view(n, grid, int(grid * ratio), int(c / ratio))  # columns merged in groups of 1/ratio: (n, rows, cols', c')
    x = x.permute(0, 2, 1, 3)  # (n, cols', rows, c')
    x = x.reshape(n, int(grid * ratio), int(grid * ratio), int(c / ratio**2))  # rows merged too: (n, cols', rows', c'')
    x = x.permute(0, 2, 1, 3)  # (n, rows', cols', c''), row-major again
    return x.reshape(n, -1, x.shape[-1])


class SimpleMLP(nn.Module):
    """The adapter's MLP: linear, GELU, linear, GELU; no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.c_fc = ColumnParallelLinear(dim, hidden_dim, gather_output=False)
        self.c_proj = RowParallelLinear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.c_proj(F.gelu(self.c_fc(x))))


class PixelShuffleMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.ratio = args.pixel_shuffle_ratio
        self.mlp = SimpleMLP(int(args.dim / self.ratio**2), args.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))  # (n, patches_per_chunk, output_dim)


class VisionEmbeddings(nn.Module):
    """Images -> one output_dim vector per <|patch|> token: all tiles of all images through the encoder at once."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.vision_encoder = VisionEncoder(args)
        self.vision_adapter = PixelShuffleMLP(args)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images: one (n_chunks_i, 3, S, S) tensor per image. Returns (sum n_chunks_i, patches_per_chunk,
        output_dim), the chunks in the order given."""
        like = self.vision_encoder.class_embedding  # the model's dtype (a linear layer's weight may be int8)
        tiles = torch.cat(images).to(like.device, like.dtype)  # (n_tiles, 3, S, S)
        return self.vision_adapter(self.vision_encoder(tiles))
