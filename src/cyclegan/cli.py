"""`cyclegan <stage>`: one subcommand per DVC stage, each reading params.yaml in the current folder."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from .config import load_config
from .errors import UserError

STAGES = {
    "download": "Fetch or generate the dataset into data/raw/<name>",
    "prepare": "Validate, convert to RGB, resize; write data/prepared/<name>",
    "train": "Train CycleGAN; resumes from models/checkpoints automatically",
    "translate": "Translate the test sets both ways (or a folder of your images)",
    "evaluate": "FID and KID with torch-fidelity, and ground-truth error on the embedded dataset",
    "report": "Write reports/index.html",
    "compare": "Compare experiments (dvc exp show or MLflow) against a param",
    "import-authors": "Convert one of the authors' generators (an official name or a .pth) to our file",
    "log-pending": "Log to the MLflow server what train kept while the server was unreachable",
    "sweep": "Run a parameter grid as a SLURM job array, one dvc exp run per task",
}
# Commands that work outside a project: they read no params.yaml.
NO_PARAMS = {"import-authors"}


def _module(command: str) -> str:
    return f"cyclegan.stages.{command.replace('-', '_')}"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cyclegan", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen stage is imported: stages import heavy libraries (torch-fidelity, mlflow).
        if name in argv:
            module = importlib.import_module(_module(name))
            if hasattr(module, "add_arguments"):
                module.add_arguments(p)
    return parser


def disk_full(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error`, if any.

    Libraries may raise another error while handling it: torch's checkpoint writer raises a
    RuntimeError when it closes the file it could not write.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return e
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        cfg = None if args.stage in NO_PARAMS else load_config(args.params)
        importlib.import_module(_module(args.stage)).main(cfg, args)
    except UserError as e:
        print(f"cyclegan {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cyclegan {args.stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # A full disk is the user's to fix, not a bug: one line. Outputs are written to temp files
        # renamed into place (cyclegan.fileio), so those of earlier runs are intact.
        e = disk_full(error)
        if e is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        fix = "raise the file size limit (ulimit -f)" if e.errno == errno.EFBIG else "free disk space"
        print(f"cyclegan {args.stage}: error: {where}{e.strerror} while writing its outputs; {fix} and run "
              f"it "
              f"again (earlier outputs are intact)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
