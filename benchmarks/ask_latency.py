"""Load time, prefill, seconds per decoded token and peak RSS of a short ask, one base model per process:
    python benchmarks/ask_latency.py ADAPTER_DIR|default KB_DIR   (prints one JSON line)
"""
import json, resource, sys, time
import torch
from atlaskv.model.atlaskv import AtlasKV
from atlaskv.kb.store import KnowledgeBase

adapter, kb_dir = (sys.argv[1] if sys.argv[1] != "default" else None), sys.argv[2]
torch.set_num_threads(2)
t0 = time.time()
akv = AtlasKV.from_pretrained(adapter)
load_s = time.time() - t0
kb = KnowledgeBase.open(kb_dir)
q = "What is the capital of Canada?"
ans = akv.ask(q, kb, max_new_tokens=8)            # warm-up (question encoder, KB tensors, tree)
res = {"base_model": akv.adapter.config.base_model, "load_s": round(load_s, 1)}
for n in (1, 33):  # prefill + 0 / 32 decode steps, forced length; per-token = difference / 32
    kb_in = akv.kb_inputs(kb, record=True)
    t = time.time()
    akv.generate(q, kb_in, max_new_tokens=n, min_new_tokens=n)
    res[f"gen_{n}_s"] = time.time() - t
res["decode_s_per_token"] = round((res["gen_33_s"] - res["gen_1_s"]) / 32, 4)
res["prefill_s"] = round(res.pop("gen_1_s"), 3)
res.pop("gen_33_s")
ans = akv.ask(q, kb, max_new_tokens=32)
res["answer"] = ans.text
res["citations"] = [(" | ".join(t), round(w, 3)) for t, w in ans.citations[:3]]
res["support"] = round(ans.support, 2)
res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(res))
