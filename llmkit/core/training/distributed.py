"""Running under ``torchrun``: the process group, who does what, and the few collectives the
training loop needs.

``torchrun --nproc_per_node=N -m llmkit pretrain …`` sets WORLD_SIZE, RANK and LOCAL_RANK in each
process; ``Dist.from_env()`` reads them and joins the process group (gloo on CPU, nccl on CUDA,
each process on its own GPU). Without them it is a world of one and every method is free.

Who does what: every rank trains on its own slice of each global batch and evaluates (the
weights are identical everywhere, so the metrics and the decisions they drive are too); rank 0
alone logs, draws progress and writes files, while the others wait at a barrier.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from safetensors import safe_open

from llmkit.core.model.transformer import param_groups


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device_spec: str = "auto") -> Dist:
        """The launch environment; joins the process group when WORLD_SIZE > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        d = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not tdist.is_initialized():
            cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda")
            if cuda:
                torch.cuda.set_device(d.local_rank)
            # A long timeout: rank 0 may tokenize a big corpus while the others wait at a barrier.
            tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
        return d

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each process on its own GPU; CPU processes share the CPU."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (one small all-reduce)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        tdist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun): for the CLI's quiet ranks."""
    return int(os.environ.get("RANK", "0"))


# --- FSDP2 (sharded parameters, gradients and optimizer state) ------------------------------------


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a Transformer with FSDP2 (``fully_shard``): each block is a unit (gathered for its own
    forward and backward, then freed), the root holds the embeddings, final norm and heads."""
    from torch.distributed.fsdp import (  # start-up time: torch.distributed's modules load only for a distributed run
        fully_shard,
        register_fsdp_forward_method,
    )

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    # The classifier and pooling read hidden_states(), not forward(): FSDP must gather the root's
    # parameters (the embeddings) around it too.
    register_fsdp_forward_method(model, "hidden_states")
    model._llmkit_fsdp = True
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return getattr(model, "_llmkit_fsdp", False)


def _options(**kw):
    # start-up time: torch.distributed's modules load only for a distributed run
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_for_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """For a sharded model, (full model state, optimizer (tensors, metadata) or None) gathered on
    rank 0 in the ordinary checkpoint layout (a collective: every rank calls it); None otherwise."""
    if not is_sharded(model):
        return None
    # start-up time: torch.distributed's modules load only for a distributed run
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    opt = None
    if optimizer is not None:
        full = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
        opt = _by_index(full) if full else ({}, {})
    return state, opt


def _by_index(full: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer state keyed by parameter names -> the index-keyed layout of optimizer.safetensors
    (the order of the parameter groups, as an unsharded AdamW would number them)."""
    tensors, groups, index = {}, [], 0
    for group in full["param_groups"]:
        ids = []
        for name in group["params"]:
            for slot, value in full["state"].get(name, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"state.{index}.{slot}"] = t.detach().contiguous().cpu()
            ids.append(index)
            index += 1
        groups.append({**group, "params": ids})
    return tensors, {"param_groups": json.dumps(groups)}


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Load an ordinary optimizer.safetensors into the optimizer of a sharded model."""
    # start-up time: torch.distributed's modules load only for a distributed run
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = [n for group in param_groups(model, 0.0, names=True) for n in group["params"]]
    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            _, idx, slot = key.split(".", 2)
            state.setdefault(names[int(idx)], {})[slot] = f.get_tensor(key)
    full_groups = [{**g, "params": [names[i] for i in g["params"]]} for g in groups]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": full_groups}, options=_options())
