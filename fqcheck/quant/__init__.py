"""Fake-quant math and quantizer state for deep checks and the re-fold. Importing the submodules
imports torch: the header-only path never imports this package's submodules."""
