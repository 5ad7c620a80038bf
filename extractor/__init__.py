"""Fruits! feature extraction: S3 images -> CNN features -> PCA -> one CSV per fruit."""

__version__ = "0.1.0"
