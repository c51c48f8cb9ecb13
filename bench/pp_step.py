"""Pipeline-parallel training step: accel against a hand-written torch loop in the same run,
and the bubble fraction of each schedule.

    python bench/pp_step.py                     # gpipe, 1f1b, interleaved1f1b on 2 processes
    python bench/pp_step.py --scenario 1f1b_dp2 --rounds 5 --steps 5
    python bench/pp_step.py --control           # adds raw_b: the noise floor of the ratios
    python bench/pp_step.py --hidden 512 --rounds 3 --steps 4   # compute outweighs the sends

Scenarios, each in fresh gloo processes (accel.testing.run_world, one thread per rank),
on a transformers Llama (4 layers, hidden 128, vocab 256), a batch of 8 x 64 tokens in
4 microbatches, AdamW:
- `gpipe`, `1f1b`: 2 stages of 2 layers on 2 processes;
- `interleaved1f1b`: 4 stages of 1 layer, 2 per process (rank 0 runs stages 0 and 2);
- `1f1b_dp2` (4 processes): 1F1B x DDP over 2 data-parallel ranks.

`raw` is written the way torch's pipelining docs and torchtitan write it: a stage module
per stage by hand (embeddings / decoder layers / norm and head, the causal mask and
rotary embeddings recomputed per stage), `PipelineStage` over the pp group, the schedule
class, `schedule.step(...)`, `optimizer.step()`, `zero_grad()` (and DDP per stage for
`1f1b_dp2`). `accel` is `init(mesh=...)`, `pipeline_parallel(..., split_points="auto")`,
(`shard_model(strategy=accel.DDP())`), `wrap_optimizer`, `model.step(inputs, targets)`.

Rounds alternate the implementations inside each process in ABBA order; the ratio is the
median over rounds of raw time / accel time per step (1.0: no overhead); the CPU time
ratio (CPU time of the main thread per step: forward, backward, optimizer and the
library around them, not the time spent waiting for the CPU or for another rank; each
rank's median over rounds, averaged over ranks) is the steadier figure on a shared
machine. The bubble fraction is 1 - busy / step, each the fastest of the rounds: `step`
is `model.step` alone (the schedule, no optimizer), `busy` the time the rank then takes
to run its own stages' forward and backward on every microbatch alone, without waiting
for another rank; the rest of a step is waiting (the pipeline's fill and drain) and
gloo's sends (and, with DDP, the gradient all-reduce). The ideal bubble of
(p - 1) / (v * m + p - 1) (p stages per pipeline, m microbatches, v stages per rank)
is printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time

#: scenario -> (schedule, stages per rank, mesh, processes)
SCENARIOS = {"gpipe": ("gpipe", 1, {"pp": 2}, 2), "1f1b": ("1f1b", 1, {"pp": 2}, 2),
             "interleaved1f1b": ("interleaved1f1b", 2, {"pp": 2}, 2),
             "1f1b_dp2": ("1f1b", 1, {"pp": 2, "dp_shard": 2}, 4)}
CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
           "interleaved1f1b": "ScheduleInterleaved1F1B"}
BATCH, SEQ, MICROBATCHES, LAYERS, VOCAB, HIDDEN = 8, 64, 4, 4, 256, 128


def llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=128))


def loss_fn(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def raw_stage(model, stage: int, stages: int):
    """One stage of the Llama, written by hand: its slice of layers, ends where they are."""
    import torch
    from torch import nn
    from transformers.masking_utils import create_causal_mask

    per = LAYERS // stages
    inner = model.model

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = inner.embed_tokens if stage == 0 else None
            self.layers = nn.ModuleList(inner.layers[stage * per:(stage + 1) * per])
            self.norm = inner.norm if stage == stages - 1 else None
            self.head = model.lm_head if stage == stages - 1 else None
            self.rotary = inner.rotary_emb

        def forward(self, x):
            if self.embed is not None:
                x = self.embed(x)
            positions = torch.arange(x.shape[1]).unsqueeze(0)
            mask = create_causal_mask(config=model.config, inputs_embeds=x,
                                      attention_mask=None, cache=None, position_ids=positions)
            rope = self.rotary(x, position_ids=positions)
            for layer in self.layers:
                x = layer(x, attention_mask=mask, position_embeddings=rope,
                          position_ids=positions)
            if self.head is not None:
                x = self.head(self.norm(x))
            return x

    return Stage()


def raw_setup(ctx, schedule: str, per_rank: int):
    import torch
    from torch.distributed import pipelining
    from torch.nn.parallel import DistributedDataParallel

    model, stages = llama(), ctx.pp_size * per_rank
    group = ctx.mesh["pp"].get_group()
    indices = list(range(ctx.pp_rank, stages, ctx.pp_size))
    modules = [raw_stage(model, index, stages) for index in indices]
    if ctx.dp_size > 1:
        modules = [DistributedDataParallel(module, process_group=ctx.dp_group)
                   for module in modules]
    built = [pipelining.PipelineStage(module, index, stages, ctx.device, group=group)
             for module, index in zip(modules, indices, strict=True)]
    cls = getattr(pipelining, CLASSES[schedule])
    runner = cls(built if per_rank > 1 else built[0], MICROBATCHES, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=1e-3)
    first, last = 0 in indices, stages - 1 in indices

    def step(inputs, targets):
        runner.step(*((inputs,) if first else ()), target=targets if last else None,
                    losses=[] if last else None)
        optimizer.step()
        optimizer.zero_grad()
    return step


def accel_setup(ctx, schedule: str, per_rank: int):
    import torch

    import accel

    model, ctx = accel.pipeline_parallel(llama(), ctx, schedule=schedule,
                                         stages_per_rank=per_rank,
                                         microbatches=MICROBATCHES, loss_fn=loss_fn)
    if ctx.dp_size > 1:
        model, ctx = accel.shard_model(model, ctx, strategy=accel.DDP())
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx)

    def step(inputs, targets):
        model.step(inputs, targets)
        optimizer.step()
        optimizer.zero_grad()
    return step, model


def busy_time(pipe, steps: int) -> float:
    """Seconds per step this rank's stages take for every microbatch's forward and backward
    alone: the compute of a schedule step without waiting for another rank or sending."""
    import torch

    micro = BATCH // MICROBATCHES
    ids = torch.randint(0, VOCAB, (micro, SEQ))
    start = time.perf_counter()
    for _ in range(steps):
        for part, index in zip(pipe.parts, pipe.stage_indices, strict=True):
            for _ in range(MICROBATCHES):
                x = ids if index == 0 else torch.randn(micro, SEQ, HIDDEN, requires_grad=True)
                out = part(x)
                if index == pipe.num_stages - 1:
                    loss_fn(out, ids).backward()
                else:
                    out.backward(torch.randn_like(out))
    return (time.perf_counter() - start) / steps


def bubble_rounds(pipe, rounds: int, steps: int, batch: tuple) -> float:
    """1 - busy / the schedule's step (model.step alone, no optimizer) on this rank.

    Each is the fastest of `rounds`: on a shared machine the other jobs only ever add
    time, and the least disturbed round is the closest to what the schedule itself costs.
    """
    import torch

    scheduled, busy = [], []
    for _ in range(rounds):
        torch.distributed.barrier()
        begin = time.perf_counter()
        for _ in range(steps):
            pipe.step(*batch)
        scheduled.append((time.perf_counter() - begin) / steps)
        torch.distributed.barrier()  # busy runs alone: no rank is still inside a step
        busy.append(busy_time(pipe, steps))
        pipe.zero_grad(set_to_none=True)
    return 1 - min(busy) / min(scheduled)


def paired_rounds(impls: dict, rounds: int, steps: int, batch: tuple
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and main-thread CPU seconds per step of each implementation, by round (ABBA)."""
    import torch

    wall: dict[str, list[float]] = {name: [] for name in impls}
    cpu: dict[str, list[float]] = {name: [] for name in impls}
    for round_ in range(rounds):
        order = list(impls) if round_ % 2 == 0 else list(impls)[::-1]
        for name in order:  # neither implementation goes first every time
            torch.distributed.barrier()
            begin, begin_cpu = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                impls[name](*batch)
            cpu[name].append((time.thread_time() - begin_cpu) / steps)
            torch.distributed.barrier()
            wall[name].append((time.perf_counter() - begin) / steps)
    return wall, cpu


