"""Tutorial 09: fine-tune a pretrained Llama, start to finish, written with `compose`.

    accel launch -n 2 tutorials/09_finetune_pretrained.py --dir /tmp/ft --steps 4
    accel launch -n 2 tutorials/09_finetune_pretrained.py --dir /tmp/ft --steps 8  # resumes
    accel launch -n 4 tutorials/09_finetune_pretrained.py --dir /tmp/ft4 --tp 2 \
        --compile-backend aot_eager                              # TP x FSDP

The job most users bring: "fine-tune this pretrained model on N processes". A
`save_pretrained` folder stands in for the download (the first run writes it). Then
every rank builds the model on the meta device (no memory), and two pipelines

    with_amp(bf16) -> [tensor_parallel] -> checkpoint_activations -> compile_model
    -> shard_model(FSDP, keep_meta) -> load_pretrained
    wrap_optimizer -> distribute_loader -> accumulate_grads(4)

shard it while it is still empty and fill each rank's shards straight from the
checkpoint's files (no rank ever holds the whole model, nothing random is made or
broadcast), then build the optimizer on the final parameters. Each transformer block
is compiled once for all layers (regional) and recomputes its activations in backward
(all of them; with --tp, all but the matmuls' outputs).
The loop checkpoints every few optimizer steps; a second run resumes from the newest
checkpoint at the same batch. At the end the weights are exported as safetensors that
`from_pretrained` reads on one process. `--compile-backend aot_eager` compiles faster
on a CPU (dynamo and AOT autograd, no C++ build); `none` runs eagerly.
"""

import argparse
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import accel

ACCUMULATION, MICRO_BATCH, SEQUENCE = 4, 2, 32


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="pretrained/, checkpoints/, export/")
    parser.add_argument("--steps", type=int, default=4, help="train up to this optimizer step")
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend, or 'none'")
    return parser.parse_args()


def download_stand_in(folder: Path, ctx: accel.Context) -> None:
    """What a hub download would leave: config.json and model.safetensors."""
    with accel.main_process_first(ctx):
        if ctx.is_main_process and not (folder / "config.json").exists():
            torch.manual_seed(0)
            config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=128, max_position_embeddings=SEQUENCE)
            LlamaForCausalLM(config).save_pretrained(folder)


def finetuning_data() -> TensorDataset:
    # Counting sequences (n, n+1, ...) from random starts: a rule the model can learn.
    starts = torch.randint(0, 128, (256, 1), generator=torch.Generator().manual_seed(1))
    return TensorDataset((starts + torch.arange(SEQUENCE)) % 128)


def model_pipeline(args: argparse.Namespace, pretrained: Path):
    """Everything that decides what the parameters are, in torchtitan's order."""
    tensor_parallel = [accel.tensor_parallel] if args.tp > 1 else []
    compiling = [] if args.compile_backend == "none" else [
        partial(accel.compile_model, backend=args.compile_backend)]
    return accel.compose(
        partial(accel.with_amp, dtype="bf16"),
        *tensor_parallel,
        # full recomputation of every block; with tensor parallelism "selective" (op
        # level), as torch 2.13 cannot compile the full recomputation of DTensor blocks
        partial(accel.checkpoint_activations, policy="selective" if args.tp > 1 else "full"),
        *compiling,                                   # each block compiled once (regional)
        partial(accel.shard_model, strategy=accel.FSDP(keep_meta=True)),
        partial(accel.load_pretrained, path=pretrained),  # each rank reads its own slices
    )


# What holds the parameters: built from the final ones (sharded and filled).
training_pipeline = accel.compose(
    accel.wrap_optimizer,
    accel.distribute_loader,
    partial(accel.accumulate_grads, steps=ACCUMULATION),
)


def main() -> None:
    args = parse()
    mesh = {"dp_shard": -1, "tp": args.tp} if args.tp > 1 else None
    ctx = accel.init(seed=0, mesh=mesh)
    root = Path(args.dir)
    download_stand_in(root / "pretrained", ctx)

    config = LlamaConfig.from_pretrained(root / "pretrained")
    config.use_cache = False  # training: no KV cache (and one compiled graph for all layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    objects, ctx = model_pipeline(args, root / "pretrained")(ctx, model=model)
    model = objects["model"]
    objects, ctx = training_pipeline(
        ctx, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        loader=DataLoader(finetuning_data(), batch_size=MICRO_BATCH, shuffle=True))
    optimizer, loader = objects["optimizer"], objects["loader"]
    accel.print(ctx, ctx=ctx)

    folder = accel.CheckpointFolder(root / "checkpoints", total_limit=2)
    state = dict(model=model, optimizer=optimizer, loader=loader)
    if folder.latest() is not None:
        info = accel.load_state(folder, ctx, **state)
        accel.print(f"resumed at step {info.step}", ctx=ctx)
    while optimizer.real_steps < args.steps:
        for (ids,) in loader:
            loss = model(input_ids=ids, labels=ids).loss
            accel.backward(loss, optimizer, ctx)
            optimizer.step()  # updates once every ACCUMULATION micro-batches
            optimizer.zero_grad()
            if optimizer.accumulation.micro_step != 0:
                continue
            step = optimizer.real_steps
            accel.print(f"step {step} loss {accel.reduce(loss.detach(), ctx).item():.4f}",
                        ctx=ctx)
            if step % args.save_every == 0 or step == args.steps:
                accel.save_state(folder, ctx, **state)
            if step == args.steps:
                break

    accel.save_model(model, root / "export", ctx)
    if ctx.is_main_process:
        loaded = LlamaForCausalLM.from_pretrained(root / "export")
        print(f"from_pretrained: {sum(p.numel() for p in loaded.parameters())} parameters")
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
