#!/usr/bin/env python3
"""Give the embedded default parent eyes: a small Pixtral vision encoder and a multimodal projector,
trained together with the text parent (assets/parent) on the image world of scripts/make_image_world.ts,
saved whole as a Mistral3ForConditionalGeneration with its tokenizer (three image tokens added) and its
image processor's settings.

Runs on the GPU machine (torch, transformers 5.17, tokenizers), seeded; no network. From the repository root:

    node scripts/make_image_world.ts --pixels /tmp/vision/pixels.bin        # writes data/vision and the pixels
    python3 scripts/train_vision_parent.py --pixels /tmp/vision/pixels.bin --out assets/parent-vl

The pictures come as raw RGB bytes (--pixels, with pixels.json beside it naming them) so that no PNG
decoder is needed here; they are normalised as PixtralImageProcessor does (rescale 1/255, CLIP mean and
std). A picture is 32 x 32: at patch 4 and merge 2 its [IMG] placeholder becomes PixtralProcessor's grid
of 4 rows of 4 [IMG] tokens, each row closed by [IMG_BREAK], the last by [IMG_END].

Each step trains on a batch of picture questions (loss on the answer and the EOS after it) and a batch
of the text corpus (next-token loss on every token), so the text model keeps what it knew. The encoder
and projector learn at --lr, the text model at --text-lr. Writes into --out: config.json,
generation_config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json,
preprocessor_config.json and training_log.json (loss curve; held-out visual accuracy by kind of
question; held-out NLL, recall and arithmetic before and after, as the text parent's log has them).
"""

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralForCausalLM, PixtralVisionConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_parent as text_parent  # noqa: E402  (its evaluation: held-out NLL, recall, arithmetic)

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
SIZE, PATCH, MERGE = 32, 4, 2
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
BOS, EOS, PAD = text_parent.BOS, text_parent.EOS, text_parent.PAD
log = text_parent.log


# The text parent's template, with a message's content also a list of parts as HF chat templates take them:
# {"type": "text", "text"} and {"type": "image"}, which renders as the [IMG] placeholder.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}[IMG]{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def write_tokenizer_config(parent, out):
    """The parent's tokenizer_config.json with the image-aware chat template."""
    config = json.load(open(os.path.join(parent, "tokenizer_config.json")))
    config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def grid(img, brk, end):
    side = SIZE // (PATCH * MERGE)
    row = [img] * side + [brk]
    tokens = row * side
    tokens[-1] = end
    return tokens


def expand(ids, ids_of):
    out = []
    for t in ids:
        out.extend(grid(ids_of["[IMG]"], ids_of["[IMG_BREAK]"], ids_of["[IMG_END]"]) if t == ids_of["[IMG]"] else [t])
    return out


