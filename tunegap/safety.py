"""What tunegap will read from a folder someone else handed over: tensors, never code.

A pickle (`pytorch_model.bin`, `*.pt`, `*.ckpt`) is a program: unpickling runs whatever its `__reduce__`
says. Safetensors files are a JSON header and raw bytes, with nothing to execute. So weights load only from
safetensors unless the user passes `--allow-pickle`, and even then only through `torch.load(weights_only=True)`,
PyTorch's restricted unpickler that rebuilds tensors and plain containers and refuses every other object.
Optimizer state (`state.pt`, written by tunegap itself) is always read that way too (checkpoint.py).
A model folder's own Python code (`auto_map` in config.json) runs only with `--trust-remote-code`.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeFileError(ValueError):
    """A file tunegap refuses to load because loading it could run code; the message says what to do."""


def pickled_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES) \
        if Path(folder).is_dir() else []


def weights_format(folder: str | Path, *, allow_pickle: bool = False, what: str = "weights") -> str:
    """'safetensors' or 'pickle' (only with allow_pickle) for the weights in `folder`; else UnsafeFileError.

    Safetensors win whenever present, even beside a pickle, so a planted `pytorch_model.bin` next to
    `model.safetensors` is never the one read.
    """
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return "safetensors"
    pickles = pickled_files(folder)
    if not pickles:
        raise UnsafeFileError(f"{folder}: no *.safetensors {what} found")
    if allow_pickle:
        return "pickle"
    names = ", ".join(p.name for p in pickles[:3])
    raise UnsafeFileError(
        f"{folder}: {what} are pickled ({names}); loading a pickle can run arbitrary code, so tunegap reads "
        "only safetensors. Convert them with safetensors.torch.save_file, or pass --allow-pickle if you trust "
        "their source (tensors only, via torch.load(weights_only=True))")
