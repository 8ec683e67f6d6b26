"""`tide bench`: residency policies side by side, with bounds and routing statistics."""
