"""Where each stage reads and writes, relative to the project root (as dvc.yaml declares them)."""
from pathlib import Path

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
TRANSLATED = Path("data/translated")
MODELS = Path("models")
CHECKPOINTS = MODELS / "checkpoints"
# Generators to start training from (train.init_from): the train stage depends on this folder.
INIT = MODELS / "init"
MLFLOW_RUN = MODELS / "mlflow_run.json"
METRICS = Path("metrics")
TRAIN_METRICS = METRICS / "train.json"
TRAIN_LOSSES = METRICS / "train_losses.csv"
EVAL_METRICS = METRICS / "eval.json"
DATA_REPORT = METRICS / "data_report.json"
REPORTS = Path("reports")
DATASET_PREVIEW = REPORTS / "dataset_preview.png"


def translated_name(name: str) -> str:
    """The file name of the translation of image `name`, in data/translated/<direction>/ or --output."""
    return f"{Path(name).stem}.png"
