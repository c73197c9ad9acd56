"""fdlight: Feature Distillation (Wei et al. 2022, arXiv 2205.14141) with Lightning and Hydra."""

__version__ = "0.1.0"
