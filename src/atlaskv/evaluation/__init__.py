"""Measuring atlaskv: grounding and answer quality (grounding.py), the text-prompt baselines (baselines.py),
memory and latency against KB size (scale.py)."""
