"""The training loop: losses, the optimizer schedule, checkpoints and resume, validation, the loss curve."""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from atlaskv.kb.encoder import load_encoder
from atlaskv.kb.records import answer_for
from atlaskv.model.adapter import KBAdapter, count_relation_pairs
from atlaskv.model.attention import attach
from atlaskv.model.kb_inputs import KBInputs
from atlaskv.train.data import TrainConfig, TrainData, encode_batch, make_batch, prepare_data


def losses(model, batch_t: dict, kb: KBInputs, gold: list[list[int]]):
    """(answer loss, retrieval loss, in-batch ACC@1 of the summed KB attention)."""
    out = model(input_ids=batch_t["input_ids"], attention_mask=batch_t["attention_mask"], atlaskv_kb=kb,
                use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch_t["labels"][:, 1:]
    tok_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="none")
    n_tok = (labels != -100).sum(1).clamp_min(1)
    answer_loss = ((tok_loss.sum(1) / n_tok)).mean()  # length-normalised per sample
    pm = batch_t["prompt_mask"].to(logits.dtype)
    per_layer = torch.stack([(att * pm[:, :, None]).sum(1) for att in kb.attention.values()])   # [L, B, N]
    target = torch.zeros(per_layer.shape[1:], device=logits.device)                         # [B, N]
    for s, g in enumerate(gold):
        if g:
            target[s, g] = 1.0 / len(g)
    has_gold = target.sum(-1) > 0
    logp = torch.log(per_layer.clamp_min(1e-12)) - torch.log(per_layer.sum(-1, keepdim=True).clamp_min(1e-12))
    r = -(logp * target).sum(-1)                                                            # [L, B]
    retrieval_loss = r[:, has_gold].mean() if has_gold.any() else answer_loss * 0
    top = per_layer.sum(0).argmax(-1)
    hits = int(sum(target[s, int(top[s])] > 0 for s in range(len(gold)) if gold[s]))
    n = int(has_gold.sum())
    return answer_loss, retrieval_loss, hits / max(n, 1)


