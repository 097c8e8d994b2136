#!/usr/bin/env python3
"""Reference fixtures for the image side of Ministral 3 (Mistral3ForConditionalGeneration), made with transformers.

Run once on a machine with torch, transformers (written against 5.17), PIL and numpy; no network is needed:

    python3 scripts/make-vision-fixtures.py --out DIR

Everything runs on the CPU in float32 with eager attention and fixed seeds, so the numbers are reproducible.
Writes, under DIR (default $OUT/vision-fixtures, else ./vision-fixtures):

  <model>/                 for model in vl-tiny, vl-bias, vl-ministral3: what save_pretrained wrote
                           (config.json, generation_config.json, model.safetensors) plus, per prompt,
                           reference-<prompt>.safetensors and reference-<prompt>.json (tensor list, shapes,
                           meaning, token layout, self-checks); fixture-info.json (saved tensor names/shapes).
  processor/images/*.png   small deterministic images
  processor/processor-config.json            the image-processor settings used
  processor/processor-<cfg>-<backend>.safetensors   pixel_values / image_sizes per image (and a padded batch)
  processor/processor-<cfg>.json             image sizes and the [IMG] token grid per image
  summary.json             files written, shapes, max |logit|, self-check maxima

Facts taken from the transformers 5.17 source (see the report that came with this script):
  - PixtralVisionModel.forward(pixel_values [N,3,Hmax,Wmax] padded, image_sizes [N,2] (h,w)) crops each
    image's patch grid to (h//patch, w//patch), concatenates all images into one sequence and uses a
    block-diagonal attention mask (generate_block_attention_mask), so images do not see each other.
  - Mistral3Model.get_image_features takes hidden_states[vision_feature_layer] of the tower (index 0 = after
    ln_pre, i = output of layer i), runs Mistral3MultiModalProjector (RMSNorm eps=text rms_norm_eps ->
    Mistral3PatchMerger (unfold k=s=spatial_merge_size, Linear(hidden*merge^2 -> hidden)) -> linear_1 -> act ->
    linear_2) and splits per image (h//(patch*merge)) * (w//(patch*merge)) rows.
  - Mistral3Model.forward scatters those rows, in order, into the positions where input_ids == image_token_id.
  - PixtralProcessor.replace_image_token: per image (resized) h x w, rows = h // (patch*merge),
    cols = w // (patch*merge); ([IMG]*cols + [IMG_BREAK]) * rows, last token replaced by [IMG_END].
    PixtralProcessor._process_images calls the image processor with patch_size = patch*merge, so processed
    sizes are multiples of patch*merge.
"""

import argparse
import json
import math
import os
import sys
import traceback

# No hub access on the machine that runs this: never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    MistralConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralVisionConfig,
)

# HF's init (std 0.02, norms exactly 1) would make every logit nearly the same: the weights are redrawn
# as the text fixtures' are, with larger seeded noise and every RMSNorm weight moved off 1.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_references import init_weights  # noqa: E402

torch.set_grad_enabled(False)

# Token ids of Mistral's Tekken vocabulary that the fixtures use.
BOS, EOS, INST, INST_END = 1, 2, 3, 4
IMG, PAD, IMG_BREAK, IMG_END = 10, 11, 12, 13
TOKEN_NAMES = {BOS: "<s>", EOS: "</s>", INST: "[INST]", INST_END: "[/INST]", IMG: "[IMG]", PAD: "<pad>",
               IMG_BREAK: "[IMG_BREAK]", IMG_END: "[IMG_END]"}
FIRST_TEXT_ID = 14  # random "text" ids are drawn from [14, vocab) so they never hit a special id

