"""Copy logits: the shipped adapter (copy values) with next-token logits += gain x each entry's share of the
last KB layer's KB attention, on the entry's next value token (attention.py _copy_pointer), swept over the
gain, the share's normaliser and the residual token gain. Flat, KB of SIZE (100), N questions (200), seed 0.

    OUT=benchmarks/results/answer_stage/dev_copy_logit_sweep.json \\
      .venv/bin/python benchmarks/copy_logit_sweep.py runs/dev/fb15k-train kb:0:300 kb:2:300 kb:4:300 ...
(spec = norm:copy_logit_gain:token_gain of the last KB layer[:mode], norm "kb" or "mass", mode "add" (the
default) or "mix"; a set is a name in
$ATLASKV_SHARED/eval or a folder path.) Pick on the dev set of training facts (benchmarks/make_dev_set.py),
never on an evaluation set.
"""
import json
import os
import sys
import time

import torch

from atlaskv.model.adapter import TOKEN_GAIN_UNIT
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
        norm, gain, token_gain, *mode = spec.split(":")
        ad.config.copy_logit_norm, ad.config.copy_logit_gain = norm, float(gain)
        ad.config.copy_logit_mode = mode[0] if mode else "add"
        with torch.no_grad():
            ad.token_gain[-1] = float(token_gain) / TOKEN_GAIN_UNIT
        t0 = time.time()
        x = eval_grounding(set_dir, [SIZE], akv, enc, n_questions=N, answer_questions=N, progress=False)["results"][0]
        rows.append(dict(set=set_name, copy_logit_mode=ad.config.copy_logit_mode, copy_logit_norm=norm, copy_logit_gain=float(gain), token_gain=float(token_gain),
                         kb_size=SIZE, questions=N, acc1=x["acc1"], em=x["answer_em"], em_wo=x["answer_em_without_gold"]))
        print(set_name, spec, "acc1", x["acc1"], "em", x["answer_em"], "em_wo", x["answer_em_without_gold"],
              "gap", round(x["answer_em"] - x["answer_em_without_gold"], 3), f"{time.time() - t0:.0f}s", flush=True)
        json.dump(rows, open(OUT, "w"), indent=1)  # after every point: a stopped sweep keeps its rows
