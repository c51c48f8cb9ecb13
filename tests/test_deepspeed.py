"""The DeepSpeed backend: ZeRO 1/2/3 train like one process, through the usual loop.

One spawned world carries every multi-process check (DeepSpeed's import and communicator
start cost ~6 s per world): it trains the stage x precision x accumulation matrix, then
exercises engines side by side, inference, zero.Init and checkpoints. Client optimizers
are torch's, so no DeepSpeed optimizer op is compiled (only its shared-memory
communication op, once, into TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import accel
from accel import DeepSpeed
from accel.backends import resolve_strategy
from accel.errors import IncompatibleOptionsError, UnsupportedError
from accel.testing import run_world

deepspeed = pytest.importorskip("deepspeed")
from accel.backends.deepspeed import config as ds_config  # noqa: E402 (needs deepspeed)

SAMPLES, EPOCHS, GLOBAL_BATCH, CLIP = 64, 3, 16, 1.0
#: max |difference| from one process with the doubled batch, in the same precision.
#: fp32: the same sums in another order (measured: 6e-8). bf16: DeepSpeed keeps bf16
#: weights and reduces bf16 gradients, the reference autocasts fp32 weights; both round
#: to bf16's 8-bit mantissa, and Adam carries the differences along (measured: 1.5e-3).
#: fp16 (not measured: this CPU has no fp16 kernels for DeepSpeed) as bf16.
TOLERANCE = {"no": 1e-6, "bf16": 5e-3, "fp16": 5e-3}
#: relative difference of the gradient norms clip_grad_norm reports (measured 2e-7, 5e-3).
NORM_TOLERANCE = {"no": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 8, generator=gen)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def make_mlp(lr: float = 1e-2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def prepare(ctx, precision, strategy, accumulation, lr=1e-2):
    model, optimizer = make_mlp(lr)
    model, ctx = accel.with_amp(model, ctx, dtype=precision)
    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    # A loss scale that never overflows here, so no run skips a step the other takes.
    scaler = (torch.amp.GradScaler(ctx.device.type, init_scale=2.0**10)
              if precision == "fp16" else None)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx, scaler=scaler)
    model, optimizer, ctx = accel.accumulate_grads(model, optimizer, ctx, steps=accumulation)
    return model, optimizer, ctx


def train(ctx, precision: str, strategy, accumulation: int, epochs: int = EPOCHS):
    """Tutorial 02's loop; rank r reads its own slice of every global batch.

    Returns the full fp32 parameters and the gradient norms clip_grad_norm reported.
    """
    model, optimizer, ctx = prepare(ctx, precision, strategy, accumulation)
    x, y = (tensor.to(ctx.device) for tensor in mlp_data())
    per_rank = GLOBAL_BATCH // (ctx.world_size * accumulation)
    norms = []
    for _ in range(epochs):
        for start in range(0, SAMPLES, per_rank * ctx.world_size):
            lo = start + ctx.rank * per_rank
            loss = nn.functional.mse_loss(model(x[lo:lo + per_rank]), y[lo:lo + per_rank])
            accel.backward(loss, optimizer, ctx)
            norm = accel.clip_grad_norm(model, ctx, CLIP, optimizer=optimizer)
            if norm is not None:
                norms.append(float(norm))
            optimizer.step()
            optimizer.zero_grad()
    return full_params(model, ctx), norms


def full_params(model, ctx) -> dict[str, torch.Tensor]:
    if ctx.backend == "deepspeed":
        from accel.backends.deepspeed import get_full_model_state

        return get_full_model_state(model)
    return {k: v.detach().clone() for k, v in accel.unwrap_model(model, ctx).state_dict().items()}


@functools.cache
def reference(precision: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, the whole global batch, plain PyTorch placement."""
    return train(accel.Context(), precision, "single", 1)


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# ---------------------------------------------------------------- the training matrix

MATRIX = [(stage, precision, accumulation)
          for stage in (1, 2, 3) for precision in ("no", "bf16") for accumulation in (1, 2)]
OFFLOAD = [  # (strategy, precision, accumulation)
    (DeepSpeed(stage=2, offload_optimizer=True), "no", 2),
    (DeepSpeed(stage=3, offload_optimizer=True, offload_params=True), "bf16", 1),
]


