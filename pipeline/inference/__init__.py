"""Scoring: the backends, the predictor, and the engine that runs them (locally or on Ray)."""
