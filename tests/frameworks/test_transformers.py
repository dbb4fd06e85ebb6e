"""The HF transformers ``Trainer`` with signsgd optimisers, one CPU process, on a tiny Llama
built locally from a config (no hub download: HF_HUB_OFFLINE=1): the Trainer's training
equals the same steps written by hand, bit for bit.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers (and huggingface_hub) import

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the transformers extra is not "
                                   "installed (pip install -e '.[transformers]')")

import signsgd  # noqa: E402

STEPS, BATCH, LR = 4, 4, 3e-3


def tiny_llama() -> transformers.LlamaForCausalLM:
    """A 2-layer Llama of width 16 (no biases: a GPT-2 key bias has a gradient that is zero
    in exact arithmetic, so its sign is rounding noise that no two programs share)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.LlamaForCausalLM(config)


def samples() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (STEPS * BATCH, 12), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(tmp_path, **kwargs) -> transformers.TrainingArguments:
    """CPU, the samples in order, no logging, saving or progress bars."""
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=STEPS,
        per_device_train_batch_size=BATCH, train_sampling_strategy="sequential",
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **kwargs)


def by_hand(model, opt, sched, max_grad_norm: float = 0.0) -> list[torch.Tensor]:
    """The Trainer's loop written out: forward, backward, (clip), step, scheduler, zero."""
    data = samples()
    model.train()
    for step in range(STEPS):
        chunk = data[step * BATCH:(step + 1) * BATCH]
        batch = {k: torch.stack([s[k] for s in chunk]) for k in chunk[0]}
        # The Trainer divides the summed token loss by the tokens that count (not a mean
        # per batch: the same for any accumulation); the same sum here, the same bits.
        items = batch["labels"][..., 1:].ne(-100).sum()
        model(**batch, num_items_in_batch=items).loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        model.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def halving(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)


OPTIMISERS = {
    "signum": lambda params: signsgd.Signum(params, lr=LR, momentum=0.9, weight_decay=1e-3),
    "lion": lambda params: signsgd.Lion(params, lr=LR, betas=(0.9, 0.99), weight_decay=0.1),
    "signsgd": lambda params: signsgd.SignSGD(params, lr=LR),
}


@pytest.mark.parametrize(("name", "max_grad_norm"),
                         [("signum", 0.0), ("lion", 0.0), ("signsgd", 0.0), ("signum", 1.0)])
def test_trainer_with_our_optimiser_and_scheduler_equals_the_loop_by_hand(
        tmp_path, name, max_grad_norm):
    model, ref = tiny_llama(), tiny_llama()
    opt = OPTIMISERS[name](model.parameters())
    trainer = transformers.Trainer(
        model=model, args=arguments(tmp_path, max_grad_norm=max_grad_norm),
        train_dataset=samples(), optimizers=(opt, halving(opt)))
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert opt.param_groups[0]["lr"] == LR * 0.5 ** STEPS  # the scheduler stepped each step
    ref_opt = OPTIMISERS[name](ref.parameters())
    expected = by_hand(ref, ref_opt, halving(ref_opt), max_grad_norm)
    for (n, p), e in zip(model.named_parameters(), expected):
        assert torch.equal(p.detach(), e), f"{name}: {n} differs by {(p - e).abs().max()}"


def test_trainer_builds_signum_from_optimizer_cls_and_kwargs(tmp_path):
    # The Trainer makes the param groups (no weight decay on biases and LayerNorm) and its
    # own schedule (linear decay after warm-up) around our class.
    model, ref = tiny_llama(), tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=arguments(tmp_path, learning_rate=LR, weight_decay=0.01,
                                    warmup_steps=1, max_grad_norm=0.0),
        train_dataset=samples(),
        optimizer_cls_and_kwargs=(signsgd.Signum, {"lr": LR, "momentum": 0.9}))
    trainer.train()
    opt = trainer.optimizer.optimizer  # the Trainer's accelerate wrapper holds ours
    assert type(opt) is signsgd.Signum
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    decay = set(trainer.get_decay_parameter_names(ref))
    groups = [{"params": [p for n, p in ref.named_parameters() if n in decay],
               "weight_decay": 0.01},
              {"params": [p for n, p in ref.named_parameters() if n not in decay],
               "weight_decay": 0.0}]
    ref_opt = signsgd.Signum(groups, lr=LR, momentum=0.9)
    expected = by_hand(ref, ref_opt, transformers.get_linear_schedule_with_warmup(
        ref_opt, num_warmup_steps=1, num_training_steps=STEPS))
    for (n, p), e in zip(model.named_parameters(), expected):
        assert torch.equal(p.detach(), e), f"{n} differs by {(p - e).abs().max()}"