def train_matrix(ctx, with_fp16: bool):
    results = {}
    for stage, precision, accumulation in MATRIX:
        results[stage, precision, accumulation] = train(ctx, precision, DeepSpeed(stage=stage),
                                                        accumulation)
    for index, (strategy, precision, accumulation) in enumerate(OFFLOAD):
        results["offload", index] = train(ctx, precision, strategy, accumulation)
    if with_fp16:
        for stage in (1, 2, 3):
            results[stage, "fp16", 2] = train(ctx, "fp16", DeepSpeed(stage=stage), 2)
    else:
        results["fp16_refused"] = _error_of(train, ctx, "fp16", DeepSpeed(stage=2), 1)
    results["gas_conflict"] = _error_of(
        train, ctx, "no", DeepSpeed(stage=2, config={"gradient_accumulation_steps": 4}), 2)
    return results


def _error_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects type and message
        return type(exc).__name__, str(exc)
    return None


@pytest.fixture(scope="module")
def matrix_results(world_results):
    return [results["matrix"] for results in world_results]


def assert_matches_reference(ranks, precision):
    expected, expected_norms = reference(precision)
    for params, norms in ranks:
        for name, value in expected.items():
            diff = (params[name] - value).abs().max().item()
            assert diff <= TOLERANCE[precision], f"{name} differs by {diff}"
        # clip_grad_norm reports DeepSpeed's norm of the whole gradient, before clipping
        assert len(norms) == len(expected_norms)
        assert norms == pytest.approx(expected_norms, rel=NORM_TOLERANCE[precision])
    for name in expected:  # every rank holds the same weights, bit for bit
        assert torch.equal(ranks[0][0][name], ranks[1][0][name])


@pytest.mark.parametrize("stage,precision,accumulation", MATRIX,
                         ids=[f"zero{s}-{p}-acc{a}" for s, p, a in MATRIX])
def test_zero_stages_match_one_process(matrix_results, stage, precision, accumulation):
    assert_matches_reference([r[stage, precision, accumulation] for r in matrix_results],
                             precision)


@pytest.mark.parametrize("index", range(len(OFFLOAD)), ids=["zero2-optimizer", "zero3-all"])
def test_cpu_offload_matches_one_process(matrix_results, index):
    assert_matches_reference([r["offload", index] for r in matrix_results], OFFLOAD[index][1])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_matches_one_process(matrix_results, stage):
    if not fp16_supported():
        pytest.skip("DeepSpeed refuses fp16 on this CPU (no mkldnn fp16 kernels)")
    assert_matches_reference([r[stage, "fp16", 2] for r in matrix_results], "fp16")


def test_fp16_is_refused_clearly_where_deepspeed_cannot_run_it(matrix_results):
    if fp16_supported():
        pytest.skip("this machine runs DeepSpeed fp16 (test_fp16_matches_one_process)")
    kind, message = matrix_results[0]["fp16_refused"]
    assert kind == "UnsupportedError" and "fp16" in message and "bf16" in message


def test_clipping_really_clips():
    """The norms are above CLIP, so the matrix checks DeepSpeed's clipping too."""
    assert max(reference("no")[1]) > CLIP


def test_config_accumulation_differing_from_the_context_is_an_error(matrix_results):
    kind, message = matrix_results[0]["gas_conflict"]
    assert kind == "IncompatibleOptionsError"
    assert "gradient_accumulation_steps=4" in message and "accumulate_grads" in message
    assert "says 2" in message


# ---------------------------------------------------------------- config, in-process

def test_strategy_by_name_and_validation():
    assert resolve_strategy("deepspeed", accel.Context()) == DeepSpeed()
    with pytest.raises(IncompatibleOptionsError, match="stage must be 1"):
        DeepSpeed(stage=4)


def facts(**changes):
    values = dict(precision="bf16", grad_accum_steps=2, world_size=2, device_type="cpu",
                  micro_batch_size=4, micro_batch_source="the loader")
    return ds_config.Facts(**{**values, **changes})


def test_config_is_written_from_the_context():
    config = ds_config.engine_config({"train_batch_size": "auto", "bf16": {"enabled": "auto"}},
                                     DeepSpeed(stage=3, offload_optimizer=True), facts())
    assert config["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert (config["gradient_accumulation_steps"], config["train_micro_batch_size_per_gpu"],
            config["train_batch_size"]) == (2, 4, 16)
    assert config["gradient_clipping"] == 0.0  # clip_grad_norm sets it in the loop


