"""The release of modiff-quant, recorded in saved models and calibration caches."""

__version__ = "0.1.0"
