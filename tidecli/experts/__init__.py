"""Where routed experts live and run: resident pools, host store, CPU workers, policies."""
