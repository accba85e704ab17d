"""The copy-value path's two gains on the shipped adapter: the copy logits (next-token logits += gain x each
entry's share of the last KB layer's KB attention, on the entry's next value token: values.py CopyValues) and
the residual token write of the last KB layer. Flat, KB of SIZE (100), N questions (200), seed 0.

    OUT=benchmarks/results/answer_stage/dev_copy_logit_sweep.json \\
      .venv/bin/python benchmarks/copy_logit_sweep.py runs/dev/fb15k-train 0:300 2:300 4:300 8:300 ...
(spec = copy_logit_gain:token_gain; copy_logit_gain 0 sweeps the token write alone, as dev_gain_sweep.json did;
a set is a name in $ATLASKV_SHARED/eval or a folder path.) Pick on the dev set of training facts
(benchmarks/make_dev_set.py), never on an evaluation set. The removed variants (share of all attention "mass",
pointer-generator "mix", constant token values) were swept with this script's earlier versions (commits
eb53769, 36b9b5b); their rows stay in the result files.
"""
import json
import os
import sys
import time

import torch

from atlaskv.model.values import TOKEN_GAIN_UNIT
from atlaskv.kb.encoder import load_encoder
from atlaskv.evaluation.grounding import eval_grounding
from atlaskv.model.atlaskv import AtlasKV

torch.set_num_threads(2)
SIZE, N = int(os.environ.get("SIZE", 100)), int(os.environ.get("N", 200))
OUT = os.environ.get("OUT", "benchmarks/results/answer_stage/dev_copy_logit_sweep.json")
akv = AtlasKV.from_pretrained()
enc = load_encoder("all-MiniLM-L6-v2")
ad = akv.adapter
if not ad.config.copy_values:
    sys.exit("the adapter has no copy values (value_source encoder+llm_copy)")
rows = []
for set_name in sys.argv[1].split(","):
    set_dir = set_name if os.sep in set_name else os.path.join(os.environ.get("ATLASKV_SHARED", "../shared"), "eval", set_name)
    for spec in sys.argv[2:]:
        gain, token_gain = spec.split(":")
        ad.config.copy_logit_gain = float(gain)
        with torch.no_grad():
            ad.token_gain[-1] = float(token_gain) / TOKEN_GAIN_UNIT
        t0 = time.time()
        x = eval_grounding(set_dir, [SIZE], akv, enc, n_questions=N, answer_questions=N, progress=False)["results"][0]
        rows.append(dict(set=set_name, copy_logit_mode="add", copy_logit_norm="kb", copy_logit_gain=float(gain), token_gain=float(token_gain),
                         kb_size=SIZE, questions=N, acc1=x["acc1"], em=x["answer_em"], em_wo=x["answer_em_without_gold"]))
        print(set_name, spec, "acc1", x["acc1"], "em", x["answer_em"], "em_wo", x["answer_em_without_gold"],
              "gap", round(x["answer_em"] - x["answer_em_without_gold"], 3), f"{time.time() - t0:.0f}s", flush=True)
        json.dump(rows, open(OUT, "w"), indent=1)  # after every point: a stopped sweep keeps its rows
