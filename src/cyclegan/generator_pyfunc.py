"""A generator as an MLflow pyfunc model: uint8 images (N, H, W, 3) in, their translations out.

A "models from code" file: MLflow runs this file to build the model, and the weights are the
generator's safetensors file, logged as the artifact `generator`. Nothing is pickled, so loading a
logged model runs this code and reads tensors, nothing else. `cyclegan.generator_mlflow` logs it.

The imports are absolute because MLflow runs the file as a module of its own, outside the
package; a logged model carries the cyclegan files this one imports (its `code/` folder), so it
loads where cyclegan is not installed.

model_config (given at logging, overridable by `mlflow.pyfunc.load_model(..., model_config=)`):
  device      auto (CUDA if visible), cpu or cuda
  batch_size  images per forward pass
"""
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from cyclegan.device import exact_fp32, resolve_device
from cyclegan.generator_file import open_generator, translate_array
from cyclegan.networks import size_multiple

ARTIFACT = "generator"


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """The translation `cyclegan translate` computes, as a pyfunc model."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        path = Path(context.artifacts[ARTIFACT])
        self.device = resolve_device(str(config.get("device", "auto")), "model_config device")
        self.batch_size = int(config.get("batch_size", 16))
        architecture, self.direction, self.net = open_generator(path, self.device)
        self.multiple = size_multiple(architecture.netG)

    # np.ndarray, evaluated (no `from __future__ import annotations` here): MLflow reads the hint
    # and, for ndarray, validates against the logged signature instead of asking for hints.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise MlflowException.invalid_parameter_value(
                f"expected uint8 RGB images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        height, width = images.shape[1:3]
        if height % self.multiple or width % self.multiple:
            raise MlflowException.invalid_parameter_value(
                f"image size {height}x{width}: this generator needs sides that are multiples of "
                f"{self.multiple}; resize the images (training used data.crop_size)")
        # As the translate stage computes: true fp32, not TF32, on GPUs.
        with exact_fp32():
            return translate_array(self.net, images, self.batch_size, self.device)


# Imported as cyclegan.generator_pyfunc (to find this file, or the class) it sets nothing; MLflow
# runs it under a name of its own and reads the model this sets.
if __name__ != "cyclegan.generator_pyfunc":
    mlflow.models.set_model(GeneratorModel())
