"""Both generators as MLflow models of the training run, and the optional registration.

Each generator file (models/G_A.safetensors, G_B.safetensors) is logged as a pyfunc model named
after it (`G_A`: A->B, `G_B`: B->A): the python model is cyclegan/generator_pyfunc.py (models from
code, no pickle), the weights the safetensors file as is, a tensor signature (uint8 images in
and out), an input example (a test image of the source domain), the architecture as the model's
params and metadata, the cyclegan source files it runs, and pinned requirements. It loads with
`mlflow.pyfunc.load_model` and serves with `mlflow models serve`. `tracking.register_as` also
registers G_A under that name.
"""
from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import code_closure, paths
from .config import Config
from .generator_file import read_generator
from .vocabulary import A2B, DIRECTIONS

# What the files of generator_pyfunc.py's import closure import; MLflow would otherwise infer the
# list by loading the model in a subprocess (seconds of imports per model).
REQUIREMENTS = ("torch", "numpy", "safetensors", "pyyaml")


def requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def bundle_code(dest: Path) -> Path:
    """The cyclegan files generator_pyfunc.py runs, as a package folder under `dest`."""
    package = dest / code_closure.PACKAGE
    for path in code_closure.import_closure({f"{code_closure.PACKAGE}.generator_pyfunc"}):
        target = package / path.relative_to(code_closure.SRC / code_closure.PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return package


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    return ModelSignature(inputs=images, outputs=images)


def log_generators(mlflow, cfg: Config, examples: dict[str, np.ndarray], step: int) -> dict[str, Any]:
    """Log models/G_A and G_B as models of the active run; {"G_A": ModelInfo, "G_B": ModelInfo}.

    `examples` holds an input example per direction ("A2B": testA images, "B2A": testB images).
    """
    from . import generator_pyfunc  # for its file: MLflow runs it as the model's code

    logged = {}
    with tempfile.TemporaryDirectory(prefix="cyclegan-model-code-") as tmp:
        code = bundle_code(Path(tmp))
        for d in DIRECTIONS:
            name, direction = d.generator, d.name
            path = paths.GENERATORS[name]
            architecture, file_direction, _ = read_generator(path, weights=False)
            register = cfg.tracking.register_as if d is A2B and cfg.tracking.register_as else None
            logged[name] = mlflow.pyfunc.log_model(
                name=name,
                python_model=generator_pyfunc.__file__,
                artifacts={generator_pyfunc.ARTIFACT: str(path)},
                code_paths=[str(code)],
                signature=signature(),
                input_example=np.ascontiguousarray(examples[direction]),
                pip_requirements=requirements(),
                model_config={"device": "auto", "batch_size": cfg.eval.batch_size},
                params={**{f"model.{k}": v for k, v in asdict(architecture).items()},
                        "direction": file_direction},
                metadata={"direction": file_direction, "model": asdict(architecture)},
                registered_model_name=register,
                step=step,
            )
    return logged
