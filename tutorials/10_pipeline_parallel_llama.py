"""Tutorial 10: a Llama trained with pipeline parallelism x data parallelism on 4 processes,
resumed without a pipeline, exported for transformers.

    accel launch -n 4 tutorials/10_pipeline_parallel_llama.py --dir /tmp/pp --mesh pp2xdp2 --steps 3
    accel launch -n 1 tutorials/10_pipeline_parallel_llama.py --dir /tmp/pp --mesh none --steps 6

The first run lays the 4 processes out as 2 pipeline stages x 2 data-parallel ranks
(`init(mesh={"pp": 2, "dp_shard": 2})`). `pipeline_parallel` cuts the Llama into 2 stages
of 2 decoder layers (embeddings on the first, norm and head on the last); each rank keeps
its stage's blocks (the others' move to the meta device), and FSDP2 shards each stage
over its 2 data-parallel ranks. `model.step(inputs, targets)` runs the 1F1B schedule on
4 microbatches: forward and backward through both stages, the loss on the last stage.

Checkpoints hold each stage's tensors under the unsplit model's names, so the second
run, one process with no pipeline at all, resumes from it with the same loop written
the usual way. Both runs export safetensors that `LlamaForCausalLM.from_pretrained`
loads on one process.

The global batch stays 8 sequences whatever the mesh: each data-parallel rank takes
8 / dp_size of them; the 2 stages of one pipeline take the same ones.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import accel

MESHES = {"pp2xdp2": {"pp": 2, "dp_shard": 2}, "pp2": {"pp": 2}, "none": None}
GLOBAL_BATCH, MICROBATCHES = 8, 4


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="checkpoints and the export go here")
    parser.add_argument("--mesh", choices=sorted(MESHES), default="pp2xdp2")
    parser.add_argument("--steps", type=int, default=4, help="train up to this step")
    return parser.parse_args()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(ctx: accel.Context):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config)
    if ctx.pp_size > 1:
        model, ctx = accel.pipeline_parallel(model, ctx, split_points="auto", schedule="1f1b",
                                             microbatches=MICROBATCHES,
                                             loss_fn=next_token_loss)
    if ctx.dp_size > 1:
        model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP())
    # After pipeline_parallel: the parameters are this rank's stage's.
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), ctx)
    # Counting sequences (n, n+1, ...) from random starts: a rule the model can learn.
    starts = torch.randint(0, 128, (GLOBAL_BATCH * 16, 1),
                           generator=torch.Generator().manual_seed(1))
    tokens = (starts + torch.arange(33)) % 128
    loader, ctx = accel.distribute_loader(
        DataLoader(TensorDataset(tokens), batch_size=GLOBAL_BATCH // ctx.dp_size), ctx)
    return model, optimizer, loader, ctx


def train_step(model, optimizer, ctx: accel.Context, ids: torch.Tensor) -> torch.Tensor | None:
    """One optimizer step; the batch's loss where this rank knows it (None elsewhere)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if ctx.pp_size > 1:  # every stage runs its part; the loss is on the last stage's ranks
        loss = model.step(inputs, targets)
    else:
        loss = next_token_loss(model(input_ids=inputs).logits, targets)
        accel.backward(loss, optimizer, ctx)
    accel.clip_grad_norm(model, ctx, 1.0, optimizer=optimizer)  # the norm of all stages
    optimizer.step()
    optimizer.zero_grad()
    return None if loss is None else loss.detach()


def main() -> None:
    args = parse()
    ctx = accel.init(mesh=MESHES[args.mesh])
    model, optimizer, loader, ctx = build(ctx)
    folder = accel.CheckpointFolder(Path(args.dir) / "checkpoints")
    step = 0
    if folder.latest() is not None:  # any pipeline or none: the checkpoint is by name
        step = accel.load_state(folder, ctx, model=model, optimizer=optimizer,
                                rng=False).step
        loader = accel.skip_first_batches(loader, step)
        accel.print(f"resumed step {step} on mesh {ctx.layout}", ctx=ctx)
    for (ids,) in loader:
        if step == args.steps:
            break
        loss = train_step(model, optimizer, ctx, ids)
        step += 1
        if loss is not None:  # the last stage's ranks: their mean over the global batch
            loss = accel.reduce(loss, ctx)
            if ctx.dp_rank == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
    accel.save_state(folder, ctx, model=model, optimizer=optimizer, rng=False, step=step)
    accel.save_model(model, Path(args.dir) / "export", ctx)  # every stage, gathered
    accel.print(ctx, ctx=ctx)
    if ctx.is_main_process:
        loaded = LlamaForCausalLM.from_pretrained(Path(args.dir) / "export")
        print(f"from_pretrained: {sum(p.numel() for p in loaded.parameters())} parameters")
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
