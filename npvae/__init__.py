"""npvae: a variational autoencoder in NumPy, every gradient written by hand.

Reading order, the reference first: layers -> distributions -> posteriors -> model ->
hierarchical -> optim -> evaluate -> gradcheck -> data -> train -> checkpoint -> cli. Then
npvae.engine, read after the rest: how it is made fast.
"""
from .hierarchical import HierarchicalVAE
from .model import VAE
from .optim import SGD, Adam

__version__ = "0.1.0"
__all__ = ["VAE", "HierarchicalVAE", "Adam", "SGD", "load", "log_likelihood", "__version__"]


def __getattr__(name):
    # Training and evaluation pull in more code; load them on first use so that
    # `import npvae` stays fast.
    if name == "load":
        from .checkpoint import load
        return load
    if name == "log_likelihood":
        # the engine's: npvae.evaluate.log_likelihood with the examples split over threads
        from .engine.evaluate import log_likelihood
        return log_likelihood
    raise AttributeError(f"module 'npvae' has no attribute {name!r}")
