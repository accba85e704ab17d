"""Zero-shot token values: the shipped adapter plus the token-value path (adapter.py, value_source
"encoder+llm_tokens": A = identity, R_l = per-head pinv(o_proj)), no training, swept over how many tokens
make t and the absolute gain of the last KB layers. Flat, KB of 100, 100 questions answered, seed 0.

    OUT=benchmarks/results/answer_stage/token_values_sweep.json \
      .venv/bin/python benchmarks/token_value_sweep.py fb15k,pararel 1:0 1:200 1:300 1:400 2:300
(spec = value_tokens:gain[,gain...], gains for the last KB layers; a set is a name in $ATLASKV_SHARED/eval or
a folder path; SIZE (KB entries, 100), N (questions, 100) and VALUE_SOURCE (encoder+llm_tokens or
encoder+llm_copy) from the environment)
Picking a gain on the evaluation sets is optimistic: pick it on the dev set of training facts instead
(benchmarks/make_dev_set.py), as token_values_dev_sweep.json does.
"""
import sys, os, time, torch, json
from atlaskv.model.adapter import TOKEN_GAIN_UNIT
from atlaskv.model.atlaskv import AtlasKV
from atlaskv.model.attention import attach
from atlaskv.train import TrainConfig, _with_new_values
from atlaskv.kb.encoder import load_encoder
from atlaskv.evaluation.grounding import eval_grounding
torch.set_num_threads(2)
SIZE, N = int(os.environ.get("SIZE", 100)), int(os.environ.get("N", 100))
akv = AtlasKV.from_pretrained()
enc = load_encoder("all-MiniLM-L6-v2")
VALUE_SOURCE = os.environ.get("VALUE_SOURCE", "encoder+llm_tokens")  # or encoder+llm_copy
ad = _with_new_values(akv.adapter, akv.model, TrainConfig(data=[], out="", value_source=VALUE_SOURCE))
akv.adapter = ad; attach(akv.model, ad)
nl = len(ad.config.kb_layers)
out = []
for setname in sys.argv[1].split(","):
  for spec in sys.argv[2:]:
    vt, g = spec.split(":")
    ad.config.value_tokens = int(vt)
    g = [float(a) for a in g.split(",")]
    g = [0.0] * (nl - len(g)) + g
    with torch.no_grad(): ad.token_gain.copy_(torch.tensor(g) / TOKEN_GAIN_UNIT)
    t0 = time.time()
    set_dir = setname if os.sep in setname else os.path.join(os.environ.get("ATLASKV_SHARED", "../shared"), "eval", setname)
    r = eval_grounding(set_dir, [SIZE], akv, enc, n_questions=N, answer_questions=N, progress=False)
    x = r["results"][0]
    row = dict(set=setname, value_source=VALUE_SOURCE, kb_size=SIZE, questions=N, value_tokens=int(vt), gains=g, acc1=x["acc1"], em=x["answer_em"], em_wo=x["answer_em_without_gold"])
    out.append(row)
    print(setname, spec, "acc1", x["acc1"], "em", x["answer_em"], "em_wo", x["answer_em_without_gold"], "gap", round(x["answer_em"]-x["answer_em_without_gold"],2), round(time.time()-t0), flush=True)
    json.dump(out, open(os.environ.get("OUT", "/tmp/exp/sweep.json"), "w"), indent=1)  # after every point: a stopped sweep keeps its rows
