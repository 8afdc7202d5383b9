"""warmstart: fast cold starts for LLM inference on NVIDIA Triton.

The public surface is small: :func:`save` and :func:`open` for checkpoints in the warmstart format,
plus the framework modules ``warmstart.torch`` and ``warmstart.jax`` (``load_state_dict`` /
``load_params``).
"""

__version__ = "0.1.0"
