"""``pdso-ray export-model RUN OUT``: a run's fine-tuned model as a self-describing folder, in the
Hugging Face layout::

    OUT/model.safetensors   the segmentation model's weights (backbone + 1×1 head), flat keys
    OUT/config.json         what rebuilds and feeds it (module docstring of pdso_ray.models.heads;
                            :func:`model_config`)
    OUT/README.md           a model card: YAML front matter, the data, method and settings, the
                            metrics with the data they were measured on, the backbone's licence
    OUT/model.onnx          with --onnx: the same network as an ONNX graph (input ``pixel_values``
                            B×3×H×W, output ``logits`` B×(C+1)×H/s×W/s, dynamic batch, height and
                            width), checked against torch with onnxruntime on real images

``pdso-ray segment OUT INPUT ...`` loads the folder and gives the run's own labels.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdso_ray import __version__
from pdso_ray.config import ConfigError, PipelineConfig
from pdso_ray.data.imagenet_s import IGNORE_ID
from pdso_ray.models.dino import APACHE_2, DINO_SPECS, IMAGENET_MEAN, IMAGENET_STD
from pdso_ray.models.heads import MODEL_FORMAT, load_segmenter, save_exported
from pdso_ray.run_layout import RunLayout, load_run_config
from pdso_ray.plan import METHODS
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")

ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"
ONNX_OPSET = 18
_INSTALL_ONNX = "pip install 'pdso-ray[onnx]' (onnx, onnxscript, onnxruntime)"


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_model` wrote: the folder, its config and, with ONNX, the check's result."""

    folder: str
    config: dict[str, Any]
    onnx_max_abs_diff: float | None = None


def export_model(storage: Storage, run_url: str, out: str, *, method: str | None = None,
                 onnx: bool = False, check_images: list[np.ndarray] | None = None) -> ExportedModel:
    """Export the fine-tuned model of ``run_url`` (``method``'s; default PDSO's, else
    LightCluster's) to the folder ``out`` (module docstring). With ``onnx``, ``check_images``
    (H×W×3 uint8 RGB photographs; default: up to 4 of the run's own images) are what the ONNX graph
    is checked on. ConfigError when the run has no model or config, or onnx is missing."""
    run_url = run_url.rstrip("/")
    method = method or next((m for m in METHODS if storage.exists(RunLayout(run_url, method=m).finetune_model)),
                            METHODS[0])
    run = RunLayout(run_url, method=method)
    if not storage.exists(run.finetune_model):
        raise ConfigError(f"no fine-tuned model in {run_url} ({run.finetune_model} not found): run the "
                          "finetune stage first")
    cfg = load_run_config(storage, run_url, method)
    if cfg is None:
        raise ConfigError(f"{run.config_file} not found or not valid: the export describes the model "
                          "from the run's config")
    model, meta = load_segmenter(run.finetune_model, storage)
    config = model_config(storage, run, cfg, meta, model.stride)
    if onnx:
        _require_onnx()
    save_exported(storage, out, model.state_dict(), config)
    diff = None
    if onnx:
        images = check_images if check_images is not None else run_images(storage, cfg, 4)
        if not images:
            raise ConfigError(f"the ONNX check needs real images and none of {cfg.data.root} can be read "
                              "from here: pass --check-images DIR")
        diff = export_onnx(model, storage, Storage.join(out, ONNX_FILE), images, cfg.predict.short_side)
        config["onnx"] = {"file": ONNX_FILE, "opset": ONNX_OPSET, "input": "pixel_values", "output": "logits",
                          "dynamic_axes": ["batch", "height", "width"], "checked_images": len(images),
                          "max_abs_logit_diff": diff}
        storage.write_json(Storage.join(out, "config.json"), config)
    storage.write_text(Storage.join(out, CARD_FILE), model_card(config))
    return ExportedModel(out, config, diff)


