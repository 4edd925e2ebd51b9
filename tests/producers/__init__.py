"""Fixture producers for the SRV rules: contract-written headers (headers.py) and generators that
run the real producer libraries (see README: "Serve-conformance fixtures")."""
