"""Model-level code: the registry, weights, artifacts, presets, calibration and decisions. No Ray."""
