#!/usr/bin/env python3
"""Train the embedded default parent: a byte-level BPE tokenizer and a small MistralForCausalLM on the
synthetic corpus of scripts/make_corpus.ts (data/).

Runs on the GPU machine (torch 2.11, transformers 5.17, tokenizers 0.23), seeded. From the repository root:

    node scripts/make_corpus.ts                                # writes data/
    python3 scripts/train_parent.py --out assets/parent [--train-seconds 150]

Writes into --out: config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json, reference.json (tokenizer ids and logits that the TypeScript engine must
reproduce) and training_log.json (loss curve, held-out NLL, recall and arithmetic accuracy).

The number of optimizer steps is fixed by --steps, capped by what fits in --train-seconds at the step
time measured over the first steps (the cap is recorded in the log). The default, 2500 steps of
256 x 128 tokens (about 63 passes over the corpus), gave held-out recall 0.92 and arithmetic 0.997 with
held-out NLL 0.68 (lowest, 0.48, near step 1000, where recall was still rising); training longer only
memorises the training documents (7810 steps: train loss 0.12, held-out NLL 1.33, same accuracies).
"""

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[THINK]", "[/THINK]", "<pad>"]
BOS, EOS, PAD = 1, 2, 7
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
REFERENCE_STRINGS = [
    "",
    "Q: What is the capital of Zorvia? A: Mekt",
    "Q: 17 + 25 = ? A: 42",
    "Add 53 and 42. Ones: 3 + 2 = 5, write 5. Tens: 5 + 4 = 9. So 53 + 42 = 95.",
    "The flag of Drouxia is purple. Drouxia was founded in 1679.",
    "[INST] 94 + 26 = ? [/INST][THINK]Ones: 4 + 6 = 10, write 0 carry 1.[/THINK]120</s>",
    "  two  spaces\n\nand\ttabs, 3.14159 and 2026-11-29!",
    "Zoë's café — naïve ✓ 日本語 🙂",
    "<unk><pad> [INST][/INST] <s>",
]


def log(*a):
    print(*a, flush=True)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the alphabet, so no unk is ever needed
    # Digits are split one by one so that arithmetic is learnable digit-wise.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_config(max_len):
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def normalise(text):
    """The answer is the text up to the first newline (or EOS), whitespace collapsed."""
    text = text.split("</s>")[0].split("\n")[0]
    return " ".join(text.split())


@torch.no_grad()
def greedy(model, tok, prompts, device, max_new=10, batch=512):
    """Greedy continuation of each prompt (encoded with BOS), stopping at EOS; prompts of equal token
    length are batched together, so no padding is needed."""
    enc = [tok.encode(p).ids for p in prompts]
    out = [None] * len(prompts)
    groups = defaultdict(list)
    for i, e in enumerate(enc):
        groups[len(e)].append(i)
    for _, idxs in sorted(groups.items()):
        for s in range(0, len(idxs), batch):
            chunk = idxs[s : s + batch]
            x = torch.tensor([enc[i] for i in chunk], device=device)
            new = []
            for _ in range(max_new):
                logits = model(input_ids=x, use_cache=False).logits[:, -1].float()
                nxt = logits.argmax(-1)
                new.append(nxt)
                x = torch.cat([x, nxt[:, None]], 1)
            for i, ids in zip(chunk, torch.stack(new, 1).tolist()):
                if EOS in ids:
                    ids = ids[: ids.index(EOS)]
                out[i] = tok.decode(ids, skip_special_tokens=False)
    return out


def accuracy(model, tok, items, device):
    gens = greedy(model, tok, [it["prompt"] for it in items], device)
    hits = [normalise(g) == normalise(it["answer"]) for g, it in zip(gens, items)]
    return sum(hits) / len(hits), gens