VOCAB = 512
PATCH = 4
MERGE = 2
SUMMARY = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}, "processor": {},
           "skipped": [], "notes": [], "errors": {}}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def vision_config():
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,  # head_dim 16
              num_channels=3, image_size=64, patch_size=PATCH, hidden_act="gelu")
    try:  # transformers 5: RoPE settings live in rope_parameters, Pixtral's type is "axial"
        return PixtralVisionConfig(rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}, **kw)
    except Exception:  # noqa: BLE001  (older transformers: top-level rope_theta)
        note = "PixtralVisionConfig(rope_parameters=...) refused; used rope_theta=10000.0"
        if note not in SUMMARY["notes"]:
            SUMMARY["notes"].append(note)
        return PixtralVisionConfig(rope_theta=10000.0, **kw)


TEXT_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                   sliding_window=None)


def mistral_text_config():
    return MistralConfig(max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **TEXT_COMMON)


def ministral3_text_config():
    """Ministral 3 text model as in test/fixtures/ministral3-yarn: YaRN + llama-4 query scaling.

    original_max_position_embeddings 16 so that prompts longer than 16 tokens reach floor(pos/16) >= 1,
    where the llama-4 scaling of queries is not 1."""
    from transformers import Ministral3Config  # raises ImportError where transformers has no ministral3

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 1000000.0,
            "llama_4_scaling_beta": 0.1}
    return Ministral3Config(max_position_embeddings=64, rope_parameters=rope, **TEXT_COMMON)


def mistral3_config(text_config, **kw):
    # tie_word_embeddings defaults to True in Mistral3Config and the top-level value is the one
    # PreTrainedModel.tie_weights reads: say False explicitly (text_config says False too).
    base = dict(vision_config=vision_config(), text_config=text_config, image_token_index=IMG,
                projector_hidden_act="gelu", spatial_merge_size=MERGE, multimodal_projector_bias=False,
                tie_word_embeddings=False)
    base.update(kw)
    return Mistral3Config(**base)


def inner_model(model):
    """Mistral3Model (transformers >= 4.52 puts it at model.model)."""
    return getattr(model, "model", model)


# ----------------------------------------------------------------------------------------------
# prompts: input_ids with the image grid expanded as PixtralProcessor.replace_image_token does
# ----------------------------------------------------------------------------------------------
def image_grid_ids(h, w, patch, merge):
    step = patch * merge
    assert h % step == 0 and w % step == 0, f"image {h}x{w} not a multiple of patch*merge={step} (the processor never makes one)"
    rows, cols = h // step, w // step
    ids = ([IMG] * cols + [IMG_BREAK]) * rows
    ids[-1] = IMG_END
    return ids, rows, cols


def grid_strings(h, w, patch, merge):
    ids, rows, cols = image_grid_ids(h, w, patch, merge)
    names = [TOKEN_NAMES[i] for i in ids]
    return ["".join(names[r * (cols + 1):(r + 1) * (cols + 1)]) for r in range(rows)]


# Each prompt: a list of segments, "T<n>" = n random text tokens, (h, w) = one image of h x w pixels.
PROMPTS = {
    "one-16x16": [BOS, INST, (16, 16), "T5", INST_END, "T3"],
    "one-24x16": [BOS, INST, "T2", (24, 16), "T4", INST_END, "T2"],  # non-square: 3 rows of 2
    "two-16x8-8x16": [BOS, INST, (16, 8), "T3", (8, 16), "T2", INST_END, "T2"],
    "one-32x48": [BOS, INST, "T3", (32, 48), "T3", INST_END, "T4"],  # 4 rows of 6; > 16 positions (YaRN/llama-4)
}


