"""Llama 4 image input: preprocessing against llama-models' llama4/preprocess.py (tile grids, resize sizes and pixel
tensors exact), the chat format with images token-exact against llama-models' ChatFormat on the real Llama 4
tokenizer, and the errors a user can cause.

Meta's preprocess calls four torchvision functions, and torchvision does not import beside this torch. It runs
here on a stand-in for them written from torchvision's documented behaviour on PIL images: F.resize and
tv.Resize are PIL's Image.resize with the same filter, ToTensor is uint8 HWC / 255 as float32 CHW, Normalize is
(x - mean) / std. What the stand-in decides is therefore only how a PIL image is resized and made a tensor; the
grid, the resize sizes (recorded from Meta's calls and compared on their own), padding, tile order and thumbnail
are Meta's. transformers' Llama4ImageProcessorFast needs torchvision too, so it cannot be a witness here."""

import dataclasses
import enum
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import tokenizer_paths
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from meta_reference import meta, raw_message

from llama.args import ModelArgs
from llama.chat_format import ChatFormat, Llama2ChatFormat, Llama3ChatFormat, Llama4ChatFormat
from llama.generation import Llama
from llama.model import Transformer
from llama.preprocess import best_grid, load_image, size_without_distortion, transform_image
from llama.tiny import TINY_LLAMA4_PARAMS, TINY_PARAMS, random_state_dict

Image = pytest.importorskip("PIL.Image", reason="reading images needs Pillow (the 'vision' extra)")
ImageFile = pytest.importorskip("PIL.ImageFile")

llama4, llama4_path, llama3, llama2 = (
    tokenizer_paths.llama4,
    tokenizer_paths.llama4_path,
    tokenizer_paths.llama3,
    tokenizer_paths.llama2,
)
llama3_path, llama2_path = tokenizer_paths.llama3_path, tokenizer_paths.llama2_path
byte_path, byte_tokenizer = tokenizer_paths.byte_path, tokenizer_paths.byte_tokenizer

SCOUT_TILE = 336  # Llama 4 Scout's and Maverick's vision_args: 336-pixel tiles of 14-pixel patches, shuffle 0.5


def vision_args(tile=SCOUT_TILE, patch=14, ratio=0.5):
    """What the chat format reads of a model's vision_args."""
    return types.SimpleNamespace(
        image_size=types.SimpleNamespace(height=tile, width=tile),
        patch_size=types.SimpleNamespace(height=patch, width=patch),
        pixel_shuffle_ratio=ratio,
    )


def meta_vision_args(args_module, tile, patch, ratio):
    size = args_module.Size
    return args_module.VisionArgs(
        image_size=size(height=tile, width=tile),
        patch_size=size(height=patch, width=patch),
        dim=32,
        n_layers=1,
        n_heads=1,
        mlp_ratio=2.0,
        output_dim=32,
        pixel_shuffle_ratio=ratio,
    )


@pytest.fixture(autouse=True)
def strict_pil(monkeypatch):
    # Pillow's default: a truncated file is an error (llama-models' preprocess turns this off when imported).
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


# -- The witness: Meta's preprocess on a stand-in for torchvision ------------------------------------------------


