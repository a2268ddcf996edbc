"""`cyclegan import-authors NAME_OR_PATH`: one of the authors' generators as our generator file.

NAME is one of their 18 pretrained generators (downloaded, or taken from CYCLEGAN_PRETRAINED_URL),
PATH any generator file their code saved; cyclegan.generator_authors reads the architecture from it. The
file written (default models/init/<name>.safetensors) is what `cyclegan translate --generator`
takes, and what train.init_from names to evaluate it through the pipeline or to train from it.
Not a DVC stage: it needs no params.yaml.
"""
from __future__ import annotations

from pathlib import Path

from .. import generator_authors, paths
from ..config import Config
from ..vocabulary import A2B, DIRECTIONS, direction_named


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="NAME_OR_PATH",
                        help=f"an official name ({', '.join(generator_authors.OFFICIAL)}) or a .pth file of "
                             f"the authors' code")
    parser.add_argument("--direction", choices=tuple(d.name for d in DIRECTIONS), default=A2B.name,
                        help="what it translates in your dataset's terms: A2B (use as G_A, the default) or "
                             "B2A "
                             "(G_B, e.g. zebra2horse for horse2zebra)")
    parser.add_argument("--output", type=Path,
                        help=f"the file to write (default {paths.INIT}/<name>{generator_authors.SUFFIX})")


def main(cfg: Config | None, args) -> None:
    imported = generator_authors.import_generator(args.source, args.direction, args.output)
    m = imported.converted.model
    role = direction_named(args.direction).generator
    print(f"cyclegan import-authors: {imported}\n"
          f"  translate your images: cyclegan translate --input FOLDER --generator {imported.output}\n"
          f"  score it through the pipeline: in params.yaml set model.netG: {m.netG}, model.ngf: {m.ngf}, "
          f"model.norm: {m.norm}, model.use_dropout: {str(m.use_dropout).lower()}, "
          f"train.init_from.{role}: {imported.output}, train.n_epochs: 0, train.n_epochs_decay: 0; "
          f"then dvc repro (epochs > 0 fine-tune from it)")
