"""Synthetic post-training data in the Llama-Nemotron record format (see data_gen/build.py)."""
