"""An evaluation set from a knowledge graph the project never trained on, asked in phrasings it never saw:
WebNLG 3.0's DBpedia triples (../shared/data/webnlg-3.0-en, CC BY-NC-SA: evaluation only, so the set is built
here into runs/, never committed or shipped), with one hand-written question per relation below.

The KB keeps DBpedia's raw relation names ("birthPlace", "isPartOf", "cityServed"), as a user's own KG would
give them; the store turns them into key phrases by its rules. Names lose their underscores and DBpedia's
disambiguation in brackets ("Whig_Party_(United_States)" -> "Whig Party"). Only keys with one value stay (the
format's guarantee: each (head, relation) once), numbers and dates are left out (the questions ask for
entities). Deterministic.

    .venv/bin/python benchmarks/make_webnlg_set.py runs/eval/webnlg
    .venv/bin/atlaskv eval grounding --set runs/eval/webnlg --sizes 100,1000 --questions 200 --prune ...
"""
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

SHARED = Path(os.environ.get("ATLASKV_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# written without the training templates in view: none of them is "What is the <relation> of X?"
QUESTIONS = {
    "country": "Which country is {h} in?",
    "leader": "Who leads {h}?",
    "birthPlace": "Where was {h} born?",
    "location": "Where is {h} located?",
    "language": "What language do people speak in {h}?",
    "manager": "Who manages {h}?",
    "league": "Which league does {h} play in?",
    "nationality": "What nationality was {h}?",
    "isPartOf": "What is {h} a part of?",
    "capital": "Which city serves as the seat of government of {h}?",
    "followedBy": "What came after {h}?",
    "largestCity": "Which is the biggest city in {h}?",
    "city": "In which city is {h}?",
    "precededBy": "What came before {h}?",
    "owner": "Who owns {h}?",
    "deathPlace": "Where did {h} die?",
    "almaMater": "Where did {h} go to university?",
    "genre": "What style of music is {h} known for?",
    "party": "Which political party did {h} belong to?",
    "manufacturer": "Which company makes the {h}?",
    "currency": "What money do they use in {h}?",
    "publisher": "Who published {h}?",
    "parentCompany": "{h} is a subsidiary of which company?",
    "author": "Who wrote {h}?",
    "successor": "Who took over from {h}?",
    "ground": "Where does {h} play its home games?",
    "cityServed": "Which city does {h} serve?",
    "region": "Which region does {h} come from?",
    "demonym": "What are the people of {h} called?",
    "discoverer": "Who discovered {h}?",
    "architect": "Who designed {h}?",
    "countySeat": "Which town is the administrative centre of {h}?",
    "state": "Which state is {h} in?",
    "operator": "Who operates {h}?",
    "occupation": "What did {h} do for a living?",
    "operatingOrganisation": "Which organisation runs {h}?",
    "coach": "Who coaches {h}?",
    "isPartOfMilitaryConflict": "Which war was {h} fought in?",
    "keyPerson": "Who is a leading figure at {h}?",
    "producer": "Who produced {h}?",
    "commander": "Who was in command at {h}?",
    "course": "Which course of a meal is {h} served as?",
    "champions": "Which team won {h}?",
    "chairman": "Who chairs {h}?",
    "officialLanguage": "Which language is official in {h}?",
    "governmentType": "What kind of government does {h} have?",
    "creator": "Who created {h}?",
    "award": "Which award did {h} receive?",
    "academicDiscipline": "Which field does {h} publish on?",
    "club": "Which club does {h} play for?",
    "stylisticOrigin": "Which style did {h} grow out of?",
    "ingredient": "What goes into {h}?",
}


def clean(name: str) -> str:
    name = name.strip().strip('"').replace("_", " ")
    bare = re.sub(r"\s*\([^()]*\)$", "", name).strip()  # DBpedia's disambiguation: "Afterplay (Brian Kelly album)"
    return re.sub(r"\s+", " ", bare or name)


def read_triples(root: Path) -> set[tuple[str, str, str]]:
    triples = set()
    files = glob.glob(str(root / "train" / "*triples" / "*.xml")) + glob.glob(str(root / "dev" / "*triples" / "*.xml"))
    files += glob.glob(str(root / "test" / "*.xml"))
    for f in sorted(files):
        if "semantic-parsing" in f:
            continue
        for m in ET.parse(f).getroot().iter("mtriple"):
            h, r, t = (x.strip() for x in m.text.split("|"))
            triples.add((clean(h), r, clean(t)))
    return triples


def main(out: str) -> None:
    triples = read_triples(SHARED / "data" / "webnlg-3.0-en")
    keys = Counter((h.casefold(), r) for h, r, _ in triples)
    numeric = re.compile(r"^[-−+]?[\d.,\s]+(\(.*\))?$|^\d{4}-\d{2}-\d{2}$")
    pool = sorted(t for t in triples if keys[(t[0].casefold(), t[1])] == 1 and not numeric.match(t[2])
                  and t[0] and t[2] and "\t" not in "".join(t))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "triples.tsv", "w", encoding="utf-8") as f:
        for h, r, t in pool:
            f.write(f"{h}\t{r}\t{t}\n")
    asked = [(h, r, t) for h, r, t in pool if r in QUESTIONS]
    with open(out_dir / "questions.jsonl", "w", encoding="utf-8") as f:
        for h, r, t in asked:
            f.write(json.dumps(dict(question=QUESTIONS[r].format(h=h), head=h, relation=r, tail=t)) + "\n")
    print(f"{out_dir}: {len(pool)} triples ({len({r for _, r, _ in pool})} relations), {len(asked)} questions "
          f"over {len({r for _, r, _ in asked})} relations, from WebNLG 3.0 (evaluation only: CC BY-NC-SA)")


if __name__ == "__main__":
    main(sys.argv[1])