class MetaPreprocess:
    """llama-models' llama4/preprocess.py, loaded from its file under a private name, on the stand-in below."""

    def __init__(self):
        self.resize_calls: list[tuple[int, int]] = []  # (height, width), as Meta asks torchvision for them
        path = importlib.util.find_spec("llama_models.llama4").submodule_search_locations[0] + "/preprocess.py"
        stand_in = self._torchvision()
        saved = {name: sys.modules.get(name) for name in stand_in}
        truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        sys.modules.update(stand_in)
        try:
            spec = importlib.util.spec_from_file_location("_meta_llama4_preprocess", path)
            self.module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.module)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated  # Meta's module sets it process-wide
            for name, module in saved.items():
                if module is None:
                    del sys.modules[name]
                else:
                    sys.modules[name] = module

    def _torchvision(self) -> dict:
        calls = self.resize_calls

        class InterpolationMode(enum.Enum):
            BILINEAR = "bilinear"

        def resize(img, size, interpolation=InterpolationMode.BILINEAR):
            assert interpolation is InterpolationMode.BILINEAR
            calls.append(tuple(size))
            return img.resize((size[1], size[0]), Image.Resampling.BILINEAR)

        class ToTensor:
            def __call__(self, pic):
                return torch.from_numpy(np.array(pic, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)

        class Normalize:
            def __init__(self, mean, std, inplace=False):
                self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

            def __call__(self, tensor):
                return tensor.sub_(self.mean).div_(self.std)

        class Resize:
            def __init__(self, size):
                self.size = size

            def __call__(self, img):
                return resize(img, self.size)

        class Compose:
            def __init__(self, transforms):
                self.transforms = transforms

            def __call__(self, x):
                for t in self.transforms:
                    x = t(x)
                return x

        tv = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.resize = resize
        for cls in (InterpolationMode, ToTensor, Normalize, Resize, Compose):
            setattr(transforms, cls.__name__, cls)
        transforms.functional, tv.transforms = functional, transforms
        return {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }

    def transforms(self, tile: int):
        return self.module.VariableSizeImageTransform(tile), self.module.ResizeNormalizeImageTransform(tile, tile)

    def __call__(self, image, tile: int, max_num_chunks: int):
        """(pixels, aspect ratio, resize size (width, height)) as llama-models' ChatFormat makes them."""
        tiles_transform, thumbnail_transform = self.transforms(tile)
        self.resize_calls.clear()
        tiles, aspect_ratio = tiles_transform(image, max_num_chunks=max_num_chunks)
        resized = self.resize_calls[0][::-1]
        if tiles.shape[0] > 1:
            tiles = torch.cat([tiles, thumbnail_transform(image)[None]])
        return tiles, aspect_ratio, resized


@pytest.fixture(scope="module")
def meta_preprocess():
    if importlib.util.find_spec("llama_models") is None:
        pytest.skip("llama-models, whose preprocess is the witness, is not installed")
    return MetaPreprocess()


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# -- Preprocessing ------------------------------------------------------------------------------------------------

SIZES = {
    "one pixel": (1, 1),
    "exactly one tile": (336, 336),
    "smaller than a tile": (120, 90),
    "tall": (300, 800),
    "wide": (800, 300),
    "a pixel over one tile": (337, 335),
    "a 3 x 2 grid exactly": (672, 1008),
    "photo 4:3": (1600, 1200),
    "very wide": (5000, 20),
    "very tall": (20, 5000),
}


@pytest.mark.parametrize("name", SIZES)
def test_tiles_and_thumbnail_equal_metas(name, meta_preprocess):
    width, height = SIZES[name]
    image = random_image(width, height, seed=width * height)
    pixels, aspect_ratio, resized = meta_preprocess(image, SCOUT_TILE, 16)
    ours = transform_image(image, SCOUT_TILE, 16)
    assert ours.aspect_ratio == aspect_ratio
    rows, cols = aspect_ratio
    canvas = (cols * SCOUT_TILE, rows * SCOUT_TILE)
    assert size_without_distortion(width, height, canvas, SCOUT_TILE) == resized
    assert ours.pixels.dtype == torch.float32 and ours.pixels.shape == pixels.shape
    assert torch.equal(ours.pixels, pixels)
    assert (rows * cols > 1) == (ours.pixels.shape[0] == rows * cols + 1)  # the thumbnail only with several tiles


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_modes_become_rgb_as_metas_do(mode, meta_preprocess):
    # RGBA over white, the others converted; llama-models' chat format converts before its transform.
    meta_chat_format = meta("llama4")[1]
    base = random_image(500, 400, "RGBA" if mode == "RGBA" else "RGB", seed=3)
    image = base if mode == "RGBA" else base.convert(mode)
    pixels, aspect_ratio, _ = meta_preprocess(meta_chat_format.convert_image_to_rgb(image), SCOUT_TILE, 16)
    ours = transform_image(image, SCOUT_TILE, 16)
    assert ours.aspect_ratio == aspect_ratio and torch.equal(ours.pixels, pixels)


def test_a_small_tile_size_and_chunk_limit_equal_metas(meta_preprocess):
    image = random_image(97, 61, seed=7)
    for max_num_chunks in (1, 2, 5):
        pixels, aspect_ratio, _ = meta_preprocess(image, 28, max_num_chunks)
        ours = transform_image(image, 28, max_num_chunks)
        assert ours.aspect_ratio == aspect_ratio and torch.equal(ours.pixels, pixels)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 12000),
    height=st.integers(1, 12000),
    tile=st.sampled_from([14, 28, 336, 448]),
    max_num_chunks=st.integers(1, 24),
)
def test_grid_and_resize_size_equal_metas_for_any_size(width, height, tile, max_num_chunks, meta_preprocess):
    meta_transform = meta_preprocess.module.VariableSizeImageTransform(tile)
    canvases = torch.tensor(meta_transform.find_supported_resolutions(max_num_chunks, tile))
    canvas = meta_transform.get_best_fit((width, height), canvases)  # (width, height)
    rows, cols = best_grid(width, height, tile, max_num_chunks)
    assert (cols * tile, rows * tile) == canvas
    target = (min(max(width, tile), canvas[0]), min(max(height, tile), canvas[1]))
    expected = meta_transform.get_max_res_without_distortion((width, height), target)
    assert size_without_distortion(width, height, canvas, tile) == tuple(max(s, 1) for s in expected)


