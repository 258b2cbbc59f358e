"""Quantize a model directory with GPTQModel itself (W4 g32, sym or asym, on random token windows) and save its
checkpoint: the "checkpoint made by another tool" that quantlm must read. Runs in GPTQModel's venv.

    python gptqmodel_quantize.py MODEL_DIR OUT_DIR sym|asym
"""

import sys

import torch
from gptqmodel import GPTQModel, QuantizeConfig


def main():
    source, out, grid = sys.argv[1], sys.argv[2], sys.argv[3]
    config = QuantizeConfig(bits=4, group_size=32, sym=grid == "sym", desc_act=False)
    model = GPTQModel.load(source, config, device="cpu")
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 256, (1, 64), generator=g) for _ in range(8)]
    model.quantize([{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows], batch_size=1)
    model.save(out)


if __name__ == "__main__":
    main()
