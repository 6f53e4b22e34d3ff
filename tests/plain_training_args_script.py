"""An unmodified TrainingArguments script (nothing of coupled_adam_hf in it): parse, build a Trainer, report."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=8, bos_token_id=0,
                                   eos_token_id=0))
optimizer = Trainer(model=model, args=args).create_optimizer()
coupled = [name for group in optimizer.param_groups if group.get("coupled") for name in group["param_names"]]
print(f"optimizer={type(optimizer).__name__} coupled={','.join(coupled)} torch={torch.__version__}")