def _ratio(times: dict[str, list[float]], first: str, second: str) -> float:
    return statistics.median(a / b for a, b in zip(times[first], times[second], strict=True))


def worker(ctx, scenario: str, rounds: int, steps: int, warmup: int, control: bool,
           hidden: int) -> str:
    """One scenario on this rank (run_world started the processes); rank 0's line of figures."""
    global HIDDEN
    HIDDEN = hidden  # this process's model width (a spawned rank imports the defaults)
    import torch

    import accel

    schedule, per_rank, _, _ = SCENARIOS[scenario]
    raw = raw_setup(ctx, schedule, per_rank)  # built first: being first measured slower
    ours, pipe = accel_setup(ctx, schedule, per_rank)
    impls = {"raw": raw, "accel": ours}
    if control:  # a second raw loop: how far two identical loops differ on this machine
        impls["raw_b"] = raw_setup(ctx, schedule, per_rank)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1),
                        generator=torch.Generator().manual_seed(ctx.dp_rank))
    batch = (ids[:, :-1], ids[:, 1:])
    for _ in range(warmup):
        for step in impls.values():
            step(*batch)
    wall, cpu = paired_rounds(impls, rounds, steps, batch)
    bubble = bubble_rounds(pipe, rounds, steps, batch)
    pairs = [("raw", "accel")] + ([("raw", "raw_b")] if control else [])
    ranks = accel.gather_object([([_ratio(cpu, *pair) for pair in pairs], bubble)], ctx,
                                ranks="all")
    ideal = (ctx.pp_size - 1) / (per_rank * MICROBATCHES + ctx.pp_size - 1)
    ratios = "; ".join(
        f"{a}/{b} wall {_ratio(wall, a, b):.3f}, CPU "
        f"{statistics.mean(cpus[index] for cpus, _ in ranks):.3f}"
        for index, (a, b) in enumerate(pairs))
    return (f"{scenario} (hidden {HIDDEN}): raw {statistics.median(wall['raw']) * 1e3:.1f} "
            f"ms/step, accel "
            f"{statistics.median(wall['accel']) * 1e3:.1f} ms/step; {ratios} (medians of "
            f"{rounds} paired rounds); bubble {statistics.mean(b for _, b in ranks):.2f} "
            f"(ranks {', '.join(f'{b:.2f}' for _, b in ranks)}; ideal {ideal:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--control", action="store_true", help="add a second raw loop")
    parser.add_argument("--hidden", type=int, default=HIDDEN,
                        help="model width: more compute per microbatch against the same sends")
    args = parser.parse_args()
    from accel.testing import run_world

    for scenario in args.scenario or ["gpipe", "1f1b", "interleaved1f1b"]:
        _, _, mesh, processes = SCENARIOS[scenario]
        lines = run_world(worker, processes, scenario, args.rounds, args.steps, args.warmup,
                          args.control, args.hidden, mesh=mesh, env={"OMP_NUM_THREADS": "1"},
                          timeout=3600)
        print(lines[0], flush=True)


if __name__ == "__main__":
    main()