def model_config(storage: Storage, run: RunLayout, cfg: PipelineConfig, meta: dict[str, Any],
                 stride: int) -> dict[str, Any]:
    """``config.json``: the meta :func:`~pdso_ray.models.heads.load_segmenter` rebuilds the model
    from, and what anyone feeding it needs: input size and normalisation, output stride, the
    background id and decision rule, the cluster→class match of the run's evaluation, the data,
    method and settings it came from, its metrics and its backbone's licence."""
    classes = int(meta["num_classes"])
    arch = meta["arch"]
    spec = DINO_SPECS.get(arch) if meta["backbone"] == "dino" else None
    summary = storage.read_json(run.summary_file) if storage.exists(run.summary_file) else {}
    match_url = run.eval_file("match.json")
    metrics = {}
    for split in ("validation", "test"):
        url = run.eval_file(f"{split}.json")
        if storage.exists(url):
            result = storage.read_json(url)
            metrics[split] = {"mIoU": result["mIoU"], "images": result["num_images"],
                              "rule": result.get("rule", "argmax"),
                              "ground_truth": f"{cfg.data.layout} {split} split of {cfg.data.root}"}
    checkpoint = cfg.models.dino.checkpoint
    return {
        **{k: meta[k] for k in ("format", "version", "num_classes", "backbone", "arch", "img_size")},
        "epochs": meta.get("epochs"),
        "library": "pdso-ray", "library_version": __version__,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timm_name": spec.timm_name.split(".")[0] if spec else arch,
        "backbone_family": spec.family if spec else None,
        "backbone_license": spec.license if spec else APACHE_2,
        "backbone_checkpoint": checkpoint.rsplit("/", 1)[-1] if checkpoint else None,
        "num_outputs": classes + 1, "background_id": 0, "ignore_id": IGNORE_ID,
        "output_stride": int(stride),
        "input": {"short_side": cfg.predict.short_side, "multiple_of": int(stride),
                  "batch_size": cfg.predict.batch_size,
                  "resize": "short side to short_side, aspect kept, each side rounded to the nearest "
                            "multiple of multiple_of; bilinear, antialiased",
                  "color": "RGB", "scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "exif_orientation": "not applied (pixels as stored, as the ImageNet-S tools read them)",
                  "tensor": "pixel_values: float32 B×3×H×W, (x / 255 - mean) / std"},
        "output": {"tensor": "logits: float32 B×(C+1)×H/output_stride×W/output_stride, channel 0 background",
                   "decision": "upsample bilinearly (align_corners=False) to the image's size, then argmax "
                               "over all C+1 channels; ties go to the lower id",
                   "label_codec": "ImageNet-S label PNG: id = R + 256·G, 0 background"},
        "match": storage.read_json(match_url) if storage.exists(match_url) else None,
        "match_note": ("model id → ground-truth class id, the Hungarian matching of the run's validation "
                       "evaluation" if storage.exists(match_url) else "the run was not evaluated"),
        "method": cfg.method,
        "profile": _profile(cfg),
        "data": {"root": cfg.data.root, "layout": cfg.data.layout, "classes": cfg.data.classes,
                 "train_split": cfg.data.train_split, "images": summary.get("images_ok")},
        "metrics": metrics,
    }


def _profile(cfg: PipelineConfig) -> dict[str, Any]:
    """The settings that made the model, as a reader of the card wants them."""
    profile: dict[str, Any] = {"seed": cfg.seed, "dino_image_size": cfg.models.dino.image_size,
                               "finetune_backbone": cfg.finetune.backbone, "finetune_loss": cfg.finetune.loss,
                               "finetune_epochs": cfg.finetune.epochs, "finetune_crop_size": cfg.finetune.crop_size}
    if cfg.method == "pdso":
        profile.update(refiner=cfg.pseudo_labels.refine.method, denoise_finetune_blocks=cfg.denoise.finetune_blocks,
                       pseudo_label_image_size=cfg.pseudo_labels.image_size)
    else:
        profile.update(lightcluster_feature=cfg.lightcluster.feature, lightcluster_labelling=cfg.lightcluster.labelling)
    return profile


