"""``distill(config)``: build the target's task (every argument and file checked here, before any training),
train or resume, save the student, export it (encoder, with ``--repository``), write the JSON summary and the
loss curve."""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from tokenmill.distill.config import DistillConfig
from tokenmill.distill.trainer import DistillTask, Trainer

SUMMARY_FILE = "distill_summary.json"
CURVE_FILE = "loss_curve.png"


def build_task(config: DistillConfig) -> DistillTask:
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device} asked for but this machine has no CUDA GPU")
    if config.target == "draft":
        from tokenmill.distill.llm import DraftTask

        return DraftTask(config)
    if config.target == "eagle":
        from tokenmill.distill.eagle import EagleTask

        return EagleTask(config)
    from tokenmill.distill.encoder import EncoderTask

    return EncoderTask(config)


def distill(config: DistillConfig, stop_after: int | None = None, log=print) -> dict:
    """Train (or resume) and return the summary; ``stop_after`` ends early at that step (tests of resume)."""
    started = time.perf_counter()
    task = build_task(config)
    trainer = Trainer(task, config)
    resumed_from = trainer.resume(config.resume) if config.resume else None
    info = task.describe()
    log(f"teacher {info['teacher_params'] / 1e6:.2f}M params -> student {info['student_params'] / 1e6:.2f}M "
        f"({info['student_layers']} layers, width {info['student_hidden_size']}; {info['init']})"
        + (f"; resumed from {resumed_from}" if resumed_from else ""))
    trainer.train(stop_after=stop_after)
    out = config.out_dir
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
        "device": config.device if not config.device.startswith("cuda") else torch.cuda.get_device_name(),
        "config": config.to_dict(), "model": info, "resumed_from": str(resumed_from) if resumed_from else None,
        "steps_done": trainer.step, "evals": trainer.evals, "history": trainer.history,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if trainer.step == config.steps:
        task.save_student(out)
        summary["student_dir"] = str(out)
        if config.repository:
            report = task.export(out, Path(config.repository), config.name or out.name)
            summary["export"] = {"repository": config.repository, "model": report["model"],
                                 "max_abs_vs_torch": report["validation"]["max_abs"],
                                 "atol": report["validation"]["atol"]}
            log(f"exported to {config.repository}/{report['model']}: ONNX vs torch max abs "
                f"{report['validation']['max_abs']:.2e}")
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    summary["loss_curve"] = plot_loss_curve(summary, out / CURVE_FILE)
    log(held_out_line(trainer.evals[0], trainer.evals[-1]) + f" after {trainer.step} steps")
    return summary


HEADLINES = (("loss", "held-out loss"), ("kl_to_teacher", "KL to teacher"), ("top1_agreement", "top-1 agreement"),
             ("acceptance_length_k4", "k = 4 acceptance length"))


def held_out_line(first: dict, last: dict) -> str:
    """The headline held-out metrics at the first and the last evaluation (those the target reports)."""
    return ", ".join(f"{label} {first[key]:.4f} -> {last[key]:.4f}" for key, label in HEADLINES if key in last)


def plot_loss_curve(summary: dict, path: Path) -> str | None:
    """Training loss per step and held-out KD loss at each evaluation; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    history = summary["history"]
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="training loss", lw=1)
    ax.plot([e["step"] for e in summary["evals"]], [e["loss"] for e in summary["evals"]], "o-",
            label="held-out loss (same terms; no hidden MSE, no input noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"tokenmill distill --target {summary['config']['target']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