def test_a_path_bytes_and_a_pil_image_give_the_same_pixels(tmp_path):
    image = random_image(700, 500, seed=11)
    path = tmp_path / "image.png"
    image.save(path)
    expected = transform_image(image, SCOUT_TILE).pixels
    for given_as in (path, str(path), path.read_bytes()):
        assert torch.equal(transform_image(given_as, SCOUT_TILE).pixels, expected)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG")
    assert load_image(jpeg.getvalue()).size == (700, 500)


# -- The chat format with images: token-exact with llama-models ---------------------------------------------------


@pytest.fixture(scope="module")
def meta_llama4(meta_preprocess, llama4_path):
    """llama-models' Llama 4 ChatFormat with images, on its own tokenizer, as factory(tile, patch, ratio)."""
    datatypes, chat_format, meta_tokenizer = meta("llama4")
    args_module = importlib.import_module("llama_models.llama4.args")
    tokenizer = meta_tokenizer.Tokenizer(llama4_path)

    def witness(tile=SCOUT_TILE, patch=14, ratio=0.5):
        # Built without vision_args, then given them: its constructor would build the transforms from the
        # torchvision stub its module was imported with; the stand-in's are put in their place.
        formatter = chat_format.ChatFormat(tokenizer)
        formatter.vision_args = meta_vision_args(args_module, tile, patch, ratio)
        formatter.dynamic_image_transform, formatter.image_transform = meta_preprocess.transforms(tile)
        return formatter

    return datatypes, witness


def image_item(image):
    return {"type": "image", "image": image}


def text_item(text):
    return {"type": "text", "text": text}


def image_dialogs():
    small, wide, tall = random_image(200, 150, seed=1), random_image(900, 400, seed=2), random_image(300, 700, seed=3)
    return {
        "one image, one tile": [{"role": "user", "content": [image_item(small), text_item("What is this?")]}],
        "one image, a 1 x 3 grid": [{"role": "user", "content": [text_item("Describe"), image_item(wide)]}],
        "several images in a message": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [
                    image_item(png_bytes(small)),
                    text_item(" and "),
                    image_item(tall),
                    text_item(": compare them."),
                    text_item(" Briefly."),
                ],
            },
        ],
        "an image in an earlier turn": [
            {"role": "user", "content": [image_item(wide), text_item("What colour dominates?")]},
            {"role": "assistant", "content": "None: it is noise.", "stop_reason": "end_of_turn"},
            {"role": "user", "content": [text_item("And now?"), image_item(small)]},
        ],
        "text items only": [{"role": "user", "content": [text_item("Hi "), text_item("there")]}],
    }


@pytest.mark.parametrize("name", image_dialogs())
def test_image_dialogs_give_llama_models_tokens_and_pixels(name, llama4, meta_llama4):
    datatypes, witness_for = meta_llama4
    dialog = image_dialogs()[name]
    witness = witness_for()
    expected = witness.encode_dialog_prompt([raw_message(datatypes, m) for m in dialog])
    ours = ChatFormat(llama4, vision_args=vision_args())
    assert isinstance(ours, Llama4ChatFormat)
    prompt = ours.encode_dialog(dialog)
    assert prompt.tokens == expected.tokens
    assert ours.encode_dialog_prompt(dialog) == expected.tokens
    assert len(prompt.images) == len(expected.images or [])
    for pixels, meta_pixels in zip(prompt.images, expected.images or []):
        assert torch.equal(pixels, meta_pixels)
    # The contract with the model: 144 <|patch|> tokens (Scout's 24 x 24 patches, shuffled by 0.5) per tile.
    n_tiles = sum(p.shape[0] for p in prompt.images)
    assert ours.patches_per_chunk == 144 and prompt.tokens.count(llama4.special_tokens["<|patch|>"]) == 144 * n_tiles


