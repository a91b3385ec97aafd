"""Command line of the two entry points: flags -> a validated, frozen ``Config``.

``cifar100.py`` and ``miniImageNet100.py`` share this one parser; they differ only in the
benchmark they pass in, which sets the benchmark-specific defaults (the batch size) and the
only ``--dataset`` value the script accepts.

The flags keep the authors' names and defaults so their README commands run unchanged; their
parser's defects are fixed here: the README spellings it rejected (``--sparse_init``,
``--growth unfired``, ``--dataset miniImageNet``) are accepted, and every boolean can be turned
off (``--no-sparse``, ``--no-isolate``, ``--no-download``).

Every problem with the command line, malformed (an unknown flag, a bad choice) or semantic (a
value the run cannot use), raises ``UserError`` with one line; the entry points exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from data import CLASS_ORDER_MODES, DATASET_STATS
from models import MODELS
from sparselearning import DEATH_MODES, GROWTH_MODES, NEW_WEIGHTS, SPARSE_INITS
from sparselearning.masking import SAMPLED_GROWTHS, SCORED_GROWTHS
from utils.approaches import APPROACHES
from utils.epoch_metrics import tensorboard_available
from utils.errors import UserError
from utils.task_inference import CALIBRATED_METHODS, DEFAULT_METHOD, INFERENCE_METHODS

BENCHMARKS: tuple[str, ...] = tuple(DATASET_STATS)
"""The canonical dataset names (those the data package reads); also the values of ``Config.dataset``."""

SCRIPTS: dict[str, str] = {"cifar100": "cifar100.py", "miniImageNet": "miniImageNet100.py"}
"""The entry script of each benchmark (used as ``prog`` and in error messages)."""

BATCH_SIZE: dict[str, int] = {"cifar100": 64, "miniImageNet": 128}
"""Training batch size per benchmark (the authors' values)."""

DATASET_CLASSES = 100
"""Both benchmarks have 100 classes; a split cannot ask for more."""

# Alternative spellings accepted on the command line, keyed by their lower-case form.
_DATASET_ALIASES: dict[str, str] = {
    "cifar100": "cifar100",
    "miniimagenet": "miniImageNet",
    "miniimagenet100": "miniImageNet",  # the authors' spelling
}
_INIT_ALIASES: dict[str, str] = {name.lower(): name for name in SPARSE_INITS}
_GROWTH_ALIASES: dict[str, str] = {
    **{name: name for name in GROWTH_MODES},
    "random_unfired": "unfired",  # the authors' name for it
}
KEEP_MODES = ("best_train", "last")
EVAL_MODES = ("task", "all_logits")
OPTIMIZERS = ("adam", "sgd")

MAX_SEED = 2**64 - 1
"""The largest ``--seed``: ``torch.manual_seed`` takes 64-bit unsigned seeds (numpy's generators
and ``derive_seed`` take any non-negative integer)."""

DEVICE_TYPES = ("cpu", "cuda")
"""The torch device types a run can train on (``meta``, say, has no data; ``mps``, ``xpu`` and the
other back-ends are untested here; ``mps`` is refused with its own reason, see ``_validate_device``)."""

MIN_BATCH = 2
"""The smallest batch a run accepts: BatchNorm normalizes with the statistics of each batch (no
running averages), and a single image has no batch statistics to learn from."""

RESULT_NEUTRAL_SETTINGS: tuple[str, ...] = (
    "output_dir", "resume", "overwrite", "data_dir", "download", "checkpoint_every", "checkpoint_minutes",
    "tensorboard", "lock_stale_minutes")
"""Settings that do not change a run's results: a report's table may mix runs that differ in
them. Not ``device``: a CPU and a CUDA run of one seed draw different random streams, so they
are different experiments."""

RESUME_MAY_CHANGE: tuple[str, ...] = (*RESULT_NEUTRAL_SETTINGS, "device")
"""Settings ``--resume`` accepts changed: those above, and ``device`` (a run saved on a GPU may
continue on a CPU and the other way round; it is then neither run's twin, see the README)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run depends on; built only by ``parse_config``, never mutated."""

    dataset: str
    num_tasks: int
    num_classes: int
    num_classes_per_task: int
    net_name: str
    optimizer: str
    lr: float
    momentum: float
    l2: float
    epochs: int
    batch_size: int
    test_batch_size: int
    sparse: bool
    density: float
    sparse_init: str
    death: str
    growth: str
    death_rate: float
    update_frequency: int
    isolate: bool
    new_weights: str
    seed: int
    data_dir: Path
    output_dir: Path
    device: str
    image_size: int
    test_per_class: int
    class_order: str
    keep: str
    eval: str
    task_inference: str
    download: bool
    resume: bool
    overwrite: bool
    checkpoint_every: int
    checkpoint_minutes: float
    max_batches: int | None
    amp: bool
    compile: bool
    channels_last: bool | None
    cudnn_benchmark: bool
    tensorboard: bool = False
    train_per_class: int | None = None
    deterministic: bool = True
    regrow_frozen: bool = False
    lock_stale_minutes: float = 10.0
    approach: str = "dst"
    prune_after: int | None = None
    erk_power: float | str = 1.0
    growth_later: str | None = None
    turnover_stop: float = 0.0
    net_width: int = 64

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (paths become strings), in field order."""
        return {
            field.name: str(value) if isinstance(value, Path) else value
            for field in dataclasses.fields(self)
            for value in (getattr(self, field.name),)
        }


def run_name(
    dataset: str,
    num_tasks: int,
    sparse: bool,
    sparse_init: str,
    growth: str,
    density: float,
    seed: int,
    isolate: bool,
    approach: str = "dst",
) -> str:
    """The readable directory name of a run, e.g. ``cifar100_10tasks_ERK_random_d0.2_s0``.

    Dense runs are ``<dataset>_<T>tasks_dense_s<seed>``; sparse runs without isolation get
    the suffix ``_noiso``; another approach than DST is named instead of the growth, e.g.
    ``cifar100_10tasks_packnet_ERK_d0.1_s0``. Flags not in the name (epochs, update frequency,
    ...) do not make a new directory: pass ``--output_dir`` to keep such runs apart.
    """
    if not sparse:
        return f"{dataset}_{num_tasks}tasks_dense_s{seed}"
    if approach != "dst":
        return f"{dataset}_{num_tasks}tasks_{approach}_{sparse_init}_d{density}_s{seed}"
    name = f"{dataset}_{num_tasks}tasks_{sparse_init}_{growth}_d{density}_s{seed}"
    return name if isolate else name + "_noiso"


def _alias_type(aliases: dict[str, str]):
    """An argparse ``type`` that maps accepted spellings (case-insensitive) to canonical ones.

    Unknown values pass through unchanged so that argparse's ``choices`` check reports them.
    """

    def convert(value: str) -> str:
        return aliases.get(value.lower(), value)

    return convert


def _finite_float(value: str) -> float:
    """An argparse ``type`` for float flags: any finite number (``inf`` and ``nan`` are refused)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def _power(value: str) -> float | str:
    """An argparse ``type`` for --erk_power: ``auto`` or a finite number."""
    return "auto" if value.lower() == "auto" else _finite_float(value)


def _path(value: str) -> Path:
    """An argparse ``type`` for paths: refuses the empty string (which Path would read as '.')."""
    if not value:
        raise argparse.ArgumentTypeError("an empty path; give a directory (. for this one)")
    return Path(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after every help line that does not state its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "%(default)" in help_text or "default:" in help_text:
            return help_text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Reports a malformed command line as a UserError: one line, exit code 2, no usage dump."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser(benchmark: str) -> argparse.ArgumentParser:
    """The argument parser of ``benchmark``'s entry script ("cifar100" or "miniImageNet")."""
    _check_benchmark(benchmark)
    parser = OneLineParser(
        prog=SCRIPTS[benchmark],
        description=(
            "Task-incremental continual learning with dynamic sparse training "
            f"({benchmark}): every task trains its own sparse sub-network of one shared "
            "backbone; weights of earlier tasks are frozen."
        ),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )

    _add_data_flags(parser.add_argument_group("benchmark and task split"), benchmark)
    _add_training_flags(parser.add_argument_group("model and training"), benchmark)
    _add_sparse_flags(parser.add_argument_group("dynamic sparse training"))
    _add_adaptive_flags(parser.add_argument_group("adaptive dynamic sparse training (beyond the paper; see the README)"))
    _add_run_flags(parser.add_argument_group("run"), benchmark)
    _add_speed_flags(parser.add_argument_group(
        "speed (GPU)", "On CUDA the data sets live on the GPU, always; input batches are channels_last "
        "unless --no-channels_last; --cudnn_benchmark, --amp and --compile are opt-in. None of these is "
        "result-neutral (see the README's GPU section)."))
    return parser


def _add_data_flags(data: argparse._ArgumentGroup, benchmark: str) -> None:
    data.add_argument(
        "--dataset",
        type=_alias_type(_DATASET_ALIASES),
        choices=BENCHMARKS,
        default=benchmark,
        help="the benchmark; must match the script (cifar100.py: cifar100, "
        "miniImageNet100.py: miniImageNet); case-insensitive, alias: miniImagenet100 = "
        "miniImageNet",
    )
    data.add_argument("--num_tasks", type=int, default=10, help="number of tasks T")
    data.add_argument("--num_classes", type=int, default=100,
                      help="classes used in total; must equal num_tasks * num_classes_per_task")
    data.add_argument("--num_classes_per_task", type=int, default=10, help="classes per task")
    data.add_argument("--class_order", choices=CLASS_ORDER_MODES, default="fixed",
                      help="fixed: classes 0..99 in order (authors); random: a permutation "
                      "drawn from --seed")
    data.add_argument("--data_dir", type=_path, default=Path("data"),
                      help="where datasets are read from (and downloaded to)")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                      help="download the dataset if it is missing from --data_dir")
    data.add_argument("--image_size", type=int, default=32,
                      help="side of the (square) input images in pixels, >= 8")
    data.add_argument("--test_per_class", type=int, default=100,
                      help="test images per class: miniImageNet holds out this many per class; CIFAR-100 "
                      "tests on the first this many of each class's 100")
    data.add_argument("--train_per_class", type=int, default=None,
                      help="train on the first N training images of each class only (default: all; for "
                      "small studies on a CPU)")


def _add_training_flags(train: argparse._ArgumentGroup, benchmark: str) -> None:
    train.add_argument("--net_name", choices=tuple(MODELS), default="resnet18", help="backbone")
    train.add_argument("--net_width", type=int, default=64,
                       help="channels of the backbone's first stage (later stages 2x, 4x, 8x); 64 is the "
                       "paper's ResNet-18, narrower only for smoke runs and tests")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                       help="a fresh optimizer per task")
    train.add_argument("--lr", type=_finite_float, default=1e-3,
                       help="learning rate (x0.1 at 50%% and 75%% of the epochs)")
    train.add_argument("--momentum", type=_finite_float, default=0.9, help="SGD momentum, in [0, 1)")
    train.add_argument("--l2", type=_finite_float, default=0.0, help="weight decay, >= 0")
    train.add_argument("--epochs", type=int, default=20, help="epochs per task")
    train.add_argument("--batch_size", type=int, default=BATCH_SIZE[benchmark],
                       help="training batch size; the benchmark sets the default "
                       "(cifar100 64, miniImageNet 128)")
    train.add_argument("--test_batch_size", type=int, default=128,
                       help="evaluation batch size; BatchNorm uses batch statistics (no "
                       "running averages), so results depend on it")
    train.add_argument("--keep", choices=KEEP_MODES, default="best_train",
                       help="which epoch's weights and mask a task keeps: the one with the best "
                       "training accuracy (authors) or the last")
    train.add_argument("--eval", choices=EVAL_MODES, default="task",
                       help="prediction = argmax over the task's own classes (task id given), "
                       "or over all classes (authors)")
    train.add_argument("--task_inference", choices=INFERENCE_METHODS, default=DEFAULT_METHOD,
                       help="also test with the task id hidden (beyond the paper): infer each test "
                       "batch's task by its network's confidence, its entropy, SupSup's one-shot "
                       "superposition rule (sparse runs), or a confidence calibrated on each task's "
                       "training images; results.json gets acc_matrix_agnostic. Default none: the "
                       "paper's protocol, task id given only")
    train.add_argument("--seed", type=int, default=0, help="seed of every random generator, >= 0")


