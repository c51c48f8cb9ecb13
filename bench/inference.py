"""Big-model inference on this machine: accel vs Hugging Face Accelerate, disk offload.

Same GPT-2-style checkpoint (random weights, ~0.8 GB fp32, sharded safetensors), same
device map (embeddings and head in RAM, all 12 blocks on disk), greedy generation of a
batch of one. Measured per implementation, each in a fresh process:

- load time and peak RSS of `load_checkpoint_and_dispatch` (VmHWM over the RSS before);
- tokens/s "warm": the disk blocks' files fit in the kernel's page cache (accel keeps
  their pages mapped between passes, its default when they fit in half the free RAM);
- tokens/s "cold": the files are evicted from the page cache before every forward, as if
  the model did not fit in RAM (posix_fadvise DONTNEED, which spares pages a process
  maps: accel runs with release_after_use=True here, its default when disk blocks do not
  fit in RAM, and Accelerate maps each tensor anew for every use);
- the same cold, with one compute thread (torch.set_num_threads(1)) for everyone: the
  prefetch thread then has a core of its own to read the next blocks on;
- peak RSS while generating.

Implementations: accel with prefetch=2 (background thread) and prefetch=0 (each block
loaded when needed), and Accelerate's load_checkpoint_and_dispatch. A second scenario
offloads a model already in memory entirely to disk: accel.dispatch_model({"": "disk"})
vs Accelerate's disk_offload. Rounds alternate the implementations (rotating order);
the table shows medians and the load average, since the machine is shared.

    python bench/inference.py             # 3 rounds, ~15 minutes on a busy 2-core machine
    python bench/inference.py --quick     # 1 round, fewer tokens
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = dict(n_layer=12, n_embd=1024, n_head=16, vocab_size=50257, n_positions=512,
              bos_token_id=0, eos_token_id=0)
LAYERS = CONFIG["n_layer"]
DEVICE_MAP = {"transformer.wte": "cpu", "lm_head": "cpu", "transformer.wpe": "cpu",
              "transformer.drop": "cpu", "transformer.ln_f": "cpu",
              **{f"transformer.h.{i}": "disk" for i in range(LAYERS)}}
CHECKPOINT_IMPLS = ("accel-prefetch2", "accel-prefetch0", "accelerate")
SCENARIOS = ("warm", "cold", "cold-1thread")
REPEATS = 3  # timed generations per run; the run reports their median
IN_MEMORY_IMPLS = ("accel-dispatch-disk", "accelerate-disk_offload")


# --------------------------------------------------------------------------- worker


def status(key: str) -> int:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith(key + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # VmHWM := VmRSS


def evict(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def import_for(impl: str) -> None:
    from transformers import GPT2LMHeadModel  # noqa: F401  (a lazy module: import it now)

    if impl.startswith("accelerate"):
        import accelerate  # noqa: F401
    else:
        import accel  # noqa: F401


def load(impl: str, workdir: Path, cold: bool):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**CONFIG)
    checkpoint, offload = workdir / "checkpoint", workdir / f"offload-{impl}"
    release = True if cold else None  # None: accel's own choice (keep mapped: they fit)
    if impl.startswith("accel-prefetch"):
        import accel

        with accel.init_empty_weights():
            model = GPT2LMHeadModel(config).eval()
        return accel.load_checkpoint_and_dispatch(model, checkpoint, device_map=DEVICE_MAP,
                                                  offload_dir=offload, prefetch=int(impl[-1]),
                                                  release_after_use=release)
    if impl == "accelerate":
        import accelerate

        with accelerate.init_empty_weights():
            model = GPT2LMHeadModel(config).eval()
        model.tie_weights()  # Accelerate needs the tie made again on meta
        return accelerate.load_checkpoint_and_dispatch(
            model, str(checkpoint), device_map=DEVICE_MAP, offload_folder=str(offload),
            no_split_module_classes=["GPT2Block"])
    model = GPT2LMHeadModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if impl == "accel-dispatch-disk":
        import accel

        return accel.dispatch_model(model, {"": "disk"}, offload_dir=offload,
                                    release_after_use=release)
    import accelerate

    return accelerate.disk_offload(model, str(offload), execution_device="cpu")


def generate_seconds(model, prompt, new_tokens: int, repeats: int, evicting: list[float]
                     ) -> tuple[list[float], list[float], list[int]]:
    """Wall and CPU seconds (eviction excluded) of `repeats` greedy generations of
    `new_tokens` each, after a warm-up, and the tokens generated."""
    import torch

    walls, cpus = [], []
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(repeats):
            evicting.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
            walls.append(time.perf_counter() - wall - sum(evicting))
            cpus.append(time.process_time() - cpu)
    return walls, cpus, out[0, prompt.shape[1]:].tolist()


def worker(impl: str, workdir: Path, new_tokens: int, scenario: str) -> dict:
    import torch

    cold = scenario.startswith("cold")
    if scenario == "cold-1thread":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    prompt = torch.randint(1, CONFIG["vocab_size"], (1, 16))
    import_for(impl)  # imports are not part of the load time
    shutil.rmtree(workdir / f"offload-{impl}", ignore_errors=True)  # no reuse between runs
    reset_peak()
    before = status("VmRSS")
    started = time.perf_counter()
    model = load(impl, workdir, cold)
    result = {"impl": impl, "scenario": scenario, "load_s": time.perf_counter() - started,
              "load_peak_mib": (status("VmHWM") - before) / 2**20}
    evicting: list[float] = []
    if cold:
        files = [str(p) for p in (workdir / "checkpoint").glob("*.safetensors")]
        files += glob.glob(str(workdir / f"offload-{impl}" / "**" / "*"), recursive=True)

        def evict_timed(*_) -> None:
            started = time.perf_counter()
            evict([p for p in files if os.path.isfile(p)])
            evicting.append(time.perf_counter() - started)

        model.register_forward_pre_hook(evict_timed, prepend=True)
    reset_peak()
    before = status("VmRSS")
    walls, cpus, result["tokens"] = generate_seconds(model, prompt, new_tokens, REPEATS,
                                                     evicting)
    # The eviction stands in for a kernel reclaiming memory in the background: its own
    # time (the same for every implementation) is not part of generating. CPU time (all
    # threads, user and system, eviction included) shows the work per token regardless
    # of how busy the machine was.
    result["tok_s"] = new_tokens / statistics.median(walls)
    result["cpu_ms_per_token"] = 1000 * statistics.median(cpus) / new_tokens
    result["evict_s_per_token"] = sum(evicting) / new_tokens  # of the last generation
    result["generate_peak_mib"] = (status("VmHWM") - before) / 2**20
    if impl.startswith("accel-"):
        import accel

        stats = accel.dispatch_stats(model)
        result["prefetched"], result["inline"] = stats.prefetched, stats.inline
        result["in_memory"] = stats.in_memory
        result["wait_s"], result["inline_s"] = stats.wait_s, stats.inline_s
    return result


# --------------------------------------------------------------------------- driver


def prepare(workdir: Path) -> None:
    checkpoint = workdir / "checkpoint"
    if (checkpoint / "model.safetensors.index.json").exists():
        return
    code = ("import torch, sys; from transformers import GPT2Config, GPT2LMHeadModel; "
            "torch.manual_seed(0); "
            f"GPT2LMHeadModel(GPT2Config(**{CONFIG!r})).save_pretrained(sys.argv[1], "
            "max_shard_size='200MB')")
    subprocess.run([sys.executable, "-c", code, str(checkpoint)], check=True)


def run_worker(impl: str, args: argparse.Namespace, scenario: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, "--worker", impl, "--workdir", str(args.workdir),
               "--new-tokens", str(args.new_tokens), "--scenario", scenario]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rounds(impls: tuple[str, ...], args: argparse.Namespace, scenarios: tuple[str, ...]
           ) -> list[dict]:
    runs = [(impl, scenario) for scenario in scenarios for impl in impls]
    results = []
    for index in range(args.rounds):
        shift = index % len(runs)
        for impl, scenario in runs[shift:] + runs[:shift]:  # rotating order, round by round
            load_average = os.getloadavg()[0]
            result = run_worker(impl, args, scenario)
            result["loadavg"], result["round"] = load_average, index
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)
    return results


def summarize(results: list[dict], impls: tuple[str, ...], title: str) -> str:
    columns = ("load_s", "load_peak_mib", "tok_s", "cpu_ms_per_token", "generate_peak_mib")
    lines = [title, f"{'implementation':<24}{'scenario':>13}" +
             "".join(f"{c:>18}" for c in columns)]
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for scenario in SCENARIOS:
        for impl in impls:
            mine = [r for r in results if r["impl"] == impl and r["scenario"] == scenario]
            if not mine:
                continue
            medians[impl, scenario] = {c: statistics.median(r[c] for r in mine)
                                       for c in columns}
            lines.append(f"{impl:<24}{scenario:>13}" + "".join(
                f"{medians[impl, scenario][c]:>18.2f}" for c in columns))
    baseline = impls[-1]
    for (impl, scenario), row in medians.items():
        if impl != baseline and (baseline, scenario) in medians:
            base = medians[baseline, scenario]
            per_round = sorted(_round_ratios(results, impl, baseline, scenario))
            lines.append(f"  {scenario}: {impl} tokens/s = {row['tok_s'] / base['tok_s']:.2f} x "
                         f"{baseline} (per round: {', '.join(f'{r:.2f}' for r in per_round)})"
                         f"; CPU per token = "
                         f"{row['cpu_ms_per_token'] / base['cpu_ms_per_token']:.2f} x")
    same = len({tuple(r["tokens"]) for r in results}) == 1
    lines.append(f"  same generated tokens everywhere: {'yes' if same else 'NO'}; "
                 f"load average during runs: {min(r['loadavg'] for r in results):.1f}-"
                 f"{max(r['loadavg'] for r in results):.1f} on {os.cpu_count()} CPUs "
                 f"(medians of {len(results) // max(1, len(medians))} rounds)")
    return "\n".join(lines)


def _round_ratios(results: list[dict], impl: str, baseline: str, scenario: str
                  ) -> list[float]:
    """tokens/s of `impl` over `baseline` within each round (similar machine load)."""
    by_round: dict[tuple[int, str], float] = {
        (r["round"], r["impl"]): r["tok_s"] for r in results if r["scenario"] == scenario}
    return [by_round[i, impl] / by_round[i, baseline] for i, name in by_round
            if name == impl and (i, baseline) in by_round]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=SCENARIOS, default="warm",
                        help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/accel-bench-inference"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1 round, 4 tokens")
    parser.add_argument("--skip-in-memory", action="store_true",
                        help="only the checkpoint scenario")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.new_tokens, args.scenario)))
        return
    if args.quick:
        args.rounds, args.new_tokens = 1, 4
    scenarios = tuple(args.scenarios.split(","))
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    prepare(args.workdir)
    tables = [summarize(rounds(CHECKPOINT_IMPLS, args, scenarios), CHECKPOINT_IMPLS,
                        "checkpoint -> RAM (embeddings, head) + disk (12 blocks)")]
    if not args.skip_in_memory:
        tables.append(summarize(rounds(IN_MEMORY_IMPLS, args, ("warm",)), IN_MEMORY_IMPLS,
                                "model in memory -> everything on disk"))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
