"""Inference defaults: the one home every entry point reads (Python API, CLI, server, evaluation).

Plain constants, no imports: `atlaskv --help` shows them without loading torch.
"""
from __future__ import annotations

# What an answer says when the KB does not hold the asked fact, and when it says it (model/atlaskv.py
# `refuses`): the question does not name the head of the most cited fact, or the facts naming the most cited
# value weigh under REFUSE_BELOW times the heaviest fact naming another value. Calibrated on training facts only
# (the two dev sets of benchmarks/run_refusal_signals.sh, KB of 1,000, pruned default path): the most refusals
# without the gold fact while refusing at most 3 % of the answerable questions of each dev set
# (benchmarks/results/refusal_v3/rules.json). 2.27 before, picked on a calibration split of the fb15k eval set.
REFUSAL = "I don't know."
REFUSE_BELOW = 1.86

# HiKVP: leaves kept per level (roots, inter, leaves) and how the tree is searched. The paper keeps 16
# leaves; 64 cost next to nothing and answer better (benchmarks/results/pruning_answers_*); routing by the
# KB query heads and the question embedding together measured best (benchmarks/results/pruning_options.json).
PRUNE_TOP_K = (128, 64, 64)
PRUNE_ROUTE = "both"
PRUNE_TOP_K_TEXT = ",".join(map(str, PRUNE_TOP_K))   # as the CLI's --top-k takes it
# Route "both": at each level the KB query heads score only this many candidates, those nearest the question
# (the question's own top-k still sees them all). It makes the first token at 10^7 entries several times faster
# with grounding unchanged on the dev sets (docs/experiments.md, "First token at scale").
PRUNE_SHORTLIST = 512

# A started KB value is finished as stored and ends the answer (model/decoding.py).
VALUE_DECODING = True

MAX_NEW_TOKENS = 48        # ask / chat / serve: answer length budget
EVAL_MAX_NEW_TOKENS = 32   # eval grounding and baselines: the measured answers
TOP_CITATIONS = 5          # cited facts returned with an answer

# serve: answers decoded together (continuous batching, serve/scheduler.py). On a 2-core CPU a decode step of
# 16 rows costs about 2.1x one row (benchmarks/results/batching_steps.json); beyond the batch, requests wait in the queue (--max-queue, then 503).
MAX_BATCH = 32
