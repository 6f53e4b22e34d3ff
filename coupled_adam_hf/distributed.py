"""Coupled Adam on sharded parameters (DTensor: FSDP2, tensor parallelism), and which parallel setups are allowed.

The coupled second moment is a mean over the rows (vocabulary items) of an embedding matrix. When the rows are
split over ranks -- FSDP2 shards every parameter on dim 0 (``Shard(0)``), vocabulary-parallel tensor parallelism
does too -- each rank holds only some rows, and a per-shard mean would be silently wrong. So the optimizer
all-reduces the local per-column *sum* (an ``[H]`` vector) over the ranks that hold the rows and divides by the
global row count. Split by columns (``Shard(1)``) or replicated, a rank holds whole columns: its own mean is the
global one and no communication is needed.

Setups that flatten parameters into 1-D shards (FSDP1, DeepSpeed ZeRO, Megatron-LM, XLA FSDP) lose the row
structure altogether; :func:`check_supported_parallelism` refuses them before training starts.

Everything here is derived at step time from each DTensor's own placements and device mesh, so it survives
accelerate swapping the optimizer's parameters for DTensors after the optimizer was built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "RowShardedColumnMean",
    "check_supported_parallelism",
    "column_state_zeros",
    "grad_with_param_layout",
    "lay_out_state_like_param",
    "row_sharded_column_mean",
    "all_ranks_finite",
    "SUPPORTED_PARALLELISM",
]

SUPPORTED_PARALLELISM = (
    "one device, DDP (`torchrun`, `accelerate launch --multi_gpu`), or FSDP2 (accelerate config with "
    "`fsdp_version: 2`, e.g. `accelerate launch --config_file recipes/accelerate/fsdp2.yaml scripts/train.py "
    "RECIPE`; TrainingArguments `fsdp_config={'version': 2}`; or transformers' own "
    "`from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))` for untied embeddings)"
)


# ---------------------------------------------------------------------------------------------- placements
def _sharded_dim(placement: Any, ndim: int) -> int | None:
    """The tensor dim a placement shards (``_StridedShard`` included), None for Replicate."""
    if placement.is_partial():
        raise ValueError(
            f"CoupledAdam: a parameter with a Partial placement ({placement}) has no well-defined rows; "
            "parameters must be Shard or Replicate DTensors"
        )
    if not placement.is_shard():
        return None
    return placement.dim % ndim


def _mesh_dims_sharding(param: Tensor, rows: bool) -> list[int]:
    """Mesh dims over which ``param``'s rows (``rows=True``) or its other dims (``rows=False``) are split."""
    dims = []
    for mesh_dim, placement in enumerate(param.placements):
        tensor_dim = _sharded_dim(placement, param.ndim)
        if tensor_dim is not None and (tensor_dim == 0) == rows:
            dims.append(mesh_dim)
    return dims


class RowShardedColumnMean:
    """The optimizer's column reducer for a coupled DTensor whose rows are split over ranks.

    Called with this rank's per-column sum over its own rows (``[1, *shape[1:]]``, possibly from an empty shard),
    it returns the global per-column mean. One all-reduce per row-sharding mesh dim (one for FSDP2), of
    ``H + 1`` numbers: the extra one counts the ranks that hold a gradient for the parameter, so a rank without
    a gradient can still join (contributing zero rows) and learn whether any rank had one.
    """

    def __init__(self, param: Tensor, mesh_dims: list[int]):
        self.param = param
        self.groups = [param.device_mesh.get_group(mesh_dim) for mesh_dim in mesh_dims]
        self.rows = param.shape[0]
        self.ranks_with_grad: Tensor | None = None

    def __call__(self, column_sum: Tensor) -> Tensor:
        has_grad = 0.0 if self.param.grad is None else 1.0
        packed = torch.cat([column_sum.reshape(-1), column_sum.new_full((1,), has_grad)])
        for group in self.groups:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        self.ranks_with_grad = packed[-1]
        return packed[:-1].reshape(column_sum.shape).div_(self.rows)

    def any_rank_has_grad(self) -> bool:
        """After a call: whether some rank holds a gradient (a host sync; asked only by ranks without one)."""
        if self.ranks_with_grad is None:
            raise RuntimeError("RowShardedColumnMean.any_rank_has_grad() is only known after a reduction")
        return bool(self.ranks_with_grad.item() > 0)