def test_image_tokens_follow_metas_for_another_geometry(llama4, meta_llama4):
    # 56-pixel tiles of 14-pixel patches, shuffle 0.5: 4 patches a tile; a 2 x 3 grid shows every separator.
    datatypes, witness_for = meta_llama4
    dialog = [{"role": "user", "content": [image_item(random_image(150, 100, seed=5)), text_item("?")]}]
    expected = witness_for(56, 14, 0.5).encode_dialog_prompt([raw_message(datatypes, m) for m in dialog])
    ours = ChatFormat(llama4, vision_args=vision_args(56, 14, 0.5)).encode_dialog(dialog)
    assert ours.tokens == expected.tokens
    special = llama4.special_tokens
    image_start = ours.tokens.index(special["<|image_start|>"])
    image = ours.tokens[image_start : ours.tokens.index(special["<|image_end|>"]) + 1]
    p, x, y = special["<|patch|>"], special["<|tile_x_separator|>"], special["<|tile_y_separator|>"]
    row = [p] * 4 + [x] + [p] * 4 + [x] + [p] * 4 + [y]
    assert image == [special["<|image_start|>"], *row, *row, special["<|image|>"], *[p] * 4, special["<|image_end|>"]]


def test_tool_results_and_calls_take_content_lists(llama4, meta_llama4):
    datatypes, witness_for = meta_llama4
    dialog = [
        {"role": "user", "content": [text_item("Weather in "), text_item("Paris?")]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"call_id": "1", "tool_name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        {"role": "ipython", "content": [text_item('{"temp": 21}')]},
    ]
    expected = witness_for().encode_dialog_prompt([raw_message(datatypes, m) for m in dialog])
    assert ChatFormat(llama4, vision_args=vision_args()).encode_dialog_prompt(dialog) == expected.tokens


# -- One class per family -----------------------------------------------------------------------------------------


def test_chat_format_picks_the_family_class(llama2, llama3, llama4):
    assert type(ChatFormat(llama2)) is Llama2ChatFormat and ChatFormat(llama2).style == "llama2"
    assert type(ChatFormat(llama3)) is Llama3ChatFormat and ChatFormat(llama3).style == "llama3"
    assert type(ChatFormat(llama4)) is Llama4ChatFormat and ChatFormat(llama4).style == "llama4"
    assert type(Llama3ChatFormat(llama3)) is Llama3ChatFormat
    from llama.tokenizer import ChatFormat as meta_import_path

    assert meta_import_path is ChatFormat


def test_text_models_read_text_items_joined(llama2, llama3):
    for tokenizer in (llama2, llama3):
        formatter = ChatFormat(tokenizer)
        as_items = [{"role": "user", "content": [text_item(" Hello, "), text_item("world ")]}]
        assert formatter.encode_dialog_prompt(as_items) == formatter.encode_dialog_prompt(
            [{"role": "user", "content": " Hello, world "}]
        )


# -- Errors a user can cause --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_a_text_model_given_an_image_says_images_need_llama4(name, request):
    formatter = ChatFormat(request.getfixturevalue(name))
    dialog = [{"role": "user", "content": [image_item(random_image(8, 8)), text_item("?")]}]
    with pytest.raises(ValueError, match="read text only: images need a Llama 4 model"):
        formatter.encode_dialog_prompt(dialog)
    with pytest.raises(ValueError, match="images need Llama 4"):
        ChatFormat(request.getfixturevalue(name), vision_args=object())


def test_a_llama4_model_without_vision_args_says_so(llama4):
    dialog = [{"role": "user", "content": [image_item(random_image(8, 8))]}]
    with pytest.raises(ValueError, match="no vision encoder"):
        ChatFormat(llama4).encode_dialog_prompt(dialog)


def truncated(image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()[: len(out.getvalue()) * 2 // 3]


BAD_IMAGES = {
    "not an image": (b"%PDF-1.4 a document, not an image", ValueError, "not an image Pillow can read"),
    "empty bytes": (b"", ValueError, "is empty"),
    "a truncated PNG": (truncated(random_image(64, 64), "PNG"), ValueError, "truncated or damaged"),
    "a truncated JPEG": (truncated(random_image(64, 64), "JPEG"), ValueError, "truncated or damaged"),
    "a number": (42, ValueError, "give a path, the bytes of an image file, or a PIL image"),
    "no such file": ("/nonexistent/cat.png", FileNotFoundError, "no image file at /nonexistent/cat.png"),
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_an_unreadable_image_is_a_clear_error(name, llama4, tmp_path):
    image, error, match = BAD_IMAGES[name]
    formatter = ChatFormat(llama4, vision_args=vision_args())
    with pytest.raises(error, match=match):
        formatter.encode_dialog_prompt([{"role": "user", "content": [image_item(image)]}])
    if isinstance(image, bytes) and image:  # the same bytes in a file: the error names the file
        path = tmp_path / "image.png"
        path.write_bytes(image)
        with pytest.raises(error, match=str(path)):
            load_image(path)


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="it is a folder"):
        load_image(tmp_path)


BAD_CONTENT = {
    "a number": (3, "content must be a str or a list"),
    "a dict": ({"type": "text", "text": "hi"}, "content must be a str or a list"),
    "an item without a type": (["hi"], "content item 0 is 'hi'"),
    "an unknown type": ([{"type": "video", "video": "x.mp4"}], "content item 0 is"),
    "a text item without text": ([text_item("ok"), {"type": "text"}], "content item 1 is"),
    "a text item with bytes": ([{"type": "text", "text": b"hi"}], "content item 0 is"),
    "an image item without an image": ([{"type": "image"}], "content item 0 is"),
}


@pytest.mark.parametrize("name", BAD_CONTENT)
def test_a_bad_content_item_is_a_clear_error(name, llama4, llama3):
    content, match = BAD_CONTENT[name]
    for tokenizer in (llama4, llama3):
        with pytest.raises(ValueError, match=f"message 0.*{match}"):
            ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": content}])


def test_without_pillow_text_works_and_an_image_names_the_extra(llama4, monkeypatch):
    for name in [m for m in sys.modules if m == "PIL" or m.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails, as where Pillow is not installed
    formatter = ChatFormat(llama4, vision_args=vision_args())
    text = [{"role": "user", "content": [text_item("Hi")]}]
    assert formatter.encode_dialog_prompt(text) == ChatFormat(llama4).encode_dialog_prompt(
        [{"role": "user", "content": "Hi"}]
    )
    with pytest.raises(ImportError, match=r'pip install "llama-reference\[vision\]"'):
        formatter.encode_dialog_prompt([{"role": "user", "content": [image_item(b"\x89PNG...")]}])


def test_import_llama_and_chat_in_text_needs_no_pillow():
    code = (
        "import sys; sys.modules['PIL'] = None\n"  # import PIL fails, as where Pillow is not installed
        "import llama, llama.preprocess, llama.tokenizer\n"
        "from llama.tiny import write_byte_tokenizer\n"
        "from pathlib import Path\n"
        "write_byte_tokenizer(Path(sys.argv[1]))\n"
        "print(llama.ChatFormat(llama.Tokenizer(sys.argv[1])).encode_dialog_prompt([{'role': 'user', 'content': 'hi'}]))"
    )
    with tempfile.TemporaryDirectory() as folder:
        run = subprocess.run(
            [sys.executable, "-c", code, f"{folder}/tokenizer.model"],
            cwd=Path(__file__).parents[1],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[")


# -- Generation with images: the model is given the pixels and the mask of their <|patch|> tokens -----------------
# Until this library's vision encoder is merged, the model here is the tiny Llama 4 text model under a stand-in that
# records what generation hands it and runs the text model without the images.


class RecordingTransformer(Transformer):
    """The text model, recording each call's tokens, images and image_mask."""

    def forward(self, tokens, start_pos, last_only=False, images=None, image_mask=None):
        self.calls.append((tokens.clone(), start_pos, images, image_mask))
        return super().forward(tokens, start_pos, last_only=last_only)


TINY_VISION = vision_args(56, 14, 0.5)  # 4 <|patch|> tokens a tile


@pytest.fixture(scope="module")
def tiny_llama4(llama4):
    args = ModelArgs(**dict(TINY_LLAMA4_PARAMS, vocab_size=llama4.n_words), max_seq_len=96, max_batch_size=2)
    with torch.device("meta"):
        model = RecordingTransformer(args)
    model.load_state_dict(random_state_dict(args, seed=0, std=0.5, dtype=torch.float32), strict=True, assign=True)
    model.setup_caches(torch.device("cpu"), torch.float32)
    model.params.vision_args = TINY_VISION  # the stand-in's: a text model that takes images
    model.calls = []
    return Llama(model.eval(), llama4)


def test_chat_completion_gives_the_model_each_dialogs_pixels_and_patch_mask(tiny_llama4, llama4):
    image = random_image(150, 100, seed=5)  # a 2 x 3 grid and the thumbnail: 7 tiles, 28 <|patch|> tokens
    with_image = [{"role": "user", "content": [image_item(image), text_item("What is it?")]}]
    text_only = [{"role": "user", "content": "Hello"}]
    model, patch = tiny_llama4.model, llama4.special_tokens["<|patch|>"]
    model.calls.clear()
    batch = tiny_llama4.chat_completion([text_only, with_image], max_gen_len=4, temperature=0)
    expected_pixels = transform_image(image, 56).pixels
    with_images = [call for call in model.calls if call[2] is not None]
    assert len(with_images) == 1
    tokens, start_pos, images, image_mask = with_images[0]
    prompt = ChatFormat(llama4, vision_args=TINY_VISION).encode_dialog_prompt(with_image)
    assert start_pos == 0 and tokens.tolist() == [prompt]  # the whole prompt in the call that has its image
    assert len(images) == 1 and torch.equal(images[0], expected_pixels)
    assert torch.equal(image_mask, tokens == patch) and int(image_mask.sum()) == 7 * 4
    assert all(call[3] is None for call in model.calls if call[2] is None)  # text calls pass nothing
    # Each dialog's reply is the one it gets alone, and the stream's is the same.
    for dialog, result in zip([text_only, with_image], batch):
        assert tiny_llama4.chat_completion([dialog], max_gen_len=4, temperature=0)[0] == result
    stream = tiny_llama4.chat_completion_stream(with_image, max_gen_len=4, temperature=0)
    assert "".join(stream) == batch[1]["generation"]["content"] and stream.message == batch[1]["generation"]


def test_chat_api_errors_for_images(tiny_llama4, tmp_path):
    image = image_item(random_image(150, 100, seed=5))  # 37 tokens: 7 tiles of 4 patches, 6 separators, 3 marks
    with pytest.raises(
        ValueError, match=r"dialogs\[0\] is \d+ tokens long, 111 of them for its 3 image\(s\), but max_seq_len is 96"
    ):
        tiny_llama4.chat_completion([[{"role": "user", "content": [image, image, image, text_item("?")]}]])
    with pytest.raises(ValueError, match=r"dialogs\[0\]\[0\]\['content'\] must be a string or a list"):
        tiny_llama4.chat_completion([[{"role": "user", "content": 3}]])
    with pytest.raises(ValueError, match=r"dialogs\[0\] is malformed: message 0's content item 0 is"):
        tiny_llama4.chat_completion([[{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]])
    (tmp_path / "cut.png").write_bytes(truncated(random_image(64, 64), "PNG"))
    with pytest.raises(ValueError, match="truncated or damaged"):
        tiny_llama4.chat_completion_stream([{"role": "user", "content": [image_item(tmp_path / "cut.png")]}])
    # A failed call leaves the Llama usable.
    assert tiny_llama4.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=2)[0]["generation"]


def test_a_text_model_given_an_image_is_a_value_error(byte_tokenizer):
    args = ModelArgs(**dict(TINY_PARAMS, vocab_size=byte_tokenizer.n_words), max_seq_len=32, max_batch_size=1)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, dtype=torch.float32), strict=True, assign=True)
    model.setup_caches(torch.device("cpu"), torch.float32)
    generator = Llama(model.eval(), byte_tokenizer)
    dialog = [{"role": "user", "content": [image_item(random_image(8, 8)), text_item("?")]}]
    with pytest.raises(ValueError, match=r"dialogs\[0\] is malformed: a user message holds an image, but Llama 3"):
        generator.chat_completion([dialog])


def test_the_chat_example_asks_about_an_image_and_a_text_model_says_it_needs_llama4(tmp_path):
    # The example on a tiny Llama 3: the image is refused with the library's message, before any generation.
    env = dict(os.environ, OMP_NUM_THREADS="1", LLAMA_DEVICE="cpu")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "llama.tiny", "--out_dir", str(tmp_path)], cwd=root, env=env, check=True)
    random_image(40, 30).save(tmp_path / "cat.png")
    args = ["example_chat_completion.py", "--ckpt_dir", str(tmp_path), "--image", str(tmp_path / "cat.png")]
    run = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"User: [image: {tmp_path / 'cat.png'}] Describe this image" in run.stdout
    assert "ValueError: dialog is malformed: a user message holds an image, but Llama 3 models read text only" in (
        run.stderr
    )


# -- End to end on the tiny Llama 4 with its vision tower (python -m llama.tiny --llama4) --------------------------


@pytest.fixture(scope="module")
def tiny_vision_folder(tmp_path_factory):
    if "vision_args" not in {f.name for f in dataclasses.fields(ModelArgs)}:
        pytest.skip("this library's vision encoder is not here yet")
    out = tmp_path_factory.mktemp("tiny-llama4-vision")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "llama.tiny", "--llama4", "--out_dir", str(out)], cwd=root, env=env, check=True
    )
    return out


