"""``python tests/fsdp_on_cpu.py ARGS`` (under torchrun) = ``flowtune ARGS`` with Accelerate's FSDP2
running on CPU gloo processes.

Accelerate turns its FSDP plugin on only for GPU process groups; on CPU processes it silently
runs DDP.  torch's FSDP2 itself shards on CPU meshes, so this test entry point marks the CPU group
as an FSDP one right after ``Accelerator()`` is built.  Everything after that is Accelerate's real
FSDP2 path (``fully_shard`` per transformer block, sharded gradient clipping, sharded optimizer and
model state in ``save_state`` / ``load_state``) and flowtune's own, unchanged.
"""

import accelerate
import accelerate.state as state
from accelerate.utils import DistributedType

_init = accelerate.Accelerator.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.state.distributed_type == DistributedType.MULTI_CPU:
        for shared in (state.AcceleratorState._shared_state, state.PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        state.AcceleratorState._shared_state["fsdp_plugin"] = fsdp_plugin


accelerate.Accelerator.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from flowtune.cli import main

    main()
