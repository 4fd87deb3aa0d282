"""A finished run's trained model: written once by the trainer, read back by one function everywhere.

Layout inside runs/<name>/:
  adapter/                          a PEFT adapter (LoRA, IA3, prompt/prefix...): plain `PeftModel.from_pretrained`
  bottleneck_adapter.safetensors    the hand-written bottleneck adapter's tensors (PEFT has no such method)
  model/                            full weights as safetensors, with the tokenizer (full SFT, freezing, scratch)
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, check_tensors, load_tensors, trainable_state
from .costs.shape import ModelShape
from .errors import ConfigError
from .io import DamagedFileError, atomic_dir, atomic_write_bytes, read_json
from .methods import make_method
from .models import load_model
from .runs import run_folder
from .safety import ADAPTER_FILES, refused_pickle, weights_format

ADAPTER_DIR, MODEL_DIR, TRAINABLE_FILE = "adapter", "model", "bottleneck_adapter.safetensors"
# What a user names to fetch the base a run started from, where tunegap's own name is not one: the default model
# is read from a GGUF file and cached under ~/.cache/tunegap, a path that means nothing on another machine.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class RunLoadError(ValueError):
    """A run that cannot be loaded (unfinished, no saved weights); one line naming its folder."""


def save_outputs(folder: Path, model, base, tokenizer, method) -> None:
    """A PEFT adapter for PEFT methods (plain `PeftModel.from_pretrained` loads it), else safetensors weights.

    Each is built in a hidden folder or file and renamed into place: a kill never leaves half a model to load."""
    from safetensors.torch import save

    if method.saves_adapter:
        model.peft_config["default"].base_model_name_or_path = base_model_name(folder)
        with atomic_dir(folder / ADAPTER_DIR) as staging:
            model.save_pretrained(staging)  # adapter_config.json + adapter_model.safetensors
    elif method.saves_trained_tensors:
        atomic_write_bytes(folder / TRAINABLE_FILE, save(trainable_state(model)))
    else:
        with atomic_dir(folder / MODEL_DIR) as staging:
            base.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)


def base_model_name(folder: Path) -> str:
    """The base model as the user named it in the run's config.json (`--model`), or its Hub id."""
    try:
        name = read_json(folder / "config.json", what="run config")["model"]
    except (DamagedFileError, KeyError, TypeError):
        return ""
    return HUB_IDS.get(name, name)


@dataclass
class LoadedRun:
    folder: Path
    ledger: dict
    model: object  # a transformers model (merged), or a PeftModel when merge=False
    tokenizer: object


def finished_run(run: str | Path, runs_dir: str | Path = "runs") -> tuple[Path, dict]:
    """(folder, ledger) of a completed run given by folder path or by name in `runs_dir`."""
    folder = Path(run)
    if not (folder / "ledger.json").is_file() and not folder.is_absolute() and len(folder.parts) == 1:
        folder = run_folder(runs_dir, str(run))  # a plain name: the run of that name in runs_dir
    path = folder / "ledger.json"
    if not path.is_file():
        raise RunLoadError(f"{folder}: not a finished tunegap run (no ledger.json)")
    ledger = read_json(path, what="run ledger")  # truncated or not an object: one line naming it
    if ledger.get("status") != "completed" or not isinstance(ledger.get("config"), dict):
        raise RunLoadError(f"{folder}: run status is {ledger.get('status')!r}, not 'completed'")
    return folder, ledger


