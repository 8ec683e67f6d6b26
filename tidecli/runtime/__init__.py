"""The application layer: options, the engine, what it builds and plans, calibration runs."""
