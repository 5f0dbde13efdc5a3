"""The conversion record inside a transformers model's config, and loading through the Auto classes.

:func:`tnmoe.moe.convert` calls :func:`mark_hf_config`, which

1. stores the conversion record ``{"format", "moe_config", "moe_modules", "base_model_class",
   "base_model_type"}`` as attribute ``tnmoe`` of ``model.config``, and
2. swaps ``model.config.__class__`` for a subclass of its class (``GPT2Config`` ->
   ``TnmoeGPT2Config``) whose serialized form says ``"model_type": "tnmoe"``. In memory
   ``config.model_type`` stays the base model's (``"gpt2"``), so transformers' own code paths
   (loss functions, generation, attention dispatch) see the model they know.

So every ``model.save_pretrained(dir)`` folder, Trainer checkpoints included, is a ``tnmoe``
checkpoint in ``config.json``:

* without tnmoe, transformers refuses it ("model type `tnmoe` ... does not recognize this
  architecture") instead of returning the base model with freshly initialized FFNs;
* after ``import tnmoe.moe``, ``AutoConfig`` maps ``"tnmoe"`` to a loader class whose
  ``from_dict`` builds the base config (``CONFIG_MAPPING[base_model_type]``) as its ``Tnmoe*``
  subclass and registers, for every ``AutoModel*`` class whose mapping has the base config, a
  subclass of the base model class whose ``__init__`` converts the freshly built model
  (:func:`tnmoe.models.persistence.tnmoe_model_class`; weights left empty), so transformers' loader
  fills in the trained weights: ``AutoModelForCausalLM.from_pretrained(dir)`` returns the
  trained MoE model.

Importing transformers' ``configuration_auto`` costs ~0.8 s, so ``import tnmoe.moe`` does not do
it: when transformers is not imported yet, a one-shot import hook registers ``"tnmoe"`` right
after transformers imports ``configuration_auto`` (which every ``AutoConfig``/``AutoModel*`` use
does). The registration (that hook and the caches of generated classes) is this module's only
global state.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Callable

from torch import nn

from ..moe.config import MoEConfig

__all__ = ["HF_CONFIG_KEY", "FORMAT", "MODEL_TYPE", "TIED_CORES_KEY", "WEIGHT_FILES_KEY", "WEIGHT_CHECKSUM", "mark_hf_config", "conversion_record", "check_record",
           "attach_record", "tnmoe_config_class", "register_auto_classes", "ensure_auto_registration"]

#: attribute of the transformers config (and key of ``config.json``) holding the conversion record
HF_CONFIG_KEY = "tnmoe"
#: checkpoint format tag written with the conversion record
FORMAT = "tnmoe-1"
#: ``model_type`` written into ``config.json`` of converted transformers models
MODEL_TYPE = "tnmoe"
#: record key (optional): ``{tied core: core it is tied to}`` parameter names, written at save time
TIED_CORES_KEY = "tied_cores"
#: record key (optional): ``{weight file name: {"xxh3_128": hex, "bytes": size}}``, written with the
#: weights by ``tnmoe.moe.save_pretrained``; never kept in a config in memory (a later
#: transformers ``save_pretrained`` writes other weights)
WEIGHT_FILES_KEY = "weight_files"
#: the checksum each ``weight_files`` entry records (see :mod:`tnmoe.models.persistence`)
WEIGHT_CHECKSUM = "xxh3_128"

_AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_RECORD_KEYS = ("moe_config", "moe_modules", "base_model_class")


# --- the record ------------------------------------------------------------------------------------
def conversion_record(model: nn.Module, config: MoEConfig, modules: list[str]) -> dict:
    """The JSON-serializable record of a conversion: format tag, :class:`MoEConfig`, converted
    module names, the model's class name and (transformers models) the base ``model_type``."""
    record = {
        "format": FORMAT,
        "moe_config": config.to_dict(),
        "moe_modules": list(modules),
        "base_model_class": type(model).__name__,
    }
    hf_config = getattr(model, "config", None)
    if _is_hf_config(hf_config):
        record["base_model_type"] = type(hf_config).model_type
    return record


