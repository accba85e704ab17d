import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The project's shared data: $ATLASKV_SHARED, else a `shared` folder beside the checkout or beside one of
    its parent folders (a CI clone may sit one level deeper than the working checkout)."""
    for p in (os.environ.get("ATLASKV_SHARED"), *(d / "shared" for d in REPO.parents)):
        if p and Path(p, "data").is_dir():
            return Path(p)
    return None


@pytest.fixture(scope="session")
def shared() -> Path:
    p = shared_dir()
    if p is None:
        pytest.skip("shared data not found (set ATLASKV_SHARED to the folder holding data/ and eval/)")
    return p


@pytest.fixture(scope="session")
def demo_facts() -> Path:
    return REPO / "examples" / "demo" / "facts.tsv"


@pytest.fixture(scope="session")
def encoder():
    from atlaskv.kb.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="session")
def trained_model():
    """SmolLM2 + the shipped adapter, loaded once for every test file that reads it (no test changes it)."""
    pytest.importorskip("gguf")
    from atlaskv.model.atlaskv import AtlasKV

    return AtlasKV.from_pretrained()
