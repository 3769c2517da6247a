"""SIGKILL a small training run at random moments, resume it each time, and compare it with an
uninterrupted run: weights, EMA and Adam bit for bit, and exactly one log.csv row per step.

    python .ci/sigkill-resume.py [--kills 6] [--steps 300] [--seed 1]

It makes its own small image folder; a checkpoint every step (--ckpt-minutes 1e-9) and a log row
every step, so that a kill can fall between any two writes. CI never runs this (about 2 minutes on
2 CPU cores).
"""

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng, root = random.Random(args.seed), Path(tempfile.mkdtemp())
    for k in range(40):
        pixels = np.random.default_rng(k).integers(0, 256, (10, 12, 3), dtype=np.uint8)
        (root / "images" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / f"c{k % 2}" / f"{k}.png")
    ddpm = str(Path(__file__).resolve().parent.parent / "ddpm.py")
    flags = "--image-size 8 --base-channels 32 --channel-mult 1,2 --num-res-blocks 1"
    flags += " --attn-resolutions 4 --timesteps 20 --batch-size 8 --warmup 10 --device cpu"
    flags += f" --max-steps {args.steps} --sample-every 0 --log-every 1 --ckpt-minutes 1e-9"
    flags += " --sampler ddim --sample-steps 2 --dataset folder --data-dir " + str(root / "images")

    def command(out, *extra):
        return [sys.executable, ddpm, *flags.split(), "--out-dir", str(root / out), *extra]

    subprocess.run(command("once"), check=True, capture_output=True)
    kills, resume = 0, []
    while True:
        run = subprocess.Popen(command("killed", *resume), stdout=subprocess.DEVNULL)
        if kills < args.kills:
            time.sleep(rng.uniform(2.5, 4.5))  # python and torch start in about 2 s
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
                run.wait()
                kills += 1
                ckpt = root / "killed" / "ckpt.pt"
                step = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None
                print(f"kill {kills}: SIGKILL, the checkpoint then held step {step}")
                resume = ["--resume"] if ckpt.exists() else []
                continue
        if run.wait() == 0:
            break
    a, b = (torch.load(root / d / "ckpt.pt", weights_only=True) for d in ("once", "killed"))
    same = all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])
    adam = a["optimizer"]["state"], b["optimizer"]["state"]
    same_adam = all(torch.equal(adam[0][i][m], adam[1][i][m]) for i in adam[0] for m in adam[0][i])
    rows = [int(r.split(",")[0]) for r in (root / "killed" / "log.csv").read_text().split()[1:]]
    print(f"{kills} kills; step {b['step']}; weights and EMA identical: {same}; Adam: {same_adam}")
    once = rows == list(range(1, args.steps + 1))
    print(f"log.csv: {len(rows)} rows for {args.steps} steps, each step once: {once}")


if __name__ == "__main__":
    main()
