"""Real photographs as backgrounds: the sample images that ship inside scikit-image and
scikit-learn (nothing is downloaded), split into two disjoint pools.

``pretrain`` backs the data the stand-in DINO is pretrained on; ``eval`` backs every demo, test
and benchmark set, so a model trained on one pool is always measured on backgrounds it has not
seen. :func:`background` cuts a random crop of a pool's photo at a random scale and aspect,
then blurs, partially desaturates, tints and relights it.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageFilter

# scikit-image sample names (skimage.data.<name>) and scikit-learn sample files (china.jpg,
# flower.jpg), one list per pool. Grey photos are tinted at random when drawn, so no pool's
# colours are fixed. The pools are disjoint on purpose: see the module docstring.
PHOTO_POOLS: dict[str, tuple[str, ...]] = {
    "pretrain": ("astronaut", "brick", "camera", "chelsea", "coins", "grass", "hubble_deep_field", "moon",
                 "page", "retina", "sklearn:flower.jpg"),
    "eval": ("coffee", "rocket", "gravel", "immunohistochemistry", "text", "clock", "cell",
             "stereo_motorcycle", "sklearn:china.jpg"),
}
# Longer photo sides are downscaled to this on load: crops of a few hundred pixels at most are
# ever taken, and it keeps the cached pool small (~4 MB a pool).
_MAX_SIDE = 512


def _load(name: str) -> np.ndarray:
    """One sample photo as uint8: H×W×3 RGB, or H×W for a grey one."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name.split(":", 1)[1])
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo pairs: the left view
            image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"sample photo {name} is {image.dtype}, expected uint8")
    if image.ndim == 3:
        image = image[..., :3]
        if np.abs(image[..., 0].astype(np.int16) - image[..., 1]).max() < 4:  # grey stored as RGB
            image = image[..., 0]
    im = Image.fromarray(np.ascontiguousarray(image))
    scale = _MAX_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    return np.asarray(im)


@functools.lru_cache(maxsize=None)
def photo_pool(pool: str) -> tuple[np.ndarray, ...]:
    """The photos of ``pool`` (a :data:`PHOTO_POOLS` name), loaded once per process: uint8
    H×W×3 RGB, or H×W for grey photos.

    Raises:
        ValueError: unknown pool.
        ModuleNotFoundError: scikit-image or scikit-learn is not installed (both are
            dependencies of pdso-ray).
    """
    if pool not in PHOTO_POOLS:
        raise ValueError(f"unknown photo pool {pool!r}; known: {', '.join(PHOTO_POOLS)}")
    return tuple(_load(name) for name in PHOTO_POOLS[pool])


def background(rng: np.random.Generator, height: int, width: int, pool: str = "eval") -> np.ndarray:
    """A ``height×width×3`` float32 background in [0, 255] cut from a photo of ``pool``.

    The crop covers 20-100% of the photo's shorter side (so textures appear at many scales) at the
    output's aspect ratio, at a random place, mirrored half the time; then a Gaussian blur of
    σ 0.5-2.5 px (60% of images), desaturation towards grey by 0-80%, a random tint on grey
    photos, and a brightness gain of 0.6-1.25.
    """
    photos = photo_pool(pool)
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    aspect = width / height
    side = rng.uniform(0.2, 1.0) * min(ph, pw)
    ch, cw = side, side * aspect
    if cw > pw:  # keep the aspect, shrink to fit
        ch, cw = ch * pw / cw, pw
    if ch > ph:
        ch, cw = ph, cw * ph / ch
    y0 = rng.uniform(0, ph - ch)
    x0 = rng.uniform(0, pw - cw)
    im = Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR,
                                       box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.6:
        im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.5))))
    img = np.asarray(im, dtype=np.float32)
    if img.ndim == 2:
        tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        img = img[..., None] * tint / tint.max()
    else:
        grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        desaturate = rng.uniform(0.0, 0.8)
        img = img * (1 - desaturate) + grey[..., None] * desaturate
    return np.clip(img * rng.uniform(0.6, 1.25), 0, 255)
