"""Cost model and solver: (model config, hardware profile, VRAM budget, decoding) → plan."""
