"""Train a KBAdapter (method.md §3, with its fixes): the LLM and the sentence encoder stay frozen.

Each step: B questions about facts from the training triples; one KB shared by the batch holding every
question's own fact, other facts of the same head (hard negatives) and random distractors (a growing
curriculum). Losses:
  * answer loss: cross-entropy on the answer tokens only (pads and prompt excluded), mean per sample;
  * retrieval loss (ours; weight 0 = the paper's pure recipe): the KB attention summed over heads and
    prompt tokens, as a distribution over KB entries, should put its mass on the question's own entry;
    this is exactly what ACC@1 measures, and without it grounding stays at chance on a CPU budget.
Refusal samples (own fact left out of the KB) teach "I don't know". Questions are the key in one of 16 templates
("Tell me the place of death of X."), or with --phrasings a natural phrasing of the relation ("Where did X
die?"). With --relation-aliases a share of each relation's facts carry another name of it ("birthPlace"), as
other graphs name it. Every sample's batch is a pure
function of (seed, step), so `--resume` continues the same run from its last checkpoint.
"""
from atlaskv.train.data import (QUESTION_TEMPLATES, Batch, TrainConfig, TrainData, answer_suffix, build_records,
                                encode_batch, make_batch, n_distractors, prepare_data, read_phrasings,
                                read_relation_aliases, rename_relations)
from atlaskv.train.loop import lr_factor, train, validate

__all__ = ["QUESTION_TEMPLATES", "Batch", "TrainConfig", "TrainData", "answer_suffix", "build_records", "encode_batch",
           "lr_factor", "make_batch", "n_distractors", "prepare_data", "read_phrasings", "read_relation_aliases",
           "rename_relations", "train", "validate"]
