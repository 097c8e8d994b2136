#!/usr/bin/env python3
"""Generate reference fixtures for Cascade with Hugging Face transformers.

Runs on the GPU machine (torch 2.11, transformers 5.17), but computes everything on the CPU in
float32 with eager attention, so that the numbers are as exact and reproducible as possible.

Usage (from the repository root):

    python3 scripts/make_references.py --out OUTDIR [--tiny-mistral DIR] [--sources FILE]
        [--existing MODEL_DIR ...] [--only NAME ...]

Writes OUTDIR/fixtures/<variant>/ (what save_pretrained writes + reference*.safetensors),
OUTDIR/fixtures/rope-probe.json (RoPE test vectors), OUTDIR/report.json (self-checks) and, with
--sources, a dump of the transformers source that the notes in docs/transformers-notes.md summarise.

Every variant is also recomputed by an independent float64 implementation written from
docs/transformers-notes.md (`manual_forward` below); report.json records the largest differences,
which is how the written spec was checked against transformers.

--existing takes a model folder that Cascade wrote (e.g. test/fixtures/mistral-long-phase, made by
scripts/make_long_phase_fixture.ts), copies it to OUTDIR/fixtures/<its name>/ and adds references
computed by loading it as transformers does (AutoModelForCausalLM picks the class config.json names).
--only NAME runs only the named steps (variant names, "rope-probe", or an --existing folder's name).
"""

import argparse
import glob
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import traceback

import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    AutoModelForCausalLM,
    Ministral3Config,
    Ministral3ForCausalLM,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PixtralVisionConfig,
)

torch.set_grad_enabled(False)
DEVICE = torch.device("cpu")
PAD_ID = 11
BOS_ID = 1
REPORT = {"transformers": transformers.__version__, "torch": torch.__version__, "variants": {}, "errors": {}}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# weight initialisation: bigger than initializer_range so that logits vary visibly
# ----------------------------------------------------------------------------------------------
def init_weights(model, seed, std=0.15):
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim == 1 and name.endswith(".weight"):  # RMSNorm weights: around 1, but not exactly 1
            p.data.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:  # biases (a Mistral 3 projector's, with multimodal_projector_bias)
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            s = 0.5 if "embed_tokens" in name else std
            p.data.copy_(s * torch.randn(p.shape, generator=g))


def make_inputs(seed, B, T, vocab):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g, dtype=torch.int64)
    ids[:, 0] = BOS_ID
    return ids


