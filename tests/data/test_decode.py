"""Robust decoding: odd but valid files become RGB arrays, bad bytes become reasons."""

import io

import numpy as np
import pytest
from PIL import Image

from pdso_ray.data.decode import decode_image
from pdso_ray.data.synthetic import odd_and_corrupt_samples

SAMPLES = odd_and_corrupt_samples()


def _encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _ok(data, **kw):
    res = decode_image(data, **kw)
    assert res.ok and res.reason is None, res.reason
    img = res.image
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.flags["C_CONTIGUOUS"]
    return res


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_odd_and_corrupt_samples_decode_as_declared(name):
    sample = SAMPLES[name]
    res = decode_image(sample.data)
    if sample.valid:
        _ok(sample.data)
        assert res.image.shape[:2] == sample.shape
        assert res.orig_size == sample.shape
    else:
        assert res.image is None and res.orig_size is None
        assert isinstance(res.reason, str) and 0 < len(res.reason) <= 200


def test_samples_are_deterministic():
    again = odd_and_corrupt_samples()
    assert {k: v.data for k, v in again.items()} == {k: v.data for k, v in SAMPLES.items()}
    assert sum(s.valid for s in SAMPLES.values()) == 10 and len(SAMPLES) == 15


def test_reasons_name_the_problem():
    assert decode_image(SAMPLES["empty.JPEG"].data).reason == "empty file"
    assert decode_image(SAMPLES["text.JPEG"].data).reason == "not an image (unrecognised format)"
    assert decode_image(SAMPLES["truncated.JPEG"].data).reason.startswith("truncated or corrupt image")
    assert decode_image(SAMPLES["bomb.png"].data).reason.startswith("too many pixels")
    assert decode_image(SAMPLES["large_header.png"].data).reason == "too many pixels: 10000x10000 > 89478485"


def test_max_pixels_is_checked_before_decoding():
    data = _encode(Image.new("RGB", (40, 30)), "PNG")
    assert decode_image(data, max_pixels=1200).ok
    assert decode_image(data, max_pixels=1199).reason == "too many pixels: 40x30 > 1199"


def test_grayscale_jpeg_becomes_equal_channels():
    img = _ok(SAMPLES["grayscale.JPEG"].data).image
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    assert img[:, 0].mean() < 20 and img[:, -1].mean() > 235  # the 0..255 ramp survives


def test_cmyk_jpeg_converts_to_rgb():
    img = _ok(SAMPLES["cmyk.JPEG"].data).image
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535, 1000, 40000]], dtype=np.uint16)
    img = _ok(_encode(Image.fromarray(values), "PNG")).image
    # v * 255 / 65535, rounded: clipping would give 255 for every v > 255.
    assert img[0, :, 0].tolist() == [0, 1, 128, 255, 4, 156]


def test_int32_and_float_tiffs():
    i32 = np.array([[0, 65535, 32896]], dtype=np.int32)
    assert _ok(_encode(Image.fromarray(i32), "TIFF")).image[0, :, 0].tolist() == [0, 255, 128]
    wide = np.array([[-100, 0, 100]], dtype=np.int32)  # outside 16 bits: stretched
    assert _ok(_encode(Image.fromarray(wide), "TIFF")).image[0, :, 0].tolist() == [0, 128, 255]
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert _ok(_encode(Image.fromarray(unit), "TIFF")).image[0, :, 0].tolist() == [0, 128, 255]
    hdr = np.array([[2.0, 4.0, np.nan]], dtype=np.float32)
    assert _ok(_encode(Image.fromarray(hdr), "TIFF")).image[0, :, 0].tolist() == [128, 255, 0]


def test_palette_png_with_transparency_keeps_palette_colours():
    img = _ok(SAMPLES["palette_transparent.png"].data).image
    expected = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]])[np.arange(48) % 3].reshape(6, 8, 3)
    np.testing.assert_array_equal(img, expected)  # the transparent entry (blue) is kept, alpha dropped


def test_rgba_and_la_drop_alpha():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3] = 255  # other pixels fully transparent
    img = _ok(_encode(Image.fromarray(rgba), "PNG")).image
    assert (img == [10, 20, 30]).all()
    la = _ok(SAMPLES["gray_alpha.png"].data).image
    assert la[:, -1].mean() > 250


def test_exif_orientation_6_rotates_clockwise():
    data = SAMPLES["exif_rotated.JPEG"].data
    res = _ok(data)
    raw = _ok(data, exif_transpose=False)
    assert raw.image.shape == (16, 32, 3) and raw.orig_size == (16, 32)
    assert res.image.shape == (32, 16, 3) and res.orig_size == (32, 16)
    np.testing.assert_array_equal(res.image, np.rot90(raw.image, k=-1))
    # Stored top-left red block (rows 0..7, cols 0..15) displays in the top-right corner.
    assert res.image[:16, 8:].mean(axis=(0, 1))[0] > 200
    assert res.image[:16, :8].max() < 60


def test_png_named_jpeg_decodes_by_content():
    img = _ok(SAMPLES["png_named_jpeg.JPEG"].data).image
    noisy = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(img, noisy[:20, :30])  # lossless: exact pixels


def test_extreme_shapes():
    assert _ok(SAMPLES["one_pixel.JPEG"].data).image.shape == (1, 1, 3)
    assert _ok(SAMPLES["very_wide.JPEG"].data).image.shape == (20, 4000, 3)


def test_draft_downscales_jpeg_but_never_below_target():
    rng = np.random.default_rng(1)
    data = _encode(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), "JPEG")
    full = _ok(data)
    assert full.image.shape == (300, 400, 3) and full.orig_size == (300, 400)
    for target, shape in [(64, (75, 100)), (100, (150, 200)), (151, (300, 400)), (37, (38, 50))]:
        res = _ok(data, target_short_side=target)
        assert res.image.shape[:2] == shape and min(shape) >= target
        assert res.orig_size == (300, 400)
    png = _encode(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), "PNG")
    assert _ok(png, target_short_side=64).image.shape == (300, 400, 3)  # only JPEGs draft


def test_draft_with_exif_rotation_reports_oriented_original_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.new("RGB", (400, 200), (0, 128, 0)), "JPEG", exif=exif)
    res = _ok(data, target_short_side=50)
    assert res.image.shape == (100, 50, 3) and res.orig_size == (400, 200)


def test_garbage_never_raises():
    rng = np.random.default_rng(2)
    jpeg = _encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    png = _encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    blobs = [rng.bytes(int(n)) for n in rng.integers(1, 200, size=20)]
    for data in (jpeg, png):
        for cut in (1, 4, 8, 20, len(data) - 2):
            blobs.append(data[:cut])
        corrupted = bytearray(data)
        corrupted[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
        blobs.append(bytes(corrupted))
    for blob in blobs:
        res = decode_image(blob)
        assert (res.image is None) != (res.reason is None)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=0)
    with pytest.raises(ValueError, match="target_short_side"):
        decode_image(b"x", target_short_side=0)