@pytest.fixture(scope="module")
def tiny_vision_llama(tiny_vision_folder):
    return Llama.build(tiny_vision_folder, None, max_seq_len=256, max_batch_size=2, device="cpu", dtype=torch.float32)


def test_chat_with_an_image_is_the_models_own_greedy_decoding_and_sees_the_image(tiny_vision_llama):
    generator, model = tiny_vision_llama, tiny_vision_llama.model
    patch = generator.tokenizer.special_tokens["<|patch|>"]

    def dialog(image):
        return [{"role": "user", "content": [image_item(image), text_item("What is in the picture?")]}]

    @torch.inference_mode()
    def plain_greedy(prompt, n: int) -> list[int]:
        tokens = torch.tensor([prompt.tokens])
        logits = model(tokens, 0, images=prompt.images, image_mask=tokens == patch)
        out = []
        for pos in range(tokens.shape[1], tokens.shape[1] + n):
            token = int(logits[0, -1].argmax())
            if token in generator.stop_tokens:
                break
            out.append(token)
            logits = model(torch.tensor([[token]]), pos)
        return out, logits

    first, second = random_image(150, 100, seed=1), random_image(150, 100, seed=2)
    replies = generator.chat_completion([dialog(first), dialog(second)], max_gen_len=6, temperature=0)
    for image, reply in zip((first, second), replies):
        expected, _ = plain_greedy(generator.formatter.encode_dialog(dialog(image)), 6)
        assert reply["generation"]["content"] == generator.tokenizer.decode(expected)
    # The image reaches the model: another image, other logits after the same text.
    _, logits_first = plain_greedy(generator.formatter.encode_dialog(dialog(first)), 0)
    _, logits_second = plain_greedy(generator.formatter.encode_dialog(dialog(second)), 0)
    assert not torch.allclose(logits_first, logits_second)


def test_a_text_only_build_skips_the_tower_says_so_and_refuses_images(tiny_vision_folder, tiny_vision_llama):
    assert tiny_vision_llama.model.params.vision_args is not None
    out = tiny_vision_folder
    with pytest.warns(UserWarning, match="text-only build: the vision tower's weights"):
        text_only = Llama.build(
            out, None, max_seq_len=256, max_batch_size=2, device="cpu", dtype=torch.float32, vision=False
        )
    assert text_only.model.params.vision_args is None
    assert not any(k.startswith("vision_") for k in text_only.model.state_dict())
    dialog = [{"role": "user", "content": "Hello"}]
    # The language model is the same: text chat gives the same reply with and without the tower.
    assert text_only.chat_completion([dialog], max_gen_len=4, temperature=0) == tiny_vision_llama.chat_completion(
        [dialog], max_gen_len=4, temperature=0
    )
    with pytest.raises(ValueError, match="image"):
        text_only.chat_completion([[{"role": "user", "content": [image_item(random_image(8, 8)), text_item("?")]}]])
    with pytest.raises(ValueError, match="vision must be True or False"):
        Llama.build(out, None, max_seq_len=256, max_batch_size=2, device="cpu", vision="no")
