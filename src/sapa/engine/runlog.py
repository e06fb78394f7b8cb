"""JSON-lines run log and its loss / metric plot (PNG, matplotlib Agg)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class RunLog:
    """Appends one JSON object per line to ``path`` (``None``: keeps records in memory only)."""

    def __init__(self, path: str | os.PathLike | None, append: bool = False, keep=None):
        """``append``: continue the existing file; ``keep(record) -> bool`` then selects the records
        that stay (a resumed run drops those written after its checkpoint, which it writes again)
        and the file is rewritten atomically with just them."""
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append and self.path.exists():
                records = read_jsonl(self.path)
                self.records = [r for r in records if keep(r)] if keep is not None else records
                if len(self.records) != len(records):
                    tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
                    tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in self.records))
                    os.replace(tmp, self.path)
            else:
                self.path.write_text("")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: skip it
                    continue
    return out


def plot_curves(records: list[dict], path: str | os.PathLike, title: str = "") -> Path | None:
    """Training loss (and lr) against iteration, and every scalar eval metric against iteration."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        return None
    from .._optional import optional_import

    with optional_import("matplotlib", "the training-curve plot"):
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        ax.plot([r["iter"] for r in train], [r["loss"] for r in train], label="loss", color="C0")
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax2 = ax.twinx()
        ax2.plot([r["iter"] for r in train], [r["lr"] for r in train], color="C1", alpha=0.5, label="lr")
        ax2.set_ylabel("lr (first group)")
    ax.set_title("loss")
    ax = axes[1]
    keys = [k for k in (evals[0] if evals else {}) if k not in ("type", "iter", "epoch", "time_s")
            and isinstance(evals[0][k], (int, float)) and not isinstance(evals[0][k], bool)]
    for k in keys:
        pts = [(r["iter"], r[k]) for r in evals if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=k)
    ax.set_xlabel("iteration")
    ax.set_title("evaluation")
    if keys:
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
