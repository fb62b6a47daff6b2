"""LoRA on torch's nn.TransformerEncoder (nn.MultiheadAttention): loralab vs HF PEFT vs the frozen base.

A BERT-base-like encoder stack (12 layers of width 768, random weights), LoRA r=16 on each attention (its packed input
projection and out_proj, as targeting the attention adapts both) and on linear1/linear2. A train
step is a forward and a backward; the floor is the frozen base's forward and backward with the input
requiring its gradient (as in bench/train_step.py). Here the adapted models read below the floor: torch
runs the frozen attention's input projection as a batched matmul over an expanded weight (it does not
fold a non-contiguous input that needs its gradient against a weight that needs none), about twice as
slow as the folded matmul it runs once the weight W + ΔW needs a gradient (profiled: 116 vs 57 ms
for the forward product over 4 layers). Both libraries run the attention with W + ΔW in its weights (PEFT by merging
and unmerging around every forward, loralab by passing the adapted weights to the attention's own
forward). Run: `.venv/bin/python bench/attention.py`.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import interleaved, markdown_table
from peft import LoraConfig, get_peft_model
from torch import nn

import loralab as ll

TARGETS = ["self_attn", "linear1", "linear2"]


class Encoder(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        block = nn.TransformerEncoderLayer(width, width // 64, 4 * width, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


def step(model: nn.Module, x: torch.Tensor):
    trained = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        model(x).square().mean().backward()
        for p in (*trained, x):
            p.grad = None

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=11, help="one step per contender per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Encoder(args.width, args.layers).requires_grad_(False)
    ours = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(r=16, alpha=32, targets=TARGETS))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    x = torch.randn(args.batch, args.seq, args.width)
    floor_x = x.clone().requires_grad_(True)
    times = interleaved({"floor": step(base, floor_x), "loralab": step(ours, x), "peft": step(theirs, x)}, "floor",
                        rounds=args.rounds, repeats=1, warmup=2)
    print(f"nn.TransformerEncoder, width {args.width}, {args.layers} layers, batch {args.batch}x{args.seq}, LoRA r=16 "
          f"on {', '.join(TARGETS)}, CPU, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
    print(markdown_table(["contender", "train step / floor", "step"],
                         [[k, f"{v['ratio']:.3f}x", f"{v['seconds'] * 1000:.1f} ms"] for k, v in times.items()]))
    print(f"loralab / PEFT: {times['loralab']['ratio'] / times['peft']['ratio']:.3f}x")


if __name__ == "__main__":
    main()
