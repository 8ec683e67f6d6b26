"""Option help shared by the commands (plain strings: imported at start-up)."""

POLICY_HELP = ("Expert residency: resident, lru, static or tide (without --tau or "
               "--experts-per-layer, tide follows the planner's plan for this machine).")
PROFILE_HELP = ("tide: hardware profile to plan with (a reference name such as rtx4090, or a "
                "file). Default: this machine's saved profile, measured once when missing.")
VRAM_HELP = "GPU memory budget in GiB for tide's allocations (dense + KV + expert slots)."
RAM_HELP = ("Host RAM budget in GiB for the experts (those kept in RAM + staging buffers); "
            "experts beyond it are read from disk when used (slower, same tokens). Default: the "
            "available RAM minus 2 GiB.")
MISSES_HELP = ("static/tide: where experts missing from the GPU run: stream (the GPU places "
               "them or reads them from pinned RAM inside the step, no host round trip), split "
               "(CPU and GPU scratch slots by measured cost), cpu, or gpu (scratch slots); "
               "auto = stream on a GPU when the experts fit pinned RAM, else split. stream and "
               "gpu give bitwise the resident run's tokens.")
MODEL_HELP = ("Checkpoint folder, Hub id (e.g. inclusionAI/LLaDA2.0-mini) or 'demo'. "
              "Env: TIDE_MODEL.")
