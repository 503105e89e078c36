"""Megatron-LM's `torch_dist` checkpoint format (its default): read and write.

What megatron-core's `dist_checkpointing.save` leaves in an iteration
directory (Megatron-LM's training loop puts `args`, `iteration` and
`checkpoint_version` in the common state):

    metadata.json      {"sharded_backend": "torch_dist", ...}
    common.pt          torch.save of every non-tensor entry (args: a Namespace)
    .metadata          DCP metadata: every tensor's GLOBAL shape and chunks
    __<rank>_<n>.distcp  the tensors' bytes

Tensors are global (TP = 1 shapes) and keyed by megatron-core's
`sharded_state_dict` keys: the layers of the decoder are stacked along a
first axis under one key (`decoder.layers.mlp.linear_fc2.weight` is
[num_layers, h, ffn]); the input and pre-MLP norms carry Transformer
Engine's names (`self_attention.linear_qkv.layer_norm_weight`,
`mlp.linear_fc1.layer_norm_weight`) whichever layer spec was used; SwiGLU's
fc1 is [all gates; all ups] (our full layout); modules' `_extra_state` are
byte entries (pickles), never read here.

Reading: `common.pt` through `megatron_pickle` (allowlist), `.metadata`
through an unpickler that resolves only DCP's metadata and plan classes,
and only the tensor entries through DCP (which reads them with
weights_only), plus, for the optimizer, the distributed optimizer's param
groups and gathered buckets with torch.load(weights_only=True). Writing
(`export`) produces the same layout with one data file, which
megatron-core's `dist_checkpointing.load` reads into its GPTModel.
"""
from __future__ import annotations

import io
import json
import os
import re

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint import planner as dcp_planner

from megatron_sr.checkpointing import dcp_metadata

METADATA_JSON = "metadata.json"
COMMON_FILE = "common.pt"
_DATA_FILE = re.compile(r"__[0-9]+_[0-9]+\.distcp")
_STACKED = "decoder.layers."
_EXTRA_STATE_SUFFIXES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_PLAN_CLASSES = ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")


def is_torch_dist_directory(directory: str) -> bool:
    """Whether `directory` is an iteration directory megatron-core's torch_dist wrote."""
    path = os.path.join(directory, METADATA_JSON)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return False


class _MetadataUnpickler(dcp_metadata.MetadataUnpickler):
    """`dcp_metadata.MetadataUnpickler` plus DCP's save-plan dataclasses,
    which megatron-core keeps in the metadata (plain data, no behaviour)."""

    def find_class(self, module: str, name: str):
        if module == dcp_planner.__name__ and name in _PLAN_CLASSES:
            return getattr(dcp_planner, name)
        return super().find_class(module, name)


