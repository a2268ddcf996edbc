"""Where each stage reads and writes, relative to the project root (as dvc.yaml declares them)."""
import os
from pathlib import Path

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
TRANSLATED = Path("data/translated")
MODELS = Path("models")
CHECKPOINTS = MODELS / "checkpoints"
# A folder for the training state of every run, for instance on a shared file system; it replaces
# the project's own models/checkpoints.
CHECKPOINTS_ENV = "CYCLEGAN_CHECKPOINTS"
GENERATORS = {"G_A": MODELS / "G_A.safetensors", "G_B": MODELS / "G_B.safetensors"}  # A->B, B->A
# Generators to start training from (train.init_from): the train stage depends on this folder.
INIT = MODELS / "init"
METRICS = Path("metrics")
TRAIN_METRICS = METRICS / "train.json"
TRAIN_LOSSES = METRICS / "train_losses.csv"
TRAIN_EVAL = METRICS / "train_eval.csv"
EVAL_METRICS = METRICS / "eval.json"
EVAL_DETAILS = METRICS / "eval_details.json"
DATA_REPORT = METRICS / "data_report.json"
REPORTS = Path("reports")
DATASET_PREVIEW = REPORTS / "dataset_preview.png"


def translated_name(name: str) -> str:
    """The file name of the translation of image `name`, in data/translated/<direction>/ or --output."""
    return f"{Path(name).stem}.png"


_EXP_TMP = os.path.join(".dvc", "tmp", "exps")


def project_root() -> Path:
    """The project root, also from inside a queued experiment's copy under .dvc/tmp/exps/.

    DVC sets DVC_ROOT for stage commands (for queued experiments: the parent repo's root);
    outside DVC the path itself tells.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    marker = os.sep + _EXP_TMP + os.sep
    if marker in str(cwd):
        return Path(str(cwd).split(marker)[0])
    return cwd


def checkpoints_root() -> Path:
    """Where training state lives: $CYCLEGAN_CHECKPOINTS, else the project's own models/checkpoints.

    Never a queued experiment's copy: DVC deletes that copy when the experiment ends or dies, and
    with it the checkpoints a re-queued experiment would resume from.
    """
    named = os.environ.get(CHECKPOINTS_ENV)
    if named:
        return Path(named).expanduser().resolve()
    root = project_root() / CHECKPOINTS
    try:  # inside the working directory, as relative as dvc.yaml's paths (and the messages naming it)
        return root.relative_to(Path.cwd().resolve())
    except ValueError:
        return root
