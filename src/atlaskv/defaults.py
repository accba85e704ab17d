"""Inference defaults: the one home every entry point reads (Python API, CLI, server, evaluation).

Plain constants, no imports: `atlaskv --help` shows them without loading torch.
"""
from __future__ import annotations

# What an answer says when the KB does not hold the asked fact, and when it says it (model/refusal.py
# `refuses`): the question does not name the head of the most cited fact, or the facts naming the most cited
# value weigh under REFUSE_BELOW times the heaviest fact naming another value and the answer does not name that
# value. Calibrated on training facts only (the answers of the three dev sets of benchmarks/make_dev_set.py,
# pruned default path, shipped decoding): the most refusals without the gold fact while refusing at most 3 % of
# each dev set's answerable questions (benchmarks/refusal_rules.py -> results/answer_targets/refusal_rules.json).
# Before 2026-12-07 the rule read the prefill alone, at 1.86 (2.27 before that, picked on the fb15k eval set).
REFUSAL = "I don't know."
REFUSE_BELOW = 5.88
# ... and when a fact the KB lacks about the answer's entity ("the gender of X" when only X's nationality is
# stored) would draw this many times the attention of the fact backing the answer (model/probes.py). Calibrated
# the same way, on the same dev sets, with the adapter v4's answers (1.28255 in
# benchmarks/results/samerel_finetune/negatives24/rules.json, to three decimals; 1.45 with v3 in refusal_v7/; 4.36
# in v6, before the kinds of fact below kept a film from being asked for its regular TV show).
LACKING_RATIO = 1.283
# ... and only relations that at least this share of the adapter's training heads holding one of the entity's
# relations also hold (relation_pairs.tsv in the adapter folder): which kinds of fact go together. A round
# number, not tuned; 0.005-0.05 give the same within a question or two, 0.1 lets the dev
# calibration fall to 0.80 (benchmarks/lacking_kinds.py; docs/results.md, refusal v7).
LACKING_KIND_SHARE = 0.01
# Value decoding trusts an answer whose top fact's value stands out by this much (and whose head the question
# names): it must name a value and may not open with the model's own "I don't know." (model/decoding.py). The
# prefill-only refusal rule's calibration (benchmarks/results/refusal_v3/rules.json), which the guards were
# picked with; kept apart from REFUSE_BELOW so that the rule reading the answer does not change the answers.
TRUSTED_SUPPORT = 1.86
# ... and an answer may not open with the model's own "I don't know." when the question names the top fact's
# head and its value's support is at least this (it may still end without a value): the refusal rule, which also
# checks the facts the entity lacks, says it instead. The model learned its refusal for facts the KB lacks, and it
# also fires on phrasings training never used. Calibrated on the dev sets' answers with adapter v4: midway between
# the highest support of an unanswerable question the rule would then let through (1.39) and the lowest of an
# answerable one it would then answer (1.79) (benchmarks/own_refusal_calibration.py; docs/results.md, "The
# model's own refusal").
OWN_REFUSAL_BELOW = 1.59

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
