"""What tunegap will read from a folder someone else handed over: tensors, never code.

A pickle (`pytorch_model.bin`, `*.pt`, `*.ckpt`) is a program: unpickling runs whatever its `__reduce__`
says. Safetensors files are a JSON header and raw bytes, with nothing to execute. So weights load only from
safetensors unless the user passes `--allow-pickle`, and even then only through `torch.load(weights_only=True)`,
PyTorch's restricted unpickler that rebuilds tensors and plain containers and refuses every other object.
Optimizer state (`state.pt`, written by tunegap itself) is always read that way too (checkpoint.py).
A model folder's own Python code (`auto_map` in config.json) runs only with `--trust-remote-code`.
"""

from __future__ import annotations

import re
from pathlib import Path

from .io import DamagedFileError, read_json, require_regular

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# The files a loader really reads, safetensors first (transformers' and PEFT's own names): the check is on
# these, so a decoy `x.safetensors` beside a pickled `adapter_model.bin` cannot pass for the weights.
MODEL_FILES = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
ADAPTER_FILES = (("adapter_model.safetensors",), ("adapter_model.bin",))


class UnsafeFileError(ValueError):
    """A file tunegap refuses to load because loading it could run code; the message says what to do."""


def pickled_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES) \
        if Path(folder).is_dir() else []


def weights_format(folder: str | Path, *, allow_pickle: bool = False, what: str = "weights",
                   files: tuple = MODEL_FILES) -> str:
    """'safetensors' or 'pickle' (only with allow_pickle) for the weights the loader will read from `folder`,
    else UnsafeFileError. `files` names them: (safetensors names, pickle names), in the loader's order.

    Safetensors win whenever present, even beside a pickle, so a planted `pytorch_model.bin` next to
    `model.safetensors` is never the one read; each safetensors file is checked whole (`check_safetensors`)
    so a damaged one is one line here, not a traceback inside the loader.
    """
    folder = Path(folder)
    safe_names, pickle_names = files
    for name in safe_names:
        if (folder / name).exists():
            for shard in _shards(folder / name):
                check_safetensors(shard)
            return "safetensors"
    pickles = [folder / n for n in pickle_names if (folder / n).is_file()]
    if not pickles:
        others = ", ".join(p.name for p in [*sorted(folder.glob("*.safetensors")), *pickled_files(folder)][:3])
        raise UnsafeFileError(f"{folder}: no {' or '.join(safe_names)} {what} found"
                              + (f" (it holds {others}, which the loader would not read as {what})" if others else ""))
    if allow_pickle:
        return "pickle"
    names = ", ".join(p.name for p in pickles[:3])
    raise UnsafeFileError(
        f"{folder}: {what} are pickled ({names}); loading a pickle can run arbitrary code, so tunegap reads "
        "only safetensors. Convert them with safetensors.torch.save_file, or pass --allow-pickle if you trust "
        "their source (tensors only, via torch.load(weights_only=True))")


def _shards(path: Path) -> list[Path]:
    """The safetensors files behind `path`: itself, or the shards a `*.index.json` maps tensors to, each
    inside the same folder."""
    if not path.name.endswith(".index.json"):
        return [path]
    index = read_json(path, what="weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DamagedFileError(f"{path}: not a valid weights index: no 'weight_map' of file names")
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = path.parent / name
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise UnsafeFileError(f"{path}: weight_map names {name!r}, not a .safetensors file in {path.parent}")
        shards.append(shard)
    return shards


def check_safetensors(path: str | Path) -> None:
    """A safetensors file whose header and offsets are whole, checked by the safetensors library itself
    (`safe_open` reads only the header: a length past the end, a 2^62-byte header, offsets past the body or
    a truncated body are all refused) and turned into one line naming the file."""
    from safetensors import safe_open

    path = require_regular(path)
    if not Path(path).is_file():
        raise DamagedFileError(f"{path}: missing (a safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError is a plain Exception; OSError for a bad file
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedFileError(f"{path}: not a valid safetensors file: {detail}") from None


def unpickler_reason(err: BaseException) -> str:
    """What torch's restricted unpickler objected to, in a few words: never its advice to retry with the unsafe
    weights_only=False, which its message offers first."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text)
    if found:
        return found.group(1).strip()[:160]
    first = text.splitlines()[0] if text else type(err).__name__
    return "it holds objects other than tensors" if "weights_only" in first else first[:160]


def refused_pickle(path: Path, err: BaseException) -> UnsafeFileError:
    """torch.load(weights_only=True) refused a pickle: one line naming the file, without the unsafe advice."""
    return UnsafeFileError(f"{path}: refused ({unpickler_reason(err)}): this pickle holds more than plain tensors, "
                           "and loading it could run code; tunegap reads pickles only as tensors (convert the "
                           "weights to safetensors)")


__all__ = ["ADAPTER_FILES", "MODEL_FILES", "UnsafeFileError", "check_safetensors", "pickled_files", "refused_pickle",
           "unpickler_reason", "weights_format"]
