"""pdso-ray: unsupervised semantic segmentation at ImageNet scale on Ray (docs/architecture.md)."""

__version__ = "0.2.0"