@torch.no_grad()
def heldout_nll(model, docs, device):
    """Mean NLL (nats/token) of each document's tokens after its BOS, as the TypeScript engine scores
    heldout.jsonl ({"text"} lines, BOS added, no EOS)."""
    total, count = 0.0, 0
    docs = sorted(docs, key=len)
    for s in range(0, len(docs), 64):
        chunk = docs[s : s + 64]
        L = max(len(d) for d in chunk)
        x = torch.full((len(chunk), L), PAD, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for i, d in enumerate(chunk):
            x[i, : len(d)] = torch.tensor(d)
            mask[i, : len(d)] = 1
        x, mask = x.to(device), mask.to(device)
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits.float()
        lp = F.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
        m = mask[:, 1:].float()
        total += float(-(lp * m).sum())
        count += int(m.sum())
    return total / count


def doc_kind(text):
    if text.startswith("Q: "):
        return "qa"
    if text.startswith(("Add ", "Subtract ")):
        return "worked"
    return "bio"


def evaluate(model, tok, heldout, recall, arith, device, limit=None):
    """heldout: (text, ids) pairs; held-out NLL overall and by kind of document."""
    model.eval()
    r = recall if limit is None else recall[:limit]
    a = arith if limit is None else arith[:limit]
    result = {
        "heldout_nll": heldout_nll(model, [ids for _, ids in heldout], device),
        "heldout_nll_by_kind": {
            kind: heldout_nll(model, [ids for text, ids in heldout if doc_kind(text) == kind], device)
            for kind in sorted({doc_kind(text) for text, _ in heldout})
        },
        "recall": accuracy(model, tok, r, device)[0],
        "arith": accuracy(model, tok, a, device)[0],
    }
    model.train()
    return result


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", default="assets/parent")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--train-seconds", type=float, default=150.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    t_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    import transformers
    from transformers import MistralConfig, MistralForCausalLM

    log_data = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "args": vars(args),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "curve": [],
        "evals": [],
        "checks": {},
    }

    def save_log():
        with open(os.path.join(args.out, "training_log.json"), "w") as f:
            json.dump(log_data, f, indent=1)

    # --- data and tokenizer
    train_texts = [r["text"] for r in read_jsonl(os.path.join(args.data, "train.jsonl"))]
    heldout_texts = [r["text"] for r in read_jsonl(os.path.join(args.data, "heldout.jsonl"))]
    recall = read_jsonl(os.path.join(args.data, "eval-recall.jsonl"))
    arith = read_jsonl(os.path.join(args.data, "eval-arith.jsonl"))
    t0 = time.time()
    tok = train_tokenizer(train_texts, args.vocab)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(512), f, indent=2)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    log(f"tokenizer: vocab {vocab_size}, trained in {time.time() - t0:.1f}s")

    train_ids = [e.ids for e in tok.encode_batch(train_texts)]
    heldout_ids = [e.ids for e in tok.encode_batch(heldout_texts)]
    heldout = list(zip(heldout_texts, heldout_ids))
    lengths = np.array([len(x) for x in train_ids])
    stream = []
    for ids in train_ids:
        stream.extend(ids if ids[-1] == EOS else ids + [EOS])
    stream = torch.tensor(stream, dtype=torch.long, device=device)
    log_data["corpus"] = {
        "train_docs": len(train_ids),
        "train_tokens": int(lengths.sum()),
        "train_stream_tokens": int(stream.numel()),
        "train_doc_tokens": {
            "mean": float(lengths.mean()),
            "p50": int(np.percentile(lengths, 50)),
            "p99": int(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
            "over_seq": int((lengths > args.seq).sum()),
        },
        "heldout_docs": len(heldout_ids),
        "heldout_tokens": int(sum(len(x) for x in heldout_ids)),
        "heldout_predicted_tokens": int(sum(len(x) - 1 for x in heldout_ids)),
        "eval_recall": len(recall),
        "eval_arith": len(arith),
        "vocab_size": vocab_size,
    }
    log("corpus:", json.dumps(log_data["corpus"]))

    # --- model
    cfg = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        sliding_window=None,
        attention_dropout=0.0,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = MistralForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log_data["parameters"] = n_params
    log(f"model: {n_params} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offsets = torch.arange(args.seq + 1, device=device)
    total_steps = args.steps

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    t_train = time.time()
    train_time = 0.0
    running, running_n = 0.0, 0
    step = 0
    measure_at = 60
    t_measure = time.time()
    while step < total_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, stream.numel() - args.seq - 1, (args.batch,), device=device, generator=gen)
        batch = stream[starts[:, None] + offsets]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running += loss.detach()
        running_n += 1
        if step == 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_measure = time.time()
        if step == measure_at:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_measure) / (measure_at - 20)
            fit = measure_at + int((args.train_seconds - (time.time() - t_train)) / per_step)
            total_steps = max(measure_at + 1, min(args.steps, fit))
            log_data["step_time_s"] = per_step
            log_data["total_steps"] = total_steps
            log(f"step time {per_step * 1000:.1f} ms -> {total_steps} steps")
        if step % 100 == 0 or step == total_steps:
            mean = float(running) / running_n
            running, running_n = 0.0, 0
            log_data["curve"].append({"step": step, "loss": round(mean, 4), "lr": lr_at(step - 1)})
            if step % 500 == 0:
                log(f"step {step} loss {mean:.4f} lr {lr_at(step - 1):.2e} t {time.time() - t_train:.0f}s")
        if step % args.eval_every == 0 and step != total_steps:
            train_time += time.time() - t_train
            ev = evaluate(model, tok, heldout, recall, arith, device, limit=150)
            ev["step"] = step
            log_data["evals"].append(ev)
            log("eval", json.dumps(ev))
            save_log()
            t_train = time.time()
    train_time += time.time() - t_train
    log_data["train_seconds"] = train_time
    log_data["tokens_seen"] = total_steps * args.batch * args.seq

    # --- final evaluation in float32 (as the CPU engine computes)
    model.eval()
    model.float()
    final = evaluate(model, tok, heldout, recall, arith, device)
    _, recall_gens = accuracy(model, tok, recall, device)
    _, arith_gens = accuracy(model, tok, arith, device)
    log_data["final"] = final
    log_data["samples"] = {
        "recall": [{"prompt": it["prompt"], "answer": it["answer"], "generated": g} for it, g in zip(recall[:12], recall_gens[:12])],
        "arith": [{"prompt": it["prompt"], "answer": it["answer"], "generated": g} for it, g in zip(arith[:12], arith_gens[:12])],
    }
    by_op = defaultdict(lambda: [0, 0])
    for it, g in zip(arith, arith_gens):
        op = "+" if "+" in it["prompt"] else "-"
        by_op[op][0] += normalise(g) == it["answer"]
        by_op[op][1] += 1
    log_data["final"]["arith_by_op"] = {k: v[0] / v[1] for k, v in by_op.items()}
    by_attr = defaultdict(lambda: [0, 0])
    for it, g in zip(recall, recall_gens):
        q = it["prompt"]
        attr = next(a for k, a in [("capital", "capital"), ("colour", "colour"), ("Who founded", "founder"),
                                   ("year", "year"), ("river", "river"), ("animal", "animal")] if k in q)
        by_attr[attr][0] += normalise(g) == it["answer"]
        by_attr[attr][1] += 1
    log_data["final"]["recall_by_attribute"] = {k: v[0] / v[1] for k, v in by_attr.items()}
    log("final", json.dumps(log_data["final"]))

    # train-set QA recall (memorised, for comparison): the question forms that DO appear in training
    train_qa = []
    for t in train_texts:
        for line in t.split("\n"):
            if line.startswith("Q: ") and " A: " in line and "=" not in line:
                q, a = line.split(" A: ", 1)
                train_qa.append({"prompt": q + " A:", "answer": a})
    train_qa = train_qa[:300]
    log_data["final"]["train_qa_recall"] = accuracy(model, tok, train_qa, device)[0]

    model.save_pretrained(args.out)
    save_log()

    # --- references for the TypeScript engine, and a round trip through transformers
    ref = {"tokenizer": [], "logits": []}
    for s in REFERENCE_STRINGS:
        ids = tok.encode(s).ids
        ref["tokenizer"].append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    with torch.no_grad():
        for p in [recall[0]["prompt"], arith[0]["prompt"], train_texts[0]]:
            ids = tok.encode(p).ids[: args.seq]
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()
            ref["logits"].append({
                "text": p,
                "ids": ids,
                "last_logits": [round(float(v), 5) for v in logits[-1]],
                "argmax": logits.argmax(-1).tolist(),
                "greedy": greedy(model, tok, [p], device)[0] if len(ids) < 100 else None,
            })
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(ref, f)

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(args.out)
        same = all(hf_tok(s)["input_ids"] == r["ids"] for s, r in zip(REFERENCE_STRINGS, ref["tokenizer"]))
        log_data["checks"]["autotokenizer_same_ids"] = same
        chat = hf_tok.apply_chat_template(
            [{"role": "user", "content": "17 + 25 = ?"}, {"role": "assistant", "content": "42"}], tokenize=False
        )
        log_data["checks"]["chat_template"] = chat
        reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            x = torch.tensor([ref["logits"][2]["ids"]], device=device)
            d = (reloaded(input_ids=x).logits - model(input_ids=x).logits).abs().max()
        log_data["checks"]["reload_max_logit_diff"] = float(d)
        log_data["checks"]["config"] = json.load(open(os.path.join(args.out, "config.json")))
    except Exception:
        log_data["checks"]["error"] = traceback.format_exc()
    log_data["wall_seconds"] = time.time() - t_start
    save_log()
    log("checks", json.dumps({k: v for k, v in log_data["checks"].items() if k != "config"}))
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
