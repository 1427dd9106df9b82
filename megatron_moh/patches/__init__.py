"""The one way this project replaces an attribute of torch, megatron-core or megatron.training.

A plain ``module.attr = fn`` silently creates a new attribute when upstream renames the old one,
and the patch turns into a no-op nobody notices. `replace` and `wrap` instead assert that the
target exists (and, where given, that its parameters are the expected ones), remember the
original, and are idempotent: installing the same patch twice changes nothing.
`tests/unit/test_patches.py` lists every target, so a megatron-core upgrade that renames one
fails loudly in CI.

The patches themselves live beside this module, one file per concern:
`cpu` (megatron on CPU with gloo), `checkpointing` (safe, exact checkpoints),
`megatron_training` (start-up and argument parsing of megatron.training); the MoH metrics hook
megatron's log from `megatron_moh.metrics`. `install_all` installs every one of them and is called
by the entry points only (``pretrain_moh.py``, the commands, the scripts, the test harness);
library code that depends on a patch checks it with `require` and fails loudly without it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable


class PatchTargetMissing(RuntimeError):
    """A patch's target is gone or changed shape: the dependency was upgraded past this project."""


class PatchNotInstalled(RuntimeError):
    """Code that depends on a patch ran in a process whose entry point did not install it."""


@dataclass(frozen=True)
class Patch:
    """One installed replacement."""

    target: str
    """Dotted name of the replaced attribute, e.g. ``torch.cuda.current_device``."""
    original: Any
    replacement: Any
    why: str


_INSTALLED: dict[tuple[int, str], Patch] = {}


def _owner_name(owner: Any) -> str:
    if inspect.ismodule(owner):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"


def _check_params(target: str, original: Any, params: tuple[str, ...]) -> None:
    try:
        names = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError) as err:
        raise PatchTargetMissing(f"{target} has no inspectable signature ({err}); this patch expects "
                                 f"parameters {params}") from None
    if names[: len(params)] != params:
        raise PatchTargetMissing(f"{target} takes {names}, but this patch was written for parameters starting "
                                 f"with {params}: megatron-moh needs updating for this version")


def _install(owner: Any, name: str, build: Callable[[Any], Any], why: str, params: tuple[str, ...] | None) -> Any:
    key = (id(owner), name)
    if key in _INSTALLED:
        return _INSTALLED[key].replacement
    target = f"{_owner_name(owner)}.{name}"
    if not hasattr(owner, name):
        raise PatchTargetMissing(f"{target} does not exist: the installed version of its library is not the "
                                 f"one megatron-moh was written for (patch: {why})")
    original = getattr(owner, name)
    if params is not None:
        _check_params(target, inspect.unwrap(original) if callable(original) else original, params)
    replacement = build(original)
    setattr(owner, name, replacement)
    _INSTALLED[key] = Patch(target, original, replacement, why)
    return replacement


def replace(owner: Any, name: str, replacement: Any, *, why: str, params: tuple[str, ...] | None = None) -> Any:
    """Set ``owner.name`` to ``replacement`` once; ``params``: the leading parameter names the
    original must have."""
    return _install(owner, name, lambda _: replacement, why, params)


def wrap(owner: Any, name: str, make: Callable[[Any], Any], *, why: str, params: tuple[str, ...] | None = None) -> Any:
    """Set ``owner.name`` to ``make(original)`` once (a second call does not wrap twice)."""
    return _install(owner, name, make, why, params)


def original(owner: Any, name: str) -> Any:
    """What ``owner.name`` was before this project patched it (the attribute itself if unpatched)."""
    patch = _INSTALLED.get((id(owner), name))
    return patch.original if patch else getattr(owner, name)


def installed() -> list[Patch]:
    """Every patch installed in this process, in installation order."""
    return list(_INSTALLED.values())


def require(owner: Any, name: str) -> None:
    """Raise `PatchNotInstalled` unless ``owner.name`` was patched in this process."""
    if (id(owner), name) not in _INSTALLED:
        raise PatchNotInstalled(f"{_owner_name(owner)}.{name} is not patched in this process: call "
                                f"megatron_moh.patches.install_all() at start-up, as the entry points do")


def install_all() -> None:
    """Install every patch of the project (idempotent). Entry points call it once, after
    `megatron_moh.platform.setup` chose the device and before megatron builds or reads anything:
    the CPU redirection when the device is the CPU, then megatron.training's start-up,
    checkpointing and the MoH metrics."""
    from megatron_moh import metrics, platform
    from megatron_moh.patches import checkpointing, cpu, megatron_training

    megatron_training.install()
    if platform.on_cpu():
        cpu.install()
    checkpointing.install()
    metrics.install()
