"""An Accelerate `nlp_example`-style script, ported line by line with the migration guide.

`training_function` is the loop of Accelerate's examples (nlp_example.py with gradient
accumulation) and transformers' `run_glue_no_trainer.py` (completed steps, checkpoints),
written here in their style; every line carries, as a comment, the Accelerate line it
replaces, and each replacement is the one docs/migration_from_accelerate.md's table
gives. It runs on 2 real ranks and on 1 process: it trains (the loss falls), gathers the
evaluation metrics over exactly the evaluation set, checkpoints on completed steps, and
both runs end with the same parameters.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import accel
from accel.testing import run_world

transformers = pytest.importorskip("transformers")

VOCAB, PAD, CLS = 64, 0, 1
SEED = 42


class Sentences(Dataset):
    """Tokenised "sentences" of 6 to 12 tokens; label 1 uses the words below 34, 0 the rest."""

    def __init__(self, size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(size):
            length = int(torch.randint(6, 13, (), generator=gen))
            label = int(torch.randint(0, 2, (), generator=gen))
            low, high = (4, 34) if label else (34, VOCAB)
            words = torch.randint(low, high, (length,), generator=gen)
            self.rows.append((torch.cat([torch.tensor([CLS]), words]), label))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.rows[index]


def collate_fn(rows: list) -> dict[str, torch.Tensor]:
    """What a tokenizer's padding collator gives: ids, attention mask, labels."""
    ids = nn.utils.rnn.pad_sequence([ids for ids, _ in rows], batch_first=True,
                                    padding_value=PAD)
    ids = nn.functional.pad(ids, (0, 13 - ids.shape[1]), value=PAD)  # max_length padding
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(),
            "labels": torch.tensor([label for _, label in rows])}


def get_dataloaders(batch_size: int) -> tuple[DataLoader, DataLoader]:
    train = Sentences(128, seed=0)
    evaluation = Sentences(50, seed=1)  # 50: not a multiple of 2 ranks x 8
    return (DataLoader(train, shuffle=True, collate_fn=collate_fn, batch_size=batch_size),
            DataLoader(evaluation, shuffle=False, collate_fn=collate_fn, batch_size=8))


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def training_function(config: dict, args: dict) -> dict:
    # accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    ctx = accel.init(device="cpu" if args["cpu"] else None)
    lr, num_epochs = config["lr"], config["num_epochs"]
    batch_size, gradient_accumulation_steps = config["batch_size"], config["accumulation"]
    # set_seed(seed)
    accel.set_seed(SEED, ctx)
    # train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)
    train_dataloader, eval_dataloader = get_dataloaders(batch_size)
    model = tiny_bert()
    # model = model.to(accelerator.device)  (shard_model places it)
    # eps=1e-6 (RoBERTa's): the attention key biases have a zero gradient in exact
    # arithmetic (softmax ignores a shift of every score), and with eps=1e-8 Adam would
    # turn the float noise of that zero into full-size steps, different per batch split.
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=lr, eps=1e-6)

    # Accelerator(mixed_precision=args.mixed_precision): None is the launch's, else fp32
    model, ctx = accel.with_amp(model, ctx, dtype=args["mixed_precision"])
    # model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
    model, ctx = accel.shard_model(model, ctx)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    train_dataloader, ctx = accel.distribute_loader(train_dataloader, ctx)
    eval_dataloader, ctx = accel.distribute_loader(eval_dataloader, ctx)
    # Accelerator(gradient_accumulation_steps=...) + `with accelerator.accumulate(model):`
    model, optimizer, ctx = accel.accumulate_grads(
        model, optimizer, ctx, steps=gradient_accumulation_steps, loader=train_dataloader)
    # lr_scheduler = get_linear_schedule_with_warmup(...): built after distribute_loader,
    # in optimizer steps of this process, then accelerator.prepare(lr_scheduler)
    max_train_steps = num_epochs * math.ceil(len(train_dataloader) / gradient_accumulation_steps)
    lr_scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=2, num_training_steps=max_train_steps)
    lr_scheduler, ctx = accel.wrap_scheduler(lr_scheduler, ctx, optimizer)

    completed_steps, saved, epoch_losses, accuracies, seen = 0, [], [], [], []
    for epoch in range(num_epochs):
        model.train()
        total_loss = torch.zeros(())
        for batch in train_dataloader:
            # with accelerator.accumulate(model):  (no block: accumulate_grads did it)
            # batch.to(accelerator.device)  (distribute_loader moved it)
            outputs = model(**batch)
            loss = outputs.loss
            total_loss += loss.detach()
            # accelerator.backward(loss)
            accel.backward(loss, optimizer, ctx)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            # if accelerator.sync_gradients:
            if optimizer.sync_gradients:
                completed_steps += 1
            # if completed_steps % checkpointing_steps == 0 and accelerator.sync_gradients:
            if completed_steps % args["checkpointing_steps"] == 0 and optimizer.sync_gradients:
                output_dir = Path(args["output_dir"]) / f"step_{completed_steps}"
                # accelerator.save_state(output_dir)
                accel.save_state(output_dir, ctx, model=model, optimizer=optimizer,
                                 scheduler=lr_scheduler, loader=train_dataloader)
                saved.append(output_dir.name)
        # accelerator.reduce(total_loss, "mean")
        epoch_losses.append(accel.reduce(total_loss / len(train_dataloader), ctx).item())

        model.eval()
        correct = samples = 0
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            predictions = outputs.logits.argmax(dim=-1)
            # accelerator.gather_for_metrics((predictions, batch["labels"]))
            predictions, references = accel.gather_for_metrics(
                (predictions, batch["labels"]), ctx, eval_dataloader)
            correct += (predictions == references).sum().item()
            samples += len(references)
        accuracies.append(correct / samples)
        seen.append(samples)
        # accelerator.print(f"epoch {epoch}:", eval_metric)
        accel.print(f"epoch {epoch}: accuracy {correct / samples:.3f}", ctx=ctx)

    # accelerator.unwrap_model(model).state_dict()
    params = {k: v.detach().clone() for k, v in accel.unwrap_model(model, ctx).state_dict().items()}
    # accelerator.end_training()
    accel.shutdown(ctx)
    return {"losses": epoch_losses, "accuracies": accuracies, "seen": seen, "saved": saved,
            "completed_steps": completed_steps, "real_steps": optimizer.real_steps,
            "params": params, "precision": ctx.precision, "backend": ctx.backend}


