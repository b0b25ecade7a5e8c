"""Clean against robust accuracy, with and without adversarial training.

Each recipe fine-tunes the bundled model on the Grocery Store train split with the same short,
seeded schedule; they differ only in `--adversarial`. "none" is the control: it separates what
the extra epochs do from what the adversarial copies do. Every model, the bundled one included,
is then evaluated on the val split with `jobs.evaluate --corruptions all` (clean accuracy, five
ImageNet-C corruptions at severities 1, 3 and 5, FGSM at 1, 2 and 4 pixel levels), and one table
prints. Each step is the project's own command line, run as a user would run it.

    python benchmarks/robustness.py [--recipes none,fgsm] [--epochs 2] [--train-stages 3|all]
        [--output outputs/robustness]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import BUNDLED_MODEL  # noqa: E402

MANIFEST = "manifests/grocery.parquet"
# The fine-tune: the bundled model's trainable stages, a lower peak rate than its first training
# (it starts trained), a short warm-up.
FINE_TUNE = ["--model-name", "efficientnet_lite0", "--backbone-lr-scale", "0.25", "--lr", "0.001",
             "--warmup-epochs", "0.2", "--seed", "0", "--cpus-per-worker", "2"]
ADVERSARIAL_EPSILON = "2"  # pixel levels of 255, the middle of the evaluated FGSM strengths


def job(*args: str) -> dict:
    """Run `python -m jobs.<name> ...`; its JSON summary on stdout."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args[:1])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()  # progress lines first, then the indented JSON summary
    return json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="none,fgsm",
                        help="comma-separated --adversarial values to fine-tune with")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--pgd-steps", default="3")
    parser.add_argument("--train-stages", default="3",
                        help="as jobs.train --train-stages; 'all' fine-tunes every stage")
    parser.add_argument("--no-bundled", action="store_true",
                        help="leave the bundled model's own evaluation out")
    parser.add_argument("--output", default="outputs/robustness")
    args = parser.parse_args()
    out = (REPO / args.output).resolve()
    if not (REPO / MANIFEST).exists():
        job("jobs.make_manifest", "--output", MANIFEST)
    models = {} if args.no_bundled else {"bundled": (BUNDLED_MODEL, None)}
    stages = [] if args.train_stages == "all" else ["--train-stages", args.train_stages]
    for recipe in args.recipes.split(","):
        start = time.perf_counter()
        flags = ["--adversarial", recipe]
        if recipe != "none":
            flags += ["--adversarial-epsilon", ADVERSARIAL_EPSILON,
                      "--adversarial-steps", args.pgd_steps]
        summary = job("jobs.train", "--manifest", MANIFEST, "--weights", BUNDLED_MODEL,
                      "--epochs", args.epochs, "--output", str(out / f"train-{recipe}"),
                      *FINE_TUNE, *stages, *flags)
        models[f"fine-tuned, adversarial {recipe}"] = (summary["model"],
                                                       time.perf_counter() - start)
        print(f"trained {recipe}: {models[f'fine-tuned, adversarial {recipe}'][1]:.0f} s",
              flush=True)
    rows = []
    for name, (model, train_s) in models.items():
        metrics = job("jobs.evaluate", "--manifest", MANIFEST, "--split", "val", "--model", model,
                      "--corruptions", "all", "--output", str(out / f"eval-{name.split()[-1]}"))
        rows.append((name, train_s, metrics["robustness"]))
    attacks = [k for k in rows[0][2] if k.startswith("fgsm@")]
    header = ["model", "training s", "clean", "mean corrupted", *attacks]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, train_s, robust in rows:
        cells = [name, f"{train_s:.0f}" if train_s else "",
                 f"{robust['clean']:.1%}", f"{robust['mean_corruption_accuracy']:.1%}",
                 *(f"{robust[a]:.1%}" for a in attacks)]
        print("| " + " | ".join(cells) + " |")
    print("per corruption and severity: <output>/eval-*/robustness.csv")


if __name__ == "__main__":
    main()