def run_images(storage: Storage, cfg: PipelineConfig, count: int) -> list[np.ndarray]:
    """Up to ``count`` decodable images of the run's data (its evaluation splits, then train), as
    the predict stage reads them; [] when the data cannot be listed from here."""
    from pdso_ray.data.layouts import build_layout
    from pdso_ray.stages.read_decode import ImageReader

    layout = build_layout(cfg.data)
    reader = ImageReader.from_config(storage, cfg.data)
    images: list[np.ndarray] = []
    splits = [info.split for info in layout.eval_splits(storage) if info.present] + [layout.train_split()]
    for split in dict.fromkeys(splits):
        try:
            records = layout.list_split(storage, split).images
        except (FileNotFoundError, ValueError):
            continue
        for record in records:
            decoded = reader.read(record.path, exif_transpose=False)
            if decoded.ok:
                images.append(decoded.image)
            if len(images) == count:
                return images
    return images


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--onnx needs the onnx packages ({e.name} is missing): {_INSTALL_ONNX}") from None


def export_onnx(model, storage: Storage, url: str, images: list[np.ndarray], short_side: int) -> float:
    """Write ``model`` (a :class:`~pdso_ray.models.heads.Segmenter`) as an ONNX graph with dynamic
    batch, height and width (multiples of its stride) to ``url``; run onnxruntime and torch on
    ``images`` (each resized as the predict stage does) and return the largest absolute logit
    difference. ValueError when it exceeds 1e-3 (the graph does not compute the model)."""
    import onnxruntime
    import torch

    from pdso_ray.models.dino import to_model_input
    from pdso_ray.models.heads import model_input_size

    _require_onnx()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per folded initializer otherwise
    model = model.eval().float()
    stride = model.stride
    example = torch.zeros(2, 3, 2 * stride, 3 * stride)  # sizes 1 would be specialised (fixed)
    rows, cols = torch.export.Dim("rows", min=1, max=4096), torch.export.Dim("cols", min=1, max=4096)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                input_names=["pixel_values"], output_names=["logits"],
                                dynamic_shapes={"x": {0: batch, 2: stride * rows, 3: stride * cols}})
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, ONNX_FILE)
        program.save(path)
        with open(path, "rb") as f:
            data = f.read()
    storage.write_bytes(url, data)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.inference_mode():
        for image in images:
            size = model_input_size(image.shape[0], image.shape[1], short_side, stride)
            x = to_model_input([image], size)
            reference = model(x).numpy()
            got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
            worst = max(worst, float(np.abs(got - reference).max()))
    log.info("export-model: ONNX graph checked on %d images: max abs logit difference %.3g", len(images), worst)
    if worst > 1e-3:
        raise ValueError(f"the ONNX graph at {url} differs from the model by {worst:.3g} in a logit")
    return worst


