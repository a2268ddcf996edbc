"""`cyclegan sweep`: a parameter grid as a SLURM job array, one experiment per array task (README:
A sweep on a SLURM cluster); not a DVC stage.

The grid is DVC's own: `-S key=v1,v2` (DVC's parser, the same points `dvc exp run --queue -S`
would queue), several -S multiply. Each task clones the git remote at the pinned commit into its
own folder under the scratch folder, runs `dvc exp run -n <name> -S ...` there and pushes the
experiment (`dvc exp push`: its git ref to the git remote, its outputs to the DVC remote); its
training state lives in a shared folder, so a requeued or resubmitted task resumes. Before anything is
submitted, every grid point is validated as params.yaml, and the working tree must be committed
and pushed, the DVC remote committed and the MLflow tracking server answering. Credentials reach
the tasks in the environment sbatch hands them, never in the script.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .. import fileio, paths, tracking, tracking_server
from ..config import PARAMS_FILE, ConfigError, load_config_with
from ..errors import UserError

SCRIPT = "sweep.sbatch"
LOGS = "logs"
# sbatch options the script sets itself: the array is the grid, the logs are one file per task.
RESERVED = {"-a": "--array", "--array": "--array", "-o": "--output", "--output": "--output",
            "-e": "--error", "--error": "--error", "--open-mode": "--open-mode"}
# Characters git refuses in a ref name (hence in an experiment name), and runs of them.
NOT_IN_REF = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Point:
    """One grid point: the experiment's name and its `-S key=value` overrides, as DVC reads them."""

    name: str
    overrides: tuple[str, ...]


def default_scratch() -> Path:
    return Path(os.environ.get("SCRATCH") or "~").expanduser() / "cyclegan-sweeps"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Options after `--` go to sbatch, as #SBATCH lines of the script: "
                     "`cyclegan sweep -S lambda_cycle=5,10 -- --partition=gpu --gres=gpu:1 --time=4:00:00`.")
    parser.add_argument("-S", "--set-param", action="append", dest="set_params", required=True,
                        metavar="KEY=VALUES",
                        help="a key of params.yaml and its values, as `dvc exp run -S` takes them "
                             "(lambda_cycle=5,10, seed=range(0,3)); several -S multiply")
    parser.add_argument("--name", help="prefix of the experiments' names (default: the commit's short hash); "
                                       "each is <prefix>-<key>=<value>[-...], the same on every submission")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder the nodes share, for the tasks' clones, training state and logs "
                             f"(default: $SCRATCH/cyclegan-sweeps, else ~/cyclegan-sweeps; now "
                             f"{default_scratch()})")
    parser.add_argument("--git-remote", default="origin",
                        help="git remote the tasks clone from and push experiments to (default: origin)")
    parser.add_argument("--max-parallel", type=int, default=0, metavar="N",
                        help="run at most N tasks at a time (sbatch --array=...%%N; default: no limit)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the job script and print how to submit it, without submitting")
    parser.add_argument("sbatch_options", nargs="*", metavar="-- SBATCH_OPTION",
                        help="sbatch options for every task (after --)")


# --- the grid ---------------------------------------------------------------------------------------

def grid(set_params: list[str]) -> list[tuple[str, ...]]:
    """The grid points of `-S` arguments as DVC expands them: each a tuple of `key=value`."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    by_file = to_path_overrides(set_params)
    others = sorted(set(by_file) - {PARAMS_FILE})
    if others:
        raise UserError(f"-S {others[0]}:...: a sweep sets keys of {PARAMS_FILE} only")
    try:
        sweeps = get_hydra_sweeps(by_file)
    except (HydraException, InvalidArgumentError) as e:
        raise UserError(f"-S {' -S '.join(set_params)}: {str(e).splitlines()[0]}; write KEY=VALUE,VALUE... "
                        f"as for `dvc exp run -S`") from None
    return [tuple(sweep[PARAMS_FILE]) for sweep in sweeps]


def parse_point(overrides: tuple[str, ...]) -> dict[str, object]:
    """{key: value} of one point's `key=value` overrides, values typed as DVC (Hydra) types them."""
    from dvc.utils.hydra import to_hydra_overrides

    values = {}
    for override in to_hydra_overrides(list(overrides)):
        if override.is_add() or override.is_delete():
            raise UserError(f"-S {override.input_line}: a sweep sets existing keys of {PARAMS_FILE} "
                            f"(KEY=VALUES), it neither adds nor deletes keys")
        values[override.key_or_group] = override.value()
    return values


