"""fsl-cache: few-shot adaptation of CLIP on a fingerprinted feature cache."""

__version__ = "0.1.0"