def row_sharded_column_mean(param: Tensor) -> RowShardedColumnMean | None:
    """The reducer for a coupled DTensor whose rows are split over ranks; None when every rank holds whole columns."""
    mesh_dims = _mesh_dims_sharding(param, rows=True)
    if not mesh_dims:
        return None
    return RowShardedColumnMean(param, mesh_dims)


def column_state_zeros(param: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros for a coupled DTensor's per-column state (``[1, *shape[1:]]``: compact ``exp_avg_sq``, AMSGrad max).

    Row-sharding mesh dims become ``Replicate``: every rank holds the same global column statistic, which is what
    the update reads and what distributed checkpointing saves once and reshards to any world size. Column
    sharding is kept, so a rank holds the statistics of exactly its own columns.
    """
    from torch.distributed.tensor import DTensor

    placements = _column_state_placements(param)
    local_param = param.to_local()
    local = torch.zeros((1, *local_param.shape[1:]), dtype=dtype, device=local_param.device)
    shape = torch.Size(shape)
    return DTensor.from_local(
        local, param.device_mesh, placements, run_check=False, shape=shape, stride=_contiguous_stride(shape)
    )


def lay_out_state_like_param(state: dict[str, Any], param: Tensor, dtypes: dict[str, torch.dtype], *,
                             coupled: bool, compact: bool) -> None:
    """Give loaded optimizer state the layout a DTensor parameter's fresh state would have, in place.

    Distributed checkpointing (``set_optimizer_state_dict``) already hands over DTensors laid out like this
    optimizer's own state; they are kept as they are. A plain state dict (``optimizer.state_dict()`` of a
    single-process run, loaded with ``optimizer.load_state_dict``) holds full tensors: every rank takes its own
    slice, without communication. State converted between layouts on load (a full second moment averaged into
    the compact one) is redistributed to the column layout.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    column_keys = {"max_exp_avg_sq", "exp_avg_sq"} if compact else {"max_exp_avg_sq"}
    device = param.to_local().device
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key not in state:
            continue
        column = coupled and key in column_keys
        placements = _column_state_placements(param) if column else list(param.placements)
        value = state[key]
        dtype = dtypes[key]
        if isinstance(value, DTensor):
            if value.dtype != dtype:
                value = value.to(dtype=dtype)
            if value.device_mesh != param.device_mesh or list(value.placements) != placements:
                value = value.redistribute(param.device_mesh, placements)
        else:
            value = distribute_tensor(value.to(device=device, dtype=dtype), param.device_mesh, placements,
                                      src_data_rank=None)
        state[key] = value


def _column_state_placements(param: Tensor) -> list[Any]:
    from torch.distributed.tensor import Replicate

    return [Replicate() if _sharded_dim(placement, param.ndim) == 0 else placement for placement in param.placements]


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def grad_with_param_layout(param: Tensor, grad: Tensor) -> Tensor:
    """The gradient laid out like its parameter, so the kernels can work on matching local shards.

    FSDP2 gradients already are; tensor-parallel code can leave a gradient ``Partial`` (a pending sum) or
    differently sharded, and combining local shards of different layouts would be silently wrong.
    """
    if not hasattr(grad, "placements"):
        raise TypeError(
            f"CoupledAdam: parameter of shape {list(param.shape)} is a DTensor but its gradient is a plain "
            f"{type(grad).__name__}; gradients of DTensor parameters must be DTensors too"
        )
    same_mesh = grad.device_mesh is param.device_mesh or grad.device_mesh == param.device_mesh
    if same_mesh and tuple(grad.placements) == tuple(param.placements):
        return grad
    return grad.redistribute(param.device_mesh, param.placements)


