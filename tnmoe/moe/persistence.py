"""Save / load converted models.

A checkpoint folder holds ``model.safetensors`` (each shared or tied tensor stored once) and the
conversion record (:func:`tnmoe.moe.hf_config.conversion_record`): in ``config.json`` (key
``tnmoe``) for transformers models, whose ``model.save_pretrained`` folders and Trainer
checkpoints therefore load too, and in ``tnmoe_config.json`` for every model (the only place for
plain ``nn.Module`` models).

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
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MoEConfig
from .convert import convert, converted_modules, get_moe_config
from .hf_config import (
    HF_CONFIG_KEY,
    MODEL_TYPE,
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
def save_pretrained(model: nn.Module, save_directory: str | os.PathLike) -> Path:
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
    """
    config = get_moe_config(model)
    if config is None:
        raise ValueError("model has no MoE layers installed by tnmoe.moe.convert; call tnmoe.moe.convert first")
    writers = _checkpoint_writers(model, _record_of(model, config))
    return _write_folder_atomically(Path(save_directory), writers)


def _record_of(model: nn.Module, config: MoEConfig) -> dict:
    hf_config = getattr(model, "config", None)
    record = getattr(hf_config, HF_CONFIG_KEY, None) if hf_config is not None else None
    if isinstance(record, dict):
        return record
    return conversion_record(model, config, converted_modules(model))


def _checkpoint_writers(model: nn.Module, record: dict) -> dict[str, Callable[[Path], None]]:
    """``{file name: write(path)}`` for every file of the checkpoint."""
    writers = {WEIGHTS_NAME: lambda path: _write_weights(model, path)}
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
    attach_record(config, record)
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


def _model_init(self, config, *args, **kwargs):
    type(self)._tnmoe_base_model.__init__(self, config, *args, **kwargs)
    _convert_from_record(self)


def _model_reduce_ex(self, protocol):
    cls = type(self)
    _, _, *rest = object.__reduce_ex__(self, protocol)
    return (_new_model, (cls._tnmoe_base_model, cls.config_class._tnmoe_base_config), *rest)


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
    name of the same tensor is present. ``ValueError`` on missing, unexpected or mis-shaped keys."""
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in state for n in names)]
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


def load_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into an already converted ``model``; fails with a ``ValueError`` naming
    the mismatch when the structure differs (config fields, converted modules, tensor shapes)."""
    directory = _resolve_folder(Path(directory))
    return _load_weights(model, directory, _read_record(directory))


def _load_weights(model: nn.Module, directory: Path, record: dict) -> nn.Module:
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
    state = {}
    for path in _weight_files(directory):
        state.update(load_file(str(path)))
    _load_state_dict(model, state, directory)
    return model


def _load_transformers_model(directory: Path, record: dict, **kwargs) -> nn.Module:
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
    model, info = model_cls.from_pretrained(directory, config=config, **kwargs)
    problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                 "mismatched_keys") and v}
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit {name}: {problems}")
    return model


def from_pretrained(directory: str | os.PathLike, model: nn.Module | None = None, **kwargs) -> nn.Module:
    """Rebuild a converted model from a checkpoint folder, in eval mode (as transformers does).

    Reads folders written by :func:`save_pretrained`, by a converted transformers model's own
    ``save_pretrained`` and HF ``Trainer`` checkpoints (``checkpoint-<step>``).

    Args:
        directory: the checkpoint folder.
        model: an unconverted model of the saved architecture: it is converted with the saved
            config (no decomposition) and loaded (strict). Required for plain ``nn.Module``
            models; without it the transformers model class recorded in the checkpoint is built
            by transformers' loader.
        **kwargs: passed to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ...);
            only without ``model``.

    Raises ``ValueError`` when the folder has no tnmoe record, an unknown format, or weights
    that do not fit.
    """
    directory = _resolve_folder(Path(directory))
    record = _read_record(directory)
    if model is None:
        model = _load_transformers_model(directory, record, **kwargs)
    else:
        if kwargs:
            raise TypeError(f"from_pretrained(directory, model) takes no further arguments, got {sorted(kwargs)}")
        if get_moe_config(model) is None:
            convert(model, MoEConfig.from_dict(record["moe_config"]), init="empty", progress=False)
        _load_weights(model, directory, record)
    return model.eval()


ensure_auto_registration(tnmoe_model_class)  # AutoModel*.from_pretrained on tnmoe checkpoints