@pytest.mark.parametrize("user,strategy,changes,names", [
    ({"gradient_accumulation_steps": 8}, DeepSpeed(), {}, ["gradient_accumulation_steps=8", "2"]),
    ({"bf16": {"enabled": True}}, DeepSpeed(), {"precision": "no"}, ["bf16.enabled=True", "'no'"]),
    ({"zero_optimization": {"stage": 1}}, DeepSpeed(stage=3), {}, ["stage=1", "stage=3"]),
    ({"train_micro_batch_size_per_gpu": 8}, DeepSpeed(), {},
     ["train_micro_batch_size_per_gpu=8", "the loader says 4"]),
    ({"train_batch_size": 64}, DeepSpeed(), {}, ["train_batch_size=64", "4 x 2 x 2"]),
])
def test_a_config_that_disagrees_names_both_values(user, strategy, changes, names):
    with pytest.raises(IncompatibleOptionsError) as error:
        ds_config.engine_config(user, strategy, facts(**changes))
    for name in names:
        assert name in str(error.value)


def test_config_rejections():
    with pytest.raises(IncompatibleOptionsError, match="wrap_optimizer"):
        ds_config.engine_config({"optimizer": {"type": "Adam"}}, DeepSpeed(), facts())
    with pytest.raises(IncompatibleOptionsError, match="stage 3"):
        ds_config.engine_config({}, DeepSpeed(stage=2, offload_params=True), facts())
    with pytest.raises(UnsupportedError, match="fp8"):
        ds_config.engine_config({}, DeepSpeed(), facts(precision="fp8"))
    # nothing tells the batch size yet (engine built to load a checkpoint): 1 stands in
    unknown = facts(micro_batch_size=None, grad_accum_steps=1)
    assert ds_config.engine_config({}, DeepSpeed(), unknown)["train_batch_size"] == 2
    assert ds_config.micro_batch_pending({}, unknown)


def test_fp16_loss_scaling_follows_the_grad_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=500)
    config = ds_config.engine_config({}, DeepSpeed(), facts(precision="fp16", grad_scaler=scaler))
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 10,
                              "loss_scale_window": 500, "hysteresis": 1}
    with pytest.raises(IncompatibleOptionsError, match="initial_scale_power=16.*10"):
        ds_config.engine_config({"fp16": {"initial_scale_power": 16}}, DeepSpeed(),
                                facts(precision="fp16", grad_scaler=scaler))


def test_a_json_config_file_is_read(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3}, "bfloat16": {"enabled": true}}')
    assert ds_config.load_user_config(path) == {"zero_optimization": {"stage": 3},
                                                "bf16": {"enabled": True}}
    assert ds_config.engine_config(ds_config.load_user_config(path), DeepSpeed(),
                                   facts())["zero_optimization"]["stage"] == 3


def test_shard_model_without_a_process_group_says_how_to_start_one():
    with pytest.raises(IncompatibleOptionsError, match="process group"):
        accel.shard_model(nn.Linear(2, 2), accel.Context(), strategy=DeepSpeed())


# ---------------------------------------------------------------- engines and state

def two_engines_and_state(ctx, directory: str):
    return {
        "independent": independent_engines(ctx),
        "inference": inference_engine(ctx),
        "zero_init": zero_init(ctx),
        "precision": precision_layout(ctx),
        "checkpoint": checkpoint_round_trip(ctx, directory),
        "errors": loop_errors(ctx),
    }


def independent_engines(ctx):
    """Two trained models, one engine each, interleaved; each matches its own run."""
    a, opt_a, ctx_a = prepare(ctx, "no", DeepSpeed(stage=2), 1)
    b, opt_b, ctx_b = prepare(ctx, "no", DeepSpeed(stage=3), 1, lr=1e-3)
    x, y = mlp_data()
    b_before = full_params(b, ctx_b)
    steps = [(a, opt_a, ctx_a), (b, opt_b, ctx_b), (a, opt_a, ctx_a)]
    for index, (model, optimizer, own_ctx) in enumerate(steps):
        lo = index * GLOBAL_BATCH + ctx.rank * GLOBAL_BATCH // 2
        loss = nn.functional.mse_loss(model(x[lo:lo + 8]), y[lo:lo + 8])
        accel.backward(loss, optimizer, own_ctx)
        optimizer.step()
        optimizer.zero_grad()
        if index == 0:  # stepping a leaves b alone
            b_untouched = all(torch.equal(v, full_params(b, ctx_b)[k]) for k, v in b_before.items())
    return full_params(a, ctx_a), full_params(b, ctx_b), b_untouched, (opt_a.real_steps,
                                                                     opt_b.real_steps)