def load_start(config: dict, *, allow_pickle: bool = False):
    """`(model, tokenizer)` a run started from, given its config: `model` (same name, init and seed, so a random
    preset is redrawn identically), or with `init_from` that earlier run's trained model, merged; so a stage of
    a ladder (SFT, then DPO from it, then RL from that) loads with every stage below it."""
    run = config.get("init_from")
    if not run:
        return load_model(config["model"], init=config.get("init", "pretrained"), seed=config.get("seed", 0),
                          trust_remote_code=config.get("trust_remote_code", False), allow_pickle=allow_pickle)
    if config.get("init", "pretrained") != "pretrained":
        raise ConfigError("--init-from: starts from a run's trained weights; drop --init scratch")
    try:
        loaded = load_run(run, config.get("runs_dir", "runs"), merge=True, allow_pickle=allow_pickle)
    except (RunLoadError, OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"--init-from {run}: cannot start from it: {str(err).splitlines()[0]}") from None
    started = loaded.ledger["config"]["model"]
    if started != config["model"]:
        raise ConfigError(f"--init-from {run}: that run started from {started!r}; pass --model {started} so the "
                          "tokenizer is the one it was trained with")
    if (loaded.folder / TRAINABLE_FILE).is_file():
        raise ConfigError(f"--init-from {run}: a run of hand-written parameters ({loaded.ledger['method']['name']}) "
                          "cannot be merged into plain weights")
    return loaded.model, loaded.tokenizer


def load_start_model(config):
    """`(model, tokenizer)` a run of `config` (a TrainConfig) starts from: `--model`, or `--init-from RUN`."""
    return load_start(config.to_dict(), allow_pickle=config.allow_pickle)


def load_run(run: str | Path, runs_dir: str | Path = "runs", *, merge: bool = True,
             allow_pickle: bool = False) -> LoadedRun:
    """A finished run's trained model: its adapter on the starting model (merged into plain weights unless
    merge=False), its full weights, or its bottleneck adapter rebuilt on the starting model."""
    folder, ledger = finished_run(run, runs_dir)
    config = ledger["config"]
    if (folder / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        adapter = folder / ADAPTER_DIR  # the file PEFT will read is the one checked, not any file beside it
        weights_format(adapter, allow_pickle=allow_pickle, what="adapter weights", files=ADAPTER_FILES)
        read_json(adapter / "adapter_config.json", what="adapter config")
        base, tokenizer = load_start(config, allow_pickle=allow_pickle)
        try:
            model = PeftModel.from_pretrained(base, adapter)  # reads adapter_model.safetensors first, as checked
        except pickle.UnpicklingError as err:  # --allow-pickle, and torch's restricted unpickler refused it
            raise refused_pickle(adapter / ADAPTER_FILES[1][0], err) from None
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # a tensor of another shape, a bad config
            detail = " ".join(str(err).split())[:300] or type(err).__name__
            raise RunLoadError(f"{adapter}: does not fit the run's starting model: {detail}") from None
        return LoadedRun(folder, ledger, model.merge_and_unload() if merge else model, tokenizer)
    if (folder / MODEL_DIR).is_dir():
        model, tokenizer = load_model(str(folder / MODEL_DIR), allow_pickle=allow_pickle)
        return LoadedRun(folder, ledger, model, tokenizer)
    if (folder / TRAINABLE_FILE).is_file():
        return LoadedRun(folder, ledger, *_rebuild_with_tensors(folder / TRAINABLE_FILE, ledger))
    raise RunLoadError(f"{folder}: no saved adapter/, model/ or {TRAINABLE_FILE} to load")


def _rebuild_with_tensors(path: Path, ledger: dict):
    """The starting model, prepared by the run's method, with the saved trained tensors put back (strict)."""
    import torch

    base, tokenizer = load_start(ledger["config"])
    options = {k: v for k, v in ledger["method"].items() if k != "name"}
    model = make_method(ledger["method"]["name"], **options).prepare(base, ModelShape.from_hf_config(base.config))
    try:
        tensors = load_tensors(path)
        params = dict(model.named_parameters())
        if set(tensors) - set(params):
            raise RunLoadError(f"{path}: tensors {sorted(set(tensors) - set(params))[:3]} do not fit the run's model")
        check_tensors(path, tensors, {n: params[n] for n in tensors})  # shapes and dtypes too: copy_ broadcasts
    except CheckpointError as err:
        raise RunLoadError(str(err)) from None
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return model.eval(), tokenizer
