"""The LLaDA2 model: config, checkpoint access, forward pass, tokenizer, synthetic checkpoints."""
