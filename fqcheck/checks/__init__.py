"""Checks, one module per rule family. Each registers its functions with @engine.check(CODE)."""
