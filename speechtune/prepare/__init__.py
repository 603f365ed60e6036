"""Corpus preparation: corpus on disk -> manifest CSVs (the contract in ``speechtune.data``)."""