def _add_sparse_flags(sparse: argparse._ArgumentGroup) -> None:
    sparse.add_argument("--approach", choices=tuple(APPROACHES), default="dst",
                        help="how each task's sparse sub-network is trained: dst (the paper's dynamic sparse "
                        "training; with --update_frequency 0 static sparse, with --no-isolate sparse "
                        "fine-tuning), or a peer method (see the README)")
    sparse.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                        help="train sparse sub-networks (--no-sparse: the dense baseline)")
    sparse.add_argument("--density", type=_finite_float, default=0.2,
                        help="fraction of weights each task may use, in (0, 1]")
    sparse.add_argument("--sparse_init", "--init", type=_alias_type(_INIT_ALIASES),
                        choices=SPARSE_INITS, default="uniform",
                        help="per-layer density allocation (case-insensitive; --init is an "
                        "alias of --sparse_init)")
    sparse.add_argument("--death", choices=DEATH_MODES, default="magnitude",
                        help="pruning criterion")
    sparse.add_argument("--growth", type=_alias_type(_GROWTH_ALIASES),
                        choices=GROWTH_MODES, default="random",
                        help="regrowth criterion (alias: random_unfired = unfired)")
    sparse.add_argument("--death_rate", type=_finite_float, default=0.5,
                        help="initial fraction of a task's active weights pruned at each "
                        "update, in [0, 1); cosine-decayed over the task")
    sparse.add_argument("--update_frequency", type=int, default=400,
                        help="batches between topology updates, >= 0; 0 = static sparse "
                        "baseline (no updates)")
    sparse.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="freeze the weights of earlier tasks (parameter isolation); needs "
                        "--sparse (default: True; False with --no-sparse)")
    sparse.add_argument("--new_weights", choices=NEW_WEIGHTS, default="zero",
                        help="never-used weights entering a later task's mask start at zero "
                        "(authors) or at a fresh draw of the layer's default init")
    sparse.add_argument("--prune_after", type=int, default=None,
                        help="--approach packnet: epochs a task trains densely before it is pruned to its share "
                        "(default: two thirds of the task's epochs, as PackNet's 20 + 10); the rest retrain")
    sparse.add_argument("--regrow_frozen", action=argparse.BooleanOptionalAction, default=False,
                        help="let momentum and gradient growth rank earlier tasks' (frozen) weights by their "
                        "real gradients too (default: off, as the authors: frozen weights rank last, so "
                        "only the initial mask and random/unfired growth reuse them)")


