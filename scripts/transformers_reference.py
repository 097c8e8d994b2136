"""Makes a reference.safetensors with Hugging Face transformers for each checkpoint folder given.

For checking what Cascade writes: transformers must load the folder as it is (AutoModelForCausalLM,
no custom code), and its float32 logits and hidden states become the reference that
`node scripts/check-references.ts DIR=OUT/NAME/reference.safetensors` compares the engine with.

    python3 scripts/transformers_reference.py DIR [DIR ...] --out OUT [--length 24] [--seed 0]
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def reference(path, out, length, seed):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, length), generator=generator)
    with torch.no_grad():
        result = model(input_ids=ids, output_hidden_states=True)
    tensors = {"input_ids": ids.to(torch.int32), "logits": result.logits.float().contiguous()}
    for i, state in enumerate(result.hidden_states):
        tensors[f"hidden_states.{i}"] = state.float().contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    return {"model": path, "class": type(model).__name__, "dtype_on_disk": str(model.config.dtype), "vocab": vocab}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in args.dirs:
        info = reference(path, os.path.join(args.out, os.path.basename(os.path.normpath(path))), args.length, args.seed)
        print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
