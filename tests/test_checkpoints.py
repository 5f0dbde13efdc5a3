"""Checkpoints: tnmoe's and transformers' save_pretrained folders, Auto-class loading, clear
errors, and all-or-nothing writes under injected faults."""

import builtins
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tnmoe.moe as moe
import tnmoe.models.persistence as persistence
from tiny_ffn import TinyFFN, tiny_ffn_registered
from tiny_models import inputs_for, recorded_routing, tiny_bert, tiny_gpt2, tiny_t5
from tnmoe.moe import MoEConfig

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

CFG = MoEConfig(num_experts=2, m=3, init_noise=0.05)
AUTO = {"gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM, "bert": AutoModelForSequenceClassification}


def _converted(make=tiny_gpt2, config=CFG, seed=0):
    torch.manual_seed(seed)
    return moe.convert(make(), config, progress=False).eval()


def _out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- transformers folders and Auto classes -----------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5, tiny_bert], ids=["gpt2", "t5", "bert"])
def test_hf_and_tnmoe_folders_load_exactly(tmp_path, make):
    model = _converted(make)
    batch = inputs_for(model)
    ref = _out(model, batch)
    model.save_pretrained(tmp_path / "hf")         # what the Trainer writes into checkpoint-<step>
    moe.save_pretrained(model, tmp_path / "tnmoe")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "tnmoe"
    assert model.config.model_type == make().config.model_type  # in memory: still the base type
    auto = AUTO[model.config.model_type]
    for folder in ("hf", "tnmoe"):
        for loaded in (moe.from_pretrained(tmp_path / folder), auto.from_pretrained(tmp_path / folder)):
            assert not loaded.training
            assert isinstance(loaded, type(model))  # a subclass of the base class, same name
            assert moe.get_moe_config(loaded) == CFG
            assert torch.equal(_out(loaded, batch), ref), f"{folder} via {type(loaded).__name__}"
        into = moe.from_pretrained(tmp_path / folder, make())
        assert not into.training and torch.equal(_out(into, batch), ref)


def test_auto_model_of_a_head_checkpoint_and_pickling(tmp_path):
    model = _converted()
    model.save_pretrained(tmp_path)
    batch = inputs_for(model)
    base = AutoModel.from_pretrained(tmp_path)  # GPT2Model from a GPT2LMHeadModel checkpoint
    with torch.no_grad():
        assert torch.equal(base(**batch).last_hidden_state, model.transformer(**batch).last_hidden_state)
    loaded = moe.from_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_config(loaded.config)  # built for real: experts from its own init
    assert moe.get_moe_config(fresh) == CFG and torch.isfinite(_out(fresh.eval(), batch)).all()
    again = pickle.loads(pickle.dumps(loaded))
    assert type(again) is type(loaded) and type(again.config) is type(loaded.config)
    assert torch.equal(_out(again, batch), _out(model, batch))


def test_transformers_without_tnmoe_refuses_converted_checkpoints(tmp_path):
    """Before: model_type stayed 'gpt2' and AutoModel returned GPT-2 with random MLPs."""
    _converted().save_pretrained(tmp_path)
    registered = CONFIG_MAPPING._extra_content.pop("tnmoe")  # as if tnmoe were not imported
    try:
        with pytest.raises(ValueError, match="model type `tnmoe`"):
            AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        CONFIG_MAPPING._extra_content["tnmoe"] = registered


def test_import_hook_registers_when_transformers_comes_later(tmp_path):
    """``import tnmoe.moe`` first (transformers not imported), then plain transformers loading."""
    model = _converted()
    model.save_pretrained(tmp_path)
    batch = inputs_for(model)
    torch.save({"batch": batch, "ref": _out(model, batch)}, tmp_path / "ref.pt")
    code = f"""
import sys, torch
torch.set_num_threads({torch.get_num_threads()})  # the reference's: bit-equality needs the same kernels' blocking
import tnmoe.moe
assert "transformers.models.auto.configuration_auto" not in sys.modules
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / "ref.pt")!r}, weights_only=True)
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
with torch.no_grad():
    assert torch.equal(model(**ref["batch"]).logits, ref["ref"])
print("ok")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(moe.__file__).parents[2]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_tied_and_shared_tensors_stored_once(tmp_path):
    from safetensors import safe_open

    moe.save_pretrained(_converted(), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied: once, under the source
    assert sum(k.endswith("experts.up.cores.1") for k in keys) == 2  # central core: once per layer


def test_checkpoints_of_earlier_tnmoe_versions_load(tmp_path):
    """Folders written before model_type 'tnmoe': record only in tnmoe_config.json, or also in a
    config.json that still says 'gpt2'; weights deduplicated by safetensors' own rule."""
    from safetensors.torch import save_model

    model = _converted()
    batch = inputs_for(model)
    record = {k: v for k, v in model.config.tnmoe.items() if k != "base_model_type"}
    plain = {k: v for k, v in model.config.to_dict().items() if k != "tnmoe"}
    plain["model_type"] = "gpt2"
    for name, config in (("v0", plain), ("v1", dict(plain, tnmoe=record))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "tnmoe_config.json").write_text(json.dumps(record))
        save_model(model, str(folder / "model.safetensors"))
        assert torch.equal(_out(moe.from_pretrained(folder), batch), _out(model, batch))
        assert torch.equal(_out(moe.from_pretrained(folder, tiny_gpt2()), batch), _out(model, batch))


