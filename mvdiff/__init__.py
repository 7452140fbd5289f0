"""mvdiff — MVDream-style multi-view diffusion: render, train, sample, personalise, reconstruct."""

__version__ = "0.1.0"