def build_prompt(spec, seed):
    g = torch.Generator().manual_seed(seed)
    ids, images, spans = [], [], []
    for seg in spec:
        if isinstance(seg, int):
            ids.append(seg)
        elif isinstance(seg, str):
            n = int(seg[1:])
            ids += torch.randint(FIRST_TEXT_ID, VOCAB, (n,), generator=g).tolist()
        else:
            h, w = seg
            grid, rows, cols = image_grid_ids(h, w, PATCH, MERGE)
            spans.append({"image": len(images), "height": h, "width": w, "start": len(ids), "length": len(grid),
                          "rows": rows, "cols": cols, "image_tokens": rows * cols,
                          "grid": grid_strings(h, w, PATCH, MERGE)})
            ids += grid
            images.append((h, w))
    # pixel values: N(0,1) per image, padded bottom/right with zeros to the batch max (as
    # PixtralImageProcessor._pad_for_batching does); image_sizes gives each image's real (h, w).
    hmax, wmax = max(h for h, _ in images), max(w for _, w in images)
    pv = torch.zeros(len(images), 3, hmax, wmax)
    for k, (h, w) in enumerate(images):
        pv[k, :, :h, :w] = torch.randn(3, h, w, generator=g)
    sizes = torch.tensor(images, dtype=torch.int64)
    return torch.tensor([ids], dtype=torch.int64), pv, sizes, spans


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def sizes_tensor(x):
    """image_sizes as an int32 [N, 2] tensor, whatever container the processor returned (list of Size, tensor)."""
    return torch.tensor([[int(h), int(w)] for h, w in x], dtype=torch.int32)


def maxabs(a, b):
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def image_features_of(model, pv, sizes):
    out = model.get_image_features(pixel_values=pv, image_sizes=sizes)
    feats = getattr(out, "pooler_output", None)
    if feats is None:  # older transformers returned the per-image list directly
        feats = out
    return [f.reshape(-1, f.shape[-1]) for f in feats]


