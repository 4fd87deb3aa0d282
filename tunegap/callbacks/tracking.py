"""`--log tensorboard|mlflow`: the run's metrics.jsonl, line for line, in the tracker a user already looks at.

The callback mirrors the file rather than the trainer's rows, so the tracker holds exactly what metrics.jsonl
holds (the final held-out loss included) and nothing the file lacks. The main process only.
"""

from __future__ import annotations

import json
import numbers

from ..errors import ConfigError
from .base import Callback

TRACKERS = ("none", "tensorboard", "mlflow")
# The optional extra that installs each tracker's package (pyproject.toml)
EXTRAS = {"tensorboard": ("tensorboard", "log"), "mlflow": ("mlflow", "mlflow")}


def check_installed(tracker: str) -> None:
    """A one-line error naming the extra to install, before any training starts."""
    import importlib.util

    if tracker not in TRACKERS:
        raise ConfigError(f"--log: choose from {', '.join(TRACKERS)}, got {tracker!r}")
    if tracker != "none" and importlib.util.find_spec(EXTRAS[tracker][0]) is None:
        package, extra = EXTRAS[tracker]
        raise ConfigError(f"--log {tracker}: the {package} package is not installed: pip install 'tunegap[{extra}]'")


class MetricsMirror(Callback):
    """Sends each new line of metrics.jsonl to TensorBoard (a `tensorboard/` folder in the run) or MLflow."""

    def __init__(self, tracker: str):
        check_installed(tracker)
        self.tracker, self.trainer, self.offset, self.writer = tracker, None, 0, None

    def on_train_start(self, trainer):
        if not trainer.strategy.is_main:
            return
        self.trainer = trainer
        path = trainer.metrics_path
        self.offset = path.stat().st_size if path.exists() else 0  # a resumed run: earlier lines were sent before
        if self.tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(trainer.folder / "tensorboard"))
        else:
            import mlflow

            mlflow.start_run(run_name=trainer.name)
            mlflow.log_params({k: v for k, v in trainer.config.to_dict().items() if v not in ("", None)})

    def _send_new_lines(self) -> None:
        if self.trainer is None or not self.trainer.metrics_path.exists():
            return
        with open(self.trainer.metrics_path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            row = json.loads(line)
            step = int(row.get("step", 0))
            values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, numbers.Real)
                      and not isinstance(v, bool)}
            if self.writer is not None:
                for key, value in values.items():
                    self.writer.add_scalar(key, value, step)
            else:
                import mlflow

                mlflow.log_metrics(values, step=step)

    def on_step_end(self, trainer, step, row):
        self._send_new_lines()  # the lines up to the previous step (this step's line is written after callbacks)
        return {}

    def on_outputs(self, trainer, model, tokenizer):
        self._send_new_lines()  # the last step and the final held-out loss
        return {}

    def close(self):
        self._send_new_lines()  # an interrupted run: what it logged
        if self.writer is not None:
            self.writer.close()
        elif self.trainer is not None:
            import mlflow

            mlflow.end_run()
        self.trainer = None
