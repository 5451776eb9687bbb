"""Images are decoded as transformers' processors decode them, for every PIL mode a data set can
hold, from image files and embedded bytes alike (maye_jax/data/images.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from maye_jax.data import images
from maye_jax.data.images import EmbeddedBytes, ImageError, ImageSource, to_rgb
from maye_jax.data.processor import load_processor


def _pixels(rng, channels: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    pixels = rng.integers(0, high, (29, 45, channels), dtype=dtype)
    return pixels[..., 0] if channels == 1 else pixels


def stored_image(mode: str) -> tuple[bytes, str]:
    """(file bytes, expected stored mode) of a 45x29 image of `mode` with random pixels."""
    rng = np.random.default_rng(len(mode))
    out = io.BytesIO()
    if mode == "P_transparency":
        image = Image.fromarray(_pixels(rng, 1, high=8), "P")
        image.putpalette(rng.integers(0, 256, 8 * 3).tolist())
        image.save(out, "PNG", transparency=3)  # palette entry 3 is transparent
        return out.getvalue(), "P"
    if mode == "I;16":
        Image.fromarray(_pixels(rng, 1, np.uint16, 65536)).save(out, "PNG")  # 16-bit grayscale
        return out.getvalue(), "I;16"
    if mode == "CMYK":
        Image.fromarray(_pixels(rng, 4), "CMYK").save(out, "JPEG", quality=90)
        return out.getvalue(), "CMYK"
    if mode == "RGB_jpeg":
        Image.fromarray(_pixels(rng, 3), "RGB").save(out, "JPEG", quality=90)
        return out.getvalue(), "RGB"
    channels = {"RGBA": 4, "LA": 2, "L": 1, "RGB": 3, "1": 1}[mode]
    array = _pixels(rng, channels)
    if mode == "1":
        Image.fromarray(array > 127).save(out, "PNG")
    else:
        Image.fromarray(array, mode).save(out, "PNG")
    return out.getvalue(), mode


MODES = ["RGBA", "LA", "P_transparency", "L", "CMYK", "I;16", "1", "RGB", "RGB_jpeg"]
ALPHA_BAND = ("RGBA", "LA")  # (PIL keeps a palette's transparent colour through convert("RGB"))


@pytest.fixture(scope="module")
def processor():
    return load_processor()


@pytest.mark.parametrize("mode", MODES)
def test_pixels_equal_transformers_for_every_mode_from_files_and_bytes(processor, mode, tmp_path):
    data, stored_mode = stored_image(mode)
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    sources = [
        ImageSource.read_header("file", path=str(path)),
        ImageSource.read_header("bytes", embedded=EmbeddedBytes(data)),
    ]
    # transformers is handed the image as a data set gives it: the PIL image of the bytes.
    hf_pil = Qwen2VLImageProcessorPil(
        min_pixels=processor.min_pixels, max_pixels=processor.max_pixels
    )
    expected = hf_pil(images=[Image.open(io.BytesIO(data))])["pixel_values"]
    # both of transformers' image-processor backends decode a PIL image with this function
    expected_rgb = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    for source in sources:
        assert source.size == (45, 29) and source.mode == stored_mode
        decoded = source.decode()
        assert decoded.mode == stored_mode  # not converted before the processor
        ours = processor.encode(decoded, "<image>q")["pixel_values"]
        np.testing.assert_array_equal(ours, expected)
        np.testing.assert_array_equal(np.asarray(to_rgb(decoded)), expected_rgb)
    if mode in ALPHA_BAND:  # converting to RGB first (the old way) drops the alpha channel
        naive = processor.encode(Image.open(io.BytesIO(data)).convert("RGB"), "<image>q")
        assert np.abs(naive["pixel_values"] - expected).max() > 1.0


def test_a_header_is_read_without_decoding_and_bad_bytes_name_their_place(tmp_path):
    data, _ = stored_image("RGB")
    before = images.decode_count()
    source = ImageSource.read_header("d.parquet:row 3: image 2", embedded=EmbeddedBytes(data))
    assert (source.format, source.size) == ("PNG", (45, 29))
    assert images.decode_count() == before
    source.decode()
    assert images.decode_count() == before + 1
    with pytest.raises(ImageError, match=r"^d.parquet:row 4: image: not an image \(cannot ident"):
        ImageSource.read_header("d.parquet:row 4: image", embedded=EmbeddedBytes(b"not an image"))
    truncated = ImageSource.read_header("d.parquet:row 5: image", embedded=EmbeddedBytes(data[:80]))
    with pytest.raises(ImageError, match=r"^d.parquet:row 5: image: the image does not decode"):
        truncated.decode()  # a good header over missing pixels: found when decoded
    with pytest.raises(ImageError, match="d.jsonl:2: image 'x.png': image file .*x.png not found"):
        ImageSource.read_header("d.jsonl:2: image 'x.png'", path=str(tmp_path / "x.png"))
