"""Tutorial 06: big-model inference — a model split between RAM and disk, and prompts
batched across processes.

    accel launch -n 2 tutorials/06_big_model_inference.py
    python tutorials/06_big_model_inference.py --ram 20MB

Part 1, a model bigger than you would like. We build it on the meta device (no memory),
ask for a device map under a RAM budget (blocks that do not fit go to disk), and stream
the checkpoint in: RAM blocks are copied once, disk blocks stay in the checkpoint file,
memory-mapped and read in just in time, while a background thread prefetches the next
ones (here the small checkpoint stays in the kernel's page cache, so after the first
pass there is little to prefetch). With a GPU, the same calls put the first blocks on it
and run the offloaded ones there too.

Part 2, distributed inference: every process loads the model, takes its share of the
prompts with `split_between_processes`, generates, and `gather_object` brings all the
answers back in prompt order.

Needs transformers (`pip install transformers`); the weights are random and there is no
tokenizer (no download), so prompts and answers are token ids.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import accel

CONFIG = GPT2Config(n_layer=8, n_embd=256, n_head=8, vocab_size=5000, n_positions=128,
                    bos_token_id=0, eos_token_id=0)


def write_checkpoint(folder: Path, ctx: accel.Context) -> None:
    """Stand-in for a downloaded checkpoint: random weights in 4 MB shards."""
    with accel.main_process_first(ctx):  # one process writes, the others wait and reuse it
        if not (folder / "model.safetensors.index.json").exists():
            torch.manual_seed(0)
            GPT2LMHeadModel(CONFIG).save_pretrained(folder, max_shard_size="4MB")


def load_big_model(folder: Path, ram: str, ctx: accel.Context) -> torch.nn.Module:
    with accel.init_empty_weights():  # shapes only: 0 bytes of weights so far
        model = GPT2LMHeadModel(CONFIG).eval()
    estimate = accel.estimate_memory(model, dtypes=["float32"])
    accel.print(estimate.table().splitlines()[0], ctx=ctx)
    max_memory = {"cpu": ram}
    # ctx: this process's own GPU (if any) and its share of the RAM.
    accel.print(accel.explain_device_map(model, max_memory=max_memory, ctx=ctx), ctx=ctx)
    device_map = accel.infer_device_map(model, max_memory=max_memory, ctx=ctx)
    return accel.load_checkpoint_and_dispatch(model, folder, device_map=device_map,
                                              prefetch=2)


def make_prompts(count: int = 6) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, CONFIG.vocab_size, (5 + i,), generator=generator).tolist()
            for i in range(count)]


def generate(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ram", default="20MB", help="RAM budget for the weights")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "accel-tut06"))
    args = parser.parse_args()

    ctx = accel.init()
    folder = Path(args.workdir) / "checkpoint"
    write_checkpoint(folder, ctx)
    model = load_big_model(folder, args.ram, ctx)

    # Part 2: each process answers its share of the prompts (earlier ranks get the extras).
    prompts = make_prompts()
    mine = accel.split_between_processes(list(enumerate(prompts)), ctx)
    started = time.perf_counter()
    answers = [(index, generate(model, prompt, args.new_tokens)) for index, prompt in mine]
    seconds = time.perf_counter() - started
    stats = accel.dispatch_stats(model)
    print(f"rank {ctx.rank}: {len(mine)} prompts, "
          f"{len(mine) * args.new_tokens / seconds:.1f} tokens/s; disk blocks: "
          f"{stats.prefetched} loads by the prefetch thread, {stats.inline} inline, "
          f"{stats.in_memory} found in memory already", flush=True)

    everything = accel.gather_object(answers, ctx)  # lists are concatenated in rank order
    for index, answer in everything:
        accel.print(f"prompt {index}: {prompts[index]} -> {answer}", ctx=ctx, per_node=False)
    accel.print(f"gathered {len(everything)} answers from {ctx.world_size} process(es)",
                ctx=ctx, per_node=False)
    accel.remove_dispatch(model)
    accel.shutdown(ctx)


if __name__ == "__main__":
    main()
