"""The one place that builds the `accelerate.Accelerator` and reads rank / world-size environment variables.

Launches supported unchanged (always from the repo root, so `deepspeed_config_file` paths resolve):

    python -m trainer ...                                                    single process (CPU or one GPU)
    accelerate launch --config_file accelerate_configs/cpu_gloo_ddp.yaml     DDP over gloo, 2 CPU processes
    accelerate launch --config_file accelerate_configs/cpu_gloo_zero2.yaml   DeepSpeed ZeRO-2 over gloo, 2 CPU processes
    accelerate launch --config_file accelerate_configs/{single_gpu,multi_gpu_ddp,deepspeed_zero2*}.yaml   GPUs

What accelerate 1.15 gets wrong with DeepSpeed on a machine without a GPU
--------------------------------------------------------------------------
`accelerate launch` with `distributed_type: DEEPSPEED` starts the workers through torchrun
(`accelerate/commands/launch.py::deepspeed_launcher`) with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT and `ACCELERATE_USE_DEEPSPEED=true`. It does *not* set ACCELERATE_USE_CPU
(`accelerate/utils/launch.py::prepare_deepspeed_cmd_env`; the yaml's `use_cpu` only sizes OMP threads).
In each worker, `Accelerator()` -> `AcceleratorState` -> `PartialState.__init__` (accelerate/state.py) does:

1. `PartialState._prepare_backend(cpu=False, ...)`: LOCAL_RANK is set and cpu is False, so it probes
   mlu/sdaa/musa/npu/hpu/cuda/xpu/neuron; none exists, so no backend is chosen. The CPU fallback
   (`distributed_type = MULTI_CPU; backend = "gloo"`) only runs `if cpu`. Result: backend=None,
   distributed_type=NO.
2. Back in `PartialState.__init__`, the "Deal with spawning deepspeed" branch (`not cpu`, LOCAL_RANK set,
   ACCELERATE_USE_DEEPSPEED=true) calls `deepspeed.comm.init_distributed(dist_backend=None)`. DeepSpeed
   fills the backend from its own accelerator (`deepspeed/accelerator/cpu_accelerator.py`:
   `communication_backend_name()` = "gloo", or "ccl" when oneCCL bindings are installed) and really
   creates a 2-rank torch.distributed group.
3. Then `if self.backend is None:` ("No backend == no distributed training") hard-codes
   `num_processes = 1, process_index = 0, local_process_index = 0`, and finally `use_deepspeed` flips
   distributed_type to DEEPSPEED. So every rank believes it is the only, main process, while DeepSpeed
   (and torch.distributed) see two ranks: both ranks log/write as main, `prepare()` does not shard the
   data, and `Accelerator._prepare_deepspeed` computes `train_batch_size = micro * grad_accum *
   num_processes(=1)`, which DeepSpeed's config check then rejects (it expects world_size = 2).

Setting ACCELERATE_USE_CPU / `Accelerator(cpu=True)` is *not* a fix: `_prepare_backend(cpu=True)`
returns MULTI_CPU/gloo, the DeepSpeed branch is skipped (`if not cpu`), and `AcceleratorState.__init__`
only switches to DEEPSPEED `elif ... ACCELERATE_USE_DEEPSPEED ... and not cpu`, so the run silently
becomes plain DDP. Initialising the process group ourselves before the Accelerator is not a fix either:
step 3 keys on `self.backend is None`, not on whether a group exists.

The same hole, without DeepSpeed: DDP on CPU
--------------------------------------------
`distributed_type: MULTI_CPU` in an accelerate yaml does not start N processes with torchrun: without an
mpirun hostfile `launch_command` falls through to `simple_launcher`, which runs ONE process (whatever
--num_processes says). The only torchrun path for plain DDP is `distributed_type: MULTI_GPU`
(`multi_gpu_launcher`), which does not set ACCELERATE_USE_CPU either (`prepare_multi_gpu_env`), so on a
machine without a GPU each worker again ends in the "No backend" branch: distributed_type NO, 1 process,
no process group at all, every rank trains alone. Here the designed path is `cpu=True`:
`_prepare_backend(cpu=True)` returns MULTI_CPU + gloo (mpi if available), `PartialState.__init__`
initialises the gloo group from RANK/WORLD_SIZE and `prepare()` wraps the model in DDP.
(accelerate_configs/cpu_gloo_ddp.yaml is therefore MULTI_GPU + use_cpu: true; inside it is MULTI_CPU.)

The fix (one place: `build_accelerator`)
----------------------------------------
Only when the process was started by a distributed launcher (LOCAL_RANK set) and accelerate's own device
probe (the list in `_prepare_backend`) finds no device:

* DeepSpeed launch: pass `InitProcessGroupKwargs(backend=<DeepSpeed's comm backend: "gloo">)`. That public
  kwarg reaches `PartialState(cpu=False, backend="gloo")`: `_prepare_backend` returns the backend it was
  given, so `self.backend` is not None; the DeepSpeed branch calls
  `deepspeed.comm.init_distributed(dist_backend="gloo")` (the group DeepSpeed would have made anyway); the
  ranks are then read from torch.distributed (`num_processes = get_world_size()`, `process_index =
  get_rank()`, `local_process_index = LOCAL_RANK`); `set_device` keeps `cpu`; distributed_type becomes
  DEEPSPEED, so `_prepare_deepspeed` builds the real DeepSpeed engine (ZeRO stage from the json) over gloo.
* Any other launch: `Accelerator(cpu=True)` -> MULTI_CPU over gloo (above).

On a GPU none of this triggers: accelerate picks nccl itself. After construction `build_accelerator`
checks `accelerator.num_processes == WORLD_SIZE` and raises instead of training with N "main" processes.

"auto" values in the DeepSpeed json
-----------------------------------
accelerate resolves them late and partly from other sources (`utils/dataclasses.py::DeepSpeedPlugin`,
`accelerator.py::_prepare_deepspeed`): train_micro_batch_size_per_gpu from the batch_size of a
DataLoader passed to `prepare()` (error when none is passed - we do not pass ours), gradient_clipping
from a hard-coded 1.0 (not our max_grad_norm), gradient_accumulation_steps from the Accelerator,
bf16/fp16.enabled from mixed_precision (`DeepSpeedPlugin.set_mixed_precision`). We therefore build the
DeepSpeedPlugin ourselves (same source: ACCELERATE_DEEPSPEED_CONFIG_FILE), fill every one of these keys
from the recipe before the Accelerator sees it, and refuse a json whose explicit value disagrees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from trainer.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

MIXED_PRECISIONS = ("no", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------- env
def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else default


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def launched_with_deepspeed() -> bool:
    """`accelerate launch` with distributed_type DEEPSPEED (or any launcher that sets the same env)."""
    return _env_flag("ACCELERATE_USE_DEEPSPEED")


def _launched_distributed() -> bool:
    """Started by torchrun / accelerate launch / the deepspeed launcher (they all set LOCAL_RANK)."""
    return _env_int("LOCAL_RANK", -1) != -1


def _env_world_size() -> int:
    return _env_int("WORLD_SIZE", 1) or 1


def _num_nodes() -> int | None:
    """Machines in the job, when the launcher tells: torchrun's GROUP_WORLD_SIZE, else WORLD/LOCAL_WORLD."""
    nodes = _env_int("GROUP_WORLD_SIZE")
    if nodes:
        return nodes
    world, local = _env_int("WORLD_SIZE"), _env_int("LOCAL_WORLD_SIZE")
    if world and local and world % local == 0:
        return world // local
    return 1 if not _launched_distributed() else None


