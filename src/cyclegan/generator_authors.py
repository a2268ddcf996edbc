"""The CycleGAN authors' generator files, turned into ours (`cyclegan import-authors`).

Two sources:
  a name     one of the 18 pretrained generators the authors publish (OFFICIAL), downloaded from
             their server with the datasets' downloader (resumable, retried) into the cache
             folder ($CYCLEGAN_CACHE or ~/.cache/cyclegan), or taken from CYCLEGAN_PRETRAINED_URL:
             another http(s):// base, a file:// URL or a local folder holding <name>.pth
  a path     any generator file their code saved (`latest_net_G.pth`, `<epoch>_net_G_A.pth`)

Their files are bare state dicts: nothing records the architecture, so `convert` reads it from
the keys and shapes, and absorbs what makes such files fail to load elsewhere:
  - `module.` before every key, from a network saved inside DataParallel;
  - `conv_block` where our ResNet blocks say `block` (the indices are the same: with dropout the
    second convolution of a block is at .6 instead of .5, which is how dropout shows);
  - running_mean/running_var/num_batches_tracked of InstanceNorm layers, from files written with
    torch <= 0.3: our InstanceNorm keeps no statistics, so they are dropped, as the authors' own
    loader drops them;
  - with norm `none` their convolutions have no bias where ours have one: a zero bias computes
    the same.
Anything that is not a generator their code builds (3-channel ResNet 6/9 blocks or U-Net 128/256)
is refused with one line naming the file and what does not fit. Files are read with
torch.load(weights_only=True): a file holding code is refused, never run.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import paths
from .config import ModelConfig
from .datasets.http import http_download, mirror
from .errors import UserError
from .generator_file import save_generator
from .inception import cache_dir
from .networks import build_generator

BASE_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models"
URL_ENV = "CYCLEGAN_PRETRAINED_URL"
# The names of the authors' scripts/download_cyclegan_model.sh; every file is a resnet_9blocks
# generator with ngf 64, instance norm, no dropout, translating in the direction its name says.
OFFICIAL = (
    "apple2orange", "orange2apple", "summer2winter_yosemite", "winter2summer_yosemite",
    "horse2zebra", "zebra2horse", "monet2photo", "style_monet", "style_cezanne", "style_ukiyoe",
    "style_vangogh", "sat2map", "map2sat", "cityscapes_photo2label", "cityscapes_label2photo",
    "facades_photo2label", "facades_label2photo", "iphone2dslr_flower",
)
SUFFIX = ".safetensors"  # of the files we write by default
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
_UNET_DEPTHS = {7: "unet_128", 8: "unet_256"}


@dataclass(frozen=True)
class Converted:
    net: nn.Module
    model: ModelConfig
    adapted: tuple[str, ...]  # what had to be changed to load it, for the user to see

    def describe(self) -> str:
        m = self.model
        return f"{m.netG}, ngf {m.ngf}, norm {m.norm}, {'dropout' if m.use_dropout else 'no dropout'}"


# --- reading ------------------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a file the authors' code saved; one line for anything else."""
    try:
        with warnings.catch_warnings():
            # Old files use pickle protocols torch's safe unpickler warns about, and load fine.
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder; give the generator file in it "
                        f"(latest_net_G_A.pth, ...)") from None
    except Exception as e:  # noqa: BLE001 - each kind of unreadable file gets its one line below
        text = str(e)
        # torch's safe unpickler names the function or class a pickle would import and call.
        code = re.search(r"GLOBAL ([\w.]+)", text)
        if code:
            raise UserError(f"{path}: refused: loading it would call {code.group(1)}, and a generator file "
                            f"holds tensors only (read with weights_only=True); use the file as the "
                            f"authors' code saved it") from None
        if isinstance(e, EOFError):
            reason = "it ends before its data (empty or cut short)"
        elif "zip archive" in text:
            reason = "its zip archive is cut short or damaged"
        else:
            reason = "torch.save did not write it"
        raise UserError(f"{path}: not a complete PyTorch file: {reason}; download or copy it again") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: holds a {type(raw).__name__}, not a state dict (layer names -> tensors) "
                        f"as the authors' code saves generators")
    for key, value in raw.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            raise UserError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor: not a state dict "
                            f"of a generator as the authors' code saves them (latest_net_G_A.pth, ...)")
    return dict(raw)