def inference_engine(ctx):
    """A frozen reference model: ZeRO-3 partitions it, no optimizer, same outputs."""
    plain, _ = make_mlp()
    model, ctx = accel.shard_model(make_mlp()[0], ctx, strategy=DeepSpeed(stage=3))
    x = mlp_data()[0][:4]
    with torch.no_grad():
        out = model(x)
    partitioned = all(p.numel() == 0 for p in model.parameters())
    return torch.equal(out, plain(x)), partitioned, model.optimizer is None


def precision_layout(ctx):
    """bf16: 16-bit weights in the engine, fp32 masters, and an fp32 output.

    with_amp's autocast casts the fp32 batch (the loop needs no .bfloat16()) and returns
    fp32 outputs: it is harmless on bf16 weights, and needed.
    """
    model, optimizer, ctx = prepare(ctx, "bf16", DeepSpeed(stage=2), 1)
    out = model(mlp_data()[0][:4])
    masters = full_params(model, ctx)
    return (out.dtype, model.module[0].weight.dtype, {v.dtype for v in masters.values()},
            model.config["bf16"], model.config["fp16"])


def zero_init(ctx):
    """deepspeed_init: parameters are partitioned as they are created, then train."""
    strategy = DeepSpeed(stage=3)
    with accel.deepspeed_init(ctx, strategy):
        model, optimizer = make_mlp()
    weight = model[0].weight
    at_construction = (weight.numel(), weight.ds_numel, weight.ds_tensor.numel())
    model, ctx = accel.shard_model(model, ctx, strategy=strategy)
    optimizer, ctx = accel.wrap_optimizer(optimizer, ctx)
    x, y = mlp_data()
    loss = nn.functional.mse_loss(model(x[:8]), y[:8])
    accel.backward(loss, optimizer, ctx)
    optimizer.step()
    return at_construction, optimizer.real_steps


def checkpoint_round_trip(ctx, directory: str):
    from accel.backends import deepspeed as backend

    def steps(model, optimizer, own_ctx, first, count):
        x, y = mlp_data()
        for index in range(first, first + count):
            lo = index * 8 + ctx.rank * 4
            loss = nn.functional.mse_loss(model(x[lo:lo + 4]), y[lo:lo + 4])
            accel.backward(loss, optimizer, own_ctx)
            optimizer.step()
            optimizer.zero_grad()

    model, optimizer, own = prepare(ctx, "bf16", DeepSpeed(stage=2), 1)
    steps(model, optimizer, own, 0, 2)
    backend.save_checkpoint(model, optimizer, directory, tag="step2", client_state={"epoch": 1})
    full_model, full_optimizer = backend.get_state_dict(model, optimizer, full=True)
    torch_format = optimizer.state_dict()
    steps(model, optimizer, own, 2, 2)
    expected = backend.get_full_model_state(model)
    backend.save_fp32_weights(model, f"{directory}/live.safetensors")

    resumed, resumed_opt, own2 = prepare(ctx, "bf16", DeepSpeed(stage=2), 1)
    client_state = backend.load_checkpoint(resumed, resumed_opt, directory, tag="step2")
    steps(resumed, resumed_opt, own2, 2, 2)
    from_checkpoint = backend.get_full_model_state(resumed)

    # the full (portable) state dicts: set, then the same two steps
    again, again_opt, own3 = prepare(ctx, "bf16", DeepSpeed(stage=3), 1)
    backend.set_state_dict(again, again_opt, full_model, full_optimizer, full=True)
    steps(again, again_opt, own3, 2, 2)
    from_full_state = backend.get_full_model_state(again)
    return (client_state, resumed_opt.real_steps, expected, from_checkpoint, from_full_state,
            full_model, sorted(torch_format["state"]))


def loop_errors(ctx):
    model, optimizer, own = prepare(ctx, "no", DeepSpeed(stage=2), 1)
    return {"no_sync": _error_of(_enter_no_sync, model, own),
            "step_before_forward": _error_of(optimizer.step),
            "norm_type": _error_of(accel.clip_grad_norm, model, own, 1.0, norm_type=1.0)}


def _enter_no_sync(model, ctx):
    with accel.no_sync(model, ctx):
        pass


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ds")


def whole_world(ctx, with_fp16: bool, directory: str):
    """Every multi-process check in one world: DeepSpeed's start-up is paid once."""
    return {"matrix": train_matrix(ctx, with_fp16), **two_engines_and_state(ctx, directory)}


@pytest.fixture(scope="module")
def world_results(checkpoint_dir):
    return run_world(whole_world, 2, fp16_supported(), str(checkpoint_dir), timeout=300)


@pytest.fixture(scope="module")
def engine_results(world_results):
    return world_results


