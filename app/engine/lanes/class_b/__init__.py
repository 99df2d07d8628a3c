"""Class-B decoding methods (removed from transformers 5's core), served natively.

Contrastive search, group (diverse) beam search, DoLa and constrained beam search, each a
faithful port of transformers 4.x's implementation (4.46) for one request, run step by step
on the engine thread between batch steps (see runner.py and docs/ARCHITECTURE.md).
"""