CONFIG = {"lr": 1e-2, "num_epochs": 3, "accumulation": 2}


def on_rank(ctx: accel.Context, output_dir: str) -> dict:
    """run_world's entry: the script's own `accel.init` joins the group already started."""
    args = {"cpu": True, "mixed_precision": None, "checkpointing_steps": 4,
            "output_dir": output_dir}
    return training_function({**CONFIG, "batch_size": 8}, args)


@pytest.mark.spawned
def test_ported_nlp_example_trains_on_two_ranks_like_one_process(tmp_path):
    ranks = run_world(on_rank, 2, str(tmp_path / "two"), timeout=300)
    # One process reading each update's 2 x 8 x 2 samples as 8 x 2 x 2.
    single = training_function({**CONFIG, "batch_size": 16}, {
        "cpu": True, "mixed_precision": None, "checkpointing_steps": 4,
        "output_dir": str(tmp_path / "one")})
    for result in (*ranks, single):
        assert result["precision"] == "no"  # dtype=None without a launch setting: fp32
        assert result["losses"][-1] < 0.7 * result["losses"][0], result["losses"]
        assert result["accuracies"][-1] > 0.9, result["accuracies"]
        assert result["seen"] == [50] * CONFIG["num_epochs"]  # every sample exactly once
        # 8 micro-batches per epoch and process / 2 = 4 updates per epoch, 12 in all.
        assert result["completed_steps"] == result["real_steps"] == 12
        assert result["saved"] == ["step_4", "step_8", "step_12"]
    assert ranks[0]["backend"] == "ddp" and single["backend"] == "single"
    assert ranks[0]["accuracies"] == ranks[1]["accuracies"]
    for name, value in single["params"].items():
        for rank in ranks:
            difference = (rank["params"][name] - value).abs().max().item()
            assert difference <= 1e-5, (name, difference)
    assert (tmp_path / "two" / "step_12").is_dir() and (tmp_path / "one" / "step_12").is_dir()