def _add_adaptive_flags(adaptive: argparse._ArgumentGroup) -> None:
    adaptive.add_argument("--erk_power", type=_power, default=1.0,
                          help="--sparse_init ERK: layer densities proportional to ERK's scores to this power "
                          "(0 = uniform, 1 = ERK, the default), or auto: 1 at --density >= 0.2, 0 at <= 0.05, "
                          "linear in log density between")
    adaptive.add_argument("--growth_later", choices=SCORED_GROWTHS, default=None,
                          help="mix two growths in each update: a share falling from all to none over the task "
                          "(the death rate's cosine) grows by --growth (random or unfired), the rest by this one")
    adaptive.add_argument("--turnover_stop", type=_finite_float, default=0.0,
                          help="stop a task's topology updates after the first that changes less than this "
                          "fraction of its mask, in [0, 1); 0 = never (the default)")


def _add_run_flags(run: argparse._ArgumentGroup, benchmark: str) -> None:
    run.add_argument("--output_dir", type=_path, default=None,
                     help="run directory (default: runs/<name>, e.g. runs/"
                     + run_name(benchmark, 10, True, "uniform", "random", 0.2, 0, True) + ")")
    run.add_argument("--device", default=None,
                     help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, "
                     f"else cpu; here {_default_device()})")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                     help="continue the run in --output_dir from its last checkpoint")
    run.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                     help="replace the run in --output_dir, finished or not (default: refuse)")
    run.add_argument("--checkpoint_every", type=int, default=1,
                     help="save the task in progress when at least N epochs and --checkpoint_minutes "
                     "have passed since the last save (0: save only after each task and on a stop signal)")
    run.add_argument("--checkpoint_minutes", type=_finite_float, default=10.0,
                     help="minutes at least between two saves of the task in progress (0: every "
                     "--checkpoint_every epochs); a stop signal (SIGTERM, SIGINT, SIGUSR1) always saves")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                     help="also log the per-epoch metrics as TensorBoard events in <output_dir>/tensorboard "
                     "(needs the optional tensorboard package); metrics.csv is always written")
    run.add_argument("--lock_stale_minutes", type=_finite_float, default=10.0,
                     help="a run directory's lock file whose holder has not refreshed its heartbeat for this "
                     "many minutes counts as left by a dead run and is taken over (shared file systems "
                     "where flock does not work)")
    run.add_argument("--max_batches", type=int, default=None,
                     help="cap on batches per epoch, for debugging and smoke runs "
                     "(default: None = no cap)")


