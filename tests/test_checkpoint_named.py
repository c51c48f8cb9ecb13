"""Many objects per checkpoint, by name, and partial saves (`select=`, `strict=False`).

Two models with two optimizers (a GAN's pair) and their schedulers round trip bitwise
and train on identically; a missing or extra name is refused before anything loads,
naming what to pass. A PEFT LoRA model saves its adapter only (a small fraction of the
model) and loads into a fresh base model with identical outputs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import accel
from accel.checkpoint import CheckpointMismatchError, load_state, save_state
from accel.errors import IncompatibleOptionsError, InvalidArgumentError


def gan(seed: int):
    """Generator and discriminator with their optimizers and schedulers."""
    torch.manual_seed(seed)
    ctx = accel.Context()
    generator = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    discriminator = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    opt_g, ctx = accel.wrap_optimizer(torch.optim.Adam(generator.parameters(), lr=0.01), ctx)
    opt_d, ctx = accel.wrap_optimizer(
        torch.optim.SGD(discriminator.parameters(), lr=0.05, momentum=0.9), ctx)
    sched_g, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.StepLR(opt_g, step_size=2, gamma=0.5), ctx, opt_g)
    sched_d, ctx = accel.wrap_scheduler(
        torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.9), ctx, opt_d)
    objects = {"models": {"generator": generator, "discriminator": discriminator},
               "optimizers": {"generator": opt_g, "discriminator": opt_d},
               "schedulers": {"g": sched_g, "d": sched_d}}
    return ctx, objects


def play(objects, rounds: int) -> None:
    generator, discriminator = objects["models"].values()
    opt_g, opt_d = objects["optimizers"].values()
    for _ in range(rounds):
        fake = generator(torch.randn(5, 3))
        opt_d.zero_grad()  # the generator's step left gradients in the discriminator
        discriminator(fake.detach()).mean().backward()
        opt_d.step()
        opt_g.zero_grad()
        (-discriminator(fake).mean()).backward()
        opt_g.step()
        for scheduler in objects["schedulers"].values():
            scheduler.step()


def snapshot(objects) -> dict[str, torch.Tensor]:
    tensors = {f"{name}.{key}": value.detach().clone()
               for name, model in objects["models"].items()
               for key, value in model.state_dict().items()}
    for name, optimizer in objects["optimizers"].items():
        for index, entry in optimizer.state_dict()["state"].items():
            tensors.update({f"{name}/{index}/{key}": torch.as_tensor(value).clone()
                            for key, value in entry.items()})
    return tensors


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_two_models_and_two_optimizers_round_trip_bitwise_and_train_on_alike(tmp_path):
    ctx, objects = gan(0)
    play(objects, 3)
    path = save_state(tmp_path / "gan", ctx, **objects)
    saved = snapshot(objects)
    assert {p.name for p in (path / "models").iterdir()} == {
        "generator.json", "generator.safetensors", "discriminator.json",
        "discriminator.safetensors"}
    play(objects, 2)
    reference = snapshot(objects)

    ctx, copies = gan(1)
    info = load_state(path, ctx, **copies)
    assert info.step == 3 and same(snapshot(copies), saved)
    assert [s.get_last_lr() for s in copies["schedulers"].values()] == [
        [0.005], [pytest.approx(0.05 * 0.9 ** 3)]]
    play(copies, 2)  # the generators' states were restored too: the same draws
    assert same(snapshot(copies), reference)


def test_missing_or_extra_names_and_mixed_forms_are_refused_before_loading(tmp_path):
    ctx, objects = gan(0)
    play(objects, 1)
    path = save_state(tmp_path / "gan", ctx, **objects, rng=False)
    _, copies = gan(1)
    before = snapshot(copies)
    models = copies["models"]
    with pytest.raises(IncompatibleOptionsError, match=r"pass also \['discriminator'\]"):
        load_state(path, ctx, models={"generator": models["generator"]}, rng=False)
    with pytest.raises(IncompatibleOptionsError, match=r"it lacks \['critic'\]"):
        load_state(path, ctx, models={**models, "critic": nn.Linear(1, 1)}, rng=False)
    with pytest.raises(IncompatibleOptionsError, match=r"schedulers named \['g'\].*\['d', 'g'\]"):
        load_state(path, ctx, models=models, schedulers={"g": copies["schedulers"]["g"]},
                   rng=False)
    with pytest.raises(IncompatibleOptionsError, match="saved with models= named"):
        load_state(path, ctx, model=models["generator"], rng=False)
    with pytest.raises(InvalidArgumentError, match="not both"):
        save_state(tmp_path / "x", ctx, model=models["generator"], models=models)
    with pytest.raises(InvalidArgumentError, match=r"optimizers named \['critic'\]"):
        save_state(tmp_path / "x", ctx, models=models,
                   optimizers={"critic": copies["optimizers"]["generator"]})
    with pytest.raises(InvalidArgumentError, match="models"):
        save_state(tmp_path / "x", ctx, models={"../up": models["generator"]})
    # optimizers and schedulers may be left out as a whole: the models load alone
    load_state(path, ctx, models=models, rng=False)
    assert same({k: v for k, v in snapshot(copies).items() if "/" not in k},
                {k: v for k, v in snapshot(objects).items() if "/" not in k})
    assert not same(snapshot(copies), before)


def test_a_selected_part_loads_with_strict_false_and_leaves_the_rest(tmp_path):
    ctx = accel.Context()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    path = save_state(tmp_path / "head", ctx, model=model, rng=False,
                      select=lambda name: name.startswith("1."))
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    body = other[0].weight.detach().clone()
    with pytest.raises(CheckpointMismatchError, match="(?s)lacks 0.bias, 0.weight.*strict=False"):
        load_state(path, ctx, model=other, rng=False)
    load_state(path, ctx, model=other, rng=False, strict=False)
    assert torch.equal(other[1].weight, model[1].weight) and torch.equal(other[0].weight, body)
    with pytest.raises(InvalidArgumentError, match="select kept none of the 4 tensors"):
        save_state(tmp_path / "none", ctx, model=model, select=lambda name: False)


def lora_model(seed: int):
    import peft
    import transformers

    torch.manual_seed(0)  # the same pretrained base on both sides
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(config)
    torch.manual_seed(seed)  # LoRA's own initialisation
    adapter = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(base, adapter)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                    reason="peft is not installed (pip install 'accel[peft]')")
def test_a_lora_adapter_saves_alone_and_loads_into_a_fresh_base_model(tmp_path):
    ctx = accel.Context()
    model = lora_model(seed=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, ctx = accel.wrap_optimizer(torch.optim.AdamW(trainable, lr=0.01), ctx)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # LoRA's B starts at zero: train so that the adapter matters
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_state(tmp_path / "adapter", ctx, model=model, optimizer=optimizer, rng=False,
                      select=lambda name: "lora_" in name)
    adapter_bytes = (path / "model.safetensors").stat().st_size
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert adapter_bytes < model_bytes / 20, (adapter_bytes, model_bytes)

    fresh = lora_model(seed=2)
    fresh_optimizer, ctx = accel.wrap_optimizer(
        torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.01), ctx)
    with torch.no_grad():
        assert not torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)
    load_state(path, ctx, model=fresh, optimizer=fresh_optimizer, rng=False, strict=False)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)
    for optimizer_ in (optimizer, fresh_optimizer):  # one more step: the same again
        (model if optimizer_ is optimizer else fresh)(input_ids=tokens,
                                                      labels=tokens).loss.backward()
        optimizer_.step()
    assert all(torch.equal(a, b) for a, b in zip(trainable, [p for p in fresh.parameters()
                                                             if p.requires_grad], strict=True))
