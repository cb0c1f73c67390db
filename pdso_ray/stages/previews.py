"""Previews a person can open: beside every train pseudo label (raw, refined) and prediction PNG,
its colour preview and its overlay on the image (paths: :class:`~pdso_ray.run_layout.RunLayout`,
``colour_png`` / ``overlay_jpg``; colours: :mod:`pdso_ray.method.overlay`, the palette of the
report too).

The writers that hold the image and its label anyway (the pseudo-label train pass, the predict
stage's actors, LightCluster's label pass) call :meth:`PreviewWriter.write` before they write the
output that marks an image done, so a resumed run has the previews of every image it skips. The
``previews`` config key says whether they are written (:func:`previews_wanted`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pdso_ray.config import PipelineConfig
from pdso_ray.data.decode import shrink_to
from pdso_ray.data.imagenet_s import encode_jpeg
from pdso_ray.method.overlay import colorize, overlay, palette_indices
from pdso_ray.run_layout import RunLayout
from pdso_ray.storage import Storage


def previews_wanted(cfg: PipelineConfig) -> bool:
    """``previews: files``, or ``auto`` with ``output_format: files`` (config.py says why)."""
    return cfg.previews == "files" or (cfg.previews == "auto" and cfg.output_format == "files")


def encode_colour_png(label: np.ndarray) -> bytes:
    """PNG bytes of an H×W label map in the project's palette: a paletted PNG of the ids present
    (:func:`palette_indices`; any viewer shows the colours of :func:`colorize`), RGB when more
    than 256 ids are. Fast compression: previews are written once per label, read by people."""
    buf = io.BytesIO()
    paletted = palette_indices(label)
    if paletted is None:
        image = Image.fromarray(colorize(label), mode="RGB")
    else:
        indices, palette = paletted
        image = Image.fromarray(indices, mode="P")
        image.putpalette(palette.ravel().tolist())
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# Overlays are for eyes: a photo of 12 MP is blended and stored at most this long on its long side.
OVERLAY_MAX_SIDE = 1024


def _viewable(image) -> np.ndarray:
    """``image`` as an h×w×3 uint8 numpy array no longer than :data:`OVERLAY_MAX_SIDE` (area
    resampling). The GPU decode path hands over a torch tensor; it is copied to the host here."""
    if hasattr(image, "cpu"):
        image = image.cpu().numpy()
    return shrink_to(np.asarray(image), OVERLAY_MAX_SIDE, "long", Image.BOX)


class PreviewWriter:
    """Writes the colour preview and the overlay of one label PNG (picklable: actors get a copy)."""

    def __init__(self, storage: Storage, run: RunLayout):
        self.storage, self.run = storage, run

    def write(self, kind: str, image_id: str, label: np.ndarray, image: np.ndarray | None) -> None:
        """``label`` (H×W ids, the PNG's content) of ``image_id`` as ``kind`` (one of
        :data:`~pdso_ray.run_layout.PREVIEW_KINDS`): its colour PNG at the label's size, and, when
        ``image`` (h×w×3 uint8 RGB as the writer decoded it: numpy, or a torch tensor on any
        device) is given, the overlay JPEG at the image's size, at most :data:`OVERLAY_MAX_SIDE`
        long (the label resized to it by nearest neighbour)."""
        self.storage.write_bytes(self.run.colour_png(kind, image_id), encode_colour_png(label))
        if image is not None:
            self.storage.write_bytes(self.run.overlay_jpg(kind, image_id),
                                     encode_jpeg(overlay(_viewable(image), label)))
