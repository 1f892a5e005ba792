"""Compute kernels (Triton, each with a torch reference beside it) and the VMM remapper.

Imports nothing else of kunserve's, so every other package may import it.
"""
