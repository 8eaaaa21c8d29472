"""Reproducible training of the bundled models (digits16 and its feature extractor)."""
