"""One dispatcher per op: registered implementations, the tuned table's winners, and the reference fallback.

An op (paged attention, MoE) makes a `Dispatcher` with its pure-JAX reference and the name of its tuned table.
Kernels register with an availability check (may this kernel be picked automatically on the current default
device, where it was verified?). A call takes the search loop's winner for the device and shape, else the first
available kernel, else the reference; a kernel that declines a shape by raising NotImplementedError at trace
time falls back to the reference, unless the caller forced it.
"""

from __future__ import annotations

from collections.abc import Callable

from pallas_kernels import tuning


def never() -> bool:
    return False


class Dispatcher:
    def __init__(self, op: str, reference: Callable):
        self.op, self.reference = op, reference
        # name -> (implementation, may it be picked automatically on this device?)
        self.implementations: dict[str, tuple[Callable, Callable[[], bool]]] = {"reference": (reference, never)}
        self.when: dict[str, Callable[..., bool] | None] = {}
        self.revs: dict[str, int] = {}

    def register(self, name: str, fn: Callable, available: Callable[[], bool] = never,
                 when: Callable[..., bool] | None = None, rev: int = 1) -> None:
        """when: the calls (by the op's positional arguments) this kernel is picked for automatically where it
        is available, and called with no arguments, whether it takes every call; None: every call.
        rev: the kernel's revision. Raise it with a change that moves its timings: tuned entries recorded at
        another revision (an entry without one is revision 1) are then passed over until the shape is retuned,
        instead of a config picked for the old code staying in force."""
        self.implementations[name] = (fn, available)
        self.when[name] = when
        self.revs[name] = rev

    def choose(self, args: tuple | None = None) -> str:
        """The first registered kernel available on this device that takes these arguments (`when`); without
        args, `when` is asked with none: whether it takes every call."""
        for name, (_, available) in self.implementations.items():
            when = self.when.get(name)
            if name != "reference" and available() and (when is None or when(*(args or ()))):
                return name
        return "reference"

    def record(self, key: str, best: tuning.Trial):
        """Stores the search loop's winner for this device and shape key at its kernel's current revision;
        returns the table file's path."""
        return tuning.record(self.op, key, best, rev=self.revs.get(best.impl, 1))

    def tuned(self, key: str) -> dict | None:
        """The search loop's winner {"impl", "config", ...} for this device and shape key, if it ran for them at
        the kernel's current revision."""
        entry = tuning.lookup(self.op, key)
        if entry is None or entry["impl"] not in self.implementations:
            return None
        return entry if entry.get("rev", 1) == self.revs.get(entry["impl"], 1) else None

    def __call__(self, args: tuple, kwargs: dict, *, key: str, impl: str | None, config):
        """Runs the op on args/kwargs (the reference's signature) with the implementation picked for `key`."""
        name = impl
        if name is None:
            entry = self.tuned(key)
            name, config = (entry["impl"], entry["config"] or None) if entry else (self.choose(args), None)
        if name not in self.implementations:
            raise ValueError(f"unknown {self.op} implementation {name!r} (known: {', '.join(self.implementations)})")
        try:
            fn = self.implementations[name][0]
            return fn(*args, **kwargs, **({"config": config} if config else {}))
        except NotImplementedError:
            if impl is not None:
                raise
            return self.reference(*args, **kwargs)
