"""Images for Llama 4: read one (a path, bytes or a PIL image) and cut it into the square tiles and the
thumbnail its vision encoder takes, as llama-models' llama4/preprocess.py does. Reading images needs Pillow."""

import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union[str, os.PathLike, bytes, "Image.Image"]

# Pixels in [0, 1] are normalised to [-1, 1], per channel.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
MAX_NUM_CHUNKS = 16  # tiles per image at most (the thumbnail not counted), as llama-models' ChatFormat sets it


@dataclass
class TransformedImage:
    pixels: torch.Tensor  # (n_chunks, 3, S, S) float32: the tiles row by row, then the thumbnail when there are several
    aspect_ratio: tuple[int, int]  # the tile grid, (rows, cols)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            'reading images needs Pillow, which the text-only install leaves out: pip install "llama-reference[vision]"'
        ) from None
    return Image


def load_image(image: ImageInput) -> "Image.Image":
    """An RGB PIL image from a path, the bytes of an image file, or a PIL image. Transparent pixels of an RGBA
    image become white, as llama-models makes them. A missing file is a FileNotFoundError; a file that is no
    image, or is truncated, a ValueError."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}" + (": it is a folder" if path.is_dir() else ""))
        data, name = path.read_bytes(), str(path)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data, name = bytes(image), "the image's bytes"
    else:
        pil = sys.modules.get("PIL.Image")  # a PIL image can only exist where PIL is imported
        if pil is None or not isinstance(image, pil.Image):
            raise ValueError(
                f"an image is given as a {type(image).__name__}: give a path, the bytes of an image file, or a PIL image"
            )
        return _to_rgb(_loaded(image, "the PIL image"))
    if not data:
        raise ValueError(f"{name} is empty: give an image file (PNG, JPEG, ...)")
    Image = _pil()
    try:
        opened = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(
            f"{name} is not an image Pillow can read ({e}): give a PNG, JPEG or other image file"
        ) from None
    return _to_rgb(_loaded(opened, name))


def _loaded(image: "Image.Image", name: str) -> "Image.Image":
    # Pillow decodes lazily: a truncated or damaged file fails here, not in the middle of the transform.
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name} cannot be decoded ({e}): the file is truncated or damaged") from None
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name} is {image.width} x {image.height} pixels: an image needs at least one pixel")
    return image


def _to_rgb(image: "Image.Image") -> "Image.Image":
    if image.mode == "RGBA":
        white = _pil().new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image.convert("RGB")


def supported_grids(max_num_chunks: int) -> list[tuple[int, int]]:
    """Every tile grid (rows, cols) of at most max_num_chunks tiles."""
    return [(rows, n // rows) for n in range(max_num_chunks, 0, -1) for rows in range(1, n + 1) if n % rows == 0]


def best_grid(width: int, height: int, tile_size: int, max_num_chunks: int) -> tuple[int, int]:
    """The tile grid (rows, cols) whose canvas the image fits with the least scaling: the smallest upscaling when
    some canvas needs none, else the smallest downscaling; among canvases of that scale, the smallest."""
    grids = supported_grids(max_num_chunks)
    canvases = torch.tensor([(cols * tile_size, rows * tile_size) for rows, cols in grids])  # (n, 2): width, height
    # The scale that fits the image in each canvas without distortion; float32, as llama-models compares them.
    scales = torch.minimum(canvases[:, 0] / width, canvases[:, 1] / height)
    up = scales[scales >= 1]
    scale = up.min() if len(up) else scales.max()
    areas = torch.where(scales == scale, canvases[:, 0] * canvases[:, 1], torch.iinfo(torch.int64).max)
    return grids[int(areas.argmin())]


def size_without_distortion(width: int, height: int, canvas: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """The (width, height) an image is resized to so that it fits the canvas (width, height) with its aspect ratio
    kept: the largest that fits, but upscaled no further than to tile_size on a side."""
    target_w = min(max(width, tile_size), canvas[0])
    target_h = min(max(height, tile_size), canvas[1])
    # In float64, as llama-models computes it, so that the sizes match to the pixel.
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.floor(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.floor(width * scale_h), target_w), target_h
    return max(new_w, 1), max(new_h, 1)


def _normalised(image: "Image.Image") -> torch.Tensor:
    """(3, H, W) float32 pixels of an RGB image, normalised with IMAGE_MEAN and IMAGE_STD."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    pixels = pixels.permute(2, 0, 1).to(torch.float32).div(255)
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    return pixels.sub_(mean).div_(std)


def transform_image(image: ImageInput, tile_size: int, max_num_chunks: int = MAX_NUM_CHUNKS) -> TransformedImage:
    """An image as tiles of tile_size x tile_size pixels: resized without distortion to fit the best grid of at
    most max_num_chunks tiles (bilinear), padded with black at the right and bottom, cut row by row; when there
    are several tiles, the whole image squeezed into one more tile (the thumbnail) follows them."""
    if max_num_chunks < 1:
        raise ValueError(f"max_num_chunks is {max_num_chunks}: an image needs at least one tile")
    Image = _pil()
    image = load_image(image)
    rows, cols = best_grid(image.width, image.height, tile_size, max_num_chunks)
    canvas = (cols * tile_size, rows * tile_size)
    resized = image.resize(
        size_without_distortion(image.width, image.height, canvas, tile_size), Image.Resampling.BILINEAR
    )
    padded = Image.new("RGB", canvas, (0, 0, 0))
    padded.paste(resized)
    pixels = _normalised(padded).view(3, rows, tile_size, cols, tile_size)
    tiles = pixels.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size, tile_size)
    if rows * cols > 1:
        thumbnail = _normalised(image.resize((tile_size, tile_size), Image.Resampling.BILINEAR))
        tiles = torch.cat([tiles, thumbnail[None]])
    return TransformedImage(pixels=tiles, aspect_ratio=(rows, cols))