def all_ranks_finite(finite: Tensor, coupled_params: Iterable[Tensor]) -> Tensor:
    """Agree on the non-finite check across ranks that hold different columns of a coupled DTensor.

    Row-sharded statistics are all-reduced already (an inf anywhere reaches every rank) and replicated ones are
    equal, but with columns split each rank sees only its own columns: without this, one rank would skip a step
    that another takes. Takes every coupled parameter (with a gradient or not) so all ranks run the same
    collectives. ``finite`` is a bool scalar; returns the agreed one.
    """
    groups: dict[Any, torch.device] = {}
    for p in coupled_params:
        if not hasattr(p, "placements"):
            continue
        for mesh_dim in _mesh_dims_sharding(p, rows=False):
            groups.setdefault(p.device_mesh.get_group(mesh_dim), p.to_local().device)
    for group, device in groups.items():
        flag = finite.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        finite = flag[0] > 0
    return finite


# ---------------------------------------------------------------------------------------------- setup check
def check_supported_parallelism(accelerator: Any = None, args: Any = None, *, model: Any = None,
                                deepspeed_enabled: bool = False, fsdp_enabled: bool = False) -> None:
    """Refuse parallel setups in which the coupled mean over an embedding's rows cannot be taken, before step 1.

    FSDP1, DeepSpeed ZeRO, Megatron-LM and XLA FSDP hand the optimizer 1-D slices of concatenated parameters:
    the rows of an embedding matrix are gone, and a coupled mean computed on them would be silently wrong. Tensor,
    context and sequence parallelism are refused too: not tested yet. Allowed: one device, DDP, FSDP2 (DTensor
    parameters sharded by rows: the optimizer all-reduces the column statistics itself).

    transformers' own FSDP2 (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))``) gives the
    same row-sharded DTensors and is allowed for untied embeddings; with tied ones it is refused, because that
    road trains them wrong whatever the optimizer (see :func:`_native_fsdp2_problem`); its pipeline and expert
    parallelism are refused as untested.

    Looks at every place such a setup can come from: the ``Accelerator`` (or its ``AcceleratorState``), the
    Trainer's ``TrainingArguments`` (``deepspeed``, ``fsdp``/``fsdp_config``, ``parallelism_config``), the model
    (loaded with a ``tp_plan`` or a ``distributed_config``), a ``Trainer``'s own flags (``deepspeed_enabled``,
    ``fsdp_enabled``), and the environment that ``accelerate launch --config_file ...`` sets
    (``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``), which accelerate ignores on CPU but a
    GPU run would use.

    Raises:
        ValueError: naming the setup found and the supported alternatives.
    """
    setup = _unsupported_setup(accelerator, args, deepspeed_enabled=deepspeed_enabled, fsdp_enabled=fsdp_enabled)
    if setup is not None:
        raise ValueError(
            f"Coupled Adam does not support {setup}: it flattens parameters into 1-D shards, so the rows of the "
            "embedding matrix (the vocabulary axis the coupled second moment averages over) are lost and the "
            f"coupled mean would be silently wrong. Supported: {SUPPORTED_PARALLELISM}. For sharded training "
            "switch to FSDP2."
        )
    native = _native_fsdp2_problem(model)
    if native is not None:
        raise ValueError(native)
    untested = _untested_setup(args, model)
    if untested is not None:
        raise ValueError(
            f"Coupled Adam does not support {untested} yet: it couples each embedding matrix over all of its rows, "
            f"which has not been tested under it. Supported: {SUPPORTED_PARALLELISM}. Alternatively train with "
            "--optim adamw_torch_fused."
        )