def _add_speed_flags(speed: argparse._ArgumentGroup) -> None:
    speed.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                       help="bfloat16 autocast on CUDA (changes the numerics; a no-op with a notice "
                       "on other devices)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model (pays off on long GPU runs; the first "
                       "batches are slow while it compiles)")
    speed.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                       help="input batches in channels_last memory format (default: on CUDA, off "
                       "elsewhere); changes which convolution kernels run, so results may differ in the "
                       "last bits")
    speed.add_argument("--cudnn_benchmark", action=argparse.BooleanOptionalAction, default=False,
                       help="let cuDNN time its convolution algorithms at the first batches and keep the "
                       "fastest (CUDA only; a no-op with a notice elsewhere); the choice may differ between "
                       "processes, so such runs are not bit-repeatable")
    speed.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                       help="deterministic algorithms (cuDNN deterministic, torch.use_deterministic_algorithms, "
                       "CUBLAS_WORKSPACE_CONFIG) so that a GPU run repeats bit for bit; --no-deterministic lets "
                       "CUDA pick faster non-deterministic kernels (CPU runs are deterministic either way)")


def _validate_device(name: str) -> str:
    """``name`` as a canonical torch device string, or UserError if this machine lacks it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:0)"
        ) from exc
    if device.type == "mps":
        raise UserError(f"--device {name}: not supported: the mask updates use torch.nonzero_static, which may have "
                        "no MPS kernel, and no test runs on MPS; use cpu")
    if device.type not in DEVICE_TYPES:
        raise UserError(f"--device {name}: a run trains on cpu or cuda[:N], not on {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name}: CUDA is not available on this machine; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return str(device)


def _check_compile(device: str) -> None:
    """UserError when torch.compile cannot work on this machine for `device`."""
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError("--compile: torch.compile does not support this Python or platform; drop --compile")
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError("--compile on CUDA needs triton (pip install triton); drop --compile")
    elif not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UserError(f"--compile on {device} needs a C++ compiler (g++ or clang++); drop --compile")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _validate_split(args: argparse.Namespace, benchmark: str) -> None:
    """Raise UserError for the first flag of the benchmark, its task split or the batches the run
    cannot use."""
    if args.dataset != benchmark:
        other = args.dataset
        raise UserError(
            f"{SCRIPTS[benchmark]} runs --dataset {benchmark}; use {SCRIPTS[other]} for {other}"
        )
    for flag in ("num_tasks", "num_classes", "num_classes_per_task", "epochs", "batch_size",
                 "test_batch_size", "test_per_class"):
        value = getattr(args, flag)
        _require(value >= 1, f"--{flag} must be >= 1, got {value}")
    one_image = "BatchNorm normalizes with the statistics of each batch, which a single image does not have"
    for flag in ("batch_size", "test_batch_size"):
        value = getattr(args, flag)
        _require(value >= MIN_BATCH, f"--{flag} {value}: a batch needs at least {MIN_BATCH} images ({one_image})")
    _require(
        args.num_classes == args.num_tasks * args.num_classes_per_task,
        f"--num_classes {args.num_classes} != --num_tasks {args.num_tasks} x "
        f"--num_classes_per_task {args.num_classes_per_task} "
        f"(= {args.num_tasks * args.num_classes_per_task})",
    )
    _require(
        args.num_classes <= DATASET_CLASSES,
        f"--num_classes {args.num_classes}: {benchmark} has only {DATASET_CLASSES} classes",
    )
    _require(args.test_per_class * args.num_classes_per_task >= MIN_BATCH,
             f"--test_per_class 1 with --num_classes_per_task 1 tests each task on one image ({one_image})")


def _validate(args: argparse.Namespace, benchmark: str) -> None:
    """Raise UserError for the first flag value the run cannot use."""
    _validate_split(args, benchmark)
    _require(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    _require(0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}")
    _require(args.l2 >= 0, f"--l2 must be >= 0, got {args.l2}")
    _require(0 < args.density <= 1, f"--density must be in (0, 1], got {args.density}")
    _require(0 <= args.death_rate < 1, f"--death_rate must be in [0, 1), got {args.death_rate}")
    _require(args.update_frequency >= 0,
             f"--update_frequency must be >= 0 (0 = static sparse), got {args.update_frequency}")
    _require(0 <= args.seed <= MAX_SEED,
             f"--seed must be in [0, 2**64 - 1] (torch's generators take 64-bit seeds), got {args.seed}")
    _require(args.net_width >= 1, f"--net_width must be >= 1, got {args.net_width}")
    _require(args.image_size >= 8, f"--image_size must be >= 8, got {args.image_size}")
    _require(args.checkpoint_every >= 0, f"--checkpoint_every must be >= 0, got {args.checkpoint_every}")
    _require(args.checkpoint_minutes >= 0, f"--checkpoint_minutes must be >= 0, got {args.checkpoint_minutes}")
    _require(args.train_per_class is None or args.train_per_class >= MIN_BATCH,
             f"--train_per_class must be >= {MIN_BATCH}, got {args.train_per_class}")
    _require(args.lock_stale_minutes > 0, f"--lock_stale_minutes must be > 0, got {args.lock_stale_minutes}")
    _require(args.max_batches is None or args.max_batches >= 1,
             f"--max_batches must be >= 1, got {args.max_batches}")
    _require(
        not (args.growth == "momentum" and args.optimizer == "sgd" and args.momentum == 0),
        "--growth momentum ranks weights by SGD's momentum: it needs --momentum > 0",
    )
    _require(
        args.sparse or not args.isolate,
        "--isolate needs --sparse: the dense baseline has no masks to isolate",
    )
    _require(
        args.sparse or args.task_inference != "oneshot",
        "--task_inference oneshot superposes the tasks' masks: it needs --sparse (the dense baseline has one network)",
    )
    _require(
        (args.sparse and args.isolate is not False) or args.task_inference not in CALIBRATED_METHODS,
        f"--task_inference {args.task_inference} calibrates each task's network right after its task: it needs "
        "--sparse and --isolate (networks that do not change afterwards)",
    )
    if args.approach != "dst":
        _require(args.sparse and args.isolate is not False,
                 f"--approach {args.approach} gives each task a sparse sub-network of its own: it needs --sparse and "
                 "--isolate (the defaults)")
    _require(args.prune_after is None or args.approach == "packnet", "--prune_after is PackNet's: it needs "
             "--approach packnet")
    if args.approach == "packnet":
        _require(args.epochs >= 2 and (args.prune_after is None or 1 <= args.prune_after < args.epochs),
                 f"--approach packnet trains, prunes after --prune_after epochs, then retrains: it needs --epochs >= 2 "
                 f"and 1 <= --prune_after < --epochs (got {args.prune_after} of {args.epochs}; default: two thirds "
                 "of the epochs)")
    _validate_adaptive(args)
    _require(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other: pick one")
    _require(not (args.cudnn_benchmark and args.deterministic),
             "--cudnn_benchmark picks cuDNN's algorithms by timing them, so runs do not repeat bit for bit as "
             "--deterministic (the default) has them do: add --no-deterministic to autotune")
    _require(not args.tensorboard or tensorboard_available(),
             "--tensorboard needs the optional tensorboard package: pip install tensorboard "
             "(or pip install -r requirements-figures.txt)")


def _validate_adaptive(args: argparse.Namespace) -> None:
    """The adaptive-DST flags: each is DST's, and needs what it adapts."""
    used = [flag for flag, on in (("--erk_power", args.erk_power != 1.0), ("--growth_later", args.growth_later),
                                  ("--turnover_stop", args.turnover_stop != 0)) if on]
    for flag in used:
        _require(args.sparse and args.approach == "dst",
                 f"{flag} adapts dynamic sparse training: it needs --sparse and --approach dst")
    _require(args.erk_power == "auto" or args.erk_power >= 0, f"--erk_power must be >= 0 or auto, got {args.erk_power}")
    _require(args.erk_power == 1.0 or args.sparse_init == "ERK",
             f"--erk_power scales ERK's layer densities: it needs --sparse_init ERK, not {args.sparse_init}")
    _require(args.growth_later is None or args.growth in SAMPLED_GROWTHS,
             f"--growth_later {args.growth_later} takes over from an exploring growth: --growth must be "
             f"{' or '.join(SAMPLED_GROWTHS)}, not {args.growth}")
    _require(0 <= args.turnover_stop < 1, f"--turnover_stop must be in [0, 1), got {args.turnover_stop}")
    _require(not used or args.update_frequency > 0 or used == ["--erk_power"],
             f"{' and '.join(used)} adapt the topology updates: they need --update_frequency > 0")