def check_record(record, where: str) -> dict:
    """Validate a conversion record read from ``where`` (a file name, for messages); returns it.

    Raises ``ValueError`` for a record that is not a dict, has an unknown ``format`` tag or lacks a key.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: the tnmoe record must be a JSON object, got {type(record).__name__}")
    fmt = record.get("format")
    if fmt != FORMAT:
        raise ValueError(
            f"{where}: unknown tnmoe checkpoint format {fmt!r}; this version of tnmoe reads {FORMAT!r}. "
            "Load it with the tnmoe version that wrote it, or upgrade tnmoe"
        )
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"{where}: the tnmoe record lacks {missing}; the checkpoint is damaged, re-save it")
    ties = record.get(TIED_CORES_KEY, {})
    if not isinstance(ties, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
        raise ValueError(f"{where}: the tnmoe record's {TIED_CORES_KEY!r} must map parameter names to parameter "
                         "names; the checkpoint is damaged, re-save it")
    files = record.get(WEIGHT_FILES_KEY, {})
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get(WEIGHT_CHECKSUM), str)
                                              and isinstance(v.get("bytes"), int) for v in files.values()):
        raise ValueError(f"{where}: the tnmoe record's {WEIGHT_FILES_KEY!r} must map file names to "
                         f"{{{WEIGHT_CHECKSUM!r}: hex, 'bytes': size}}; the checkpoint is damaged, re-save it")
    return record


def _is_hf_config(obj) -> bool:
    return obj is not None and hasattr(obj, "to_json_string") and hasattr(type(obj), "model_type")


def mark_hf_config(model: nn.Module, config: MoEConfig, modules: list[str]) -> None:
    """Record ``config`` and the converted module names on ``model.config`` when ``model`` is a
    transformers model (no-op otherwise), and make that config serialize as ``model_type: tnmoe``."""
    hf_config = getattr(model, "config", None)
    if not _is_hf_config(hf_config):
        return
    attach_record(hf_config, conversion_record(model, config, modules))
    loader = _registered_loader()
    if loader is not None:  # so AutoModel*.from_config(model.config) builds the converted model
        loader.register_base(type(hf_config)._tnmoe_base_config)


def attach_record(hf_config, record: dict, *, keep_checksums: bool = False) -> None:
    """Store ``record`` on the transformers config ``hf_config`` and switch its class to the
    ``Tnmoe*`` subclass of its class (in place; the in-memory ``model_type`` is unchanged).
    The weight file checksums are dropped unless ``keep_checksums`` (a config being written
    with those very files)."""
    base = getattr(type(hf_config), "_tnmoe_base_config", type(hf_config))
    record = {k: v for k, v in record.items() if keep_checksums or k != WEIGHT_FILES_KEY}
    record.setdefault("base_model_type", base.model_type)
    hf_config.__class__ = tnmoe_config_class(base)
    setattr(hf_config, HF_CONFIG_KEY, record)


# --- generated classes ------------------------------------------------------------------------------
def _config_init(self, **kwargs):
    # a serialized config says model_type "tnmoe": never let it shadow the class's base model_type
    kwargs.pop("model_type", None)
    record = kwargs.get(HF_CONFIG_KEY)
    if record is not None:
        check_record(record, f"{type(self).__name__}({HF_CONFIG_KEY}=...)")
        # the checksums belong to the files read, not to this config (which may be saved with other weights)
        kwargs[HF_CONFIG_KEY] = {k: v for k, v in record.items() if k != WEIGHT_FILES_KEY}
    type(self)._tnmoe_base_config.__init__(self, **kwargs)


def _config_to_dict(self) -> dict:
    out = type(self)._tnmoe_base_config.to_dict(self)
    out["model_type"] = MODEL_TYPE
    return out


def _config_reduce_ex(self, protocol):
    return _rebuild_config, (type(self)._tnmoe_base_config, dict(self.__dict__))


def _rebuild_config(base: type, state: dict):
    """Unpickle a ``Tnmoe*`` config (generated classes cannot be pickled by reference)."""
    obj = object.__new__(tnmoe_config_class(base))
    obj.__dict__.update(state)
    return obj


@functools.cache
def tnmoe_config_class(base: type) -> type:
    """The subclass of the transformers config class ``base`` that converted models use:
    ``to_dict()`` (so ``config.json``) says ``"model_type": "tnmoe"``; ``model_type`` (class
    attribute) stays ``base.model_type``. One class per ``base``."""
    if getattr(base, "_tnmoe_base_config", None) is not None:
        return base
    name = f"Tnmoe{base.__name__}"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"``{base.__name__}`` of a model converted by tnmoe (serialized as model_type 'tnmoe').",
        "_tnmoe_base_config": base,
        "__init__": _config_init,
        "to_dict": _config_to_dict,
        "__reduce_ex__": _config_reduce_ex,
    }
    return type(name, (base,), namespace)


# --- Auto registration ------------------------------------------------------------------------------
def _auto_model_classes() -> list[type]:
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    out = []
    for name in dir(modeling_auto):
        obj = getattr(modeling_auto, name)
        if (isinstance(obj, type) and issubclass(obj, _BaseAutoModelClass)
                and getattr(obj, "_model_mapping", None) is not None):
            out.append(obj)
    return out


#: ``model_class_for(M, base_config)``: the converting subclass of transformers model class ``M``
ModelClassFactory = Callable[[type, type], type]


@functools.cache
def register_auto_classes(base_config: type, model_class_for: ModelClassFactory) -> None:
    """Register ``model_class_for(M, base_config)`` for ``tnmoe_config_class(base_config)`` with
    every ``AutoModel*`` class whose mapping sends ``base_config`` to a model class ``M``. Once per
    ``base_config``."""
    config_cls = tnmoe_config_class(base_config)
    for auto in _auto_model_classes():
        mapping = auto._model_mapping
        if base_config not in mapping:
            continue
        try:
            models = mapping[base_config]
        except (KeyError, ImportError, AttributeError, ValueError):  # an entry needing a missing dependency
            continue
        if isinstance(models, (list, tuple)):
            converted = type(models)(model_class_for(m, base_config) for m in models)
        else:
            converted = model_class_for(models, base_config)
        auto.register(config_cls, converted, exist_ok=True)


def _loader_config_class(model_class_for: ModelClassFactory):
    """The class ``AutoConfig`` maps ``"tnmoe"`` to; ``from_dict`` returns a ``Tnmoe*`` config and
    registers the converting model classes of its base config (``model_class_for``)."""
    from transformers.configuration_utils import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    class TnmoeConfig(PretrainedConfig):
        """Loader for ``model_type: tnmoe`` checkpoints (see :mod:`tnmoe.models.hf_config`)."""

        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict, **kwargs):
            record = check_record(config_dict.get(HF_CONFIG_KEY), f"config.json '{HF_CONFIG_KEY}' entry")
            base_type = record.get("base_model_type")
            if base_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"tnmoe checkpoint of base model type {base_type!r}, which this transformers version "
                    "does not know; upgrade transformers"
                )
            base = CONFIG_MAPPING[base_type]
            cls.register_base(base)
            return tnmoe_config_class(base).from_dict(config_dict, **kwargs)

        @staticmethod
        def register_base(base_config: type) -> None:
            """Make the ``AutoModel*`` classes build converted models for ``Tnmoe<base_config>``."""
            register_auto_classes(base_config, model_class_for)

    TnmoeConfig.__module__ = __name__
    return TnmoeConfig


def _register_auto_config(model_class_for: ModelClassFactory) -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, _loader_config_class(model_class_for), exist_ok=True)


def _registered_loader():
    """The loader class registered for ``"tnmoe"`` (``None`` before registration)."""
    if _AUTO_CONFIG_MODULE not in sys.modules:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[MODEL_TYPE] if MODEL_TYPE in CONFIG_MAPPING else None


class _PostImportLoader(importlib.abc.Loader):
    """Wraps the loader of ``configuration_auto``: runs ``callback(module)`` after executing it."""

    def __init__(self, loader, callback) -> None:
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_filename, ... (tracebacks, inspect)
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: registers ``"tnmoe"`` with ``AutoConfig`` once transformers has
    imported ``configuration_auto``."""

    def __init__(self, model_class_for: ModelClassFactory) -> None:
        self._model_class_for = model_class_for

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_CONFIG_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PostImportLoader(spec.loader, self._fire)
        return spec

    def _fire(self, module) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            _register_auto_config(self._model_class_for)
        except Exception as err:  # never break importing transformers
            warnings.warn(f"tnmoe could not register model type {MODEL_TYPE!r} with transformers' "
                          f"AutoConfig ({err}); load converted checkpoints with tnmoe.moe.from_pretrained")


def ensure_auto_registration(model_class_for: ModelClassFactory) -> None:
    """Register ``"tnmoe"`` with ``AutoConfig`` now if transformers' ``configuration_auto`` is
    imported, else once it is (import hook); ``AutoModel*`` classes then build
    ``model_class_for(M, base_config)`` for converted checkpoints of base model class ``M``.
    Called on ``import tnmoe.moe`` with a factory that imports :mod:`tnmoe.models.persistence`,
    which defines the model classes (this module does not import the conversion code). Idempotent."""
    if _AUTO_CONFIG_MODULE in sys.modules:
        if _registered_loader() is None:
            _register_auto_config(model_class_for)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(model_class_for))
