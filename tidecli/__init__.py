"""tide: LLaDA2.x MoE diffusion language models on GPUs that cannot hold them."""

__version__ = "0.1.0"
