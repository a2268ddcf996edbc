#!/usr/bin/env bash
# One GPU check, in one call of about 9 minutes on one H100/H200, writing $OUT/gpu_check.json and
# $OUT/gpu_check.md:
#   1. the `cuda` tests (tests/test_cuda.py)
#   2. benchmarks/train_step.py at 256 px, ResNet-9 / ngf 64 / batch 1: fp32, bf16,
#      bf16 + channels_last, bf16 + compile and the authors' way, one step of each in turn
#   3. benchmarks/gpu_recipe.py: the paper's recipe on real horse2zebra for ~4 minutes, both test
#      sets translated, FID/KID (or the translations saved for `gpu_recipe.py --score` elsewhere)
#
#   DRY_RUN=1 benchmarks/gpu_check.sh     every step at a tiny size on the CPU, in under 3 minutes
#
# It needs torch, torchvision, numpy, pillow, pyyaml, tqdm and pytest, which a bare GPU image has,
# and none of MLflow, DVC or torch-fidelity (FID needs torch-fidelity and Inception weights; where
# they are missing the translations come back instead). Data: $DATA, a folder with trainA/ trainB/
# testA/ testB/ (default .device/horse2zebra, which `benchmarks/gpu_check.sh --pack` fills with
# every test image and as many training images as the device tool carries, from
# ../shared/datasets/horse2zebra), so the call is
#   run(command="bash benchmarks/gpu_check.sh", carry=[".device"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# FIRST=(the first $2 names in folder $1, sorted). No `ls | head` pipe: under pipefail, head closing
# the pipe early kills ls with SIGPIPE and the script with exit 141 (as CI saw on a larger folder).
first_files() {
    local all=()
    mapfile -t all < <(LC_ALL=C ls -1 "$1" | LC_ALL=C sort)
    FIRST=("${all[@]:0:$2}")
}

if [ "${1:-}" = "--pack" ]; then
    src=${2:-../shared/datasets/horse2zebra}
    dst=.device/horse2zebra
    rm -rf "$dst" && mkdir -p "$dst"
    for split in testA testB; do cp -r "$src/$split" "$dst/"; done
    for split in trainA trainB; do  # 500 each: ~45 MB, under the tool's 64 MiB with the repo
        mkdir -p "$dst/$split"
        first_files "$src/$split" "${PACK_TRAIN:-500}"
        for f in "${FIRST[@]}"; do cp "$src/$split/$f" "$dst/$split/"; done
    done
    du -sh "$dst"
    exit 0
fi