def reference(model, name, prompt_name, spec, seed, mdir):
    cfg = model.config
    inner = inner_model(model)
    ids, pv, sizes, spans = build_prompt(spec, seed)
    T = ids.shape[1]
    out = model(input_ids=ids, pixel_values=pv, image_sizes=sizes, output_hidden_states=True, use_cache=False,
                return_dict=True)
    logits = out.logits
    text_hs = out.hidden_states

    # vision tower alone: every layer's output, then the layer vision_feature_layer selects
    vt = inner.vision_tower
    vout = vt(pixel_values=pv, image_sizes=sizes, output_hidden_states=True, return_dict=True)
    vhs = vout.hidden_states
    vfl = cfg.vision_feature_layer
    selected = vhs[vfl] if isinstance(vfl, int) else torch.cat([vhs[i] for i in vfl], dim=-1)
    selected = selected.squeeze(0)  # [sum of patches, vision hidden]
    patches = [int(h) // PATCH * (int(w) // PATCH) for h, w in sizes.tolist()]

    # projector step by step (Mistral3MultiModalProjector.forward), to check against get_image_features
    proj = inner.multi_modal_projector
    normed = proj.norm(selected)
    merged = proj.patch_merger(normed, sizes)
    manual = proj.linear_2(proj.act(proj.linear_1(merged)))
    feats = image_features_of(model, pv, sizes)
    feats_cat = torch.cat(feats, dim=0)

    checks = {
        "projector_manual_vs_get_image_features": maxabs(manual, feats_cat),
        "vision_last_hidden_vs_hidden_states[-1]": maxabs(vout.last_hidden_state, vhs[-1]),
    }
    img_hs = getattr(out, "image_hidden_states", None)
    if img_hs is not None:
        checks["forward_image_hidden_states_vs_features"] = maxabs(img_hs.reshape(feats_cat.shape), feats_cat)
    # splicing: hidden_states[0] is the embeddings after masked_scatter
    mask = ids[0] == IMG
    emb = inner.get_input_embeddings()(ids)[0]
    checks["hidden0_at_image_tokens_vs_features"] = maxabs(text_hs[0][0][mask], feats_cat)
    checks["hidden0_at_text_tokens_vs_embed_tokens"] = maxabs(text_hs[0][0][~mask], emb[~mask])
    checks["n_image_tokens_vs_feature_rows"] = [int(mask.sum()), int(feats_cat.shape[0])]
    # images are independent (block-diagonal mask): each image alone, unpadded, gives the same features
    off = 0
    alone = []
    for k, (h, w) in enumerate(sizes.tolist()):
        one = vt(pixel_values=pv[k:k + 1, :, :h, :w], image_sizes=sizes[k:k + 1], output_hidden_states=True,
                 return_dict=True).hidden_states
        one_sel = one[vfl] if isinstance(vfl, int) else torch.cat([one[i] for i in vfl], dim=-1)
        alone.append(maxabs(one_sel.squeeze(0), selected[off:off + patches[k]]))
        off += patches[k]
    checks["vision_each_image_alone_vs_batched"] = max(alone)

    tensors = {
        "input_ids": (ids.to(torch.int32), "[1, T] token ids; [IMG]=10, [IMG_BREAK]=12, [IMG_END]=13, BOS=1, [INST]=3, [/INST]=4"),
        "pixel_values": (pv, "[N, 3, Hmax, Wmax] float32 N(0,1) per image, zero-padded bottom/right to the batch max"),
        "image_sizes": (sizes.to(torch.int32), "[N, 2] (height, width) in pixels of each image inside pixel_values"),
        "logits": (logits, "[1, T, vocab] transformers' logits, all positions"),
        "vision_features": (selected, f"[sum_k patches_k, vision hidden] vision tower hidden_states[{vfl}] (the layer vision_feature_layer selects), all images concatenated, row-major patch order per image; before the projector"),
        "projector_normed": (normed, "[sum_k patches_k, vision hidden] after the projector's RMSNorm (eps = text_config.rms_norm_eps)"),
        "projector_merged": (merged, "[sum_k tokens_k, vision hidden] after Mistral3PatchMerger (unfold spatial_merge_size x spatial_merge_size, merging_layer)"),
        "image_features": (feats_cat, "[sum_k tokens_k, text hidden] projector output (get_image_features), what is spliced into the [IMG] positions in order"),
    }
    for i, h in enumerate(vhs):
        tensors[f"vision_hidden_states.{i}"] = (h.squeeze(0), "[sum_k patches_k, vision hidden] vision tower: 0 = patch_conv + ln_pre, i = output of layer i")
    for k, f in enumerate(feats):
        tensors[f"image_features.{k}"] = (f, f"[tokens_{k}, text hidden] projector output of image {k}")
        start = sum(patches[:k])
        tensors[f"vision_features.{k}"] = (selected[start:start + patches[k]], f"[patches_{k}, vision hidden] vision_features of image {k}")
    for i, h in enumerate(text_hs):
        tensors[f"hidden_states.{i}"] = (h, "[1, T, text hidden] text model: 0 = embeddings after splicing the image features, i = input of layer i, last = after the final norm")

    path = os.path.join(mdir, f"reference-{prompt_name}.safetensors")
    # clone: several entries are views of one tensor (safetensors refuses shared memory)
    save_file({k: v.detach().clone().contiguous() for k, (v, _) in tensors.items()}, path, metadata={"format": "pt"})
    manifest = {
        "model": name,
        "prompt": prompt_name,
        "T": T,
        "images": spans,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "vision_feature_layer": vfl,
        "attention": "eager, no attention_mask (all ones), position_ids default 0..T-1",
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "description": d}
                    for k, (v, d) in tensors.items()},
        "checks": checks,
        "max_abs_logit": float(logits.abs().max()),
    }
    with open(os.path.join(mdir, f"reference-{prompt_name}.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    log(f"  {name}/{prompt_name}: T={T} images={[tuple(s) for s in sizes.tolist()]} max|logit|={manifest['max_abs_logit']:.3f} "
        f"checks={json.dumps(checks)}")
    log(f"    tensors: {', '.join(f'{k}{list(v.shape)}' for k, (v, _) in tensors.items())}")
    return manifest


def build_model(name, config, seed, out):
    mdir = os.path.join(out, name)
    os.makedirs(mdir, exist_ok=True)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).to(torch.float32).eval()
    init_weights(model, seed)
    inner = inner_model(model)
    tied = model.lm_head.weight.data_ptr() == inner.language_model.embed_tokens.weight.data_ptr()
    if tied:
        raise RuntimeError(f"{name}: lm_head is tied to embed_tokens although tie_word_embeddings=False")
    # safetensors is the only format transformers 5 writes (its save_pretrained has no safe_serialization).
    model.save_pretrained(mdir)
    wfile = os.path.join(mdir, "model.safetensors")
    assert os.path.exists(wfile), f"{name}: save_pretrained wrote no model.safetensors: {os.listdir(mdir)}"

    # References come from the model loaded back from the folder: what the files say is what was computed.
    loaded = Mistral3ForConditionalGeneration.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager").eval()
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    roundtrip = max(maxabs(sd_a[k], sd_b[k]) for k in sd_a) if set(sd_a) == set(sd_b) else "key sets differ"
    saved = load_file(wfile)
    info = {
        "config": json.load(open(os.path.join(mdir, "config.json"))),
        "saved_tensors": {k: list(v.shape) for k, v in sorted(saved.items())},
        "module_tensors": sorted(sd_b),
        "state_dict_roundtrip_maxabs": roundtrip,
        "prompts": {},
    }
    log(f"{name}: saved {len(saved)} tensors ({os.path.getsize(wfile)} bytes), roundtrip max|diff|={roundtrip}")
    for i, (pname, spec) in enumerate(PROMPTS.items()):
        m = reference(loaded, name, pname, spec, seed + 100 + i, mdir)
        # the in-memory model (default attention) against the reloaded eager one
        ids, pv, sizes, _ = build_prompt(spec, seed + 100 + i)
        again = model(input_ids=ids, pixel_values=pv, image_sizes=sizes, use_cache=False).logits
        ref = load_file(os.path.join(mdir, f"reference-{pname}.safetensors"))["logits"]
        m["checks"]["in_memory_model_logits_vs_reference"] = maxabs(again, ref)
        info["prompts"][pname] = {"T": m["T"], "max_abs_logit": m["max_abs_logit"], "checks": m["checks"]}
    with open(os.path.join(mdir, "fixture-info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    SUMMARY["models"][name] = {k: v for k, v in info.items() if k not in ("config", "module_tensors")}


# ----------------------------------------------------------------------------------------------
# processor references
# ----------------------------------------------------------------------------------------------
def make_images(d):
    os.makedirs(d, exist_ok=True)
    imgs = {}
    # 37 wide x 23 high RGB gradient (PIL sizes are (width, height))
    a = np.zeros((23, 37, 3), np.uint8)
    a[..., 0] = (np.arange(37)[None, :] * 255 // 36).astype(np.uint8)
    a[..., 1] = (np.arange(23)[:, None] * 255 // 22).astype(np.uint8)
    a[..., 2] = ((np.arange(23)[:, None] * 7 + np.arange(37)[None, :] * 13) % 256).astype(np.uint8)
    imgs["gradient-w37-h23"] = Image.fromarray(a, "RGB")
    # 64 x 64 with shapes
    im = Image.new("RGB", (64, 64), (30, 60, 90))
    dr = ImageDraw.Draw(im)
    dr.rectangle([5, 8, 30, 40], fill=(250, 20, 20))
    dr.ellipse([28, 20, 60, 58], fill=(20, 230, 40), outline=(255, 255, 0))
    dr.line([0, 63, 63, 0], fill=(255, 255, 255), width=3)
    imgs["shapes-w64-h64"] = im
    # 100 wide x 30 high stripes (downscaled, very non-square)
    s = np.zeros((30, 100, 3), np.uint8)
    s[..., 0] = np.where((np.arange(100) // 5) % 2 == 0, 220, 20)[None, :]
    s[..., 1] = (np.arange(30)[:, None] * 8).astype(np.uint8)
    s[..., 2] = 128
    imgs["stripes-w100-h30"] = Image.fromarray(s, "RGB")
    # grayscale ('L'), converted to RGB by the processor (do_convert_rgb)
    gl = ((np.arange(45)[:, None] * 5 + np.arange(20)[None, :] * 11) % 256).astype(np.uint8)
    imgs["gray-L-w20-h45"] = Image.fromarray(gl, "L")
    # RGBA with varying alpha: the processor's convert_to_rgb is PIL's convert("RGB"), which drops alpha
    r = np.zeros((20, 50, 4), np.uint8)
    r[..., 0] = 200
    r[..., 1] = (np.arange(50)[None, :] * 5).astype(np.uint8)
    r[..., 2] = 40
    r[..., 3] = (np.arange(20)[:, None] * 13).astype(np.uint8)
    imgs["rgba-w50-h20"] = Image.fromarray(r, "RGBA")
    for k, im in imgs.items():
        im.save(os.path.join(d, f"{k}.png"))
    # what the processor gets is the PNG as decoded again (identical pixels, lossless)
    return {k: Image.open(os.path.join(d, f"{k}.png")) for k in imgs}


def tiny_tokenizer():
    """A word-level tokenizer whose special tokens have the Tekken ids above; built in memory (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<ctrl{i}>": i for i in range(24)}
    for i, n in TOKEN_NAMES.items():
        vocab.pop(f"<ctrl{i}>")
        vocab[n] = i
    vocab["<unk>"] = vocab.pop("<ctrl0>")
    for i, w in enumerate(["describe", "this", "image", "and"]):
        vocab.pop(f"<ctrl{20 + i}>")
        vocab[w] = 20 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(TOKEN_NAMES.values()))  # split out before pre-tokenising, keep their ids
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


PROC_CONFIGS = [
    # name, vision patch_size, spatial_merge_size, longest_edge (the tiny models: patch 4, merge 2)
    ("p4-m2-le32", 4, 2, 32),
    ("p4-m1-le32", 4, 1, 32),
    ("p16-m2-le64", 16, 2, 64),
]


def processor_backends():
    out = {}
    for backend, cls_name in (("torchvision", "PixtralImageProcessor"), ("pil", "PixtralImageProcessorPil")):
        try:
            out[backend] = getattr(transformers, cls_name)
        except Exception:  # noqa: BLE001
            SUMMARY["errors"][f"import {cls_name}"] = traceback.format_exc()
    return out


def processor_references(out):
    pdir = os.path.join(out, "processor")
    images = make_images(os.path.join(pdir, "images"))
    backends = processor_backends()
    proc_config = {"images": {k: {"mode": im.mode, "width": im.width, "height": im.height, "file": f"images/{k}.png"}
                              for k, im in images.items()},
                   "configs": {}}
    try:
        tokenizer = tiny_tokenizer()
    except Exception:  # noqa: BLE001
        tokenizer = None
        SUMMARY["errors"]["tiny_tokenizer"] = traceback.format_exc()

    for cname, patch, merge, le in PROC_CONFIGS:
        eff = patch * merge  # PixtralProcessor._process_images passes patch_size * spatial_merge_size
        grids = {"config": cname, "patch_size": patch, "spatial_merge_size": merge, "longest_edge": le,
                 "effective_patch_size": eff, "images": {}}
        proc_config["configs"][cname] = {"patch_size": patch, "spatial_merge_size": merge, "longest_edge": le,
                                         "image_processor_called_with_patch_size": eff, "backends": {}}
        for backend, cls in backends.items():
            try:
                ip = cls(patch_size={"height": patch, "width": patch}, size={"longest_edge": le})
                if backend == "torchvision" and type(ip).__name__.endswith("Pil"):
                    # without torchvision transformers silently falls back to the PIL class
                    SUMMARY["notes"].append(f"{cname}: no torchvision; PixtralImageProcessor fell back to the PIL backend")
                    continue
                proc_config["configs"][cname]["backends"][backend] = {
                    "class": type(ip).__name__, "to_dict": json.loads(json.dumps(ip.to_dict(), default=str))}
                tensors = {}
                for k, im in images.items():
                    r = ip(images=[im], patch_size=eff, return_tensors="pt")
                    raw = ip(images=[im], patch_size=eff, do_rescale=False, do_normalize=False, return_tensors="pt")
                    sz = sizes_tensor(r["image_sizes"])
                    tensors[f"pixel_values.{k}"] = torch.as_tensor(r["pixel_values"]).float()
                    tensors[f"resized.{k}"] = torch.as_tensor(raw["pixel_values"]).float()
                    tensors[f"image_sizes.{k}"] = sz
                    h, w = sz[0].tolist()
                    entry = grids["images"].setdefault(k, {"input": [im.height, im.width], "processed": {}})
                    entry["processed"][backend] = [h, w]
                    entry["grid_by_rule"] = grid_strings(h, w, patch, merge)
                # all images in one call: padded batch
                r = ip(images=list(images.values()), patch_size=eff, return_tensors="pt")
                tensors["batch.pixel_values"] = torch.as_tensor(r["pixel_values"]).float()
                tensors["batch.image_sizes"] = sizes_tensor(r["image_sizes"])
                fname = f"processor-{cname}-{backend}.safetensors"
                save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(pdir, fname), metadata={"format": "pt"})
                SUMMARY["processor"][fname] = {k: list(v.shape) for k, v in tensors.items()}
                log(f"processor {cname} {backend}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in tensors.items() if k.startswith(("image_sizes", "batch"))))
                log(f"  sizes: " + ", ".join(f"{k}:{v[0].tolist()}" for k, v in tensors.items() if k.startswith("image_sizes")))
            except Exception:  # noqa: BLE001
                SUMMARY["errors"][f"processor {cname} {backend}"] = traceback.format_exc()
                log(f"processor {cname} {backend}: FAILED (see summary.json errors)")

        # the real PixtralProcessor with the in-memory tokenizer, where it can be built (needs torchvision)
        grids["grid_source"] = "rule (PixtralProcessor.replace_image_token, recomputed)"
        if tokenizer is not None and "torchvision" in backends:
            try:
                from transformers import PixtralProcessor

                proc = PixtralProcessor(
                    image_processor=backends["torchvision"](patch_size={"height": patch, "width": patch},
                                                            size={"longest_edge": le}),
                    tokenizer=tokenizer, patch_size=patch, spatial_merge_size=merge)
                ptensors = {}
                agree = True
                for k, im in images.items():
                    enc = proc(text="<s>[INST][IMG]describe this[/INST]", images=[im], return_tensors="pt",
                               add_special_tokens=False)
                    ids = torch.as_tensor(enc["input_ids"])[0].tolist()
                    ptensors[f"input_ids.{k}"] = torch.tensor([ids], dtype=torch.int32)
                    names = [TOKEN_NAMES.get(i, f"<{i}>") for i in ids]
                    body = [n for n in names if n in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]
                    rows, row = [], ""
                    for n in body:
                        row += n
                        if n != "[IMG]":
                            rows.append(row)
                            row = ""
                    e = grids["images"][k]
                    e["grid_by_processor"] = rows
                    e["processor_input_ids"] = ids
                    agree = agree and rows == e.get("grid_by_rule")
                # one prompt with two images: ids, padded pixel_values, image_sizes
                two = [images["gradient-w37-h23"], images["stripes-w100-h30"]]
                enc = proc(text="<s>[INST]describe[IMG]this[IMG]image[/INST]", images=two, return_tensors="pt",
                           add_special_tokens=False)
                ptensors["prompt.input_ids"] = torch.as_tensor(enc["input_ids"]).to(torch.int32)
                ptensors["prompt.pixel_values"] = torch.as_tensor(enc["pixel_values"]).float()
                ptensors["prompt.image_sizes"] = sizes_tensor(enc["image_sizes"])
                fname = f"processor-{cname}-pixtralprocessor.safetensors"
                save_file({k: v.contiguous() for k, v in ptensors.items()}, os.path.join(pdir, fname), metadata={"format": "pt"})
                SUMMARY["processor"][fname] = {k: list(v.shape) for k, v in ptensors.items()}
                grids["grid_source"] = "PixtralProcessor with an in-memory word-level tokenizer (and the rule, compared)"
                grids["processor_agrees_with_rule"] = agree
                grids["two_image_prompt"] = {"text": "<s>[INST]describe[IMG]this[IMG]image[/INST]",
                                             "images": ["gradient-w37-h23", "stripes-w100-h30"],
                                             "input_ids": torch.as_tensor(enc["input_ids"])[0].tolist()}
                log(f"processor {cname}: PixtralProcessor grids agree with the rule: {agree}")
            except ImportError as e:  # PixtralProcessor requires torchvision: expected where it is missing
                SUMMARY["notes"].append(f"{cname}: PixtralProcessor unavailable ({str(e).strip().splitlines()[0]}); grids from the rule")
                log(f"processor {cname}: PixtralProcessor unavailable; grids from the rule only")
            except Exception:  # noqa: BLE001
                SUMMARY["errors"][f"PixtralProcessor {cname}"] = traceback.format_exc()
                log(f"processor {cname}: PixtralProcessor could not be used; grids from the rule only")
        with open(os.path.join(pdir, f"processor-{cname}.json"), "w") as fh:
            json.dump(grids, fh, indent=2)
            fh.write("\n")
    with open(os.path.join(pdir, "processor-config.json"), "w") as fh:
        json.dump(proc_config, fh, indent=2)
        fh.write("\n")


# ----------------------------------------------------------------------------------------------
def main():
    default_out = os.path.join(os.environ["OUT"], "vision-fixtures") if os.environ.get("OUT") else "vision-fixtures"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    log(f"transformers {transformers.__version__}, torch {torch.__version__}; writing {out}")

    variants = [
        ("vl-tiny", lambda: mistral3_config(mistral_text_config(), vision_feature_layer=-1), 1),
        # vision_feature_layer not passed: the default (-1)
        ("vl-bias", lambda: mistral3_config(mistral_text_config(), multimodal_projector_bias=True), 2),
        ("vl-ministral3", lambda: mistral3_config(ministral3_text_config(), vision_feature_layer=-1), 3),
    ]
    for name, make_cfg, seed in variants:
        try:
            cfg = make_cfg()
        except Exception as e:  # noqa: BLE001
            msg = f"SKIPPED {name}: could not build its config ({type(e).__name__}: {e})"
            log(msg)
            SUMMARY["skipped"].append(msg)
            continue
        try:
            build_model(name, cfg, 1000 * seed, out)
        except Exception:  # noqa: BLE001
            SUMMARY["errors"][name] = traceback.format_exc()
            log(f"{name}: FAILED\n{SUMMARY['errors'][name]}")

    try:
        processor_references(out)
    except Exception:  # noqa: BLE001
        SUMMARY["errors"]["processor"] = traceback.format_exc()
        log(f"processor: FAILED\n{SUMMARY['errors']['processor']}")

    # summary
    files, total = {}, 0
    for root, _, names in os.walk(out):
        for n in sorted(names):
            p = os.path.join(root, n)
            files[os.path.relpath(p, out)] = os.path.getsize(p)
            total += os.path.getsize(p)
    SUMMARY["files"] = files
    SUMMARY["total_bytes"] = total
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(SUMMARY, fh, indent=2, default=str)
        fh.write("\n")
    log("\n=== summary ===")
    for name, m in SUMMARY["models"].items():
        for p, r in m["prompts"].items():
            worst = max((v for v in r["checks"].values() if isinstance(v, float)), default=0.0)
            log(f"{name:14s} {p:15s} T={r['T']:3d} max|logit|={r['max_abs_logit']:8.3f} worst check diff={worst:.2e}")
    for s in SUMMARY["skipped"] + SUMMARY["notes"]:
        log(s)
    log(f"{len(files)} files, {total / 1e6:.2f} MB under {out}")
    if SUMMARY["errors"]:
        log(f"ERRORS ({len(SUMMARY['errors'])}): {', '.join(SUMMARY['errors'])} -- details in summary.json")
        sys.exit(1)


if __name__ == "__main__":
    main()