# ------------------------------------------------------------------------------------------------ state io
def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
               for i, st in sd["state"].items() for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, path, metadata={"param_groups": json.dumps(sd["param_groups"])})


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    state: dict = defaultdict(dict)
    for k, v in tensors.items():
        if k.startswith("state."):
            _, i, name = k.split(".", 2)
            state[int(i)][name] = v
    opt.load_state_dict({"state": dict(state), "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ loop
def train(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    """Train (or fine-tune, or resume) an adapter into cfg.out: checkpoints every cfg.checkpoint_every steps,
    a JSONL log, the final adapter and its loss curve."""
    from atlaskv.model.llm import cache_dir, load_base_model

    out, ckpt = Path(cfg.out), Path(cfg.out) / "checkpoint"
    cfg, start, init = _resolved(cfg, resume, ckpt)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, cache_dir() / "train")
    enc = load_encoder(cfg.encoder) if cfg.question_input else None
    model, tok = load_base_model(cfg.base_model, dtype=cfg.dtype, device=cfg.device)
    adapter = _starting_adapter(cfg, model, data, ckpt if start else None, init)
    # the value rows the model will read, as at inference (copy values: [sentence emb; token emb; ids])
    data.value_emb = adapter.value_path.embed(adapter, model, tok, [r.value_text for r in data.records], data.value_emb)
    attach(model, adapter)
    adapter.train()
    if cfg.trainable == "values":
        for name, p in adapter.named_parameters():
            p.requires_grad_(name.startswith(("value_proj.", "token_")))
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if start:  # the saved param groups carry initial_lr, so the schedule picks up at `start`
        _load_optimizer(opt, ckpt / "optimizer.safetensors")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s), last_epoch=start - 1)
    value_perm = (np.random.default_rng(cfg.seed + 1).permutation(len(data.records)) if cfg.shuffle_values
                  else None)
    log_f = open(out / "train_log.jsonl", "a", encoding="utf-8")
    (out / "command.json").write_text(json.dumps(asdict(cfg), indent=1))
    log(f"{len(data.records):,} records, {adapter.num_parameters():,} adapter parameters, "
        f"steps {start} -> {cfg.steps}, device {cfg.device}")
    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training", unit="step")
    t0 = time.time()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        stats = _accumulate(cfg, model, tok, data, enc, step, value_perm)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        row = {"step": step + 1, "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 2), **stats}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            row.update(validate(cfg, model, adapter, data, tok, enc))
        log_f.write(json.dumps(row) + "\n")
        log_f.flush()
        bar.set_postfix(ans=f"{stats['answer_loss']:.3f}", ret=f"{stats['retrieval_loss']:.3f}",
                        acc=f"{stats['acc1_in_batch']:.2f}")
        out_of_time = cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
            save_checkpoint(cfg, adapter, opt, step + 1, ckpt)
        if out_of_time:
            log(f"stopping after {cfg.max_minutes} minutes at step {step + 1} (resume with --resume)")
            break
    log_f.close()
    adapter.trained_relations = adapter.trained_relations | {r.triple.relation for r in data.records}
    # a fine-tune adds its facts to the starting adapter's counts (checkpoints are saved before this line, so a
    # resumed run counts its facts once)
    adapter.relation_pairs = adapter.relation_pairs + count_relation_pairs({r.triple for r in data.records})
    adapter.save_pretrained(out)
    plot_log(out / "train_log.jsonl", out / "loss_curve.png")
    return out


def _resolved(cfg: TrainConfig, resume: bool, ckpt: Path) -> tuple[TrainConfig, int, Path | None]:
    """(the run's config, the step it starts at, the adapter a fine-tune starts from): a resumed run takes its
    saved config (steps may be extended, the time budget and device are this call's); a fine-tune takes the
    starting adapter's layout."""
    out = ckpt.parent
    start = 0
    if resume and (ckpt / "trainer_state.json").exists():
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        steps, budget, device, scale = cfg.steps, cfg.max_minutes, cfg.device, cfg.kb_scale_factor
        cfg = TrainConfig(**saved["config"])
        cfg.steps = max(steps, cfg.steps)  # a resumed run may be extended
        cfg.max_minutes, cfg.device = budget, device
        cfg.kb_scale_factor = scale if scale is not None else cfg.kb_scale_factor
        start = saved["step"]
    elif out.exists() and any(out.iterdir()) and not resume and (ckpt / "trainer_state.json").exists():
        raise FileExistsError(f"{out} holds a training run: pass --resume to continue it, or another --out")
    init = None
    if cfg.init_adapter and not start:  # the starting adapter fixes the layout; these options follow it
        from atlaskv.model.atlaskv import default_adapter_dir

        init = default_adapter_dir() if cfg.init_adapter == "default" else Path(cfg.init_adapter)
        ic = KBAdapter.from_pretrained(init).config
        cfg.encoder, cfg.kb_layer_frequency, cfg.question_input = ic.encoder, ic.kb_layer_frequency, ic.question_input
        if cfg.value_source is None:  # a fine-tune keeps the starting adapter's values unless told otherwise
            cfg.value_source = ic.value_source
    if cfg.value_source is None:
        cfg.value_source = "encoder"
    if cfg.trainable not in ("all", "values"):
        raise ValueError(f"trainable must be 'all' or 'values', got {cfg.trainable!r}")
    return cfg, start, init


def _starting_adapter(cfg: TrainConfig, model, data, ckpt: Path | None, init: Path | None) -> KBAdapter:
    """The checkpoint's adapter (resume), the starting adapter (fine-tune) or a fresh one, with its
    provenance in config.training."""
    from atlaskv.model.llm import canonical_name

    if ckpt is not None:
        adapter = KBAdapter.from_pretrained(ckpt, model=model, device=cfg.device)
    elif init is not None:
        # keeps its own length correction unless --kb-scale-factor sets one
        adapter = KBAdapter.from_pretrained(init, model=model, encoder=cfg.encoder, device=cfg.device)
        if adapter.config.value_source != cfg.value_source:  # every weight kept, the token path added or dropped
            adapter = _with_new_values(adapter, model, cfg)
    else:
        base_name = str(Path(cfg.base_model).resolve()) if cfg.base_model and Path(cfg.base_model).is_dir() \
            else canonical_name(cfg.base_model)
        adapter = KBAdapter.for_model(model, cfg.encoder, data.key_emb.shape[1], base_model=base_name,
                                      kb_layer_frequency=cfg.kb_layer_frequency,
                                      question_input=cfg.question_input, value_source=cfg.value_source)
        if adapter.config.copy_values:
            _init_token_gain(adapter, cfg.token_gain_init)
    if cfg.kb_scale_factor is not None:  # KBs larger than the training ones get KB logits += ln(s) - ln(N)
        adapter.config.kb_scale_factor = cfg.kb_scale_factor
    if init is not None:  # provenance: what the fine-tune started from
        adapter.config.training = {"init_from": {"path": str(cfg.init_adapter), **adapter.config.training}}
    adapter.config.training = {**{k: v for k, v in adapter.config.training.items() if k == "init_from"},
                               "config": asdict(cfg), "data_sha256_16": data.digest, "records": len(data.records)}
    return adapter


def _accumulate(cfg: TrainConfig, model, tok, data, enc, step: int, value_perm) -> dict:
    """The gradients of one optimizer step (cfg.grad_accum micro-batches) and their statistics."""
    stats = defaultdict(float)
    for micro in range(cfg.grad_accum):
        b = make_batch(cfg, data, step * cfg.grad_accum + micro)
        vrows = value_perm[b.kb_rows] if value_perm is not None else b.kb_rows
        keys = torch.from_numpy(data.key_emb[b.kb_rows].astype(np.float32)).to(cfg.device)
        values = torch.from_numpy(data.value_emb[vrows].astype(np.float32)).to(cfg.device)
        qe = torch.from_numpy(enc.encode(b.prompts)).to(cfg.device) if enc else None
        kb = KBInputs(keys, values, record=True, keep_grad=True, question_emb=qe)
        bt = encode_batch(tok, b.prompts, b.answers, cfg.device)
        a_loss, r_loss, acc = losses(model, bt, kb, b.gold)
        loss = (cfg.answer_loss_weight * a_loss + cfg.retrieval_loss_weight * r_loss) / cfg.grad_accum
        loss.backward()
        stats["answer_loss"] += a_loss.item() / cfg.grad_accum
        stats["retrieval_loss"] += r_loss.item() / cfg.grad_accum
        stats["acc1_in_batch"] += acc / cfg.grad_accum
        stats["kb_size"] += len(b.kb_rows) / cfg.grad_accum
    return stats


def _with_new_values(adapter: KBAdapter, model, cfg: TrainConfig) -> KBAdapter:
    """`adapter` with all its weights, for cfg.value_source: token values added (gain token_gain_init) or dropped."""
    from dataclasses import replace

    new = KBAdapter(replace(adapter.config, value_source=cfg.value_source)).to(adapter.key_proj.weight.device)
    new.load_state_dict({k: v for k, v in adapter.state_dict().items() if not k.startswith("token_")}, strict=False)
    if new.config.copy_values:
        _init_token_gain(new, cfg.token_gain_init)
    return new


def _init_token_gain(adapter: KBAdapter, gain: float) -> None:
    """Only the last KB layer writes the value's token: in a zero-shot sweep, writes at earlier KB layers
    as well broke the answers' wording (fb15k EM 0.83 -> 0.37 with layers 24 and 27 at 300)."""
    from atlaskv.model.values import TOKEN_GAIN_UNIT

    with torch.no_grad():
        adapter.token_gain.zero_()
        adapter.token_gain[-1] = gain / TOKEN_GAIN_UNIT


def save_checkpoint(cfg, adapter, opt, step, ckpt: Path) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    adapter.save_pretrained(tmp)
    _save_optimizer(opt, tmp / "optimizer.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}))
    if ckpt.exists():
        old = ckpt.with_name(ckpt.name + ".old")
        os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, ckpt)


@torch.no_grad()
def validate(cfg, model, adapter, data: TrainData, tok, enc, n: int = 64, kb_size: int = 100) -> dict:
    """ACC@1 of the summed prefill KB attention on fixed training-distribution questions, KB of 100."""
    adapter.eval()
    rng = np.random.default_rng(12345)
    tail = [i for i, r in enumerate(data.records) if r.masked == "tail"]
    gold = rng.choice(tail, n, replace=False)
    others = rng.choice(len(data.records), kb_size * 2, replace=False)
    kb_rows = np.array(list(dict.fromkeys([int(i) for i in gold] + [int(i) for i in others])))[:max(kb_size, n)]
    keys = torch.from_numpy(data.key_emb[kb_rows].astype(np.float32)).to(cfg.device)
    values = torch.from_numpy(data.value_emb[kb_rows].astype(np.float32)).to(cfg.device)
    pos = {int(i): p for p, i in enumerate(kb_rows)}
    hits = answered = 0
    for s in range(0, n, 16):
        idx = gold[s:s + 16]
        qs = [f"What is {data.records[i].key_text}?" for i in idx]
        qe = torch.from_numpy(enc.encode(qs)).to(cfg.device) if enc else None
        kb = KBInputs(keys, values, record=True, question_emb=qe)
        bt = encode_batch(tok, qs, ["" for _ in qs], cfg.device)
        model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"], atlaskv_kb=kb, use_cache=False)
        pm = bt["prompt_mask"].float()
        scores = sum((att * pm[:, :, None]).sum(1) for att in kb.attention.values())
        hits += sum(int(scores[j].argmax()) == pos[int(i)] for j, i in enumerate(idx))
        # teacher-forced answers: every answer token the argmax (a cheap stand-in for greedy exact match)
        answers = [answer_for(data.records[i].key_text, data.records[i].value_text) for i in idx]
        bt = encode_batch(tok, qs, answers, cfg.device)
        kb = KBInputs(keys, values, question_emb=qe)
        logits = model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"], atlaskv_kb=kb,
                       use_cache=False).logits[:, :-1]
        labels = bt["labels"][:, 1:]
        ok = (logits.argmax(-1) == labels) | (labels == -100)
        answered += int(ok.all(-1).sum())
    adapter.train()
    return {"val_acc1_kb100": hits / n, "val_answer_acc_kb100": answered / n}


def plot_log(log_path: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(l) for l in open(log_path, encoding="utf-8") if l.strip()]
    if not rows:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [r["step"] for r in rows]
    for key in ("answer_loss", "retrieval_loss"):
        a1.plot(steps, _smooth([r[key] for r in rows]), label=key)
    a1.set_xlabel("step")
    a1.set_ylabel("loss (smoothed)")
    a1.legend()
    a2.plot(steps, _smooth([r["acc1_in_batch"] for r in rows]), label="in-batch ACC@1")
    val = [(r["step"], r["val_acc1_kb100"]) for r in rows if "val_acc1_kb100" in r]
    if val:
        a2.plot(*zip(*val), marker="o", label="val ACC@1, KB of 100")
    val_ans = [(r["step"], r["val_answer_acc_kb100"]) for r in rows if "val_answer_acc_kb100" in r]
    if val_ans:
        a2.plot(*zip(*val_ans), marker="s", label="val answer (teacher-forced), KB of 100")
    a2.set_xlabel("step")
    a2.set_ylim(0, 1)
    a2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _smooth(xs, k: int = 20):
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out
