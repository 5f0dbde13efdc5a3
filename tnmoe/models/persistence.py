"""Save / load converted models.

A checkpoint folder holds ``model.safetensors`` (each shared or tied tensor stored once) and the
conversion record (:func:`tnmoe.models.hf_config.conversion_record`): in ``config.json`` (key
``tnmoe``) for transformers models, whose ``model.save_pretrained`` folders and Trainer
checkpoints therefore load too, and in ``tnmoe_config.json`` for every model (the only place for
plain ``nn.Module`` models). The record written at save time also lists the cores tied across
banks (``tied_cores``, restored on load) and the XXH3-128 checksum of each weight file (``weight_files``,
verified on load). The contract is described in ``docs/checkpoints.md``.

:func:`save_pretrained` is all-or-nothing: it writes into a staging folder beside the target and
swaps it in, so the target always holds either the previous checkpoint or the new one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
import xxhash
from safetensors.torch import load_file, save_file
from torch import nn

from ..moe.config import MoEConfig
from ..networks import MPOBank
from .convert import convert, converted_modules, get_moe_config
from .hf_config import (
    HF_CONFIG_KEY,
    MODEL_TYPE,
    TIED_CORES_KEY,
    WEIGHT_CHECKSUM,
    WEIGHT_FILES_KEY,
    attach_record,
    check_record,
    conversion_record,
    ensure_auto_registration,
    tnmoe_config_class,
)

__all__ = ["save_pretrained", "from_pretrained", "load_weights", "tnmoe_model_class"]

CONFIG_NAME = "tnmoe_config.json"
HF_CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

#: weight files of earlier saves that a new save replaces rather than carries over
_WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
#: staging / set-aside folders beside the target: ``.<target>.tnmoe-<kind>-<host>-<pid>-<random>``
_STAGING, _ASIDE = "staging", "old"
#: leftovers of another host are stale after this many seconds (its pids cannot be checked)
_FOREIGN_STALE_S = 24 * 3600


# --- saving ----------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, checksums: bool = True) -> Path:
    """Write a converted model to ``save_directory``; returns its path.

    Writes ``model.safetensors`` (each shared/tied tensor once), ``tnmoe_config.json`` (the
    conversion record) and, for transformers models, ``config.json`` (``model_type: "tnmoe"``
    plus the record) and ``generation_config.json``, so ``tnmoe.moe.from_pretrained(dir)`` and,
    after ``import tnmoe.moe``, ``AutoModel*.from_pretrained(dir)`` rebuild the model.

    All-or-nothing: the files go into a staging folder beside the target, which is then swapped
    in (old folder renamed aside, staging renamed in, old removed; restored on failure). Other
    files of an existing target (a tokenizer, ...) are kept (hard-linked into the new folder);
    earlier weight files are replaced. A target holding subfolders (e.g. a Trainer output
    folder with ``checkpoint-*``) is refused. Leftovers of a killed save are cleaned up (and a
    checkpoint it had moved aside restored) by the next save into the same folder.

    Wrappers are unwrapped (``torch.compile``'s ``OptimizedModule``, ``DistributedDataParallel``,
    ``DataParallel``), so the folder is the model's own; a sharded model (FSDP, DeepSpeed) is
    refused (gather it first). Cores tied across banks (:meth:`tnmoe.networks.MPOBank.tie_cores`)
    are stored once and recorded, so loading ties them again. ``checksums``: record each weight
    file's XXH3-128 checksum in the record (verified by :func:`from_pretrained` / :func:`load_weights`).
    """
    model = unwrap_model(model)
    config = get_moe_config(model)
    if config is None:
        raise ValueError("model has no MoE layers installed by tnmoe.moe.convert; call tnmoe.moe.convert first")
    record = {k: v for k, v in _record_of(model, config).items() if k not in (TIED_CORES_KEY, WEIGHT_FILES_KEY)}
    ties = tied_cores(model)
    if ties:
        record[TIED_CORES_KEY] = ties
    writers = _checkpoint_writers(model, record, checksums)
    return _write_folder_atomically(Path(save_directory), writers)


# --- wrappers --------------------------------------------------------------------------------------
def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper (only possible once ``torch._dynamo`` is imported)."""
    if "torch._dynamo" not in sys.modules:
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule)