@pytest.fixture(autouse=True)
def _tiny_ffn_adapter():
    with tiny_ffn_registered():
        yield


def _plain_net():
    return nn.Sequential(nn.Linear(4, 8), TinyFFN(), nn.Linear(8, 2))


def test_plain_module_round_trip(tmp_path):
    torch.manual_seed(0)
    net = moe.convert(_plain_net(), MoEConfig(num_experts=2, m=2, init_noise=0.1), progress=False).eval()
    x = torch.randn(5, 4)
    moe.save_pretrained(net, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "tnmoe_config.json"]
    loaded = moe.from_pretrained(tmp_path, _plain_net().train())
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    with pytest.raises(ValueError, match="model=MyModel"):
        moe.from_pretrained(tmp_path)


# --- errors --------------------------------------------------------------------------------------
def test_folder_without_record_names_convert_and_save(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)  # an unconverted checkpoint
    for load in (lambda: moe.from_pretrained(tmp_path), lambda: moe.load_weights(_converted(), tmp_path)):
        with pytest.raises(ValueError, match=r"tnmoe\.moe\.convert.*tnmoe\.moe\.save_pretrained"):
            load()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        moe.from_pretrained(tmp_path / "nowhere")


def test_unknown_format_is_rejected(tmp_path):
    model = _converted()
    model.save_pretrained(tmp_path / "hf")
    moe.save_pretrained(_converted(_plain_net, MoEConfig(num_experts=2, m=2)), tmp_path / "plain")
    for folder, name in ((tmp_path / "hf", "config.json"), (tmp_path / "plain", "tnmoe_config.json")):
        doc = json.loads((folder / name).read_text())
        record = doc.get("tnmoe", doc)
        record["format"] = "tnmoe-99"
        (folder / name).write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="unknown tnmoe checkpoint format 'tnmoe-99'"):
            moe.from_pretrained(folder)
        with pytest.raises(ValueError, match="unknown tnmoe checkpoint format"):
            moe.load_weights(model, folder)
    with pytest.raises(ValueError, match="unknown tnmoe checkpoint format"):
        AutoConfig.from_pretrained(tmp_path / "hf")


def test_load_weights_reports_shape_mismatch(tmp_path):
    moe.save_pretrained(_converted(), tmp_path)
    with pytest.raises(ValueError, match=r"n_inner: checkpoint None, model 256"):  # the config check comes first
        moe.from_pretrained(tmp_path, tiny_gpt2(n_inner=256))
    with pytest.raises(ValueError, match="does not fit"):  # accepted config difference: the shapes still differ
        moe.from_pretrained(tmp_path, tiny_gpt2(n_inner=256), accept_config_differences=["n_inner"])


# --- all-or-nothing writes -------------------------------------------------------------------------
class Killed(BaseException):
    """A process killed mid-save: nothing after the fault reaches the disk."""


class Faults:
    """Counts a save's file operations and fails the ``fail_at``-th: once (``OSError``, the save
    may clean up), or from then on (``kill=True``: every later operation raises ``Killed``)."""

    def __init__(self, fail_at: int, kill: bool = False):
        self.fail_at, self.kill, self.count, self.fired = fail_at, kill, 0, False

    def hit(self, what: str) -> None:
        self.count += 1
        if self.count == self.fail_at or (self.kill and self.count > self.fail_at):
            self.fired = True
            if self.kill:
                raise Killed(what)
            raise OSError(f"injected failure of operation {self.count}: {what}")

    def wrap(self, fn, what):
        def faulty(*args, **kwargs):
            self.hit(f"{what}{args[:2]}")
            return fn(*args, **kwargs)
        return faulty

    def install(self, monkeypatch) -> None:
        real_open = builtins.open

        def faulty_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self.hit(f"open({file}, {mode})")
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", faulty_open)
        for mod, names in ((os, ["rename", "replace", "mkdir", "makedirs", "link", "symlink", "unlink", "remove",
                                 "rmdir", "fsync"]),
                           (shutil, ["rmtree", "copy2"]), (tempfile, ["mkdtemp"]),
                           (persistence, ["save_file"])):
            for name in names:
                monkeypatch.setattr(mod, name, self.wrap(getattr(mod, name), name))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """An old checkpoint folder (model A + a tokenizer file) and the snapshots of old and of new
    (model B saved over it)."""
    root = tmp_path_factory.mktemp("ckpts")
    a, b = _converted(seed=0), _converted(seed=1)
    old = root / "old"
    moe.save_pretrained(a, old)
    (old / "tokenizer.json").write_text('{"tokens": []}')
    new = root / "new"
    shutil.copytree(old, new)
    moe.save_pretrained(b, new)
    snaps = {"old": _snapshot(old), "new": _snapshot(new)}
    assert snaps["old"]["tokenizer.json"] == snaps["new"]["tokenizer.json"]  # foreign files kept
    assert snaps["old"]["model.safetensors"] != snaps["new"]["model.safetensors"]
    states = {"old": a.state_dict(), "new": b.state_dict()}
    return old, b, snaps, states


