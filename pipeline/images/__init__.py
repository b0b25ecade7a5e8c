"""Image bytes to model input: the guarded fetch path, decoding, the URI policy."""
