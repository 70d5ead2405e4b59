"""Tiny random models of every method, built offline from configs: the tests' fixtures and the
offline quick start (`idgen generate` with the default `tiny` base). Not imported by the
inference path (pipelines, adapters)."""
