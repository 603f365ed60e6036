"""Corpus preparation: corpus on disk -> manifest CSVs (the DESIGN.md manifest contract)."""
