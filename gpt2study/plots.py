"""Training curves as PNG: loss, perplexity and next-token accuracy against what a run has seen.

    curves = [Curve("run 1", read_metrics("out/pretrain/metrics.jsonl"), x_per_step=32768),
              Curve("run 2", read_metrics("out/pretrain_continue/metrics.jsonl"), x_per_step=32768,
                    x_offset=run_1_tokens)]
    plot_curves(curves, "curves.png", x_label="tokens seen", title="pretraining")

A curve is one run's metrics.jsonl (trainer.RunLog: training records every log_interval steps,
validation records with perplexity and accuracy at each evaluation). Its x is the record's
`tokens_seen` where the trainer logged it, else step x `x_per_step`; `x_offset` places a run that
continues another at the point where that one ended. matplotlib's Agg backend: no display needed.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gpt2study.files import replacing


@dataclass
class Curve:
    label: str
    records: list[dict]
    x_per_step: float  # what one optimizer step adds to the x axis (tokens, pairs)
    x_offset: float = 0.0  # where the run starts on the shared axis
    train_perplexity: bool = True  # False when the training loss is label-smoothed: exp of it is no perplexity
    start: dict | None = None  # a validation record of the weights the run starts from (where it takes over)

    def x(self, record: dict) -> float:
        seen = record.get("tokens_seen")
        return self.x_offset + (seen if seen is not None else record["step"] * self.x_per_step)

    def split(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("split") == name]

    @property
    def end(self) -> float:
        """Where the run ended on the axis (its last record)."""
        return max((self.x(r) for r in self.records), default=self.x_offset)


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a last line torn by a killed run is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _perplexity_axis(ax, fmt) -> None:
    """A log scale where perplexity spans a decade or more (it starts near the vocabulary size),
    labelled 2k, 5k, 10k rather than in powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ys = [y for line in ax.lines for y in line.get_ydata()]
    if not ys or max(ys) < 10 * min(ys):
        ax.yaxis.set_major_formatter(fmt)
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(fmt)

    def minor(y, pos):
        mantissa = y / 10 ** math.floor(math.log10(y) + 1e-9)
        return fmt(y, pos) if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def plot_curves(curves: list[Curve], path, *, x_label: str, title: str) -> Path:
    """Three panels side by side (loss, perplexity on a log scale, accuracy), training and
    validation of every curve; written under a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, PercentFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharex=True, layout="constrained")
    panels = (("loss", "loss (nats per token)"), ("perplexity", "perplexity"), ("accuracy", "next-token accuracy"))
    for i, curve in enumerate(curves):
        color = f"C{i}"
        train, val = curve.split("train"), curve.split("val")
        for ax, (key, _) in zip(axes, panels):
            if key == "accuracy":
                ys = [(curve.x(r), r["accuracy"]) for r in train if r.get("accuracy") is not None]
            elif key == "perplexity":
                ys = [(curve.x(r), math.exp(min(r["loss"], 700))) for r in train
                      if r.get("loss") is not None] if curve.train_perplexity else []
            else:
                ys = [(curve.x(r), r["loss"]) for r in train if r.get("loss") is not None]
            if ys:
                smoothed = "" if curve.train_perplexity else ", label-smoothed"
                ax.plot(*zip(*ys), color=color, alpha=0.35, linewidth=1, label=f"{curve.label}: train{smoothed}")
            vs = [(curve.x(r), r[key]) for r in val if r.get(key) is not None]
            if vs and curve.start and curve.start.get(key) is not None:
                vs.insert(0, (curve.x_offset, curve.start[key]))
            if vs:
                ax.plot(*zip(*vs), color=color, marker="o", markersize=3.5, linewidth=1.8,
                        label=f"{curve.label}: validation")
        if curve.x_offset:  # a run that continues another: where it took over
            for ax in axes:
                ax.axvline(curve.x_offset, color=color, linestyle=":", linewidth=1)
    for ax, (key, name) in zip(axes, panels):
        ax.set_title(name)
        ax.set_xlabel(x_label)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if key == "perplexity":
            _perplexity_axis(ax, EngFormatter(sep=""))
        if key == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path
