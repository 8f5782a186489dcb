"""Inputs: text corpora, tokenizers, packed samples, the demo corpus, and loading models.

Nothing here trains or distils; :mod:`kdcore.training` and everything above build on it.
"""
