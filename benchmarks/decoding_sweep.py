"""Run `atlaskv eval grounding` with value decoding's module settings changed, in one process: how the guards and
the push of model/decoding.py were picked on the dev set in held-out phrasings (docs/results.md, "Unseen
phrasings and an unseen KG").

    python benchmarks/decoding_sweep.py VALUE_PUSH=16.0 TRUSTED_MUST_NAME=False -- eval grounding \
        --set runs/dev/fb15k-train-para --sizes 1000 --questions 200 --answer-questions 200 --prune \
        --refuse-below 1.86 --json runs/devpara/push16.json --save-answers runs/devpara/push16.jsonl

Only the module constants can be set (VALUE_PUSH, VALUE_SHARE, TOP_VALUES, TRUSTED_MUST_NAME, OWN_REFUSAL_BELOW); the table's
rows that differ in code (token vs word 3-grams, the first-token ban) were run from those commits' code.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import atlaskv.model.decoding as decoding  # noqa: E402


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    for setting in argv[:cut]:
        name, value = setting.split("=", 1)
        old = getattr(decoding, name)  # an unknown name fails here, by name
        setattr(decoding, name, value.lower() == "true" if isinstance(old, bool) else type(old)(value))
        print(f"decoding.{name} = {getattr(decoding, name)!r} (default {old!r})", flush=True)
    from atlaskv.cli import app

    app(argv[cut + 1:])


if __name__ == "__main__":
    main(sys.argv[1:])
