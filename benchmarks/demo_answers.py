"""Reading check for copy-logit settings on the bundled demo KB (not an evaluation set): the default
adapter's answers to the first 10 questions of examples/demo/questions.jsonl (`AtlasKV.ask`, HiKVP as
built, no refusal rule), per copy-logit gain, and how many hold the right value.

    make demo   # builds build/demo_kb
    .venv/bin/python benchmarks/demo_answers.py 8 16
(the "mix" settings of the committed check came from the removed pointer-generator mode, commit eb53769)
"""
import json
import sys

from atlaskv import KnowledgeBase
from atlaskv.evaluation.metrics import contains_answer
from atlaskv.model.atlaskv import AtlasKV

kb = KnowledgeBase.open("build/demo_kb")
questions = [json.loads(line) for line in open("examples/demo/questions.jsonl")][:10]
akv = AtlasKV.from_pretrained()
for spec in sys.argv[1:]:
    akv.adapter.config.copy_logit_gain = float(spec)
    right = 0
    for q in questions:
        answer = akv.ask(q["question"], kb, max_new_tokens=30).text
        ok = contains_answer(answer, q["tail"])
        right += ok
        print(spec, int(ok), "|", answer[:90].replace("\n", " "), flush=True)
    print(spec, f"{right} of {len(questions)} hold the right value", flush=True)
