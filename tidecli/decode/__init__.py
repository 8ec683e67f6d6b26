"""Block-diffusion decoding (LLaDA2.0 threshold, LLaDA2.1 editing) and chat sessions."""