# --- the architecture from the keys ----------------------------------------------------------------

def _our_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    adapted = []
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
        adapted.append("removed the DataParallel prefix module.")
    renamed = {re.sub(r"^(model\.\d+\.)conv_block\.", r"\1block.", k): v for k, v in state.items()}
    return renamed, adapted


def _check_rgb(path: Path, key: str, channels: int, side: str) -> None:
    if channels != 3:
        raise UserError(f"{path}: {key} takes {channels}-channel {side}s; cyclegan translates RGB "
                        f"images (3 channels) only")


def infer(state: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """The model params of the generator a state dict (with our names) was saved from."""
    if any(k.startswith("model.model.") for k in state):
        first = state.get("model.model.0.weight")
        if first is None or first.ndim != 4:
            raise UserError(f"{path}: a U-Net without its first convolution model.model.0.weight; "
                            f"the file is incomplete")
        _check_rgb(path, "model.model.0.weight", first.shape[1], "input")
        depth = max(k.count("model.") for k in state) - 1
        if depth not in _UNET_DEPTHS:
            raise UserError(f"{path}: a U-Net of {depth} levels; cyclegan builds 7 (unet_128) "
                            f"or 8 (unet_256)")
        netG, ngf = _UNET_DEPTHS[depth], first.shape[0]
        norm_key, bias_key = "model.model.1.model.2.weight", "model.model.1.model.1.bias"
        # A U-Net's dropout layers hold no weights: nothing in the file tells, and evaluation
        # does not use them. Fine-tuning takes model.use_dropout from params.yaml.
        dropout = False
    elif "model.1.weight" in state:
        first = state["model.1.weight"]
        if first.ndim != 4 or tuple(first.shape[2:]) != (7, 7):
            raise UserError(f"{path}: model.1.weight has shape {list(first.shape)}; a ResNet generator "
                            f"starts with a 7x7 convolution there")
        _check_rgb(path, "model.1.weight", first.shape[1], "input")
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.block\.", k))}
        if len(blocks) not in (6, 9):
            raise UserError(f"{path}: a ResNet generator with {len(blocks)} residual blocks; cyclegan "
                            f"builds 6 (resnet_6blocks) or 9 (resnet_9blocks)")
        netG, ngf = f"resnet_{len(blocks)}blocks", first.shape[0]
        norm_key, bias_key = "model.2.weight", "model.1.bias"
        dropout = any(re.match(r"model\.\d+\.block\.6\.weight$", k) for k in state)
    else:
        first = state.get("model.0.weight")
        if first is not None and first.ndim == 4 and tuple(first.shape[2:]) in ((4, 4), (1, 1)):
            raise UserError(f"{path}: a discriminator (PatchGAN layers model.0, model.2, ...), not a "
                            f"generator; import the *_net_G*.pth file of the same run")
        raise UserError(f"{path}: no generator layers (model.1.weight of a ResNet or model.model.0.weight "
                        f"of a U-Net); its first key is {next(iter(state))!r}")
    # BatchNorm has weights; InstanceNorm has none (legacy files may carry statistics); with
    # norm none the authors' convolutions have no bias.
    norm = "batch" if norm_key in state else "instance" if bias_key in state else "none"
    return ModelConfig(netG=netG, ngf=int(ngf), norm=norm, use_dropout=dropout)


def _fit(state: dict[str, torch.Tensor], net: nn.Module, model: ModelConfig, path: Path,
         adapted: list[str]) -> dict[str, torch.Tensor]:
    """`state` with exactly the keys and shapes of `net`, or one line naming the first misfit."""
    modules = dict(net.named_modules())
    expected = net.state_dict()
    legacy = [k for k in state if k not in expected and k.rpartition(".")[2] in _RUNNING_STATS
              and isinstance(modules.get(k.rpartition(".")[0]), nn.InstanceNorm2d)]
    if legacy:
        state = {k: v for k, v in state.items() if k not in legacy}
        adapted.append(f"dropped {len(legacy)} InstanceNorm running statistics (files of torch <= 0.3)")
    filled = []
    for key, value in expected.items():
        if key in state:
            continue
        owner = key.rpartition(".")[0]
        if model.norm == "none" and key.endswith(".bias") and f"{owner}.weight" in state:
            filled.append(key)
            state[key] = torch.zeros_like(value)
        elif key.endswith(".num_batches_tracked"):  # BatchNorm files older than torch 0.4.1
            state[key] = torch.zeros_like(value)
    if filled:
        adapted.append(f"added {len(filled)} zero biases (the authors' norm none convolutions have none)")
    what = f"a {model.netG} generator with ngf {model.ngf}, norm {model.norm}"
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    more = lambda keys: f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""  # noqa: E731
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: {k} has shape {list(state[k].shape)} where {what} has "
                        f"{list(expected[k].shape)}{more(wrong)}; not a generator cyclegan can build")
    if missing:
        raise UserError(f"{path}: no {missing[0]}{more(missing)}, which {what} has; the file is incomplete "
                        f"or of another architecture")
    if extra:
        raise UserError(f"{path}: {extra[0]}{more(extra)} is not part of {what}; the file is of "
                        f"another architecture")
    return state