def _front_matter(config: dict[str, Any]) -> str:
    license_name = config["backbone_license"]
    meta: dict[str, Any] = {"library_name": "pdso-ray", "pipeline_tag": "image-segmentation",
                            "tags": ["image-segmentation", "semantic-segmentation",
                                     "unsupervised-semantic-segmentation", config["method"],
                                     config["timm_name"]]}
    if license_name == APACHE_2:
        meta["license"] = "apache-2.0"
    else:
        meta.update(license="other", license_name="dinov3-license",
                    license_link="https://ai.meta.com/resources/models-and-libraries/dinov3-license/")
    results = [{"task": {"type": "image-segmentation", "name": "Unsupervised semantic segmentation"},
                "dataset": {"type": config["data"]["layout"], "name": f"{config['data']['root']} ({split})",
                            "split": split},
                "metrics": [{"type": "mean_iou", "name": f"mIoU ({m['rule']} over C+1, Hungarian matching)",
                             "value": round(float(m["mIoU"]), 2)}]}
               for split, m in config["metrics"].items()]
    if results:
        meta["model-index"] = [{"name": f"pdso-ray {config['method']} {config['arch']}", "results": results}]
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(config: dict[str, Any]) -> str:
    """``README.md`` of an exported model: YAML front matter (licence, tags, ``model-index`` with
    the metrics) and a card saying what the model is, what it was trained on, how, how well, how
    to use it and under which licence."""
    method = {"pdso": "PDSO (pseudo-label denoising and SAM optimisation)",
              "lightcluster": "LightCluster (training-free clustering, then fine-tuning)"}[config["method"]]
    data = config["data"]
    lines = [_front_matter(config),
             f"# pdso-ray segmentation model: {config['arch']}, {config['num_classes']} classes", "",
             f"A semantic segmentation model trained **without human labels** by pdso-ray {config['library_version']} "
             f"with {method}: a {config['timm_name']} backbone (patch tokens, stride {config['output_stride']}) and a "
             f"1×1 convolution with {config['num_outputs']} outputs (0 background, 1..{config['num_classes']} "
             "classes it discovered).", "",
             "## Training data", "",
             f"- images: `{data['root']}` (layout `{data['layout']}`, split `{data['train_split']}`"
             + (f", {data['images']} images used" if data["images"] else "") + "), no labels;",
             f"- classes C = {data['classes']} (the clusters the method found; class *ids* are arbitrary until "
             "matched to named classes, see `match` in config.json).", "",
             "## Method and settings", "",
             f"- method: {method};",
             f"- backbone: `{config['arch']}` (timm `{config['timm_name']}`), initial weights "
             f"`{config['backbone_checkpoint'] or 'random (a smoke test, not a model to use)'}`;",
             *[f"- {key.replace('_', ' ')}: {value}" for key, value in config["profile"].items()], ""]
    lines += ["## Metrics", ""]
    if config["metrics"]:
        lines += ["| split | mIoU | images | measured on |", "|---|---|---|---|"]
        lines += [f"| {split} | {m['mIoU']:.2f} | {m['images']} | {m['ground_truth']} (rule: {m['rule']} over "
                  "C+1 outputs, Hungarian matching on validation) |" for split, m in config["metrics"].items()]
    else:
        lines.append("Not evaluated: the training data had no ground truth.")
    lines += ["", "## How to use", "", "```bash",
              "pdso-ray segment THIS_FOLDER photos/ out/ --overlay   # out/predictions/all/<name>.png",
              "```", "",
              f"Feeding it yourself: RGB, short side {config['input']['short_side']} px (aspect kept, each side a "
              f"multiple of {config['input']['multiple_of']}), `(x / 255 - mean) / std` with mean "
              f"{config['input']['mean']} and std {config['input']['std']}; logits are "
              f"B×{config['num_outputs']}×H/{config['output_stride']}×W/{config['output_stride']}: upsample "
              "bilinearly to the image and take the argmax over all channels (0 = background).", ""]
    if "onnx" in config:
        onnx = config["onnx"]
        lines += [f"`{onnx['file']}` (opset {onnx['opset']}) computes the same logits with dynamic batch, height and "
                  f"width: checked with onnxruntime on {onnx['checked_images']} real images, max abs logit "
                  f"difference {onnx['max_abs_logit_diff']:.2e}.", ""]
    lines += ["## Licence", "",
              f"The backbone's pretrained weights are under the **{config['backbone_license']}**; this model is "
              "derived from them and carries that licence."
              + (" DINOv3's weights are *not* Apache-2.0: read the DINOv3 License before you redistribute "
                 "or use this model." if config["backbone_license"] != APACHE_2 else ""),
              "pdso-ray itself is Apache-2.0.", "",
              "## Limitations", "",
              "Unsupervised: classes are what the method found in the training images, not named categories; "
              "quality outside the training distribution is unmeasured.", ""]
    return "\n".join(lines)
