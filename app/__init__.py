"""kogpt-serve: an inference server for Korean GPT-2 (KoGPT-2) models."""

__version__ = "0.1.0"
