"""Training on Ray Train, the embedding route and recalibration."""
