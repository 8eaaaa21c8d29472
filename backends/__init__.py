"""Base quantizers shipped with modiff-quant, found through the `modiff_quant.base_quantizers`
entry-point group exactly as third-party plugins are (installed as `modiff_quant.backends`)."""