def _which(folder: Path, probe: nn.Module, states) -> str:
    """'old' or 'new': which model ``folder`` loads as (through tnmoe's loader)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a killed swap: loading falls back to the set-aside folder
        moe.load_weights(probe, folder)
    loaded = probe.state_dict()
    for name, state in states.items():
        if all(torch.equal(loaded[k], state[k]) for k in state):
            return name
    raise AssertionError(f"{folder} loads as neither the old nor the new checkpoint")


def _leftovers(target: Path) -> list[str]:
    """Staging / set-aside folders of saves into ``target``."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tnmoe-"))


@pytest.mark.parametrize("kill", [False, True], ids=["fail-once", "killed"])
def test_save_is_all_or_nothing_under_faults(tmp_path, monkeypatch, two_checkpoints, kill):
    old, model_b, snaps, states = two_checkpoints
    probe = _converted(seed=2)
    n = 0
    while True:
        n += 1
        case = tmp_path / f"case{n}"
        case.mkdir()
        target = case / "ckpt"
        shutil.copytree(old, target)
        faults = Faults(n, kill=kill)
        with monkeypatch.context() as m:
            faults.install(m)
            try:
                moe.save_pretrained(model_b, target)
                raised = None
            except (OSError, Killed) as err:
                raised = err
        if not faults.fired:  # n is past the save's last operation
            assert raised is None and _snapshot(target) == snaps["new"] and not _leftovers(target)
            break
        seen = _which(target, probe, states)
        if not kill:
            assert raised is not None or seen == "new", f"op {n}: a failed save must raise"
            assert _snapshot(target) == snaps[seen], f"op {n} ({raised}): folder is a mix"
            assert not _leftovers(target), f"op {n} ({raised}): leftovers {_leftovers(target)}"
        # the next save (not interrupted) cleans up whatever was left and writes the new model
        moe.save_pretrained(model_b, target)
        assert _snapshot(target) == snaps["new"] and not _leftovers(target), f"op {n}: {_leftovers(target)}"
    assert n > 15  # the save's file operations were all exercised (weights, configs, renames, removal)


def test_stale_staging_of_a_dead_process_is_removed_live_one_kept(tmp_path):
    target = tmp_path / "ckpt"
    moe.save_pretrained(_converted(), target)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = persistence._host()
    stale = [tmp_path / f".ckpt.tnmoe-staging-{host}-{dead.pid}-ab12", tmp_path / f".ckpt.tnmoe-old-{host}-{dead.pid}-cd34"]
    live = tmp_path / f".ckpt.tnmoe-staging-{host}-{os.getppid()}-ef56"  # a save in progress elsewhere
    for folder in stale + [live]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    moe.save_pretrained(_converted(seed=1), target)
    assert _leftovers(target) == [live.name]


def test_save_refuses_a_folder_with_subfolders(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="subfolders.*checkpoint-4"):
        moe.save_pretrained(_converted(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "notes.txt"]
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("router", ["switch", "hash"])
def test_half_precision_checkpoint_reloads_with_float32_routers_and_the_same_routing(tmp_path, router):
    torch.manual_seed(0)
    model = tiny_gpt2().to(torch.bfloat16).eval()
    moe.convert(model, MoEConfig(num_experts=4, m=3, init_noise=0.5, router=router), progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-router stand-in: O(1) float32 weights that bf16 would round
        for _, layer in moe.moe_layers(model):
            for p in layer.router.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    batch = inputs_for(model, batch=8, seq=32)

    def routed(m):
        with recorded_routing(m) as picks, torch.no_grad():
            logits = m(**batch).logits
        return logits, picks

    want_logits, want_picks = routed(model)
    moe.save_pretrained(model, tmp_path / "ck")
    loaded = moe.from_pretrained(tmp_path / "ck")
    original = {n: t.dtype for n, t in model.state_dict().items()}
    assert {n: t.dtype for n, t in loaded.state_dict().items()} == original  # float32 router, int64 hash table
    logits, picks = routed(loaded)
    assert all(torch.equal(a, b) for a, b in zip(picks, want_picks))
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