def experiment_name(prefix: str, overrides: tuple[str, ...]) -> str:
    """<prefix>-<key>=<value>[-<key>=<value>...]: readable in `dvc exp show`, the same for the same
    point on every submission (a resubmitted task finds its experiment), and a valid git ref name."""
    parts = [prefix, *(NOT_IN_REF.sub("_", o) for o in overrides)]
    return "-".join(parts).strip(".")


def points(set_params: list[str], prefix: str) -> list[Point]:
    """The validated grid: every point is params.yaml with its overrides, checked as a stage checks
    it, before anything is submitted."""
    out = []
    for overrides in grid(set_params):
        try:
            load_config_with(parse_point(overrides))
        except ConfigError as e:
            raise UserError(f"-S {' -S '.join(overrides)}: {e}") from None
        out.append(Point(experiment_name(prefix, overrides), overrides))
    names = [p.name for p in out]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"two grid points would both be named {duplicate}; give each value once")
    return out


# --- the repository ---------------------------------------------------------------------------------

def git(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    # No password prompt from a remote: a sweep is checked, not typed into.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise UserError("git is not on PATH; the tasks clone the project with git") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"`git {' '.join(args)}` did not answer within {timeout:.0f} s") from None


def committed_commit() -> tuple[str, str]:
    """(HEAD's commit, the project's folder within the repository); refused when the working
    tree differs from it: the tasks see only what is committed."""
    head = git("rev-parse", "HEAD", "--show-prefix")
    if head.returncode != 0:
        raise UserError(f"{Path.cwd()} is not in a git repository with a commit; the tasks clone the project "
                        f"from its git remote: `git init`, commit, `git push`")
    commit, subdir = (head.stdout.splitlines() + [""])[:2]
    changed = git("status", "--porcelain", "--untracked-files=normal", ".").stdout.splitlines()
    if changed:
        more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
        raise UserError(f"{changed[0][3:]}{more} is not committed; the tasks clone the commit from the git "
                        f"remote: commit, then `git push`")
    return commit, subdir.strip()


def remote_url(remote: str) -> str:
    url = git("remote", "get-url", remote)
    if url.returncode != 0:
        raise UserError(f"no git remote '{remote}': the tasks clone the project from it and push their "
                        f"experiments to it; `git remote add {remote} <url>`, then `git push`")
    url = url.stdout.strip()
    if urllib.parse.urlsplit(url).password:
        raise UserError(f"the URL of git remote '{remote}' holds a password, which the job script would "
                        f"hold too; use SSH keys or a git credential helper instead")
    return url


def check_pushed(commit: str, remote: str) -> None:
    """The commit is on the remote: a branch there is it or descends from it (fetched first, as
    others may have pushed on top of it)."""
    fetched = git("fetch", "--quiet", remote, timeout=300)
    if fetched.returncode != 0:
        last = (fetched.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`git fetch {remote}` failed ({last}); the tasks clone the project from that remote")
    branches = git("for-each-ref", "--contains", commit, "--format=%(refname)", f"refs/remotes/{remote}/")
    if not branches.stdout.strip():
        raise UserError(f"commit {commit[:7]} is not on git remote '{remote}', and the tasks clone it from "
                        f"there: `git push {remote}` first")


def check_dvc_remote() -> None:
    """A default DVC remote in .dvc/config, the file the tasks' clones have (.dvc/config.local
    stays on this machine)."""
    dvc = [sys.executable, "-m", "dvc", "remote", "default", "--project"]
    out = subprocess.run(dvc, capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or not out.stdout.strip():
        raise UserError("no default DVC remote in .dvc/config, where the tasks push their outputs: "
                        "`dvc remote add -d storage s3://...`, commit .dvc/config, `git push`")


def check_tracking_server() -> None:
    uri = tracking.tracking_uri()
    if not tracking_server.is_remote(uri):
        raise UserError("the tasks log to a shared MLflow tracking server: set MLFLOW_TRACKING_URI to its "
                        "http(s):// URL (a local store would be one per task's clone; README: A shared "
                        "MLflow tracking server)")
    tracking_server.check(uri, tracking.EXPERIMENT)


def check_sbatch_options(options: list[str]) -> None:
    for option in options:
        if not option.startswith("-") or "\n" in option:
            raise UserError(f"sbatch option {option!r}: options go after `--`, each starting with '-' "
                            f"(--partition=gpu)")
        reserved = RESERVED.get(option.split("=", 1)[0])
        if reserved:
            raise UserError(f"sbatch option {option}: the script sets {reserved} itself (one array task per "
                            f"grid point, one log per task in {LOGS}/); to rerun tasks 1 and 3, "
                            f"`sbatch --array=1,3 {SCRIPT}`")


# --- the job script -----------------------------------------------------------------------------------

def job_script(points: list[Point], commit: str, url: str, subdir: str, folder: Path, options: list[str],
               max_parallel: int) -> str:
    q = shlex.quote
    cases = "\n".join(f"  {i}) name={q(p.name)}; overrides=({' '.join(f'-S {q(o)}' for o in p.overrides)}) ;;"
                      for i, p in enumerate(points))
    throttle = f"%{max_parallel}" if max_parallel > 0 else ""
    sbatch = "\n".join(f"#SBATCH {option}" for option in options)
    bin_dir = Path(sys.executable).parent
    return f"""#!/bin/bash
# Written by `cyclegan sweep`: {len(points)} experiments of commit {commit[:7]}, one array task each.
# Each task clones the git remote at the commit into {folder}/<name>/, runs
# `dvc exp run -n <name> -S ...` there and pushes the experiment to the git and DVC remotes.
# Submitting this file again (all tasks, or `sbatch --array=I {SCRIPT}` for task I) is safe: a task
# whose experiment exists only pushes it, one killed during training resumes from its checkpoint.
# No credentials here: the tasks read them from the environment sbatch hands them.
#SBATCH --job-name=cyclegan-sweep
#SBATCH --array=0-{len(points) - 1}{throttle}
#SBATCH --output={folder / LOGS}/task-%a.log
#SBATCH --open-mode=append
#SBATCH --requeue
{sbatch}
set -euo pipefail

case "${{SLURM_ARRAY_TASK_ID:-}}" in
{cases}
  *) echo "cyclegan sweep: no task ${{SLURM_ARRAY_TASK_ID:-}} in this grid; submit this file with sbatch" >&2
     exit 2 ;;
esac
commit={commit}
git_url={q(url)}
sweep={q(str(folder))}
clone="$sweep/$name"
echo "cyclegan sweep: task $SLURM_ARRAY_TASK_ID, experiment $name, job ${{SLURM_JOB_ID:-}} on $(hostname)," \
  "restart ${{SLURM_RESTART_COUNT:-0}}"
# (No quote characters in the message: bash would read them as quotes.)
: "${{MLFLOW_TRACKING_URI:?is not set; submit from a shell that exports the MLflow tracking server URL}}"

# The environment cyclegan sweep ran in, with the commit's own source before its installed one.
export PATH={q(str(bin_dir))}:"$PATH"
# Training state outside the clone, where a requeued or resubmitted task finds it on any node.
export {paths.CHECKPOINTS_ENV}="${{{paths.CHECKPOINTS_ENV}:-$sweep/checkpoints}}"
if [ -n "${{SLURM_CPUS_PER_TASK:-}}" ] && [ -z "${{OMP_NUM_THREADS:-}}" ]; then
  export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"  # torch would otherwise use every core of the node
fi

# One process per clone: the same sweep submitted twice must not share a working tree.
exec 9>"$clone.lock"
if ! flock --nonblock 9; then
  echo "cyclegan sweep: another task is running $name in $clone; this one stops" >&2
  exit 1
fi
if [ ! -d "$clone/.git" ]; then
  rm -rf "$clone.partial"
  git clone --quiet --no-checkout "$git_url" "$clone.partial"
  mv "$clone.partial" "$clone"
fi
cd "$clone"
git cat-file -e "$commit^{{commit}}" 2>/dev/null || git fetch --quiet origin
# A requeued task starts from the commit again; DVC's run cache and the checkpoints keep its progress.
git checkout --quiet --force --detach "$commit"
cd ./{q(subdir) if subdir else "."}
export PYTHONPATH="$PWD/src${{PYTHONPATH:+:$PYTHONPATH}}"
# Left by a task killed on another node, its process ids mean nothing here; the lock above holds.
rm -f .dvc/tmp/rwlock

if dvc exp list --name-only | grep --line-regexp --fixed-strings "$name" >/dev/null; then
  echo "cyclegan sweep: experiment $name exists (an earlier run of this task); pushing it"
else
  # The data the baseline pushed, if any (the pipeline makes what is missing). An unreachable
  # remote or missing keys stop the task here, before any training.
  dvc pull --allow-missing download prepare
  dvc exp run --name "$name" "${{overrides[@]}}"
fi
if [ -n "$(ls -A {tracking_server.PENDING} 2>/dev/null)" ]; then
  {tracking_server.LOG_PENDING_COMMAND} ||
    echo "cyclegan sweep: run {tracking_server.LOG_PENDING_COMMAND} in $PWD once the MLflow server answers"
fi
dvc exp push origin "$name"
echo "cyclegan sweep: task $SLURM_ARRAY_TASK_ID done: experiment $name pushed"
"""


def submit(script: Path) -> str:
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                             timeout=300)
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch did not answer within 300 s; the script is {script}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"sbatch refused {script}: {last}")
    return out.stdout.strip().split(";")[0]


def main(cfg, args) -> None:
    options = list(args.sbatch_options or [])
    check_sbatch_options(options)
    if args.max_parallel < 0:
        raise UserError(f"--max-parallel {args.max_parallel}: give a number of tasks >= 1, or 0 for no limit")
    if not args.dry_run and shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: run cyclegan sweep on a SLURM login node, or add --dry-run "
                        "to write the job script and submit it with sbatch yourself")
    if args.name is not None and (not args.name or NOT_IN_REF.search(args.name) or args.name[0] in ".-"):
        raise UserError(f"--name {args.name!r}: it prefixes experiment and folder names; use letters, "
                        f"digits and . _ = + - (not first)")
    commit, subdir = committed_commit()
    prefix = args.name or commit[:7]
    grid_points = points(args.set_params, prefix)
    url = remote_url(args.git_remote)
    check_dvc_remote()
    check_pushed(commit, args.git_remote)
    check_tracking_server()

    folder = (args.scratch or default_scratch()).expanduser().resolve() / prefix
    (folder / LOGS).mkdir(parents=True, exist_ok=True)  # sbatch writes no log into a missing folder
    script = folder / SCRIPT
    text = job_script(grid_points, commit, url, subdir, folder, options, args.max_parallel)
    fileio.write_text(script, text)
    names = " ".join(p.name for p in grid_points)
    for i, p in enumerate(grid_points):
        print(f"task {i}: {p.name}: dvc exp run -S {' -S '.join(p.overrides)}")
    if args.dry_run:
        print(f"cyclegan sweep: wrote {script} ({len(grid_points)} tasks, commit {commit[:7]}); submit it "
              f"with `sbatch {script}`, then `dvc exp pull {args.git_remote} {names}`", file=sys.stderr)
        return
    job = submit(script)
    print(f"cyclegan sweep: submitted job {job}: {len(grid_points)} tasks at commit {commit[:7]}; logs in "
          f"{folder / LOGS}/task-<i>.log; when `squeue -j {job}` is empty: "
          f"`dvc exp pull {args.git_remote} {names}` and `cyclegan compare`", file=sys.stderr)