class _Reader(FileSystemReader):
    """A FileSystemReader whose metadata comes from `_MetadataUnpickler`,
    checked by `dcp_metadata` (data only from the directory's own files)."""

    def __init__(self, directory: str):
        super().__init__(directory)
        self._path = os.path.join(directory, ".metadata")
        self._files = frozenset(f for f in os.listdir(directory) if _DATA_FILE.fullmatch(f))
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            try:
                with open(self._path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except dcp_metadata.RefusedGlobal as exc:
                raise ValueError(f"{self._path} names {exc.qualified_name}, which is not part "
                                 f"of DCP metadata: refused without running it") from None
            except Exception as exc:  # noqa: BLE001 - a truncated or malformed pickle
                raise ValueError(f"{self._path} is not readable DCP metadata "
                                 f"({type(exc).__name__}: {str(exc)[:120]})") from None
            dcp_metadata._check_metadata(self._path, metadata, self._files)
            if hasattr(self, "load_id"):
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = dcp_metadata.dcp_metadata.StorageMeta()
                metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


OPTIMIZER_STATE = "optimizer.state."
OPTIMIZER_BUCKETS = "optimizer.distributed."
# The distributed optimizer's torch state dict (param groups, Adam's step) per DP group, and
# under dp_zero_gather_scatter its gathered buckets.
_OPTIMIZER_GROUPS = re.compile(
    r"optimizer\.distributed\.dp_group_idx_\d+\.(optimizer|param_state)/shard_.*")


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """Reads byte entries with torch.load(weights_only=True): plain data only."""

    def __init__(self):
        super().__init__(flatten_state_dict=False)

    def load_bytes(self, read_item, value):
        self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def read(directory: str, optimizer: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(common state, {megatron-core key: global tensor}) of a torch_dist
    iteration directory, with the stacked layer tensors unstacked to
    `decoder.layers.<i>.<name>` and every byte entry (`_extra_state`,
    optimizer and RNG objects) left unread (one exception below). Without
    `optimizer` only tensors whose key does not start with "optimizer." are read; with it also the
    model-space optimizer tensors `optimizer.state.<kind>.<model key>` (kind:
    param / fp32_param, the fp32 main parameter; exp_avg; exp_avg_sq), whose
    model key is unstacked the same way, and the distributed optimizer's flat
    bucket tensors `optimizer.distributed.<...>.bucket_idx_<i>.<kind>` as they
    are (`megatron_lm_optimizer.bucket_states`), and its torch state dicts
    (`optimizer.distributed.<...>.optimizer`: param groups with Adam's step)
    and gathered buckets (`....param_state`, dp_zero_gather_scatter), read as
    plain data (weights_only) into common["optimizer"] under their keys.
    ValueError naming the file at fault."""
    from megatron_sr.checkpointing.megatron_pickle import read_megatron_pickle

    common_path = os.path.join(directory, COMMON_FILE)
    if not os.path.isfile(common_path):
        raise ValueError(f"{directory} is a torch_dist checkpoint without {COMMON_FILE}")
    common = read_megatron_pickle(common_path)
    reader = _Reader(directory)
    metadata = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in metadata.items()
             if isinstance(md, dcp_metadata.dcp_metadata.TensorStorageMetadata)
             and (not key.startswith("optimizer.")
                  or (optimizer and key.startswith((OPTIMIZER_STATE, OPTIMIZER_BUCKETS))))}
    try:
        dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as exc:  # noqa: BLE001 - DCP wraps every failure
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"{directory}: the tensors could not be read "
                         f"({type(exc).__name__}: {lines[0][:200] if lines else ''})") from None
    groups = {key: io.BytesIO() for key, md in metadata.items()
              if optimizer and _OPTIMIZER_GROUPS.fullmatch(key)
              and isinstance(md, dcp_metadata.dcp_metadata.BytesStorageMetadata)}
    if groups:
        try:
            dcp.load(groups, storage_reader=reader, planner=_WeightsOnlyPlanner(), no_dist=True)
        except Exception as exc:  # noqa: BLE001 - DCP wraps every failure
            raise ValueError(f"{directory}: the distributed optimizer's state objects "
                             f"({sorted(groups)[0]}) are not plain data: refused without "
                             f"running them ({type(exc).__name__})") from None
        if isinstance(common.get("optimizer"), dict):
            common["optimizer"].update(groups)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix = ""
        if key.startswith(OPTIMIZER_STATE):  # optimizer.state.<kind>.<model key>
            kind = key[len(OPTIMIZER_STATE):].split(".", 1)[0]
            prefix = f"{OPTIMIZER_STATE}{kind}."
        model_key = key[len(prefix):]
        if model_key.startswith(_STACKED) and not model_key[len(_STACKED)].isdigit():
            for layer, per_layer in enumerate(tensor.unbind(0)):
                tensors[f"{prefix}{_STACKED}{layer}.{model_key[len(_STACKED):]}"] = \
                    per_layer.clone()
        else:
            tensors[key] = tensor
    return common, tensors


def _stacked(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    layer = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
    stacked: dict[str, list] = {}
    out = {}
    for name, tensor in state.items():
        match = layer.match(name)
        if match is None:
            out[name] = tensor.contiguous()
        else:
            stacked.setdefault(_STACKED + match.group(2), [None] * num_layers)[
                int(match.group(1))] = tensor
    for name, tensors in stacked.items():
        out[name] = torch.stack(tensors).contiguous()
    return out


def export(state: dict[str, torch.Tensor], num_layers: int, common: dict,
           directory: str) -> None:
    """Writes `state` (megatron-core names, `decoder.layers.<i>.` per layer,
    Transformer Engine's names for the fused norms) as a torch_dist iteration
    directory `directory` (created): stacked layer tensors, an empty
    `_extra_state` per linear layer, `common` (args, iteration, ...) in
    common.pt, metadata.json. One process, no process group."""
    os.makedirs(directory)
    tensors = _stacked(state, num_layers)
    entries: dict = dict(tensors)
    for which in _EXTRA_STATE_SUFFIXES:
        module = "self_attention" if which.startswith("linear_q") or which == "linear_proj" \
            else "mlp"
        for layer in range(num_layers):
            key = f"{_STACKED}{module}.{which}._extra_state/shard_{layer}_{num_layers}"
            # A non-tensor value: DCP stores its torch.save; megatron-core stores the list of
            # the shard's objects (one, None: no FP8 metadata).
            entries[key] = [None]
    # Flat keys, no planner mappings in the metadata: what megatron-core's loader expects.
    dcp.save(entries, storage_writer=dcp.FileSystemWriter(directory, thread_count=1),
             planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
    torch.save(common, os.path.join(directory, COMMON_FILE))
    with open(os.path.join(directory, METADATA_JSON), "w", encoding="utf-8") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}, f)