OUT=${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$OUT"
DRY=${DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
    DEVICE=cpu SIZE=32 LOAD=36 NGF=8 ITERS=2 WARMUP=1 MINUTES=0.1 MODES="fp32 bf16 bf16+channels_last authors"
    DATA=${DATA:-$(mktemp -d -t gpu-check-data-XXXXXX)/horse2zebra}
    if [ ! -d "$DATA/trainA" ]; then  # a few real images per split, or the toy ones without ../shared
        if [ -d ../shared/datasets/horse2zebra ]; then
            for split in trainA trainB testA testB; do
                mkdir -p "$DATA/$split"
                first_files "../shared/datasets/horse2zebra/$split" 6
                for f in "${FIRST[@]}"; do cp "../shared/datasets/horse2zebra/$split/$f" "$DATA/$split/"; done
            done
        else
            "$PY" -c "from cyclegan.datasets import toy; toy.generate(__import__('pathlib').Path('$DATA'), image_size=48, n_train_a=6, n_train_b=6, n_test=6, seed=0)"
        fi
    fi
else
    DEVICE=cuda SIZE=256 LOAD=286 NGF=64 ITERS=10 WARMUP=3 MINUTES=${MINUTES:-4} \
        MODES="fp32 bf16 bf16+channels_last bf16+compile authors"
    DATA=${DATA:-.device/horse2zebra}
fi
echo "gpu_check: DRY_RUN=$DRY device=$DEVICE data=$DATA out=$OUT"

step_status() { [ "$1" = 0 ] && echo ok || echo "failed (exit $1)"; }

# 1. The cuda tests (they skip, with the reason, where torch sees no GPU).
set +e
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs >"$OUT/cuda_tests.log" 2>&1
tests_rc=$?
set -e
tail -n 3 "$OUT/cuda_tests.log"

# 2. The training step, every way in turn.
set +e
"$PY" benchmarks/train_step.py --device "$DEVICE" --sizes "$SIZE" --ngf "$NGF" --ndf "$NGF" \
    --iters "$ITERS" --warmup "$WARMUP" --modes $MODES --json "$OUT/train_step.json" >"$OUT/train_step.log" 2>&1
bench_rc=$?
set -e
cat "$OUT/train_step.log"

# 3. The recipe on real data for a fixed budget, then FID/KID.
set +e
"$PY" benchmarks/gpu_recipe.py --data "$DATA" --out "$OUT" --device "$DEVICE" --minutes "$MINUTES" \
    --load-size "$LOAD" --crop-size "$SIZE" --ngf "$NGF" --ndf "$NGF" >"$OUT/recipe.log" 2>&1
recipe_rc=$?
set -e
tail -n 25 "$OUT/recipe.log"

"$PY" - "$OUT" "$DRY" "$tests_rc" "$bench_rc" "$recipe_rc" <<'PYTHON'
import json, platform, sys
from pathlib import Path

import torch

out, dry, tests_rc, bench_rc, recipe_rc = Path(sys.argv[1]), sys.argv[2] == "1", *map(int, sys.argv[3:])
def read(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None

tests_tail = (out / "cuda_tests.log").read_text().strip().splitlines()[-1:] if (out / "cuda_tests.log").is_file() else []
summary = {
    "dry_run": dry, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "cuda_tests": {"exit": tests_rc, "summary": tests_tail[0] if tests_tail else ""},
    "train_step": {"exit": bench_rc, "results": read("train_step.json")},
    "recipe": {"exit": recipe_rc, "results": read("recipe.json")},
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))

lines = [f"# GPU check{' (DRY_RUN on CPU)' if dry else ''}", "",
         f"torch {summary['torch']} (CUDA {summary['cuda']}), GPU: {summary['gpu'] or 'none'}", "",
         f"## cuda tests: exit {tests_rc}", "", f"`{summary['cuda_tests']['summary']}`", "",
         f"## train step: exit {bench_rc}", "", "| size | mode | s/iter | img/s | peak GiB |", "| ---: | --- | ---: | ---: | ---: |"]
for r in summary["train_step"]["results"] or []:
    for mode, m in (r.get("modes") or {}).items():
        lines.append(f"| {r['size']} | {mode} | " + (f"{m['s_per_iter']:.4f} | {m['images_per_s']:.2f} | {m['peak_gib']:.2f} |"
                                                       if "error" not in m else f"n/a: {m['error']} | | |"))
rec = summary["recipe"]["results"] or {}
lines += ["", f"## recipe: exit {recipe_rc}", ""]
if rec:
    lines.append(f"{rec['steps']} steps in {rec['train_seconds']:.0f} s ({rec['images_per_s']:.2f} img/s, "
                 f"{rec['precision']}), {rec['epochs_completed']} epochs completed")
    scores = rec.get("scores")
    if scores:
        lines += ["", "| | FID (legacy) | clean-FID | KID | precision | recall |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        fmt = lambda key, spec: format(scores[key], spec) if key in scores else "n/a"
        lines += [f"| {k} | {fmt(f'fid_{k}', '.2f')} | {fmt(f'cleanfid_{k}', '.2f')} | {fmt(f'kid_{k}', '.4f')} | "
                  f"{fmt(f'precision_{k}', '.3f')} | {fmt(f'recall_{k}', '.3f')} |" for k in ("A2B", "B2A", "baseline")]
        lines += ["", "clean-fid leaderboard, CycleGAN horse2zebra (140 testB vs 120 translations, 256 px): "
                  "legacy FID 77.2, clean-FID 75.17 (compare with A2B at 256 px)"]
        if "cleanfid_pending" in scores:
            lines.append(f"clean-FID pending ({scores['cleanfid_pending']}): install clean-fid, run `--score`")
        lines += ["", f"protocol: `{json.dumps(scores['protocol'])}`"]
    else:
        lines.append(f"FID/KID pending ({rec.get('scores_pending')}): run `python benchmarks/gpu_recipe.py --score OUT --data DATA`")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYTHON
echo "gpu_check: summary in $OUT/gpu_check.json and $OUT/gpu_check.md"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$recipe_rc" = 0 ]