def _adaptive_suffix(args: argparse.Namespace) -> str:
    """What the adaptive flags add to a run's default directory name, e.g. ``_powauto_thenmomentum``."""
    parts = [f"pow{args.erk_power}" if args.erk_power != 1.0 else "",
             f"then{args.growth_later}" if args.growth_later else "",
             f"stop{args.turnover_stop:g}" if args.turnover_stop else ""]
    return "".join(f"_{part}" for part in parts if part)


def parse_config(argv: Sequence[str] | None, benchmark: str) -> Config:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) for ``benchmark``'s script into a Config.

    Any problem raises ``UserError`` (``--help`` prints and exits). Aliases are resolved to canonical values, ``isolate``
    defaults to ``sparse``, ``output_dir`` to ``runs/<run_name>`` and ``device`` to cuda when
    available, else cpu.
    """
    _check_benchmark(benchmark)
    args = build_parser(benchmark).parse_args(None if argv is None else list(argv))
    _validate(args, benchmark)
    isolate = args.sparse if args.isolate is None else args.isolate
    output_dir = args.output_dir
    if output_dir is None:
        name = run_name(args.dataset, args.num_tasks, args.sparse, args.sparse_init,
                        args.growth, args.density, args.seed, isolate, args.approach) + _adaptive_suffix(args)
        output_dir = Path("runs") / name
    device = _validate_device(_default_device() if args.device is None else args.device)
    if args.compile:
        _check_compile(device)
    flags = {field.name: getattr(args, field.name) for field in dataclasses.fields(Config)}
    return Config(**{**flags, "isolate": isolate, "output_dir": output_dir, "device": device})
