"""The batched JPEG decode that runs where the model runs (a GPU in production): which images it
takes, the per-image CPU fallback, and the same pixels as the CPU path — all on the CPU device
here (the GPU rate is ``benchmarks/gpu_suite.py``'s decode row)."""

import io

import numpy as np
import pytest
from PIL import Image

from pdso_ray.data.batch_decode import decode_batch, fast_path_problem
from pdso_ray.data.decode import decode_image

# Mean and largest difference allowed against PIL's decode: on the CPU both are libjpeg-turbo
# (equal); nvJPEG on a GPU differs by a few levels in IDCT rounding and chroma upsampling.
JPEG_TOLERANCE = (1.0, 8)


def _photo(h=48, w=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def _encode(im: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    return _encode(_photo(), exif=exif)


CASES = {
    "baseline": (_encode(_photo(), quality=90), ""),
    "progressive": (_encode(_photo(seed=1), progressive=True), ""),
    "grayscale": (_encode(_photo(seed=2).convert("L")), ""),
    "cmyk": (_encode(_photo(seed=3).convert("CMYK")), "CMYK JPEG"),
    "png named jpeg": (_encode(_photo(seed=4), "PNG"), "not a JPEG"),
    "exif rotated": (_rotated_jpeg(), "EXIF orientation 6"),
    "truncated": ((lambda d: d[: len(d) * 2 // 3])(_encode(_photo(96, 96, seed=5))), "decode_jpeg failed"),
    "not an image": (b"\xff\xd8\xff garbage", "unreadable header"),
}


def test_jpegs_take_the_batched_path_and_the_rest_fall_back_per_image():
    names = list(CASES)
    decoded = decode_batch([CASES[n][0] for n in names], "cpu")
    for name, result in zip(names, decoded):
        assert result.fallback.startswith(CASES[name][1]), (name, result.fallback)
        reference = decode_image(CASES[name][0])
        assert result.ok == reference.ok, name
        if not result.ok:
            assert result.reason == reference.reason  # the CPU path names the problem
            continue
        assert result.orig_size == reference.orig_size
        got = np.asarray(result.image).astype(np.int16)
        diff = np.abs(got - reference.image.astype(np.int16))
        assert got.shape == reference.image.shape and got.dtype == np.int16
        assert diff.mean() <= JPEG_TOLERANCE[0] and diff.max() <= JPEG_TOLERANCE[1], (name, diff.mean(), diff.max())
    assert decoded[names.index("exif rotated")].orig_size == (64, 48)  # shown upright


def test_the_fast_path_respects_the_pixel_limit_and_as_stored_reads():
    data = _rotated_jpeg()
    assert fast_path_problem(data, exif_transpose=False) is None  # predictions read images as stored
    (stored,) = decode_batch([data], exif_transpose=False)
    assert stored.fallback == "" and stored.orig_size == (48, 64)
    assert fast_path_problem(CASES["baseline"][0], max_pixels=100) == "too many pixels"
    (big,) = decode_batch([CASES["baseline"][0]], max_pixels=100)
    assert not big.ok and "too many pixels" in big.reason


@pytest.mark.gpu
def test_the_cuda_path_gives_the_cpu_pixels_within_jpeg_tolerance():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    names = list(CASES)
    on_gpu = decode_batch([CASES[n][0] for n in names], "cuda")
    on_cpu = decode_batch([CASES[n][0] for n in names], "cpu")
    for name, gpu, cpu in zip(names, on_gpu, on_cpu):
        assert gpu.ok == cpu.ok, name
        if gpu.ok:
            diff = np.abs(torch.as_tensor(gpu.image).cpu().numpy().astype(np.int16) - np.asarray(cpu.image))
            assert diff.mean() <= JPEG_TOLERANCE[0] and diff.max() <= 2 * JPEG_TOLERANCE[1], name