def _native_fsdp2_problem(model: Any) -> str | None:
    """What is wrong with a model that transformers sharded at load time (``distributed_config``), if anything.

    Its FSDP2 parameters are row-sharded DTensors like accelerate's, so the coupled mean is right there. But with
    tied embeddings that road trains wrong whatever the optimizer (seen with transformers 5.24): the weights are
    tied after ``fully_shard``, so FSDP2 does not know the output embedding shares the weight; from the second step
    on the LM head computes with the previous step's copy and its share of the gradient is lost
    (tests/test_fsdp2.py shows it with torch AdamW against one process).
    """
    if not getattr(model, "is_distributed_loading_by_transformers", False):
        return None
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    for size, name in (("pp_size", "pipeline"), ("ep_size", "expert")):
        if (getattr(config, size, None) or 1) > 1:
            return (f"Coupled Adam does not support transformers' {name} parallelism ({size}="
                    f"{getattr(config, size)} in distributed_config) yet: it has not been tested under it. "
                    f"Supported: {SUPPORTED_PARALLELISM}.")
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    input_weight = getattr(get_input() if callable(get_input) else None, "weight", None)
    output_weight = getattr(get_output() if callable(get_output) else None, "weight", None)
    if input_weight is not None and input_weight is output_weight:
        return ("This model has tied embeddings and was sharded by transformers at load time "
                "(from_pretrained(..., distributed_config=...)): on that road the LM head keeps a stale copy of the "
                "tied weight from the second step on, so training is wrong with any optimizer. Load the model "
                "without distributed_config and shard it with accelerate's FSDP2 instead: `accelerate launch "
                "--config_file recipes/accelerate/fsdp2.yaml ...`, or TrainingArguments(fsdp=True, "
                "fsdp_config={'version': 2}).")
    return None


def _untested_setup(args: Any, model: Any) -> str | None:
    if (getattr(model, "tp_size", None) or 1) > 1:
        return "tensor parallelism (model loaded with a tp_plan)"
    config = getattr(args, "parallelism_config", None)
    if config is not None and any((getattr(config, size, None) or 1) > 1 for size in ("tp_size", "cp_size", "sp_size")):
        return f"parallelism_config {config}"
    return None


def _unsupported_setup(accelerator: Any, args: Any, *, deepspeed_enabled: bool, fsdp_enabled: bool) -> str | None:
    state = getattr(accelerator, "state", accelerator)
    if deepspeed_enabled:
        return "DeepSpeed (Trainer.is_deepspeed_enabled)"
    if fsdp_enabled:
        version = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            return f"FSDP{version} (Trainer.is_fsdp_enabled, fsdp_version != 2)"
    if state is not None:
        distributed_type = str(getattr(getattr(state, "distributed_type", None), "value", "")).upper()
        deepspeed_plugin = getattr(state, "deepspeed_plugin", None)
        if deepspeed_plugin is not None or distributed_type == "DEEPSPEED":
            stage = getattr(deepspeed_plugin, "zero_stage", None)
            return "DeepSpeed" + (f" ZeRO stage {stage}" if stage is not None else "") + " (accelerate)"
        fsdp_plugin = getattr(state, "fsdp_plugin", None)
        if fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
            return f"FSDP{getattr(fsdp_plugin, 'fsdp_version', 1)} (accelerate FSDP plugin, fsdp_version != 2)"
        if distributed_type == "MEGATRON_LM":
            return "Megatron-LM (accelerate)"

    if args is not None:
        if getattr(args, "deepspeed", None):
            return f"DeepSpeed (TrainingArguments.deepspeed={args.deepspeed!r})"
        if getattr(args, "fsdp", None):
            fsdp_config = getattr(args, "fsdp_config", None) or {}
            if fsdp_config.get("xla") or fsdp_config.get("xla_fsdp_v2"):
                return "XLA FSDP (TrainingArguments.fsdp_config xla=True)"
            plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
            version = plugin_args.get("fsdp_version", fsdp_config.get("version", fsdp_config.get("fsdp_version", 2)))
            if int(version) != 2:
                return f"FSDP{version} (TrainingArguments.fsdp_config version={version})"

    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return "DeepSpeed" + (f" ZeRO stage {stage}" if stage else "") + " (accelerate config, ACCELERATE_USE_DEEPSPEED)"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and env.get("FSDP_VERSION", "1") != "2":
        return f"FSDP{env.get('FSDP_VERSION', '1')} (accelerate config, FSDP_VERSION={env.get('FSDP_VERSION', '1')})"
    if env.get("ACCELERATE_USE_MEGATRON_LM", "false").lower() == "true":
        return "Megatron-LM (accelerate config, ACCELERATE_USE_MEGATRON_LM)"
    return None
