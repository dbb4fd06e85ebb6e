"""The HF transformers ``Trainer`` with signsgd: ``optimizers=(Signum, scheduler)``.

    python examples/transformers_trainer.py

A tiny Llama built from a config (nothing is downloaded) learns to continue a repeating
pattern. ``max_grad_norm=0``: a sign step is already bounded by the learning rate, and
clipping would only reweight Signum's momentum.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import signsgd  # noqa: E402

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=2)
model = transformers.LlamaForCausalLM(config)
starts = torch.randint(3, 16, (512, 1))
ids = 3 + (starts + torch.arange(16)) % 13          # 3..15 counted upwards, wrapping
data = [{"input_ids": row, "labels": row} for row in ids]

steps = 120
opt = signsgd.Signum(model.parameters(), lr=3e-3, momentum=0.9, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
args = transformers.TrainingArguments(
    output_dir=tempfile.mkdtemp(), use_cpu=True, max_steps=steps,
    per_device_train_batch_size=16, max_grad_norm=0.0, report_to="none",
    save_strategy="no", logging_steps=40, disable_tqdm=True)
trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                               optimizers=(opt, sched))
trainer.train()
last = [log["loss"] for log in trainer.state.log_history if "loss" in log][-1]
print(f"Signum in the Trainer: loss {float(last):.3f} after {trainer.state.global_step} steps "
      "(guessing: ln 13 = 2.565)")
