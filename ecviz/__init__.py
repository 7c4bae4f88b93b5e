"""ecviz: see where an expert-choice diffusion transformer (EC-DiT) spends its compute."""

__version__ = "0.1.0"