def _accelerate_finds_device() -> bool:
    """Whether `PartialState._prepare_backend` (accelerate/state.py) finds a device backend for a launched
    process: the same probes, in the same spirit (XLA, MLU, SDAA, MUSA, NPU, HPU, CUDA, XPU+XCCL, Neuron)."""
    import accelerate.utils as au
    import torch

    def probe(name: str, *args) -> bool:
        fn = getattr(au, name, None)  # some probes do not exist in older accelerate versions
        return bool(fn(*args)) if fn is not None else False

    if torch.cuda.is_available():
        return True
    if probe("is_xpu_available") and probe("is_xccl_available"):
        return True
    return any(
        probe(name)
        for name in (
            "is_torch_xla_available",
            "is_mlu_available",
            "is_sdaa_available",
            "is_musa_available",
            "is_npu_available",
            "is_hpu_available",
            "is_neuron_available",
        )
    )


def _deepspeed_comm_backend() -> str:
    """DeepSpeed's own choice of comm backend: on the CPU accelerator "gloo", or "ccl" with oneCCL bindings
    (deepspeed/accelerator/cpu_accelerator.py; the accelerator itself comes from DS_ACCELERATOR or probing in
    deepspeed/accelerator/real_accelerator.py::get_accelerator, with CPU as the fallback)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


# ----------------------------------------------------------------------------------------------- DeepSpeed config
def _node(config: dict, dotted: str) -> tuple[dict, str]:
    *parents, leaf = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
        if not isinstance(config, dict):
            raise UserError(f"DeepSpeed config: `{key}` must be a section (a JSON object)")
    return config, leaf


def fill_deepspeed_config(
    config: dict,
    *,
    grad_accum: int,
    mixed_precision: str,
    micro_batch_size: int,
    max_grad_norm: float,
    world_size: int,
    source: str = "the DeepSpeed config",
) -> dict:
    """Set the recipe-owned keys of a DeepSpeed config in place: "auto" or missing -> the recipe's value;
    an explicit value that disagrees -> UserError (one line per key). Returns `config`."""
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch_size) * int(grad_accum) * int(world_size),
        "gradient_clipping": float(max_grad_norm),  # 0.0 = no clipping, as in the recipe
        "bf16.enabled": mixed_precision == "bf16",
        "fp16.enabled": mixed_precision == "fp16",
    }
    problems = []
    for dotted, value in wanted.items():
        node, leaf = _node(config, dotted)
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif isinstance(value, bool):
            if str(current).lower() != str(value).lower():
                problems.append(f'{source}: {dotted}={current} but the recipe says {value}; set it to "auto"')
            node[leaf] = value
        else:
            try:
                agrees = float(current) == float(value)
            except (TypeError, ValueError):
                agrees = False
            if not agrees:
                problems.append(f'{source}: {dotted}={current} but the recipe says {value}; set it to "auto"')
    if problems:
        raise UserError("\n".join(problems))
    return config


# ----------------------------------------------------------------------------------------------- Accelerator
def build_accelerator(
    *,
    grad_accum: int,
    mixed_precision: str,
    micro_batch_size: int,
    max_grad_norm: float,
    log_with=None,
    project_dir=None,
) -> Accelerator:
    """The Accelerator for this launch (plain process, DDP, or DeepSpeed; CPU or GPU). See the module doc."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise UserError(f"mixed_precision={mixed_precision!r}: expected one of {', '.join(MIXED_PRECISIONS)}")
    if grad_accum < 1 or micro_batch_size < 1 or max_grad_norm < 0:
        raise UserError(
            f"need grad_accum >= 1, micro_batch_size >= 1, max_grad_norm >= 0 "
            f"(got {grad_accum}, {micro_batch_size}, {max_grad_norm})"
        )
    # Accelerator(gradient_accumulation_steps=...) is silently overridden by this env var
    # (set by the launcher from a yaml's deepspeed_config.gradient_accumulation_steps).
    env_accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if env_accum and env_accum.isdigit() and int(env_accum) != grad_accum:
        raise UserError(
            f"the accelerate config sets gradient_accumulation_steps={env_accum} but the recipe says "
            f"{grad_accum}; remove it from the accelerate config (the recipe owns it)"
        )

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    kwargs_handlers = []
    deepspeed_plugin = None
    cpu = False
    no_device_launch = _launched_distributed() and not _accelerate_finds_device()
    if launched_with_deepspeed():
        if _env_flag("ACCELERATE_USE_CPU"):
            # AcceleratorState ignores DeepSpeed when cpu=True (state.py: `... and not cpu`): plain DDP instead.
            raise UserError(
                "ACCELERATE_USE_CPU=true with a DeepSpeed launch: accelerate would silently run plain "
                "DDP instead; unset it (accelerate_configs/cpu_gloo_zero2.yaml needs nothing else)"
            )
        # Reads ACCELERATE_DEEPSPEED_CONFIG_FILE (or the yaml's inline deepspeed_config), like Accelerator() would.
        deepspeed_plugin = DeepSpeedPlugin()
        source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the accelerate deepspeed_config")
        fill_deepspeed_config(
            deepspeed_plugin.deepspeed_config,
            grad_accum=grad_accum,
            mixed_precision=mixed_precision,
            micro_batch_size=micro_batch_size,
            max_grad_norm=max_grad_norm,
            world_size=_env_world_size(),
            source=source,
        )
        deepspeed_plugin.gradient_accumulation_steps = grad_accum
        deepspeed_plugin.gradient_clipping = float(max_grad_norm)
        if no_device_launch:
            # The fix (module doc): give PartialState a backend, so it reads the ranks from torch.distributed.
            kwargs_handlers.append(InitProcessGroupKwargs(backend=_deepspeed_comm_backend()))
    elif no_device_launch:
        cpu = True  # torchrun-launched DDP without a GPU: MULTI_CPU over gloo (module doc)

    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        cpu=cpu,
        deepspeed_plugin=deepspeed_plugin,
        kwargs_handlers=kwargs_handlers or None,
        log_with=log_with,
        project_dir=None if project_dir is None else str(project_dir),
    )
    expected = _env_world_size()
    if accelerator.num_processes != expected:
        raise UserError(
            f"accelerate sees {accelerator.num_processes} process(es) ({accelerator.distributed_type.value}, "
            f"backend {accelerator.state.backend}) but the launcher started WORLD_SIZE={expected}; "
            "every rank would act as the main process; launch with one of accelerate_configs/*.yaml "
            "(cpu_gloo_ddp.yaml / cpu_gloo_zero2.yaml on a machine without a GPU)"
        )
    return accelerator


