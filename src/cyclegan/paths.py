"""Where each stage reads and writes, relative to the project root (as dvc.yaml declares them)."""
from pathlib import Path

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
TRANSLATED = Path("data/translated")
MODELS = Path("models")
CHECKPOINTS = MODELS / "checkpoints"
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
