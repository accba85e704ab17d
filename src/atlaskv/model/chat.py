"""The chat prompt format, in one place: how a question becomes prompt ids, and where an answer ends.

The adapter was trained on these exact prompts (train.py), so inference, evaluation and the baselines read
them from here too.
"""
from __future__ import annotations

from typing import Sequence

import torch


def chat_text(tokenizer, question: str) -> str:
    """The user turn and the assistant header. ChatML without SmolLM2's default system prompt (a third of
    the tokens, and noise in the attention sums); other templates as their tokenizer writes them."""
    tpl = tokenizer.chat_template or ""
    if "<|im_start|>" in tpl:
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def messages_text(tokenizer, messages: Sequence[dict]) -> str:
    """A whole conversation (role / content dicts) and the assistant header, in the same format as
    chat_text: ChatML written out for SmolLM2-style templates, the tokenizer's template otherwise."""
    if "<|im_start|>" in (tokenizer.chat_template or ""):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n"
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def left_pad(tok, prompts: list[str], device):
    """Prompt texts -> left-padded ids and attention mask [B, T] (batched generation keeps the answers' start
    aligned)."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


# Gemma 3's own turn format (the GGUF of the pretrained 270M carries no template): no system role (a system
# message is prepended to the first user turn, as Google's template does), "model" for the assistant.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + (m['content'] | trim) }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# the token that closes an assistant turn, per chat format (checked against the template and the vocabulary)
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def ensure_chat_template(tokenizer, config=None) -> None:
    """Give a tokenizer without a chat template its family's one (Gemma: from the model type)."""
    if tokenizer.chat_template:
        return
    model_type = getattr(config, "model_type", "") or ""
    if model_type.startswith("gemma") or "<start_of_turn>" in tokenizer.get_vocab():
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE


def end_of_turn(tokenizer) -> str:
    """The text that ends an assistant answer: the chat format's end-of-turn token, else EOS."""
    tpl = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN:
        if t in tpl and t in vocab:
            return t
    return tokenizer.eos_token or ""


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Generation stops at EOS (the model's generation config and the tokenizer's) or the end of a turn."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [
            tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer) or "")]:
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return ids


def ended_turns(new_ids: torch.Tensor, stop: list[int]) -> list[bool]:
    """Per generated row [B, n]: did the answer close its turn (a stop id) within the token budget."""
    new_ids = new_ids if new_ids.dim() == 2 else new_ids[None]
    return torch.isin(new_ids, torch.tensor(stop, device=new_ids.device)).any(-1).tolist()