# ----------------------------------------------------------------------------------------------- queries
def is_main(accelerator: Accelerator | None = None) -> bool:
    """Global rank 0. Works before the Accelerator exists (then from the launcher's RANK)."""
    if accelerator is not None:
        return accelerator.is_main_process
    from accelerate.state import PartialState

    if PartialState._shared_state:  # an Accelerator / PartialState exists in this process
        return PartialState().is_main_process
    return (_env_int("RANK", 0) or 0) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(accelerator: Accelerator | None = None, *, local: bool = False) -> Iterator[None]:
    """The main process runs the block first (e.g. tokenizes and fills a cache); the others wait, then run it.

    `local=True`: the main process of each node goes first (caches on node-local disks). If the main
    process fails inside the block the others are still released (and will usually fail the same way)
    rather than hang until the collective timeout.
    """
    if accelerator is not None:
        first = accelerator.is_local_main_process if local else accelerator.is_main_process
    else:
        first = (_env_int("LOCAL_RANK", 0) or 0) == 0 if local else is_main()
    barrier = accelerator.wait_for_everyone if accelerator is not None else _barrier
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


def is_deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of a DeepSpeed run; 0 when not DeepSpeed (nothing partitioned)."""
    if not is_deepspeed(accelerator):
        return 0
    stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    return int(stage)


def world_info(accelerator: Accelerator) -> dict:
    """Where this process stands: world_size, rank, local_rank, distributed_type ("NO", "MULTI_CPU",
    "MULTI_GPU", "DEEPSPEED", ...), num_nodes (None when unknown), zero_stage, backend, device."""
    return {
        "world_size": accelerator.num_processes,
        "rank": accelerator.process_index,
        "local_rank": accelerator.local_process_index,
        "distributed_type": accelerator.distributed_type.value,
        "num_nodes": _num_nodes(),
        "zero_stage": zero_stage(accelerator),
        "backend": accelerator.state.backend,
        "device": str(accelerator.device),
    }


def describe_launch(info: dict) -> str:
    """The start line's words for a launch (`world_info`): `1 process, no distribution`, `2 processes, DDP (gloo)`,
    `8 processes, DeepSpeed ZeRO-2 (nccl)`, and the device."""
    n = info["world_size"]
    processes = f"{n} process" + ("es" if n != 1 else "")
    kind = info["distributed_type"]
    backend = f" ({info['backend']})" if info.get("backend") else ""
    if kind == "NO":
        how = "no distribution"
    elif kind == "DEEPSPEED":
        how = f"DeepSpeed ZeRO-{info.get('zero_stage', 0)}{backend}"
    elif kind.startswith("MULTI_"):
        how = f"DDP{backend}"
    else:
        how = f"{kind}{backend}"
    return f"{processes}, {how}, device {info['device']}"
