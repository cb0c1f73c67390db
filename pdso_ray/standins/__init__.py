"""Stand-ins for the pretrained models that cannot be downloaded here, trained on synthetic data.

What they are: tiny models in the official checkpoint layouts, trained on the worlds of
:mod:`pdso_ray.data.synthetic`, so that the demo exercises every step of the method with models
that behave like the real ones there: the DINO stand-in (``hue`` world: saturated textured shapes
on low-saturation backgrounds) finds the object and its pooled feature separates classes it has
never seen; the SAM stand-in (``shapes`` and ``hue`` worlds: objects on photographs with clutter)
segments the object a box or point points at, class-agnostically (it is trained on object masks
only, never on class ids). Each asset ships in ``ASSETS_DIR``
beside the module that reproduces it with one command.

What they are not: pretrained models. They know nothing of natural images; numbers a run with
them produces measure the pipeline on synthetic data, never PDSO on ImageNet-S.

Assets (load with the model builders, e.g. ``build_sam(SAM_ARCH, SAM_ASSET)``):

* ``DINO_ASSET``: DINO ``DINO_ARCH`` (the ViT-S/8 layout with 2 blocks of width 48 and 4 register
  tokens) at 64 px, the teacher of stage ``pretrain`` on synthetic data of other classes and
  another seed than the demo's, in the official DINO release layout (``cls_token``, ``pos_embed``,
  ``reg_token``, ``patch_embed.*``, ``blocks.N.*``, ``norm.*``). Reproduce with
  ``python -m pdso_ray.standins.dino_pretraining --out pdso_ray/standins/assets/dino_tiny.pth``.
* ``SAM_ASSET``: SAM ``SAM_ARCH`` (a tiny encoder on a convolutional stem) at its native 256 px,
  state dict in the official flat layout (``image_encoder.*``, ``prompt_encoder.*``,
  ``mask_decoder.*``; the stem's keys under ``image_encoder.patch_embed.proj.N``). Reproduce with
  ``python -m pdso_ray.standins.sam_training --out pdso_ray/standins/assets/sam_tiny.pth``.
"""

from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

DINO_ARCH = "vit_tiny_reg4"
DINO_ASSET = os.path.join(ASSETS_DIR, "dino_tiny.pth")
SAM_ARCH = "vit_tiny_convstem"
SAM_ASSET = os.path.join(ASSETS_DIR, "sam_tiny.pth")
