"""An HF folder with another model's config and tokenizer but random weights.

    python benchmarks/random_weights.py SRC OUT

For benchmarks on a machine that cannot be given the real weights (a GPU machine with no route
to the model's files): the same shapes, FLOPs and bytes, and with EOS ignored the same token
counts. SRC is an HF folder, e.g. llmscale's converted copy of the default model.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("src", type=Path, help="HF folder whose config and tokenizer to copy")
    ap.add_argument("out", type=Path, help="folder to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.src / "config.json").is_file():
        ap.error(f"{args.src} has no config.json: pass an HF model folder")
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.src)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (args.src / name).is_file():
            shutil.copy(args.src / name, args.out / name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