def convert(path: Path) -> Converted:
    """Our generator network for a file the authors' code saved."""
    state, adapted = _our_names(read_state_dict(path))
    model = infer(state, path)
    net = build_generator(model)
    net.load_state_dict(_fit(state, net, model, path, adapted))
    return Converted(net.eval(), model, tuple(adapted))


# --- the published generators ----------------------------------------------------------------------

def _locate(name: str) -> tuple[str, str | Path]:
    """('http', url) or ('file', path) of <name>.pth, from CYCLEGAN_PRETRAINED_URL or the authors."""
    base = os.environ.get(URL_ENV) or BASE_URL
    folder = mirror(base, URL_ENV)
    if isinstance(folder, str):
        return "http", f"{folder}/{name}.pth"
    if not (folder / f"{name}.pth").is_file():
        raise UserError(f"{URL_ENV}={base}: no {name}.pth in {folder}; put it there, or unset {URL_ENV} "
                        f"to download from {BASE_URL}")
    return "file", folder / f"{name}.pth"


def is_official(source: str) -> bool:
    return source in OFFICIAL and not Path(source).exists()


def default_output(source: str) -> Path:
    """models/init/<name>.safetensors: in the folder the train stage depends on (train.init_from)."""
    stem = source if is_official(source) else Path(source).stem
    return paths.INIT / f"{stem}{SUFFIX}"


@dataclass(frozen=True)
class Imported:
    output: Path
    source: str  # the URL, mirror file or path it came from
    converted: Converted

    def __str__(self) -> str:
        notes = f"; {'; '.join(self.converted.adapted)}" if self.converted.adapted else ""
        return f"{self.output}: {self.converted.describe()}, from {self.source}{notes}"


def import_generator(source: str, direction: str, output: Path | None = None) -> Imported:
    """Write our generator file for an official name or an authors' file."""
    output = output or default_output(source)
    if is_official(source):
        kind, where = _locate(source)
        if kind == "http":
            part = cache_dir() / "pretrained" / f"{source}.pth.part"
            http_download(str(where), part, name=source, file_name=f"{source}.pth", url_env=URL_ENV,
                          check=f"the name (one of {len(OFFICIAL)} official ones)")
            # Complete from here on: whether it converts or not, it is not worth resuming.
            try:
                converted = convert(part)
            finally:
                part.unlink(missing_ok=True)
        else:
            converted = convert(Path(where))
    elif Path(source).is_file():
        where, converted = source, convert(Path(source))
    elif Path(source).exists() or "/" in source or os.sep in source or Path(source).suffix:
        where, converted = source, convert(Path(source))  # its one-line error
    else:
        raise UserError(f"{source!r} is neither a file nor one of the authors' pretrained generators: "
                        f"{', '.join(OFFICIAL)}")
    save_generator(converted.net, converted.model, direction, output)
    return Imported(output, str(where), converted)
