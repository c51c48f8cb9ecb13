"""The training transforms: each takes PyTorch objects and a Context and returns PyTorch
objects and a new Context (with_amp, shard_model, wrap_optimizer, accumulate_grads,
local_sgd, join_uneven_inputs, compose). Import them from `accel`."""
