"""pdso-ray: unsupervised semantic segmentation (PDSO) at ImageNet scale on Ray."""

__version__ = "0.1.0"
