"""The expected result of `cascade eval` on image data lines, from transformers.

For the tiny vision models of test/fixtures/vision, a JSONL file whose lines carry token ids with one
[IMG] placeholder per image and the image files beside them; each placeholder expanded into the
image's token grid as PixtralProcessor does, the images preprocessed by PixtralImageProcessor (PIL
backend: patch 4 x merge 2, longest edge 32), the model run in float32 on the CPU, and the mean
next-token NLL over the targets that are not image tokens ([IMG], [IMG_BREAK], [IMG_END]).

    python3 scripts/make-vision-eval-fixture.py
writes test/fixtures/vision/eval/ and the processor's preprocessor_config.json into the two models' folders.
"""
import json
import os

import torch
from PIL import Image
from transformers import Mistral3ForConditionalGeneration, PixtralImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "vision")
OUT = os.path.join(ROOT, "eval")
IMG, IMG_BREAK, IMG_END = 10, 12, 13
PATCH, MERGE, LONGEST_EDGE = 4, 2, 32

# Token ids with one [IMG] per image; images by file name under ../processor/images.
LINES = [
    {"input_ids": [1, 3, IMG, 20, 21, 22, 4, 30, 31, 32, 2], "images": ["gradient-w37-h23.png"]},
    {"input_ids": [1, 3, IMG, 40, IMG, 41, 4, 50, 51], "images": ["shapes-w64-h64.png", "gray-L-w20-h45.png"]},
    {"input_ids": [1, 60, 61, 62, 63, 64]},
    {"input_ids": [1, 3, 70, IMG, 4, 71, 72], "images": ["rgba-w50-h20.png"]},
]


def grid(height, width):
    """PixtralProcessor's expansion of one [IMG]: rows of [IMG] each closed by [IMG_BREAK], the last by [IMG_END]."""
    rows, cols = height // (PATCH * MERGE), width // (PATCH * MERGE)
    tokens = ([IMG] * cols + [IMG_BREAK]) * rows
    tokens[-1] = IMG_END
    return tokens


def main():
    os.makedirs(OUT, exist_ok=True)
    processor = PixtralImageProcessorPil(patch_size={"height": PATCH, "width": PATCH}, size={"longest_edge": LONGEST_EDGE})
    data = []
    for line in LINES:
        entry = {"input_ids": line["input_ids"]}
        if "images" in line:
            entry["images"] = [f"../processor/images/{name}" for name in line["images"]]
        data.append(entry)
    with open(os.path.join(OUT, "data.jsonl"), "w") as f:
        for entry in data:
            f.write(json.dumps(entry) + "\n")

    expected = {"rule": "mean NLL over next-token targets that are not [IMG], [IMG_BREAK] or [IMG_END]", "models": {}}
    for name in ("vl-tiny", "vl-ministral3"):
        # The processor's settings beside the model, as transformers saves them (preprocessor_config.json).
        processor.save_pretrained(os.path.join(ROOT, name))
        model = Mistral3ForConditionalGeneration.from_pretrained(os.path.join(ROOT, name), attn_implementation="eager").eval()
        nll, tokens = 0.0, 0
        for line in LINES:
            ids, pixel_values, sizes = [], None, []
            images = [Image.open(os.path.join(ROOT, "processor", "images", n)) for n in line.get("images", [])]
            if images:
                processed = processor(images=images, patch_size=PATCH * MERGE, return_tensors="pt")
                pixel_values = processed["pixel_values"]
                sizes = [tuple(int(x) for x in s) for s in processed["image_sizes"]]
            it = iter(sizes)
            for token in line["input_ids"]:
                ids.extend(grid(*next(it)) if token == IMG else [token])
            input_ids = torch.tensor([ids])
            with torch.no_grad():
                kwargs = {} if pixel_values is None else {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes)}
                logits = model(input_ids=input_ids, **kwargs).logits[0].double()
            log_probs = torch.log_softmax(logits[:-1], dim=-1)
            targets = input_ids[0, 1:]
            keep = ~torch.isin(targets, torch.tensor([IMG, IMG_BREAK, IMG_END]))
            nll -= float(log_probs[torch.arange(len(targets)), targets][keep].sum())
            tokens += int(keep.sum())
        expected["models"][name] = {"nll": nll / tokens, "tokens": tokens}
        print(name, expected["models"][name])
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)


if __name__ == "__main__":
    main()
