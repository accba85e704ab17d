"""Measuring atlaskv: grounding and answer quality (grounding.py), keys with several values
(multi_valued.py), the text-prompt baselines (baselines.py), memory and latency against KB size (scale.py)."""
