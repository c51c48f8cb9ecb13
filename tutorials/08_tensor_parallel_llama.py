"""Tutorial 08: a Llama trained with tensor parallelism x FSDP on a device mesh, resumed on
another mesh, exported for transformers.

    accel launch -n 4 tutorials/08_tensor_parallel_llama.py --dir /tmp/tp --mesh tp2xfsdp2 --steps 4
    accel launch -n 4 tutorials/08_tensor_parallel_llama.py --dir /tmp/tp --mesh fsdp4 --steps 8

The first run lays the 4 processes out as 2 data-parallel groups of 2 tensor-parallel
ranks (`init(mesh={"dp_shard": 2, "tp": 2})`), shards each layer's projections over the
`tp` ranks with sequence parallelism (`tensor_parallel(plan="auto")`), then shards what
each rank holds over `dp_shard` (FSDP2), as torchtitan composes them. It saves a
checkpoint. The second run resumes that checkpoint on plain FSDP over 4 ranks: the
checkpoint is sharded by name, not by mesh, so any mesh can read it. Then it exports
safetensors that `LlamaForCausalLM.from_pretrained` loads on one process.

The global batch stays 8 sequences whatever the mesh: each data-parallel rank takes
8 / dp_size of them; the ranks of one tp group take the same ones.
"""

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import accel

MESHES = {"tp2xfsdp2": {"dp_shard": 2, "tp": 2}, "fsdp4": {"dp_shard": 4}, "tp2": {"tp": 2}}
GLOBAL_BATCH = 8


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="checkpoints and the export go here")
    parser.add_argument("--mesh", choices=sorted(MESHES), default="tp2xfsdp2")
    parser.add_argument("--steps", type=int, default=4, help="train up to this step")
    return parser.parse_args()


def build(ctx: accel.Context):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config)
    if ctx.tp_size > 1:
        model, ctx = accel.tensor_parallel(model, ctx, plan="auto", sequence_parallel=True)
    model, ctx = accel.shard_model(model, ctx, strategy=accel.FSDP())
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), ctx)
    # Counting sequences (n, n+1, ...) from random starts: a rule the model can learn.
    starts = torch.randint(0, 128, (GLOBAL_BATCH * 16, 1),
                           generator=torch.Generator().manual_seed(1))
    tokens = (starts + torch.arange(32)) % 128
    loader, ctx = accel.distribute_loader(
        DataLoader(TensorDataset(tokens), batch_size=GLOBAL_BATCH // ctx.dp_size), ctx)
    return model, optimizer, loader, ctx


def main() -> None:
    args = parse()
    ctx = accel.init(mesh=MESHES[args.mesh])
    model, optimizer, loader, ctx = build(ctx)
    folder = accel.CheckpointFolder(Path(args.dir) / "checkpoints")
    step = 0
    if folder.latest() is not None:  # on any mesh: the checkpoint is sharded by name
        step = accel.load_state(folder, ctx, model=model, optimizer=optimizer,
                                rng=False).step
        loader = accel.skip_first_batches(loader, step)
        accel.print(f"resumed step {step} on mesh {ctx.layout}", ctx=ctx)
    for (ids,) in loader:
        if step == args.steps:
            break
        loss = model(input_ids=ids, labels=ids).loss
        accel.backward(loss, optimizer, ctx)
        accel.clip_grad_norm(model, ctx, 1.0, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        accel.print(f"step {step} loss {accel.reduce(loss.detach(), ctx).item():.4f}", ctx=ctx)
    accel.save_state(folder, ctx, model=model, optimizer=optimizer, rng=False, step=step)
    accel.save_model(model, Path(args.dir) / "export", ctx)
    accel.print(ctx, ctx=ctx)
    if ctx.is_main_process:
        loaded = LlamaForCausalLM.from_pretrained(Path(args.dir) / "export")
        print(f"from_pretrained: {sum(p.numel() for p in loaded.parameters())} parameters")
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
