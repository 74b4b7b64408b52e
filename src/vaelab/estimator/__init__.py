"""``vaelab.VAE``, the scikit-learn facade (``facade``), and model folders on disk, safetensors
weights and JSON configuration (``serialization``). The first outer room: it may import every room
below it, and nothing imports it but the run folders, the report and the CLI."""

from vaelab.estimator.facade import VAE, load

__all__ = ["VAE", "load"]
