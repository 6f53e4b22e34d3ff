"""AdamW vs Coupled Adam on Shakespeare: same model, seed and batches; only the embedding's second moment differs.

Trains a small GPT-2 (tied embeddings, learned positions) twice in a plain PyTorch loop and prints the
validation loss and the embedding mean-norm ratio ||mu|| / mean ||e_i|| of both runs.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import time

import torch
from tokenizers import ByteLevelBPETokenizer
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from coupled_adam_hf import CoupledAdam

DATA = os.path.join(os.path.dirname(__file__), "..", "coupled_adam_hf", "data", "shakespeare")


def read(split: str) -> str:
    with gzip.open(os.path.join(DATA, f"{split}.txt.gz"), "rt", encoding="utf-8") as f:
        return f.read()


def mean_norm_ratio(weight: torch.Tensor) -> float:
    e = weight.detach().double()
    return (e.mean(0).norm() / e.norm(dim=1).mean()).item()


def train(optim: str, ids: torch.Tensor, val: torch.Tensor, vocab: int, args) -> dict[str, float]:
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=vocab, n_positions=args.block, n_embd=256, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    wte = model.get_input_embeddings().weight
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p is not wte]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": [wte], "weight_decay": 0.0, "coupled": optim == "coupled_adam"},
              {"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = CoupledAdam(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup))))
    gen = torch.Generator().manual_seed(args.seed)
    n_blocks = (len(ids) - 1) // args.block
    blocks = ids[: n_blocks * args.block].view(n_blocks, args.block)
    bar = tqdm(range(args.steps), desc=optim, dynamic_ncols=True)
    for _ in bar:
        batch = blocks[torch.randint(n_blocks, (args.batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", mu_r=f"{mean_norm_ratio(wte):.3f}")
    model.eval()
    with torch.no_grad():
        vb = val[: (len(val) // args.block) * args.block].view(-1, args.block)[:64]
        val_loss = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in vb) / len(vb)
    return {"train_loss": loss.item(), "eval_loss": val_loss, "mean_norm_ratio": mean_norm_ratio(wte)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.time()
    tokenizer = ByteLevelBPETokenizer()
    train_text, val_text = read("train"), read("validation")
    tokenizer.train_from_iterator(train_text.splitlines(), vocab_size=args.vocab, show_progress=False)
    ids = torch.tensor(tokenizer.encode(train_text).ids)
    val = torch.tensor(tokenizer.encode(val_text).ids)
    vocab = tokenizer.get_vocab_size()
    results = {optim: train(optim, ids, val, vocab, args) for optim in ("adamw", "coupled_adam")}
    print(f"\n{'optimizer':<14}{'train loss':>12}{'eval loss':>12}{'||mu||^r':>12}")
    for optim, r in results.items():
        print(f"{optim:<14}{r['train_loss']:>12.3f}{r['eval_loss']:>12.3f}{r['mean_norm_ratio']:>12.3f}")
    print(f"({args.steps} steps of {args.batch}x{args.block} tokens each, {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