def single_steps(lr: float, batches: list[int]) -> dict[str, torch.Tensor]:
    model, optimizer = make_mlp(lr)
    x, y = mlp_data()
    for index in batches:
        lo = index * GLOBAL_BATCH
        nn.functional.mse_loss(model(x[lo:lo + GLOBAL_BATCH]), y[lo:lo + GLOBAL_BATCH]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def test_two_engines_in_one_process_train_and_step_independently(engine_results):
    for a, b, b_untouched, real_steps in (r["independent"] for r in engine_results):
        assert b_untouched and real_steps == (2, 1)
        for params, expected in ((a, single_steps(1e-2, [0, 2])), (b, single_steps(1e-3, [1]))):
            for name, value in expected.items():
                assert torch.allclose(params[name], value, atol=1e-6), name


def test_inference_engine_partitions_and_matches_the_plain_model(engine_results):
    for same_output, partitioned, no_optimizer in (r["inference"] for r in engine_results):
        assert same_output and partitioned and no_optimizer


def test_bf16_engine_weights_with_fp32_masters_and_harmless_autocast(engine_results):
    output, weights, masters, bf16, fp16 = engine_results[0]["precision"]
    assert (output, weights, masters) == (torch.float32, torch.bfloat16, {torch.float32})
    assert bf16 == {"enabled": True} and fp16 == {"enabled": False}


def test_zero_init_partitions_parameters_at_construction(engine_results):
    for (numel, ds_numel, local), real_steps in (r["zero_init"] for r in engine_results):
        assert (numel, ds_numel, local) == (0, 8 * 32, 8 * 32 // 2)
        assert real_steps == 1


def test_checkpoint_resume_and_full_state_continue_identically(engine_results):
    for rank, result in enumerate(engine_results):
        client, real_steps, expected, resumed, from_full, at_step2, positions = result["checkpoint"]
        assert client["epoch"] == 1 and real_steps == 4
        for name, value in expected.items():
            assert torch.equal(resumed[name], value), name
            # ZeRO-3 in place of ZeRO-2: the same numbers in another partitioning
            assert torch.allclose(from_full[name], value, atol=1e-6), name
        assert positions == [0, 1, 2, 3]  # optimizer.state_dict(): torch's own format
        # get_state_dict(full=True): the whole state on rank 0, nothing on the others
        assert sorted(at_step2) == (["0.bias", "0.weight", "2.bias", "2.weight"]
                                    if rank == 0 else [])


def test_fp32_weights_export_to_safetensors(engine_results, checkpoint_dir, tmp_path):
    from safetensors.torch import load_file

    from accel.backends.deepspeed import checkpoint_to_fp32

    live = load_file(checkpoint_dir / "live.safetensors")
    expected = engine_results[0]["checkpoint"][2]
    assert live.keys() == expected.keys()
    assert all(torch.equal(live[k], expected[k]) for k in expected)
    # offline, from the checkpoint directory, one process: the fp32 masters at step 2
    offline = checkpoint_to_fp32(checkpoint_dir, tmp_path / "w.safetensors", tag="step2")
    at_step2 = engine_results[0]["checkpoint"][5]
    assert offline.keys() == at_step2.keys()
    assert all(torch.equal(offline[k], at_step2[k]) for k in at_step2)
    assert load_file(tmp_path / "w.safetensors").keys() == at_step2.keys()


def test_loop_errors_say_what_to_do(engine_results):
    errors = engine_results[0]["errors"]
    assert errors["no_sync"][0] == "UnsupportedError" and "accumulate_grads" in errors["no_sync"][1]
    assert errors["step_before_forward"][0] == "TransformOrderError"
    assert errors["norm_type"][0] == "UnsupportedError" and "L2 norm" in errors["norm_type"][1]


# ---------------------------------------------------------------- one GPU (lent machines)

def one_gpu(ctx, stage: int):
    """DeepSpeed needs a process group even for one process: this rank starts its own."""
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return train(accel.from_process_group(device="cuda"), "bf16", DeepSpeed(stage=stage), 2)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_bf16_on_one_cuda_gpu(stage):
    params, norms = run_world(one_gpu, 1, stage, timeout=300)[0]
    expected, expected_norms = reference("bf16")
    for name, value in expected.items():  # CUDA's bf16 kernels round unlike the CPU's
        assert (params[name].cpu() - value).abs().max().item() <= 2 * TOLERANCE["bf16"], name
    assert norms == pytest.approx(expected_norms, rel=2 * NORM_TOLERANCE["bf16"])
