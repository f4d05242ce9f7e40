"""``DistillConfig``: one validated record of what ``tokenmill distill`` trains, on what, and how.

Checked at construction (argument ranges); the teacher/student/data checks that need files happen when
``tokenmill.distill.run.build_task`` builds the target's task, before the first step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

TARGETS = ("draft", "encoder", "eagle")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_LAYERS = ("all", "last")
INTERMEDIATE_INITS = ("norm", "first")  # which teacher FFN neurons a narrower-FFN student starts from
# Per-target values of the fields left None. The encoder's are the measured recipe (docs/DISTILL.md): per-token
# matching of the last layer beside the pooled cosine, the teacher's word embeddings kept fixed, larger steps. The EAGLE
# head's are the H100 run's (docs/DISTILL.md: held-out k = 4 acceptance 2.04): feature and token loss weighted 1 : 1,
# input noise 0.1, the second draft step trained on the head's own features (unroll 2), prompt positions too.
TARGET_DEFAULTS = {
    "draft": {"lr": 5e-4, "batch_size": 8, "hidden_weight": 0.0, "hidden_layers": "all", "weight_decay": 0.01,
              "teacher_generated": 0},
    "encoder": {"lr": 1e-3, "batch_size": 32, "hidden_weight": 30.0, "hidden_layers": "last", "weight_decay": 0.01,
                "teacher_generated": 0},
    "eagle": {"lr": 3e-3, "batch_size": 16, "hidden_weight": 0.0, "hidden_layers": "all", "weight_decay": 0.0,
              "teacher_generated": 1000, "feature_weight": 1.0, "token_weight": 1.0, "feature_noise": 0.1,
              "unroll": 2, "prompt_positions": True},
}
EAGLE_FIELDS = ("feature_weight", "token_weight", "feature_noise", "unroll", "prompt_positions")  # None elsewhere
MAX_UNROLL = 5  # EAGLE draft steps a round's training passes cover (k <= 5 is measured)
# Fields that change the trained result: a resumed run must match the checkpoint's values.
RESUME_FIELDS = ("target", "teacher", "student", "student_layers", "layer_map", "student_hidden_size",
                 "student_intermediate_size", "intermediate_init", "data", "seq_len", "batch_size", "grad_accum", "steps", "lr",
                 "warmup_steps", "temperature", "kd_loss", "jsd_beta", "seed", "hidden_weight", "hidden_layers",
                 "embedding_weight", "freeze_word_embeddings", "student_dropout", "teacher_generated", "prompts",
                 "teacher_max_tokens", "teacher_temperature", "cpu_bf16", "weight_decay", "draft_vocab_size",
                 *EAGLE_FIELDS)


@dataclass
class DistillConfig:
    # draft: a decoder sharing the teacher's tokenizer; encoder: a BERT-family classifier; eagle: an EAGLE-1 draft head
    # (one decoder layer on the teacher's own last hidden states; distill/eagle.py)
    target: str = "draft"
    teacher: str | None = None  # None: embedded SmolLM2 (draft, eagle) / bundled MiniLM + sentiment head (encoder)
    teacher_head: str | None = None  # encoder: head JSON of the teacher (default: the shipped sentiment head)
    student: str | None = None  # an HF directory to start from; None: built from the teacher (see below)
    student_layers: int | None = None  # None: half the teacher's layers (DistilBERT's choice), or len(layer_map)
    layer_map: list[int] | None = None  # teacher layer each student layer starts from; None: evenly spaced
    student_hidden_size: int | None = None  # None: the teacher's width (then layers are copied from it)
    student_intermediate_size: int | None = None  # None: the teacher's, scaled with the width
    # a narrower FFN at the teacher's width keeps the teacher's largest-norm FFN neurons ("norm") or its first
    intermediate_init: str = "norm"
    data: str | None = None  # text file or JSONL ({"text": ...}); None: bundled KJV text
    eval_data: str | None = None  # None: bundled held-out KJV with the default data, else the data's last 10%
    out: str = "distilled"
    steps: int = 200
    batch_size: int | None = None  # None: 8 (draft) / 32 (encoder) / 16 answers (eagle)
    grad_accum: int = 1
    seq_len: int = 128  # draft: tokens per training window; encoder: max tokens per sentence (eagle: whole answers)
    lr: float | None = None  # None: 5e-4 (draft) / 1e-3 (encoder) / 3e-3 (eagle)
    weight_decay: float | None = None  # None: 0.01 (draft, encoder) / 0 (eagle)
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    temperature: float = 2.0
    kd_loss: str = "forward_kl"
    jsd_beta: float = 0.5  # generalized JSD mixture weight (0 -> forward KL, 1 -> reverse KL in the limit)
    hidden_weight: float | None = None  # weight of hidden-state MSE; None: 0 (draft) / 30 (encoder)
    hidden_layers: str | None = None  # all: student layer j vs the teacher layer it came from; last: last vs last
    # (per token); None: all (draft) / last (encoder)
    embedding_weight: float = 1.0  # encoder: weight of 1 - cosine(student, teacher) pooled embeddings
    # keep the word embeddings fixed (encoder None: when they are the teacher's, i.e. at the teacher's width; draft
    # None: trained; a draft with tied embeddings then also keeps the teacher's output head)
    freeze_word_embeddings: bool | None = None
    # encoder: the student's dropout while training (0: it imitates a deterministic teacher; with MiniLM's own 0.1
    # a 2-layer student's held-out cosine after 100 steps was 0.865, without 0.877)
    student_dropout: float = 0.0
    # draft: train on the teacher's own answers to the first N chat prompts (sequence-level KD, generated once with
    # tokenmill's engine and cached; the last tenth held out) instead of windows of --data; 0: off. eagle: always
    # (None: 1000 prompts)
    teacher_generated: int | None = None
    prompts: str | None = None  # one chat prompt per line; None: the bundled template x topic prompts
    teacher_generated_cache: str | None = None  # None: OUT/teacher_generated.jsonl
    teacher_max_tokens: int = 128  # answer length the teacher generates
    teacher_temperature: float = 0.0  # 0: greedy answers (what a greedy target verifies)
    # draft, eagle: write the training text's token ranking beside the student (spec_decode/draft_vocab.py) and let it
    # propose from its N most frequent ids; None: the whole vocabulary, no ranking written
    draft_vocab_size: int | None = None
    # eagle (None elsewhere; TARGET_DEFAULTS): weights of the smooth-L1 feature regression and of the KL to the
    # teacher's next-token distribution, uniform input-feature noise (x the features' RMS), draft steps trained per
    # position (2+: the later ones on the head's own predicted features), and whether prompt positions train too
    feature_weight: float | None = None
    token_weight: float | None = None
    feature_noise: float | None = None
    unroll: int | None = None
    prompt_positions: bool | None = None
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_batches: int = 8
    checkpoint_every: int = 50  # 0: only the final checkpoint
    resume: str | None = None  # "latest" or a checkpoint directory
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True  # autocast to bf16 on CUDA
    # autocast to bf16 on CPU as well (off by default: only CPUs with AMX / AVX512-BF16 gain; there a teacher
    # forward ran 3x faster, its next-token KL to the fp32 one 0.0005 nats, argmax agreement 98.6%)
    cpu_bf16: bool = False
    repository: str | None = None  # encoder: also export the student to this model repository
    name: str | None = None  # encoder: model name in the repository (default: the out dir's name)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"--target {self.target!r} is not supported; choose one of {', '.join(TARGETS)}")
        for name, value in TARGET_DEFAULTS[self.target].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.hidden_layers not in HIDDEN_LAYERS:
            raise ValueError(f"--hidden-layers {self.hidden_layers!r} is not supported; choose all or last")
        if self.target != "eagle":
            given = [name for name in EAGLE_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} applies to --target eagle only")
        if self.teacher_generated and self.target == "encoder":
            raise ValueError("--teacher-generated applies to --target draft or eagle, not encoder")
        if self.teacher_generated < 0 or (self.teacher_generated and self.teacher_generated < 2):
            raise ValueError(f"--teacher-generated must be 0 (off) or >= 2 prompts (one is held out); "
                             f"got {self.teacher_generated}")
        if self.teacher_generated and self.data is not None:
            raise ValueError("--teacher-generated trains on the teacher's answers to --prompts; drop --data "
                             "(--eval-data still sets the held-out text)")
        if self.target == "eagle":
            self._check_eagle()
        if self.teacher_max_tokens < 1 or self.teacher_temperature < 0:
            raise ValueError("--teacher-max-tokens must be >= 1 and --teacher-temperature >= 0")
        if self.intermediate_init not in INTERMEDIATE_INITS:
            raise ValueError(f"--intermediate-init {self.intermediate_init!r} is not supported; choose norm or first")
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"--kd-loss {self.kd_loss!r} is not supported; choose one of {', '.join(KD_LOSSES)}")
        positive = {"steps": self.steps, "batch-size": self.batch_size, "grad-accum": self.grad_accum,
                    "eval-batches": self.eval_batches}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name} must be >= 1; got {value}")
        if self.seq_len < 4:
            raise ValueError(f"--seq-len must be >= 4; got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0; got {self.temperature}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"--jsd-beta must lie in (0, 1); got {self.jsd_beta}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) must be >= 0 and below --steps ({self.steps})")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("--checkpoint-every and --eval-every must be >= 0 (0 turns them off)")
        if not 0.0 <= self.student_dropout < 1.0:
            raise ValueError(f"--student-dropout must lie in [0, 1); got {self.student_dropout}")
        if self.hidden_weight < 0 or self.embedding_weight < 0:
            raise ValueError("--hidden-weight and --embedding-weight must be >= 0")
        for name, value in (("student-layers", self.student_layers), ("student-hidden-size", self.student_hidden_size),
                            ("student-intermediate-size", self.student_intermediate_size)):
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1; got {value}")
        if self.student is not None and any(v is not None for v in (
                self.student_layers, self.student_hidden_size, self.student_intermediate_size, self.layer_map)):
            raise ValueError("--student (a directory) and --student-layers/--student-hidden-size/"
                             "--student-intermediate-size/--layer-map exclude each other: the directory fixes the "
                             "shape")
        if self.layer_map is not None:
            self.layer_map = list(self.layer_map)
            if self.student_layers is None:
                self.student_layers = len(self.layer_map)
            elif self.student_layers != len(self.layer_map):
                raise ValueError(f"--layer-map names {len(self.layer_map)} layers but --student-layers is "
                                 f"{self.student_layers}")
        if self.draft_vocab_size is not None and (self.target == "encoder" or self.draft_vocab_size < 1):
            raise ValueError("--draft-vocab-size applies to --target draft or eagle and must be >= 1 (ids the draft "
                             f"proposes from); got {self.draft_vocab_size} with --target {self.target}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0; got {self.weight_decay}")
        if self.repository is not None and self.target != "encoder":
            raise ValueError("--repository (ONNX export) applies to --target encoder only")

    def _check_eagle(self) -> None:
        """The head is one decoder layer shaped like the teacher's last, trained on the teacher's answers only."""
        shaped = [name for name in ("student", "student_layers", "layer_map", "student_hidden_size",
                                    "student_intermediate_size") if getattr(self, name) is not None]
        if shaped:
            raise ValueError(f"--{shaped[0].replace('_', '-')} does not apply to --target eagle: the head is one "
                             "decoder layer shaped like the teacher's last")
        if self.eval_data is not None:
            raise ValueError("--eval-data does not apply to --target eagle: the last tenth of the teacher's answers "
                             "is held out")
        if self.teacher_generated == 0:
            raise ValueError("--target eagle trains on the teacher's answers: --teacher-generated must be >= 2")
        if not 1 <= self.unroll <= MAX_UNROLL:
            raise ValueError(f"--unroll must be 1..{MAX_UNROLL} (draft steps trained per position); got {self.unroll}")
        if self.feature_noise < 0 or self.feature_weight < 0 or self.token_weight < 0:
            raise ValueError("--feature-noise, --feature-weight and --token-weight must be >= 0")
        if self.feature_weight == 0 and self.token_weight == 0:
            raise ValueError("--feature-weight and --token-weight are both 0: nothing to train on")

    @property
    def out_dir(self) -> Path:
        return Path(self.out).expanduser()

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def to_dict(self) -> dict:
        return asdict(self)
