"""``torch.compile`` of a model's networks, in place, behind the models' ``compile`` arguments.

``nn.Module.compile()`` compiles a module's forward in place: the module stays in the tree under its own name, so
``state_dict`` keys, checkpoints and resume are the same as without compiling (no ``_orig_mod.`` prefixes that a
``torch.compile(module)`` wrapper would add). The backend ``inductor`` (the default) needs a C++ compiler on CPU;
``aot_eager`` traces the same graphs without generating code (what the tests use).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_diffusion.errors import UserError

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(key: str, backend: str, mode: str | None) -> None:
    """One-line errors for an unknown backend or mode (``key`` is the config prefix, e.g. ``model``)."""
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise UserError(f"{key}.compile_backend {backend!r} is not a torch.compile backend; use one of "
                        f"{', '.join(sorted(backends))} (e.g. inductor)")
    if mode is not None and (mode not in MODES or backend != "inductor"):
        raise UserError(f"{key}.compile_mode {mode!r} needs compile_backend inductor and one of {', '.join(MODES)}; "
                        f"or leave {key}.compile_mode unset")


def compile_modules(modules: Iterable[torch.nn.Module], backend: str = "inductor", mode: str | None = None) -> None:
    """Compile each module's forward in place (see the module docstring)."""
    for module in modules:
        module.compile(backend=backend, mode=mode)


def maybe_compile(enabled: bool, modules: Iterable[torch.nn.Module], backend: str, mode: str | None,
                  key: str = "model") -> None:
    """The models' one-line hook: check the options, then compile ``modules`` when ``enabled``."""
    if enabled:
        check_compile(key, backend, mode)
        compile_modules(modules, backend, mode)
