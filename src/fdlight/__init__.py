"""fdlight: Feature Distillation (Wei et al. 2022, arXiv 2205.14141) with Lightning and Hydra."""

__version__ = "0.1.0"


def distill(student=None, teacher=None, overrides=(), run_dir=None):
    """Distil into a module of one's own (or from one): `fdlight.api.distill`, imported when called (torch loads
    then, not with the command line)."""
    from fdlight.api import distill as run

    return run(student=student, teacher=teacher, overrides=overrides, run_dir=run_dir)