# ----------------------------------------------------------------------------------------------
# running transformers
# ----------------------------------------------------------------------------------------------
def load_hf(path, cls):
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def nll_from_logits(logits, ids, mask):
    """Mean over all (sequence, position t>=1 that is not padding) of -log softmax(logits[t-1])[ids[t]]."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    tot, n = 0.0, 0
    B, T = ids.shape
    for b in range(B):
        L = int(mask[b].sum())
        for t in range(1, L):
            tot += -float(lp[b, t - 1, ids[b, t]])
            n += 1
    return torch.tensor([tot / n], dtype=torch.float32)


def run_hf(model, ids, mask, position_ids=None):
    kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    if position_ids is not None:
        kw["position_ids"] = position_ids
    out = model(**kw)
    ref = {
        "input_ids": ids.to(torch.int32).contiguous(),
        "attention_mask": mask.to(torch.int32).contiguous(),
        "logits": out.logits.float().contiguous(),
    }
    for i, h in enumerate(out.hidden_states):
        ref[f"hidden_states.{i}"] = h.float().contiguous()
    ref["nll"] = nll_from_logits(out.logits, ids, mask)
    if position_ids is not None:
        ref["position_ids"] = position_ids.to(torch.int32).contiguous()
    return ref, len(out.hidden_states)


# ----------------------------------------------------------------------------------------------
# independent float64 implementation of the spec in docs/transformers-notes.md
# ----------------------------------------------------------------------------------------------
def read_rope(cfg):
    """rope parameters dict, from rope_parameters or legacy rope_theta + rope_scaling."""
    rp = cfg.get("rope_parameters")
    if rp is None:
        rp = dict(cfg.get("rope_scaling") or {})
        rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp = dict(rp)
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def spec_inv_freq(cfg):
    rp = read_rope(cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dim = int(head_dim * rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    base = float(rp["rope_theta"])
    p = [base ** (2 * i / dim) for i in range(dim // 2)]
    if rp["rope_type"] == "default":
        return torch.tensor([1.0 / x for x in p], dtype=torch.float64), 1.0
    assert rp["rope_type"] == "yarn", rp
    orig = rp.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    factor = rp.get("factor")
    if factor is None:
        factor = cfg["max_position_embeddings"] / orig

    def get_mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    af = rp.get("attention_factor")
    if af is None:
        ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
        af = get_mscale(factor, ms) / get_mscale(factor, msa) if (ms and msa) else get_mscale(factor)
    bf = rp.get("beta_fast") or 32
    bs = rp.get("beta_slow") or 1

    def cdim(r):
        return dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = cdim(bf), cdim(bs)
    if rp.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    inv = []
    for i in range(dim // 2):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        inv.append((1.0 / (factor * p[i])) * ramp + (1.0 / p[i]) * (1.0 - ramp))
    return torch.tensor(inv, dtype=torch.float64), float(af)


def manual_forward(weights, cfg, ids, mask, position_ids=None, llama4_positions="position"):
    W = {k: v.double() for k, v in weights.items()}
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    L = cfg["num_hidden_layers"]
    rp = read_rope(cfg)
    B, T = ids.shape
    cache_pos = torch.arange(T, dtype=torch.float64)[None].expand(B, T)
    pos = cache_pos if position_ids is None else position_ids.double()
    inv, af = spec_inv_freq(cfg)
    ang = pos[..., None] * inv  # [B,T,hd/2]
    ang = torch.cat([ang, ang], -1)
    cos, sin = (ang.cos() * af)[:, None], (ang.sin() * af)[:, None]  # [B,1,T,hd]

    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat([-x2, x1], -1)

    def norm(x, w):
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))

    beta = rp.get("llama_4_scaling_beta") if cfg.get("model_type") == "ministral3" else None
    if beta is not None:
        lp = cache_pos if llama4_positions == "cache" else pos
        q_scale = (1 + beta * torch.log(1 + torch.floor(lp / rp["original_max_position_embeddings"])))[:, None, :, None]
    else:
        q_scale = 1.0
    i_idx = torch.arange(T)[:, None]
    j_idx = torch.arange(T)[None, :]
    allowed = (j_idx <= i_idx)[None] & (mask[:, None, :] > 0)  # [B,T,T]
    sw = cfg.get("sliding_window")
    if sw is not None:
        allowed = allowed & ((i_idx - j_idx) < sw)[None]
    bias = torch.where(allowed, 0.0, float("-inf"))[:, None]

    h = W["model.embed_tokens.weight"][ids]
    hs = [h]
    for l in range(L):
        p = f"model.layers.{l}."
        x = norm(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        q = q * q_scale
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        s = (q @ k.transpose(-1, -2)) * hd**-0.5 + bias
        a = torch.softmax(s, -1) @ v
        a = a.transpose(1, 2).reshape(B, T, H * hd)
        h = h + a @ W[p + "self_attn.o_proj.weight"].T
        x = norm(h, W[p + "post_attention_layernorm.weight"])
        g = x @ W[p + "mlp.gate_proj.weight"].T
        u = x @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
        hs.append(h)
    hs[-1] = norm(h, W["model.norm.weight"])
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    logits = hs[-1] @ lm.T
    return logits, hs


def load_weights(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    W = {}
    for f in files:
        if os.path.basename(f).startswith("reference"):
            continue
        W.update(load_file(f))
    return W


def compare(ref, path, cfg, position_ids=None, llama4_positions="position"):
    W = load_weights(path)
    ids = ref["input_ids"].long()
    mask = ref["attention_mask"].long()
    logits, hs = manual_forward(W, cfg, ids, mask, position_ids, llama4_positions)
    m = mask.bool()
    res = {
        # compare only real (non-pad) positions; pad positions are reported separately
        "logits_maxabs_real": float((logits - ref["logits"].double())[m].abs().max()),
        "logits_maxabs_all": float((logits - ref["logits"].double()).abs().max()),
        "logits_absmax": float(ref["logits"].abs().max()),
        "hidden_maxabs_real": [float((hs[i] - ref[f"hidden_states.{i}"].double())[m].abs().max()) for i in range(len(hs))],
        "nll_ref": float(ref["nll"][0]),
        "nll_manual": float(nll_from_logits(logits, ids, mask)[0]),
        "logits_std_over_positions": float(ref["logits"].double().std(dim=1).mean()),
    }
    return res


# ----------------------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------------------
def mistral_cfg(**kw):
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    base.update(kw)
    return MistralConfig(**base)


MINISTRAL_ROPE = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 1000000.0,
    "llama_4_scaling_beta": 0.1,
}


def ministral_cfg(**kw):
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters=dict(MINISTRAL_ROPE), tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=11,
    )
    base.update(kw)
    return Ministral3Config(**base)


def save_padded_reference(model, ids, path):
    """reference-padded.safetensors: row 1 loses its last 5 tokens to right padding."""
    T = ids.shape[1]
    idsp = ids.clone()
    maskp = torch.ones_like(ids)
    maskp[1, T - 5 :] = 0
    idsp[1, T - 5 :] = PAD_ID
    refp, _ = run_hf(model, idsp, maskp)
    save_file(refp, os.path.join(path, "reference-padded.safetensors"), metadata={"format": "pt"})
    return refp


def references(name, path, cls, T, seed, extra=None):
    model = load_hf(path, cls)
    cfg = json.load(open(os.path.join(path, "config.json")))
    vocab = cfg["vocab_size"]
    ids = make_inputs(seed, 2, T, vocab)
    mask = torch.ones_like(ids)
    ref, nh = run_hf(model, ids, mask)
    save_file(ref, os.path.join(path, "reference.safetensors"), metadata={"format": "pt"})
    info = {"n_hidden_states": nh, "num_hidden_layers": cfg["num_hidden_layers"], "config": cfg}
    info["check_unpadded"] = compare(ref, path, cfg)
    refp = save_padded_reference(model, ids, path)
    info["check_padded"] = compare(refp, path, cfg)
    info["padded_row0_equals_unpadded_row0_maxabs"] = float((refp["logits"][0] - ref["logits"][0]).abs().max())
    info["padded_row1_real_vs_unpadded_maxabs"] = float(
        (refp["logits"][1, : T - 5] - ref["logits"][1, : T - 5]).abs().max()
    )
    # hf inv_freq / attention scaling vs spec
    rot = model.model.rotary_emb
    inv_spec, af_spec = spec_inv_freq(cfg)
    info["rope"] = {
        "hf_inv_freq": rot.inv_freq.double().tolist(),
        "hf_attention_scaling": float(rot.attention_scaling),
        "spec_inv_freq": inv_spec.tolist(),
        "spec_attention_factor": af_spec,
        "inv_freq_max_rel_diff": float(((rot.inv_freq.double() - inv_spec) / inv_spec).abs().max()),
        "hf_config_rope_parameters": dict(model.config.rope_parameters) if model.config.rope_parameters else None,
    }
    if extra:
        extra(model, path, cfg, ids, mask, info)
    files = sorted(os.listdir(path))
    info["files"] = {f: os.path.getsize(os.path.join(path, f)) for f in files}
    REPORT["variants"][name] = info
    log(name, json.dumps({k: v for k, v in info.items() if k.startswith("check")}, indent=None)[:800])


def ministral_extra(model, path, cfg, ids, mask, info):
    """Positions shifted by 8 via explicit position_ids: shows which positions llama_4 scaling uses."""
    B, T = ids.shape
    pos = torch.arange(T)[None].expand(B, T) + 8
    ref, _ = run_hf(model, ids, mask, position_ids=pos)
    save_file(ref, os.path.join(path, "reference-shifted-positions.safetensors"), metadata={"format": "pt"})
    info["check_shifted_llama4_by_cache_position"] = compare(ref, path, cfg, pos, "cache")
    info["check_shifted_llama4_by_position_ids"] = compare(ref, path, cfg, pos, "position")


def build_and_save(name, outdir, model_cls, config, seed, T, dtype=None, shard=None, extra=None):
    path = os.path.join(outdir, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    torch.manual_seed(seed)
    model = model_cls(config)
    init_weights(model, seed)
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
        try:
            model.config.dtype = dtype
        except Exception:  # noqa: BLE001
            pass
    if shard:
        try:
            model.save_pretrained(path, max_shard_size=shard)
        except Exception:  # noqa: BLE001
            REPORT["errors"][name + ":max_shard_size"] = traceback.format_exc()
            model.save_pretrained(path)
        if not glob.glob(os.path.join(path, "*.index.json")):
            manual_shard(path)
    else:
        model.save_pretrained(path)
    if dtype is not None:  # make sure config.json names the storage dtype
        cp = os.path.join(path, "config.json")
        cfg = json.load(open(cp))
        want = str(dtype).split(".")[-1]
        if cfg.get("dtype") != want:
            REPORT["errors"][name + ":dtype_patched"] = f"config.json dtype was {cfg.get('dtype')!r}"
            cfg["dtype"] = want
            with open(cp, "w") as fh:
                json.dump(cfg, fh, indent=2, sort_keys=True)
                fh.write("\n")
    references(name, path, model_cls, T, seed + 1000, extra)
    return path


def manual_shard(path):
    """Fallback if save_pretrained did not shard: split model.safetensors in two like HF does."""
    f = os.path.join(path, "model.safetensors")
    W = load_file(f)
    names = sorted(W)
    half = len(names) // 2
    parts = [names[:half], names[half:]]
    wm, total = {}, 0
    for i, part in enumerate(parts):
        fn = f"model-{i+1:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: W[k].contiguous() for k in part}, os.path.join(path, fn), metadata={"format": "pt"})
        for k in part:
            wm[k] = fn
            total += W[k].numel() * W[k].element_size()
    os.remove(f)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, fh, indent=2, sort_keys=True)
        fh.write("\n")
    REPORT["errors"]["manual_shard_used:" + os.path.basename(path)] = "save_pretrained wrote no index"


def legacy_variant(outdir, src_name, name, T, seed):
    """Copy of ministral3-yarn with config.json rewritten to legacy rope_theta + rope_scaling."""
    src = os.path.join(outdir, src_name)
    dst = os.path.join(outdir, name)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for f in os.listdir(src):
        if not f.startswith("reference"):
            shutil.copy(os.path.join(src, f), dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp.pop("rope_type", None)
    rp["type"] = "yarn"
    cfg["rope_scaling"] = rp
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")
    references(name, dst, Ministral3ForCausalLM, T, seed)
    # same weights and inputs as src: the references must agree if the legacy form is read identically
    a = load_file(os.path.join(src, "reference.safetensors"))
    b = load_file(os.path.join(dst, "reference.safetensors"))
    REPORT["variants"][name]["logits_vs_" + src_name + "_maxabs"] = float((a["logits"] - b["logits"]).abs().max())
    REPORT["variants"][name]["hf_config_after_load_roundtrip"] = Ministral3Config.from_pretrained(dst).to_dict()


def existing_variant(outdir, src, T, seed):
    """References for a model folder Cascade saved: loaded by AutoModelForCausalLM from its config.json."""
    name = os.path.basename(os.path.normpath(src))
    dst = os.path.join(outdir, name)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reference*"))

    def loaded_as(model, path, cfg, ids, mask, info):
        info["loaded_class"] = type(model).__name__

    references(name, dst, AutoModelForCausalLM, T, seed, extra=loaded_as)


def tiny_mistral_padded(outdir, src):
    name = "tiny-mistral-padded"
    dst = os.path.join(outdir, name)
    os.makedirs(dst, exist_ok=True)
    model = load_hf(src, MistralForCausalLM)
    cfg = json.load(open(os.path.join(src, "config.json")))
    shared = load_file(os.path.join(src, "reference.safetensors"))
    ids = shared["input_ids"].long()
    ref, _ = run_hf(model, ids, torch.ones_like(ids))
    info = {"reproduces_shared_reference_maxabs": float((ref["logits"] - shared["logits"]).abs().max())}
    refp = save_padded_reference(model, ids, dst)
    info["check_padded"] = compare(refp, src, cfg)
    info["nll_unpadded_shared_inputs"] = float(ref["nll"][0])
    REPORT["variants"][name] = info
    log(name, info)


def tiny_pixtral():
    return PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               head_dim=16, image_size=32, patch_size=8)


def mistral3_cfg(tie, text_tie):
    """Mistral3Config around a 2-layer ministral3 text model; tie=None leaves the top-level field out."""
    text = ministral_cfg(num_hidden_layers=2, intermediate_size=96, tie_word_embeddings=text_tie)
    kw = {} if tie is None else {"tie_word_embeddings": tie}
    return Mistral3Config(vision_config=tiny_pixtral(), text_config=text, **kw)


def mistral3_variant(outdir, name, T, seed):
    """Mistral3ForConditionalGeneration (tiny Pixtral tower, untied ministral3 text model) on text tokens only.

    save_pretrained may write other tensor names than the model's modules have (transformers 5 writes
    those of 4.x before 4.52); both layouts are checked to give the same logits, and the text model
    alone, saved as a bare Ministral3ForCausalLM, is checked against transformers and the float64 spec.
    """
    path = os.path.join(outdir, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(mistral3_cfg(False, False))
    init_weights(model, seed)
    model.save_pretrained(path)
    model = load_hf(path, Mistral3ForConditionalGeneration)
    cfg = json.load(open(os.path.join(path, "config.json")))
    text_cfg = cfg["text_config"]
    ids = make_inputs(seed + 1000, 2, T, text_cfg["vocab_size"])
    mask = torch.ones_like(ids)
    ref, nh = run_hf(model, ids, mask)
    save_file(ref, os.path.join(path, "reference.safetensors"), metadata={"format": "pt"})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    info = {
        "n_hidden_states": nh,
        "config": cfg,
        "saved_tensors": {k: list(v.shape) for k, v in sorted(load_weights(path).items())},
        "module_tensors": sorted(state),
    }
    with tempfile.TemporaryDirectory() as scratch:
        modules = os.path.join(scratch, "module-names")
        os.makedirs(modules)
        save_file(state, os.path.join(modules, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(path, "config.json"), modules)
        again, loading = Mistral3ForConditionalGeneration.from_pretrained(
            modules, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        info["module_names_loading_info"] = {k: sorted(map(str, v)) for k, v in loading.items()}
        info["module_names_logits_maxabs"] = float((run_hf(again.eval(), ids, mask)[0]["logits"] - ref["logits"]).abs().max())
        bare = os.path.join(scratch, "bare")
        os.makedirs(bare)
        prefix = "model.language_model."
        text = {"model." + k[len(prefix) :] if k.startswith(prefix) else k: v
                for k, v in state.items() if k.startswith(prefix) or k == "lm_head.weight"}
        save_file(text, os.path.join(bare, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(bare, "config.json"), "w") as fh:
            json.dump(text_cfg, fh)
        info["check_text_model_spec"] = compare(ref, bare, text_cfg)
        bare_ref, _ = run_hf(load_hf(bare, Ministral3ForCausalLM), ids, mask)
        info["logits_vs_bare_text_model_maxabs"] = float((bare_ref["logits"] - ref["logits"]).abs().max())
    info["tying"] = mistral3_tying_probe()
    info["files"] = {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    REPORT["variants"][name] = info
    log(name, json.dumps({k: v for k, v in info.items() if k not in ("config", "saved_tensors", "module_tensors")})[:3000])


def mistral3_tying_probe():
    """Which tie_word_embeddings (top level, absent, or text_config's) ties lm_head to the embeddings."""
    out = {}
    for tie in (None, False, True):
        for text_tie in (False, True):
            c = mistral3_cfg(tie, text_tie)
            m = Mistral3ForConditionalGeneration(c)
            out[f"top={tie},text={text_tie}"] = {
                "tied": m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr(),
                "top_level_in_to_dict": c.to_dict().get("tie_word_embeddings", "absent"),
            }
    return out


# ----------------------------------------------------------------------------------------------
# RoPE probe: inv_freq / attention scaling for several configurations (unit-test vectors)
# ----------------------------------------------------------------------------------------------
def rope_probe(outdir):
    from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding

    base = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=1, intermediate_size=192)
    cases = {
        "tiny-yarn": dict(head_dim=32, max_position_embeddings=64, rope_parameters=dict(MINISTRAL_ROPE)),
        "tiny-yarn-truncate-false": dict(head_dim=32, max_position_embeddings=64,
                                         rope_parameters={**MINISTRAL_ROPE, "truncate": False}),
        "tiny-yarn-maxpos-128": dict(head_dim=32, max_position_embeddings=128, rope_parameters=dict(MINISTRAL_ROPE)),
        "tiny-yarn-no-mscale": dict(head_dim=32, max_position_embeddings=64,
                                    rope_parameters={k: v for k, v in MINISTRAL_ROPE.items() if k not in ("mscale", "mscale_all_dim")}),
        "tiny-yarn-mscale-0.707-all-0": dict(head_dim=32, max_position_embeddings=64,
                                             rope_parameters={**MINISTRAL_ROPE, "mscale": 0.707, "mscale_all_dim": 0.0}),
        "tiny-yarn-mscale-1-all-0.5": dict(head_dim=32, max_position_embeddings=64,
                                           rope_parameters={**MINISTRAL_ROPE, "mscale": 1.0, "mscale_all_dim": 0.5}),
        "tiny-yarn-attention-factor-1.3": dict(head_dim=32, max_position_embeddings=64,
                                               rope_parameters={**MINISTRAL_ROPE, "attention_factor": 1.3}),
        "tiny-yarn-theta-1e4-orig-256": dict(head_dim=32, max_position_embeddings=1024,
                                             rope_parameters={**MINISTRAL_ROPE, "rope_theta": 10000.0,
                                                              "original_max_position_embeddings": 256}),
        "tiny-default": dict(head_dim=32, max_position_embeddings=64,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "ministral3-real-3b-8b-14b": dict(head_dim=128, max_position_embeddings=262144,
                                          rope_parameters={**MINISTRAL_ROPE, "factor": 16.0,
                                                           "original_max_position_embeddings": 16384}),
        "ministral3-default-config": dict(head_dim=128, max_position_embeddings=262144, rope_parameters=None),
    }
    out = {}
    for name, kw in cases.items():
        try:
            c = Ministral3Config(**{**base, **kw})
            cfgd = c.to_dict()
            r = Ministral3RotaryEmbedding(c)
            inv_spec, af_spec = spec_inv_freq(cfgd)
            out[name] = {
                "config_rope_parameters": cfgd.get("rope_parameters"),
                "head_dim": c.head_dim,
                "max_position_embeddings": c.max_position_embeddings,
                "inv_freq": r.inv_freq.double().tolist(),
                "inv_freq_float32_hex": [float(x).hex() for x in r.inv_freq.tolist()],
                "attention_scaling": float(r.attention_scaling),
                "spec_inv_freq_max_rel_diff": float(((r.inv_freq.double() - inv_spec) / inv_spec).abs().max()),
                "spec_attention_factor": af_spec,
            }
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": repr(e), "traceback": traceback.format_exc()}
    # how head_dim defaults: missing key vs explicit null, for both config classes
    hd = {}
    small = {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512}
    for cls, mt in ((Ministral3Config, "ministral3"), (MistralConfig, "mistral")):
        for label, extra in (("missing", {}), ("null", {"head_dim": None})):
            try:
                hd[f"{mt}:{label}"] = cls.from_dict({**small, "model_type": mt, **extra}).head_dim
            except Exception as e:  # noqa: BLE001
                hd[f"{mt}:{label}"] = "error: " + repr(e)[:300]
    out["_head_dim_defaults"] = hd
    with open(os.path.join(outdir, "rope-probe.json"), "w") as fh:
        json.dump(out, fh, indent=1, sort_keys=True)
    REPORT["rope_probe_summary"] = {
        k: (v.get("error") if isinstance(v, dict) and "error" in v else
            ({"attention_scaling": v["attention_scaling"], "spec_diff": v["spec_inv_freq_max_rel_diff"],
              "spec_af": v["spec_attention_factor"]} if isinstance(v, dict) and "inv_freq" in v else v))
        for k, v in out.items() if not k.startswith("_m")
    }


# ----------------------------------------------------------------------------------------------
# source dump for docs/transformers-notes.md
# ----------------------------------------------------------------------------------------------
def dump_sources(path):
    import importlib

    mods = [
        "transformers.modeling_rope_utils",
        "transformers.models.ministral3.configuration_ministral3",
        "transformers.models.ministral3.modeling_ministral3",
        "transformers.models.mistral.configuration_mistral",
        "transformers.models.mistral.modeling_mistral",
        "transformers.models.mistral3.configuration_mistral3",
        "transformers.models.mistral3.modeling_mistral3",
        "transformers.conversion_mapping",
        "transformers.masking_utils",
        "transformers.integrations.sdpa_attention",
    ]
    with open(path, "w") as fh:
        for m in mods:
            try:
                mod = importlib.import_module(m)
                fh.write(f"\n\n######## MODULE {m} ({inspect.getsourcefile(mod)})\n")
                fh.write(inspect.getsource(mod))
            except Exception as e:  # noqa: BLE001
                fh.write(f"\n\n######## MODULE {m}: ERROR {e!r}\n")
        # rope / config bits from configuration_utils
        try:
            from transformers import configuration_utils as cu

            src = inspect.getsource(cu)
            fh.write("\n\n######## configuration_utils: lines mentioning rope/head_dim/dtype (with context)\n")
            lines = src.splitlines()
            keep = set()
            for i, ln in enumerate(lines):
                if any(s in ln for s in ("rope", "head_dim", "dtype", "def to_dict", "def to_json", "def to_diff_dict")):
                    keep.update(range(max(0, i - 3), min(len(lines), i + 4)))
            prev = -2
            for i in sorted(keep):
                if i != prev + 1:
                    fh.write("  ...\n")
                fh.write(f"{i+1:5d}: {lines[i]}\n")
                prev = i
        except Exception as e:  # noqa: BLE001
            fh.write(f"configuration_utils ERROR {e!r}\n")
        # RoPE standardisation helpers, wherever they live
        try:
            import transformers.modeling_rope_utils as mru

            for nm in dir(mru):
                obj = getattr(mru, nm)
                if inspect.isclass(obj) and obj.__module__ == mru.__name__:
                    fh.write(f"\n# class {nm} in modeling_rope_utils (already above)\n")
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny-mistral", default=None)
    ap.add_argument("--sources", default=None)
    ap.add_argument("--existing", action="append", default=[], help="a model folder Cascade saved (repeatable)")
    ap.add_argument("--only", action="append", default=None, help="run only this step (repeatable)")
    args = ap.parse_args()
    fx = os.path.join(args.out, "fixtures")
    os.makedirs(fx, exist_ok=True)

    if args.sources:
        try:
            dump_sources(args.sources)
        except Exception:  # noqa: BLE001
            REPORT["errors"]["sources"] = traceback.format_exc()

    steps = [
        ("rope-probe", lambda: rope_probe(fx)),
        ("mistral-bf16", lambda: build_and_save("mistral-bf16", fx, MistralForCausalLM, mistral_cfg(), 101, 24,
                                                dtype=torch.bfloat16)),
        ("mistral-tied", lambda: build_and_save("mistral-tied", fx, MistralForCausalLM,
                                                mistral_cfg(tie_word_embeddings=True), 202, 24)),
        ("mistral-headdim", lambda: build_and_save("mistral-headdim", fx, MistralForCausalLM,
                                                   mistral_cfg(head_dim=32, num_hidden_layers=3), 303, 24)),
        ("mistral-mqa", lambda: build_and_save("mistral-mqa", fx, MistralForCausalLM,
                                               mistral_cfg(num_key_value_heads=1), 404, 24, shard="200KB")),
        ("ministral3-yarn", lambda: build_and_save("ministral3-yarn", fx, Ministral3ForCausalLM, ministral_cfg(),
                                                   505, 48, extra=ministral_extra)),
        ("ministral3-yarn-legacy", lambda: legacy_variant(fx, "ministral3-yarn", "ministral3-yarn-legacy", 48,
                                                          505 + 1000)),
        ("mistral3-wrapped", lambda: mistral3_variant(fx, "mistral3-wrapped", 24, 606)),
    ]
    if args.tiny_mistral:
        steps.append(("tiny-mistral-padded", lambda: tiny_mistral_padded(fx, args.tiny_mistral)))
    for i, src in enumerate(args.existing):
        # 48 tokens: past the original window of the long-phase fixture (12 positions) four times over.
        steps.append((os.path.basename(os.path.normpath(src)),
                      lambda src=src, i=i: existing_variant(fx, src, 48, 707 + 1000 + i)))
    if args.only is not None:
        steps = [(name, fn) for name, fn in steps if name in args.only]
        REPORT["only"] = [name for name, _ in steps]
    for name, fn in steps:
        try:
            fn()
        except Exception:  # noqa: BLE001
            REPORT["errors"][name] = traceback.format_exc()
            log("ERROR in", name, REPORT["errors"][name])
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(REPORT, fh, indent=1, sort_keys=True, default=str)
    log("errors:", list(REPORT["errors"].keys()))


if __name__ == "__main__":
    main()
