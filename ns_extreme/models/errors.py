"""User-facing errors raised while loading models, weights and bias checkpoints."""


class ModelLoadError(ValueError):
    """Weights or a bias checkpoint cannot be used with the requested model (message says how to fix it)."""


class WeightsNotFoundError(ModelLoadError, FileNotFoundError):
    """The base weights are neither on disk nor downloadable."""