_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _sharding_wrapper(model: nn.Module) -> str | None:
    """The name of the sharding ``model`` is under (FSDP, FSDP2, DeepSpeed), ``None`` if none."""
    if type(model).__name__ == "DeepSpeedEngine":
        return "DeepSpeed"
    if "torch.distributed.fsdp" in sys.modules:
        from torch.distributed import fsdp

        if isinstance(model, fsdp.FullyShardedDataParallel):
            return "FSDP (FullyShardedDataParallel)"
        if isinstance(model, getattr(fsdp, "FSDPModule", ())):
            return "FSDP2 (fully_shard)"
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in model.parameters()):
            return "DTensor (fully_shard / tensor parallel)"
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` / ``DistributedDataParallel`` / ``DataParallel``
    wrappers (any nesting). ``ValueError`` for a sharded model (FSDP, FSDP2, DeepSpeed), whose
    parameters are shards, and for a model with a wrapped submodule (its names would carry
    ``_orig_mod.`` / ``module.``, which no unwrapped model has)."""
    while True:
        if _is_compiled(model):
            model = model._orig_mod
        elif isinstance(model, _DATA_PARALLEL):
            model = model.module
        else:
            break
    sharding = _sharding_wrapper(model)
    if sharding is not None:
        raise ValueError(
            f"the model is sharded by {sharding}; tnmoe.moe.save_pretrained needs the full model. Gather it first "
            "(e.g. torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)) loaded into an unsharded copy on one rank, or "
            "accelerator.get_state_dict(model)) and save that copy"
        )
    wrapped = [name for name, m in model.named_modules() if name and (_is_compiled(m) or isinstance(m, _DATA_PARALLEL))]
    if wrapped:
        raise ValueError(
            f"submodule {wrapped[0]!r} is wrapped ({type(model.get_submodule(wrapped[0])).__name__}), so its "
            "parameter names carry a wrapper prefix that the model rebuilt on load lacks. Save the model before "
            "wrapping submodules, or compile in place (module.compile()), which keeps the names"
        )
    return model


# --- cores tied across banks -----------------------------------------------------------------------
def _core_name(bank_name: str, k: int) -> str:
    return f"{bank_name}.cores.{k}" if bank_name else f"cores.{k}"


def _split_core_name(name: str) -> tuple[str, int]:
    """``"h.1.mlp.experts.up.cores.2"`` -> ``("h.1.mlp.experts.up", 2)``."""
    bank, _, k = name.rpartition("cores.")
    return bank[:-1] if bank.endswith(".") else bank, int(k)


def tied_cores(model: nn.Module) -> dict[str, str]:
    """``{tied core: core it is tied to}`` (parameter names) for every MPO core that is the very
    parameter of an earlier bank's core (:meth:`~tnmoe.networks.MPOBank.tie_cores`); the source
    is the first name in module order, the one the weights file stores. ``ValueError`` for a
    core shared between different core positions (``tie_cores`` ties position ``k`` to ``k``)."""
    first: dict[int, str] = {}
    ties = {}
    for bank_name, bank in model.named_modules():
        if not isinstance(bank, MPOBank):
            continue
        for k, core in enumerate(bank.cores):
            name = _core_name(bank_name, k)
            source = first.setdefault(id(core), name)
            if source == name:
                continue
            if _split_core_name(source)[1] != k:
                raise ValueError(f"core {name} is the parameter of core {source}, another core position; "
                                 "checkpoints record ties made by MPOBank.tie_cores(other, [k]) (position k to k)")
            ties[name] = source
    return ties


def _tie_recorded_cores(model: nn.Module, ties: dict[str, str]) -> None:
    """Tie ``{target: source}`` core names with :meth:`~tnmoe.networks.MPOBank.tie_cores`."""
    for target, source in ties.items():
        (target_bank, k), (source_bank, _) = _split_core_name(target), _split_core_name(source)
        model.get_submodule(target_bank).tie_cores(model.get_submodule(source_bank), [k])


def _check_ties(model: nn.Module, saved: dict[str, str], where) -> None:
    """Make ``model``'s tied cores those recorded (``saved``): a model with none is tied as
    recorded; one tied otherwise is a ``ValueError`` (loading would merge or split tensors)."""
    current = tied_cores(model)
    if current == saved:
        return
    if not current:
        _tie_recorded_cores(model, saved)
        return
    raise ValueError(
        f"checkpoint {where} ties cores {sorted(saved.items())[:3]} but the model ties {sorted(current.items())[:3]}; "
        "tie the model's cores as the checkpoint records (MPOBank.tie_cores) or load into an untied model"
    )


def prepare_transformers_save(model: nn.Module, state_dict: dict | None) -> dict | None:
    """Before transformers' ``save_pretrained`` writes ``model``: record its tied cores in
    ``model.config``'s tnmoe record (so the checkpoint reloads tied) and drop the tied names from
    the state dict (transformers refuses shared tensors it does not know). Returns the state
    dict to pass (``None``: nothing to change)."""
    hf_config = getattr(model, "config", None)
    record = getattr(hf_config, HF_CONFIG_KEY, None)
    if not isinstance(record, dict):
        return state_dict
    ties = tied_cores(model)
    record.pop(WEIGHT_FILES_KEY, None)  # transformers writes the weights: no checksums of ours apply
    if not ties:
        record.pop(TIED_CORES_KEY, None)
        return state_dict
    record[TIED_CORES_KEY] = ties
    state = model.state_dict() if state_dict is None else state_dict
    return {k: v for k, v in state.items() if k not in ties}


# --- weight file checksums -------------------------------------------------------------------------
#: the weight files' checksum: XXH3-128 (xxhash), a non-cryptographic hash made to detect damaged
#: data; it hashes at memory speed (6.7x faster than SHA-256 on this project's CPU, see docs/checkpoints.md)
CHECKSUM = WEIGHT_CHECKSUM


def file_checksum(path: Path) -> str:
    """Hex XXH3-128 of a file's bytes (what ``xxhsum -H2`` prints), streamed in 4 MiB blocks."""
    digest, buffer = xxhash.xxh3_128(), bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _verify_weight_files(directory: Path, record: dict) -> None:
    """Check each weight file the record lists against its recorded checksum and size."""
    for name, entry in sorted((record.get(WEIGHT_FILES_KEY) or {}).items()):
        path = directory / name
        if not path.is_file():
            raise ValueError(f"checkpoint {directory}: weight file {name} listed in its tnmoe record is missing")
        size, digest = path.stat().st_size, None
        if size == entry.get("bytes"):
            digest = file_checksum(path)
        if digest != entry.get(CHECKSUM):
            got = f"{CHECKSUM} {digest}" if digest is not None else f"{size} bytes"
            want = f"{CHECKSUM} {entry.get(CHECKSUM)}" if digest is not None else f"{entry.get('bytes')} bytes"
            raise ValueError(
                f"checkpoint {directory}: {name} is damaged or was replaced ({got}, the tnmoe record written with it "
                f"says {want}). Restore the file or re-save the model; verify_checksums=False loads it unchecked"
            )


def _record_of(model: nn.Module, config: MoEConfig) -> dict:
    hf_config = getattr(model, "config", None)
    record = getattr(hf_config, HF_CONFIG_KEY, None) if hf_config is not None else None
    if isinstance(record, dict):
        return record
    return conversion_record(model, config, converted_modules(model))


def _checkpoint_writers(model: nn.Module, record: dict, checksums: bool) -> dict[str, Callable[[Path], None]]:
    """``{file name: write(path)}`` for every file of the checkpoint, weights first: writing them
    adds their checksum to ``record``, which the later writers write."""

    def write_weights(path: Path) -> None:
        _write_weights(model, path)
        if checksums:
            record[WEIGHT_FILES_KEY] = {path.name: {CHECKSUM: file_checksum(path), "bytes": path.stat().st_size}}

    writers = {WEIGHTS_NAME: write_weights}
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        writers[HF_CONFIG_NAME] = lambda path: _write_text(path, _hf_config_json(model, record))
        generation = _generation_config_json(model)
        if generation is not None:
            writers[GENERATION_CONFIG_NAME] = lambda path: _write_text(path, generation)
    writers[CONFIG_NAME] = lambda path: _write_text(path, json.dumps(record, indent=2, sort_keys=True))
    return writers


def _hf_config_json(model: nn.Module, record: dict) -> str:
    """``config.json`` as transformers' ``save_pretrained`` writes it (``architectures``, ``dtype``),
    always with ``model_type: "tnmoe"`` and the record, without changing ``model.config``."""
    config = copy.deepcopy(model.config)
    attach_record(config, record, keep_checksums=True)
    config.architectures = [type(model).__name__]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        config.dtype = str(dtype).split(".")[1]
    return config.to_json_string(use_diff=True)


def _generation_config_json(model: nn.Module) -> str | None:
    can_generate = getattr(model, "can_generate", None)
    generation = getattr(model, "generation_config", None)
    if generation is None or not callable(can_generate) or not can_generate():
        return None
    return generation.to_json_string(use_diff=True)


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once: of names sharing one tensor (tied embeddings) the
    first in module order is kept, which is the one transformers keeps."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def _write_weights(model: nn.Module, path: Path) -> None:
    save_file(_unique_state_dict(model), str(path), metadata={"format": "pt"})
    _fsync_file(path)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # directories cannot be opened / synced on every platform
        pass


# --- all-or-nothing folder writes --------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _leftover_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.tnmoe-{kind}-{_host()}-{os.getpid()}-"


def _parse_leftover(name: str, target: Path) -> tuple[str, str, int] | None:
    """``(kind, host, pid)`` when ``name`` is a staging / set-aside folder of ``target``."""
    m = re.fullmatch(re.escape(f".{target.name}.tnmoe-") + r"(staging|old)-([A-Za-z0-9]+)-(\d+)-\w+", name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: saves into one folder run one at a time in a process
    if os.name == "nt":
        return True  # no safe liveness check without extra dependencies
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _is_stale(path: Path, host: str, pid: int) -> bool:
    if host == _host():
        return not _pid_alive(pid)
    try:
        return time.time() - path.stat().st_mtime > _FOREIGN_STALE_S
    except OSError:
        return False


def _leftovers(target: Path) -> list[tuple[str, Path]]:
    """Stale ``(kind, path)`` staging / set-aside folders of ``target`` (newest first)."""
    found = []
    if not target.parent.is_dir():
        return found
    for entry in target.parent.iterdir():
        parsed = _parse_leftover(entry.name, target)
        if parsed is not None and _is_stale(entry, parsed[1], parsed[2]):
            found.append((parsed[0], entry))
    return sorted(found, key=lambda kp: _mtime(kp[1]), reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _set_aside_checkpoint(target: Path) -> Path | None:
    """The checkpoint a killed save had renamed aside when ``target`` itself is missing."""
    if target.exists():
        return None
    return next((path for kind, path in _leftovers(target) if kind == _ASIDE), None)


def _recover(target: Path) -> None:
    """Undo what a killed save left: restore a checkpoint it had set aside (when the target is
    missing), then remove stale staging and set-aside folders."""
    aside = _set_aside_checkpoint(target)
    if aside is not None:
        os.rename(aside, target)
    for _, path in _leftovers(target):
        _remove_tree(path)


def _remove_tree(path: Path) -> bool:
    """Remove a folder (retried once); on failure warn and leave it for the next save."""
    for _ in range(2):
        try:
            shutil.rmtree(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            continue
    warnings.warn(f"could not remove {path}; the next tnmoe.moe.save_pretrained into {path.parent} removes it")
    return False


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder; pick a folder path to save into")
    cwd = Path.cwd()
    if cwd == target or target in cwd.parents:
        raise ValueError(f"{target} is (or contains) the working directory, which save_pretrained would move "
                         "away when it swaps the folder; save into a subfolder, e.g. ./model")
    if target.is_dir():
        subfolders = sorted(p.name for p in target.iterdir() if p.is_dir() and not p.is_symlink())
        if subfolders:
            raise ValueError(
                f"{target} holds subfolders {subfolders[:5]}; save_pretrained replaces the folder as a whole "
                f"and would lose them. Save into a folder of its own, e.g. {target / 'model'}"
            )


def _carry_over(target: Path, staging: Path) -> None:
    """Hard-link (or copy) the target's other files into ``staging``: everything but the files the
    new checkpoint writes and earlier weight files."""
    if not target.is_dir():
        return
    for entry in target.iterdir():
        dest = staging / entry.name
        if dest.exists() or _WEIGHT_FILES.fullmatch(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
            continue
        try:
            os.link(entry, dest)
        except OSError:
            shutil.copy2(entry, dest)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target is renamed aside first and restored
    if that fails, removed once it succeeded."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = target.parent / (_leftover_prefix(target, _ASIDE) + secrets.token_hex(4))
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove_tree(aside)


def _write_folder_atomically(target: Path, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write ``writers``' files (``{name: write(path)}``) as the folder ``target``, all or nothing."""
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    _check_target(target)
    staging = Path(tempfile.mkdtemp(prefix=_leftover_prefix(target, _STAGING), dir=target.parent))
    try:
        for name, write in writers.items():
            write(staging / name)
        _carry_over(target, staging)
        _fsync_dir(staging)
        _swap_in(staging, target)
    except BaseException:
        _remove_tree(staging)
        raise
    _fsync_dir(target.parent)
    return target


# --- transformers model classes that convert themselves when built ----------------------------
def _relocate(names: list[str], model: nn.Module) -> list[str]:
    """Module names recorded on one model class, as seen from ``model``: a base model (``GPT2Model``)
    loading a checkpoint of its head model (``GPT2LMHeadModel``) drops the ``base_model_prefix``
    (``transformer.``); a head model loading a base-model checkpoint adds it (as transformers
    does for the weights)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return names
    head = isinstance(getattr(model, prefix, None), nn.Module)
    lead = prefix + "."
    if head and not all(n.startswith(lead) for n in names):
        return [lead + n for n in names]
    if not head and all(n.startswith(lead) for n in names):
        return [n[len(lead):] for n in names]
    return names


def _convert_from_record(model: nn.Module) -> None:
    record = check_record(getattr(model.config, HF_CONFIG_KEY, None), f"{type(model).__name__}.config")
    config = MoEConfig.from_dict(record["moe_config"])
    expected = list(record["moe_modules"])
    if type(model).__name__ != record["base_model_class"]:
        expected = _relocate(expected, model)
        if config.target_modules is not None and expected != record["moe_modules"]:
            config = dataclasses.replace(config, target_modules=expected)
        if config.bond_dims and expected != record["moe_modules"]:  # per-matrix bonds follow their modules
            moved = dict(zip(record["moe_modules"], expected))
            config = dataclasses.replace(config, bond_dims={
                moved.get(key.rpartition(".")[0], key.rpartition(".")[0]) + "." + key.rpartition(".")[2]: bonds
                for key, bonds in config.bond_dims.items()})
    # transformers' loader builds models on the meta device and fills in the checkpoint's weights;
    # a model built for real (``from_config``) decomposes its freshly initialized FFNs instead
    init = "empty" if any(p.is_meta for p in model.parameters()) else "pretrained"
    convert(model, config, init=init, progress=False)
    names = converted_modules(model)
    if names != expected:
        raise ValueError(
            f"the checkpoint converted {len(record['moe_modules'])} modules ({record['moe_modules'][:3]}...) but "
            f"converting {type(model).__name__} with its MoEConfig gives {len(names)} ({names[:3]}...); "
            "the checkpoint was written by a different model class or tnmoe version"
        )
    ties = _relocated_ties(record, model)
    _tie_recorded_cores(model, ties)
    # transformers' loader then re-ties them after filling in the weights (the file stores each
    # tied core once) and does not report the tied names as missing
    tied_weights = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied_weights, dict):
        tied_weights.update(ties)


def _relocated_ties(record: dict, model: nn.Module) -> dict[str, str]:
    """The record's ``{tied core: source}`` names as seen from ``model`` (see :func:`_relocate`)."""
    ties = record.get(TIED_CORES_KEY) or {}
    if type(model).__name__ == record["base_model_class"] or not ties:
        return dict(ties)
    return dict(zip(_relocate(list(ties), model), _relocate(list(ties.values()), model)))


def _model_init(self, config, *args, **kwargs):
    type(self)._tnmoe_base_model.__init__(self, config, *args, **kwargs)
    _convert_from_record(self)


def _model_from_pretrained(cls, pretrained_model_name_or_path, *args, verify_checksums: bool = True, **kwargs):
    """transformers' ``from_pretrained``, after checking a local folder's weight files against
    the checksums in its tnmoe record (``verify_checksums=False`` skips that)."""
    folder = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
    if verify_checksums and folder.is_dir():
        _verify_weight_files(folder, _read_record(folder))
    return cls._tnmoe_base_model.from_pretrained.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)


def _model_save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
    """transformers' ``save_pretrained``, with the model's tied cores recorded and stored once."""
    state_dict = prepare_transformers_save(self, state_dict)
    return type(self)._tnmoe_base_model.save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)


def _model_reduce_ex(self, protocol):
    cls = type(self)
    _, _, *rest = object.__reduce_ex__(self, protocol)
    return (_new_model, (cls._tnmoe_base_model, cls.config_class._tnmoe_base_config), *rest)


def _keep_checkpoint_key_mapping(base: type) -> None:
    """transformers applies a model's checkpoint key mapping (GPT-NeoX: ``lm_head`` <-> ``embed_out``)
    in reverse when a converted model saves, but skips it when loading into this module's classes,
    which it takes for custom code; re-registering the base's own mapping under its names (the
    same mapping: plain models load as before) makes the loader apply it too."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:  # transformers < 5: no key mappings
        return
    model_type = getattr(base.config_class, "model_type", None)
    for name in (base.__name__, model_type):
        mapping = cm.get_checkpoint_conversion_mapping(name) if name else None
        if mapping is not None and name not in cm.USER_REGISTERED_MAPPINGS:
            cm.register_checkpoint_conversion_mapping(name, mapping, overwrite=True)
            return


def _new_model(base: type, base_config: type):
    """Unpickle a converted model of a generated class (its state is restored by pickle)."""
    cls = tnmoe_model_class(base, base_config)
    return cls.__new__(cls)


@functools.cache
def tnmoe_model_class(base: type, base_config: type | None = None) -> type:
    """The subclass of the transformers model class ``base`` that transformers' Auto classes
    build for ``tnmoe`` checkpoints: ``__init__(config)`` builds ``base`` and converts it with the
    :class:`MoEConfig` recorded in ``config`` (on the meta device, as transformers' loader builds
    models, the weights are left for the loader to fill; otherwise, e.g. ``from_config``, the
    experts are decomposed from the freshly initialized FFNs).

    It keeps ``base.__name__`` (``architectures``, loss selection and ``base_model_class`` see
    the base class); ``config_class`` is ``tnmoe_config_class(base_config or base.config_class)``.
    """
    if getattr(base, "_tnmoe_base_model", None) is not None:
        return base
    _keep_checkpoint_key_mapping(base)
    base_config = base_config or base.config_class
    namespace = {
        "__module__": __name__,
        "__qualname__": base.__name__,
        "__doc__": f"``{base.__name__}`` converted by tnmoe when built (weights come from the checkpoint).",
        "_tnmoe_base_model": base,
        "config_class": tnmoe_config_class(base_config),
        # routers compute in float32 (convert builds them so): a checkpoint loaded in bf16/fp16
        # keeps them float32, or routing decisions would change on reload (learned weights only:
        # a hash router's integer table must not be cast)
        "_keep_in_fp32_modules_strict": sorted(set(getattr(base, "_keep_in_fp32_modules_strict", None) or [])
                                               | {"router.gate", "router.noise"}),
        "__init__": _model_init,
        "from_pretrained": classmethod(_model_from_pretrained),
        "save_pretrained": _model_save_pretrained,
        "__reduce_ex__": _model_reduce_ex,
    }
    return type(base.__name__, (base,), namespace)


# --- loading ---------------------------------------------------------------------------------------
def _resolve_folder(directory: Path) -> Path:
    """``directory``, or the checkpoint a killed save had set aside when ``directory`` is missing."""
    if directory.is_dir():
        return directory
    aside = _set_aside_checkpoint(Path(os.path.abspath(directory)))
    if aside is not None:
        warnings.warn(f"{directory} is missing; loading {aside}, the checkpoint an interrupted "
                      "tnmoe.moe.save_pretrained had set aside (the next save into that folder restores it)")
        return aside
    raise FileNotFoundError(f"checkpoint folder {directory} does not exist")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None


def _read_record(directory: Path) -> dict:
    """The conversion record of a checkpoint folder: from ``config.json`` (key ``tnmoe``) or,
    failing that, ``tnmoe_config.json``. Raises ``ValueError`` when there is none or its
    ``format`` is unknown."""
    hf_path, own_path = directory / HF_CONFIG_NAME, directory / CONFIG_NAME
    if hf_path.is_file():
        hf = _read_json(hf_path)
        if isinstance(hf, dict) and HF_CONFIG_KEY in hf:
            return check_record(hf[HF_CONFIG_KEY], str(hf_path))
        if isinstance(hf, dict) and hf.get("model_type") == MODEL_TYPE:
            raise ValueError(f"{hf_path} says model_type {MODEL_TYPE!r} but has no {HF_CONFIG_KEY!r} record; "
                             "the checkpoint is damaged")
    if own_path.is_file():
        return check_record(_read_json(own_path), str(own_path))
    raise ValueError(
        f"{directory} is not a tnmoe checkpoint: neither {HF_CONFIG_NAME} with a {HF_CONFIG_KEY!r} entry nor "
        f"{CONFIG_NAME} found. Convert the model with tnmoe.moe.convert(model, MoEConfig(...)) and save it with "
        "tnmoe.moe.save_pretrained(model, dir) (or model.save_pretrained(dir) for a transformers model); an "
        "unconverted transformers checkpoint loads with transformers' from_pretrained"
    )


def _weight_files(directory: Path) -> list[Path]:
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [directory / s for s in shards]
    raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME}); the checkpoint is incomplete")


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``state`` into ``model`` strictly, allowing a tied name to be absent when another
    name of the same tensor is present. ``ValueError`` on missing, unexpected or mis-shaped keys,
    and on two stored values for one tensor of the model (they would silently overwrite each other)."""
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in state for n in names)]
    for names in groups.values():
        stored = [n for n in names if n in state]
        if len(stored) > 1 and not all(torch.equal(state[stored[0]], state[n]) for n in stored[1:]):
            raise ValueError(f"checkpoint {where} stores different values for {stored}, which are one tensor of the "
                             "model (tied); the checkpoint was saved from a model without that tie")
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {where} does not fit the model: missing keys {sorted(missing)[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"checkpoint {where} does not fit the model (shapes differ): {wrong[:3]}")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)


def load_weights(model: nn.Module, directory: str | os.PathLike, *, verify_checksums: bool = True,
                 accept_config_differences: Iterable[str] = ()) -> nn.Module:
    """Load a checkpoint into an already converted ``model``; fails with a ``ValueError`` naming
    the mismatch when the structure differs (MoE config fields, converted modules, tied cores,
    tensor shapes, the transformers config: see :func:`from_pretrained`). A model without tied
    cores is tied as the checkpoint records. ``verify_checksums``: check the weight files
    against the XXH3-128 checksum recorded at save time first."""
    directory = _resolve_folder(Path(directory))
    record = _read_record(directory)
    check_base_config(model, directory, accept_config_differences)
    return _load_weights(model, directory, record, verify_checksums)


def _load_weights(model: nn.Module, directory: Path, record: dict, verify_checksums: bool) -> nn.Module:
    current = get_moe_config(model)
    if current is None:
        raise ValueError("model is not converted; use tnmoe.moe.from_pretrained(directory, model) to convert "
                         "and load it")
    diff = MoEConfig.from_dict(record["moe_config"]).diff(current)
    if diff:
        lines = ", ".join(f"{k}: checkpoint={a!r} model={b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {directory} does not match the model's MoE config ({lines})")
    names, saved = converted_modules(model), list(record["moe_modules"])
    if saved != names:
        raise ValueError(f"checkpoint converted modules {saved[:3]}... differ from the model's {names[:3]}... "
                         f"({len(saved)} vs {len(names)})")
    files = _weight_files(directory)
    if verify_checksums:
        _verify_weight_files(directory, record)
    _check_ties(model, dict(record.get(TIED_CORES_KEY) or {}), directory)
    state = {}
    for path in files:
        state.update(load_file(str(path)))
    _load_state_dict(model, state, directory)
    return model


#: transformers config fields that do not change what the loaded model computes
_NON_FUNCTIONAL_CONFIG_FIELDS = frozenset({
    HF_CONFIG_KEY, "model_type", "architectures", "transformers_version", "_name_or_path", "_commit_hash", "dtype",
    "torch_dtype", "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict", "use_cache",
    "chunk_size_feed_forward", "initializer_range", "initializer_factor", "attn_implementation",
    "_attn_implementation", "_attn_implementation_internal", "_attn_implementation_autoset",
})


def check_base_config(model: nn.Module, directory: Path, accept: Iterable[str] = ()) -> None:
    """Compare the transformers config of ``model`` (the base model passed to load into) with
    the one saved in ``directory/config.json``; ``ValueError`` naming every field that differs
    and changes the function (all but :data:`_NON_FUNCTIONAL_CONFIG_FIELDS`), except the field
    names in ``accept``. No-op for models without a transformers config or folders without one."""
    accept = {accept} if isinstance(accept, str) else set(accept)
    hf_config, path = getattr(model, "config", None), directory / HF_CONFIG_NAME
    if not (hasattr(hf_config, "to_dict") and hasattr(type(hf_config), "model_type")) or not path.is_file():
        if accept:
            raise ValueError(f"accept_config_differences={sorted(accept)}: there is no transformers config to compare")
        return
    saved = _read_json(path)
    base = getattr(type(hf_config), "_tnmoe_base_config", type(hf_config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved_config = base.from_dict({k: v for k, v in saved.items() if k not in (HF_CONFIG_KEY, "model_type")})
    want, have = saved_config.to_dict(), hf_config.to_dict()
    unknown = sorted(accept - set(want) - set(have))
    if unknown:
        raise ValueError(f"accept_config_differences names {unknown}, which are not fields of {base.__name__}")
    missing = object()
    differ = {k: (want.get(k, missing), have.get(k, missing)) for k in sorted(set(want) | set(have))
              if k not in _NON_FUNCTIONAL_CONFIG_FIELDS and k not in accept and want.get(k, missing) != have.get(k, missing)}
    if differ:
        shown = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
        lines = "; ".join(f"{k}: checkpoint {shown(a)}, model {shown(b)}" for k, (a, b) in differ.items())
        raise ValueError(
            f"the model's config differs from the one saved in {path} in fields that change what it computes: "
            f"{lines}. Build the base model from the saved config (AutoConfig.from_pretrained(folder) gives it, or "
            "load without a base model: tnmoe.moe.from_pretrained(folder)); if the difference is intended, pass "
            f"accept_config_differences={sorted(differ)}"
        )


def _load_transformers_model(directory: Path, record: dict, verify_checksums: bool, **kwargs) -> nn.Module:
    """Build the converted transformers model of ``directory`` with transformers' loader."""
    if not (directory / HF_CONFIG_NAME).is_file():
        raise ValueError(
            f"{directory} has no {HF_CONFIG_NAME}: the converted model was not a transformers model. Pass an "
            "unconverted instance of it: tnmoe.moe.from_pretrained(directory, model=MyModel(...))"
        )
    import transformers

    ensure_auto_registration(tnmoe_model_class)
    name = record["base_model_class"]
    base = getattr(transformers, name, None)
    if base is None:
        raise ValueError(f"transformers {transformers.__version__} has no class {name!r}; pass an unconverted "
                         "instance: tnmoe.moe.from_pretrained(directory, model=...)")
    config = transformers.AutoConfig.from_pretrained(directory)
    if getattr(type(config), "_tnmoe_base_config", None) is None:  # tnmoe_config.json-only checkpoints
        attach_record(config, record)
    model_cls = tnmoe_model_class(base, type(config)._tnmoe_base_config)
    kwargs["output_loading_info"] = True
    model, info = model_cls.from_pretrained(directory, config=config, verify_checksums=verify_checksums, **kwargs)
    problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                 "mismatched_keys") and v}
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit {name}: {problems}")
    ties = _relocated_ties(record, model)
    if tied_cores(model) != ties:
        raise ValueError(f"checkpoint {directory} records tied cores {sorted(ties.items())[:3]}, but the loaded model "
                         f"ties {sorted(tied_cores(model).items())[:3]} (the weights file stores them separately)")
    return model


def from_pretrained(directory: str | os.PathLike, model: nn.Module | None = None, *, verify_checksums: bool = True,
                    accept_config_differences: Iterable[str] = (), **kwargs) -> nn.Module:
    """Rebuild a converted model from a checkpoint folder, in eval mode (as transformers does).

    Reads folders written by :func:`save_pretrained`, by a converted transformers model's own
    ``save_pretrained`` and HF ``Trainer`` checkpoints (``checkpoint-<step>``).

    Args:
        directory: the checkpoint folder.
        model: an unconverted model of the saved architecture: it is converted with the saved
            config (no decomposition) and loaded (strict). Required for plain ``nn.Module``
            models; without it the transformers model class recorded in the checkpoint is built
            by transformers' loader. A transformers model's config must equal the saved one in
            every field that changes what the model computes (the check runs before the model
            is converted).
        verify_checksums: check each weight file against the XXH3-128 checksum recorded when
            :func:`save_pretrained` wrote it (folders written by transformers have none).
        accept_config_differences: config field names allowed to differ between ``model`` and
            the checkpoint (an intended change, e.g. ``["attn_pdrop"]`` for fine-tuning).
        **kwargs: passed to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ...);
            only without ``model``.

    Raises ``ValueError`` when the folder has no tnmoe record, an unknown format, weights that
    do not fit or fail their checksum, or a base model whose config differs.
    """
    directory = _resolve_folder(Path(directory))
    record = _read_record(directory)
    if model is None:
        if accept_config_differences:
            raise TypeError("accept_config_differences applies to a base model passed as model=")
        model = _load_transformers_model(directory, record, verify_checksums, **kwargs)
    else:
        if kwargs:
            raise TypeError(f"from_pretrained(directory, model) takes no further arguments, got {sorted(kwargs)}")
        check_base_config(model, directory, accept_config_differences)
        if get_moe_config(model) is None:
            convert(model, MoEConfig.from_dict(record["moe_config"]), init="empty", progress=False)
        _load_weights(model, directory, record, verify_checksums)
    return model.eval()

