"""Exception types raised by accel. Every message names the problem and the fix."""

from __future__ import annotations


class AccelError(Exception):
    """Base class of every error accel raises on purpose."""


class LaunchEnvironmentError(AccelError):
    """The launch environment (torchrun, SLURM, MPI, ...) is incomplete or inconsistent."""


class NotConnectedError(AccelError):
    """Ranks that should form one world did not join the same process group."""


class InvalidArgumentError(AccelError, ValueError):
    """An argument has a value the function cannot accept (unknown op, src outside the world)."""


class TransformOrderError(AccelError):
    """A transform was applied twice, or in an order that cannot work."""


class IncompatibleOptionsError(AccelError):
    """Two options, or an option and the Context, contradict each other."""


class MissingDependencyError(AccelError, ImportError):
    """An optional package (deepspeed, torch_xla, torchao, ...) is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the package {package!r}, which is not installed. "
            f"Install it with: pip install 'accel[{extra}]'"
        )
        self.package = package
        self.extra = extra


class UnsupportedError(AccelError):
    """The requested feature cannot run on this hardware or backend."""


class CollectiveMismatchError(AccelError):
    """Ranks passed tensors of different shapes or types to one collective (debug mode)."""


class WorldTimeoutError(AccelError, TimeoutError):
    """A multi-process run did not finish in time."""


class RankFailedError(AccelError):
    """A rank of a multi-process run raised; the message carries its traceback."""


class BatchSizeExhaustedError(AccelError):
    """find_executable_batch_size ran out of memory even at batch size 1."""


class CorruptCheckpointError(AccelError):
    """A checkpoint file is missing, truncated or does not match its recorded checksum."""


class CheckpointNotFoundError(AccelError, FileNotFoundError):
    """There is no complete checkpoint where one was asked for."""


class UntrustedCheckpointError(AccelError):
    """A checkpoint asks for what its author could abuse: unpickling, or a file outside it."""


class CheckpointSaveError(AccelError, OSError):
    """A checkpoint could not be written (disk full, ...); its partial folder was removed."""


class CheckpointMismatchError(InvalidArgumentError):
    """A checkpoint does not fit the model, optimizer or scheduler it is loaded into."""


class GradSyncOrderError(AccelError):
    """A backward would break no_sync's rule (sync follows the forward) and cannot be honoured."""


class StuckRanksError(AccelError, TimeoutError):
    """Ranks did not reach a barrier within its bound; `missing` holds their ranks."""

    def __init__(self, message: str, missing: tuple[int, ...] = ()):
        super().__init__(message)
        self.missing = missing


class CollectiveFailedError(AccelError, RuntimeError):
    """A collective failed in torch.distributed: a rank left, or ranks passed mismatched data."""


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument has the wrong type (a str where an optimizer goes, a float for an int)."""


class InvalidOptionError(InvalidArgumentError, IncompatibleOptionsError):
    """A strategy config (accel.DDP(...), accel.FSDP(...)) got an option value it cannot take.

    Also an IncompatibleOptionsError: what the strategies raised for such a value when
    they checked it in shard_model, before the configs checked their options when built.
    """
