"""Training checkpoints with orbax: the drafter's float32 parameters, the optimiser state and the step as one
pytree, the data iterator's position as JSON beside it. Saving is synchronous, so a kill right after `save`
returns cannot leave a half-written step that a resume would pick (orbax writes to a temporary directory and
renames it when done)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2):
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        """state: a pytree of arrays (params, optimiser state, step)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data_state)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like):
        """(state with the structure, shapes, dtypes and shardings of `like`, data iterator state)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def close(self) -> None:
        self.manager.close()
