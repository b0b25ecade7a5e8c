"""Training on Ray Train, the embedding route, recalibration and manifest importers."""
