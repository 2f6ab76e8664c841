"""Operator and developer tools that are neither process: the tiny test model, the commented
starting config, and the engine's layered venv."""