def load_pixels(path):
    names = json.load(open(os.path.join(os.path.dirname(path), "pixels.json")))
    raw = np.fromfile(path, dtype=np.uint8).reshape(len(names), SIZE, SIZE, 3)
    # As PixtralImageProcessor: rescale in double, store float32, normalise per channel in float32; channels first.
    x = (raw.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return {name: i for i, name in enumerate(names)}, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parent", default="assets/parent")
    ap.add_argument("--data", default="data")
    ap.add_argument("--vision-data", default="data/vision")
    ap.add_argument("--pixels", required=True)
    ap.add_argument("--out", default="assets/parent-vl")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--train-seconds", type=float, default=150)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--text-lr", type=float, default=3e-4)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    log_data = {"args": vars(args), "curve": []}

    # --- tokenizer: the parent's, with the three image tokens after its vocabulary
    tok = Tokenizer.from_file(os.path.join(args.parent, "tokenizer.json"))
    base_vocab = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    ids_of = {t: tok.token_to_id(t) for t in IMAGE_TOKENS}
    assert [ids_of[t] for t in IMAGE_TOKENS] == [base_vocab, base_vocab + 1, base_vocab + 2], ids_of
    vocab = base_vocab + len(IMAGE_TOKENS)

    # --- model: the parent's text model, a fresh encoder and projector
    parent = MistralForCausalLM.from_pretrained(args.parent, torch_dtype=torch.float32)
    text_config = parent.config.to_dict()
    text_config["vocab_size"] = vocab
    for key in ["architectures", "transformers_version", "dtype", "torch_dtype"]:
        text_config.pop(key, None)
    heads = 2
    vision_config = PixtralVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=heads, head_dim=args.vision_hidden // heads, num_channels=3, image_size=SIZE, patch_size=PATCH,
        hidden_act="gelu", rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    config = Mistral3Config(
        vision_config=vision_config, text_config=text_config, image_token_index=ids_of["[IMG]"], projector_hidden_act="gelu",
        spatial_merge_size=MERGE, multimodal_projector_bias=False, tie_word_embeddings=False, vision_feature_layer=-1,
    )
    model = Mistral3ForConditionalGeneration(config)
    language = model.model.language_model
    state = parent.model.state_dict()
    embed = state["embed_tokens.weight"]
    # The new tokens' embeddings and head rows start at the mean of the others.
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True).repeat(len(IMAGE_TOKENS), 1)])
    language.load_state_dict(state)
    head = parent.lm_head.weight.data
    model.lm_head.weight.data = torch.cat([head, head.mean(0, keepdim=True).repeat(len(IMAGE_TOKENS), 1)])
    model.to(device)
    del parent
    log_data["parameters"] = {
        "total": sum(p.numel() for p in model.parameters()),
        "vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
    }
    log("parameters", json.dumps(log_data["parameters"]))

    # --- data
    index_of, pixels = load_pixels(args.pixels)
    pixels = pixels.to(device)

    def encode_line(text, answer_from):
        """Token ids of a picture question with its answer, and the loss mask: the answer and the EOS after it."""
        prompt = expand(tok.encode(text[:answer_from]).ids, ids_of)
        full = expand(tok.encode(text).ids, ids_of) + [EOS]
        assert full[: len(prompt)] == prompt, text
        return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))

    train_lines = text_parent.read_jsonl(os.path.join(args.vision_data, "train.jsonl"))
    examples = []
    for line in train_lines:
        ids, mask = encode_line(line["text"], line["text"].rindex(" A:") + len(" A:"))
        examples.append((ids, mask, index_of[line["images"][0]]))
    eval_tasks = text_parent.read_jsonl(os.path.join(args.vision_data, "eval.jsonl"))
    text_docs = [d["text"] for d in text_parent.read_jsonl(os.path.join(args.data, "train.jsonl"))]
    stream = torch.tensor([t for d in text_docs for t in tok.encode(d).ids], device=device)
    heldout = [(d["text"], tok.encode(d["text"]).ids) for d in text_parent.read_jsonl(os.path.join(args.data, "heldout.jsonl"))]
    recall = text_parent.read_jsonl(os.path.join(args.data, "eval-recall.jsonl"))
    arith = text_parent.read_jsonl(os.path.join(args.data, "eval-arith.jsonl"))

    @torch.no_grad()
    def visual_accuracy():
        """Greedy answers to the held-out picture questions (prompts of equal length batched), exact match by kind."""
        model.eval()
        groups = defaultdict(list)
        for i, task in enumerate(eval_tasks):
            groups[len(expand(tok.encode(task["prompt"]).ids, ids_of))].append(i)
        answers = [None] * len(eval_tasks)
        for _, idxs in groups.items():
            x = torch.tensor([expand(tok.encode(eval_tasks[i]["prompt"]).ids, ids_of) for i in idxs], device=device)
            images = pixels[[index_of[eval_tasks[i]["images"][0]] for i in idxs]]
            sizes = torch.tensor([[SIZE, SIZE]] * len(idxs), device=device)
            new = []
            for _ in range(6):
                logits = model(input_ids=x, pixel_values=images, image_sizes=sizes, use_cache=False).logits[:, -1].float()
                nxt = logits.argmax(-1)
                new.append(nxt)
                x = torch.cat([x, nxt[:, None]], 1)
            for i, ids in zip(idxs, torch.stack(new, 1).tolist()):
                answers[i] = tok.decode(ids[: ids.index(EOS)] if EOS in ids else ids, skip_special_tokens=False)
        hits = defaultdict(lambda: [0, 0])
        for task, answer in zip(eval_tasks, answers):
            hits[task["kind"]][0] += text_parent.normalise(answer) == task["answer"]
            hits[task["kind"]][1] += 1
        model.train()
        total = sum(h for h, _ in hits.values()) / len(eval_tasks)
        return {"visual_accuracy": total, "by_kind": {k: h / n for k, (h, n) in sorted(hits.items())}}

    def text_scores():
        return text_parent.evaluate(model, tok, heldout, recall, arith, device, limit=150)

    log_data["before"] = {**text_scores(), **visual_accuracy()}
    log("before", json.dumps(log_data["before"]))

    # --- training
    vision_params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    text_params = list(language.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(
        [{"params": vision_params, "lr": args.lr, "weight_decay": 0.0}, {"params": text_params, "lr": args.text_lr, "weight_decay": 0.0}],
        betas=(0.9, 0.95), eps=1e-8,
    )
    base_lrs = [args.lr, args.text_lr]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    offsets = torch.arange(args.seq + 1, device=device)
    model.train()
    started = time.time()
    total_steps, step, running = args.steps, 0, []
    while step < total_steps:
        warm = min(1.0, (step + 1) / 100)
        decay = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / total_steps))
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * warm * decay
        chosen = torch.randint(0, len(examples), (args.batch,), generator=gen).tolist()
        width = max(len(examples[i][0]) for i in chosen)
        x = torch.full((args.batch, width), PAD, dtype=torch.long)
        m = torch.zeros((args.batch, width))
        for r, i in enumerate(chosen):
            ids, mask, _ = examples[i]
            x[r, : len(ids)] = torch.tensor(ids)
            m[r, : len(ids)] = torch.tensor(mask, dtype=torch.float)
        x, m = x.to(device), m.to(device)
        attention = (torch.arange(width, device=device)[None] < torch.tensor([len(examples[i][0]) for i in chosen], device=device)[:, None]).long()
        images = pixels[[examples[i][2] for i in chosen]]
        sizes = torch.tensor([[SIZE, SIZE]] * args.batch, device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x[:, :-1], attention_mask=attention[:, :-1], pixel_values=images, image_sizes=sizes, use_cache=False).logits
            starts = torch.randint(0, stream.numel() - args.seq - 1, (args.text_batch,), generator=gen).to(device)
            rows = stream[starts[:, None] + offsets]
            text_logits = model(input_ids=rows[:, :-1], use_cache=False).logits
        token_loss = F.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1), reduction="none")
        image_loss = (token_loss * m[:, 1:].reshape(-1)).sum() / m[:, 1:].sum()
        text_loss = F.cross_entropy(text_logits.float().reshape(-1, vocab), rows[:, 1:].reshape(-1))
        loss = image_loss + text_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running.append([image_loss.detach(), text_loss.detach()])
        if step == 50:
            per_step = (time.time() - started) / 50
            total_steps = max(51, min(args.steps, int(args.train_seconds / per_step)))
            log(f"step time {per_step * 1000:.1f} ms -> {total_steps} steps")
            log_data["total_steps"] = total_steps
        if step % 100 == 0 or step == total_steps:
            image_mean, text_mean = torch.tensor(running).mean(0).tolist()
            running = []
            log_data["curve"].append({"step": step, "image_loss": round(image_mean, 4), "text_loss": round(text_mean, 4)})
            if step % 500 == 0:
                log(f"step {step} image loss {image_mean:.4f} text loss {text_mean:.4f} t {time.time() - started:.0f}s")
    log_data["train_seconds"] = time.time() - started

    model.eval()
    log_data["after"] = {**text_scores(), **visual_accuracy()}
    log("after", json.dumps(log_data["after"]))

    # --- save: the model whole, its tokenizer, the image processor's settings
    model.save_pretrained(args.out)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    write_tokenizer_config(args.parent, args.out)
    with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
        json.dump({
            "image_processor_type": "PixtralImageProcessor", "do_convert_rgb": True, "do_resize": True, "do_rescale": True,
            "do_normalize": True, "image_mean": MEAN, "image_std": STD, "patch_size": {"height": PATCH, "width": PATCH},
            "resample": 3, "rescale_factor": 1 / 255, "size": {"longest_edge": SIZE},
        }, f, indent=2)
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump(log_data, f, indent=1)
    log("saved", args.out, sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
