"""A usable student directory from a training checkpoint of ``tokenmill distill`` (``OUT/checkpoints/step_N``), so a
long CPU run can be measured (``distill_draft_agreement.py``, ``spec_decode_cpu.py --draft-model``) before it ends
or after it was stopped. The checkpoint's own config rebuilds the task (teacher, data, draft vocabulary); its
trained tensors are loaded and the student saved as the finished run saves it. Training goes on from the same
checkpoint with ``--resume``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/distill_export_checkpoint.py OUT/checkpoints/step_000200 DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenmill.distill.checkpoint import load_checkpoint
from tokenmill.distill.config import DistillConfig
from tokenmill.distill.run import build_task


def export_checkpoint(checkpoint: Path, out: Path) -> int:
    """Save the student of ``checkpoint`` to ``out``; returns the checkpoint's step."""
    state = load_checkpoint(checkpoint)
    task = build_task(DistillConfig(**state["config"]))
    task.trainable().load_state_dict(state["trainable"])
    task.save_student(out)
    return state["step"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="OUT/checkpoints/step_NNNNNN")
    parser.add_argument("out", type=Path, help="the student directory to write")
    args = parser.parse_args()
    step = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote the step-{step} student to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
