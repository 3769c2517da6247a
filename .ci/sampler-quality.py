"""How close the fast samplers come to the 1000-step DDPM sampler, for one trained checkpoint.

    python .ci/sampler-quality.py runs/quickstart/ckpt.pt --data-dir data [--num-samples 2000]

For a grey 28x28 dataset that torchvision has (Fashion-MNIST by default) it trains a small
classifier on the training set (at the checkpoint's image size), then draws --num-samples images
with every sampler and step count below, all from the same x_T (`ddpm.py sample --seed 0`), and
prints a Markdown table: seconds per run on this machine, the Frechet distance (FD) between the
classifier's penultimate features of the samples and of the test set (FID's formula, with a
classifier of this data instead of Inception, which these machines cannot download), and how many
classes the samples spread over (exp of the entropy of the predicted classes' shares; 10 at most).
It also prints the FD of two sets of as many real training images: the floor, and how much FD
moves between draws of that size; --real-sets 2000,10000,50000 adds real sets of those sizes.
CI never runs this (it takes the better part of an hour on 2 CPU cores).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpm  # noqa: E402

RUNS = "ddpm ddim:10 ddim:20 ddim:50 ddim:100:1"  # sampler[:steps[:eta]]


def images(name, data_dir, size, train):
    """The dataset's images as ddpm.py trains on them: padded to 32x32, resized; in [-1, 1]."""
    ds = getattr(torchvision.datasets, name)(data_dir, train=train, download=True)
    x = F.pad(torch.as_tensor(ds.data)[:, None], (2, 2, 2, 2))
    x = torchvision.transforms.functional.resize(x, [size, size], antialias=True) if size != 32 else x
    return x.float() / 127.5 - 1, torch.as_tensor(ds.targets)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(1024, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.body(x))


def features(net, x):
    with torch.no_grad():
        return torch.cat([net.body(b) for b in x.split(500)]).double().numpy()


def frechet(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace of the root from the
    eigenvalues of S_a S_b."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * root)


def classes(net, x):
    """exp(entropy) of the predicted classes' shares: 10 for 10 equally common classes."""
    with torch.no_grad():
        shares = torch.cat([net(b) for b in x.split(500)]).argmax(1).bincount(minlength=10) / len(x)
    return float(torch.exp(-(shares * shares.clamp(min=1e-12).log()).sum()))


def train_classifier(x, y, x_test, y_test):
    """The small CNN, trained for 6 epochs; prints its test accuracy."""
    net, t0 = Classifier(), time.time()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(6):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        predicted = torch.cat([net(b) for b in x_test.split(500)]).argmax(1)
    accuracy = (predicted == y_test).float().mean().item()
    print(f"classifier: {accuracy:.1%} test accuracy after {time.time() - t0:.0f} s")
    return net


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--dataset", default="FashionMNIST")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--out-dir", default="runs/sampler-quality")
    p.add_argument("--runs", default=RUNS, help=f"space-separated sampler[:steps[:eta]]; {RUNS}")
    p.add_argument("--real-sets", default="", help="also FD of real sets of these sizes, e.g. 2000,10000")
    args = p.parse_args()
    cfg = torch.load(args.ckpt, map_location="cpu", weights_only=True)["config"]
    size = cfg["image_size"]
    torch.manual_seed(0)
    x, y = images(args.dataset, args.data_dir, size, True)
    x_test, y_test = images(args.dataset, args.data_dir, size, False)
    net = train_classifier(x, y, x_test, y_test)
    reference = features(net, x_test)
    perm, n = torch.randperm(len(x)), args.num_samples
    rows = []
    for k in range(2):
        fd = frechet(features(net, x[perm[k * n : (k + 1) * n]]), reference)
        real = x[perm[k * n : (k + 1) * n]]
        rows.append(f"| real training images, set {k + 1} | - | - | {fd:.2f} | {classes(net, real):.2f} |")
    for size in [int(v) for v in args.real_sets.split(",") if v]:
        fd = frechet(features(net, x[torch.randperm(len(x))[:size]]), reference)
        rows.append(f"| {size} real training images | - | - | {fd:.2f} | - |")
        print(rows[-1], flush=True)
    for run in args.runs.split():
        sampler, *rest = run.split(":")  # sampler[:steps[:eta]]
        steps, eta = (rest + [None])[0], (rest[1:] + ["0"])[0]
        steps = steps and int(steps)
        name = f"{sampler}, eta {eta}" if sampler == "ddim" else sampler
        out = Path(args.out_dir) / f"{sampler}-{steps or cfg['timesteps']}-{eta}"
        argv = [
            "sample",
            "--ckpt",
            args.ckpt,
            "--num-samples",
            str(args.num_samples),
            "--batch-size",
            "500",
            "--out-dir",
            str(out),
            "--sampler",
            sampler,
            "--device",
            "cpu",
            "--seed",
            "0",
            "--eta",
            eta,
        ]
        t0 = time.time()
        assert ddpm.main(argv + (["--sample-steps", str(steps)] if steps else [])) == 0
        seconds = time.time() - t0
        arr = ddpm.load_image_folder(out / "images", None)[0].float() / 127.5 - 1
        fd = frechet(features(net, arr), reference)
        spread = classes(net, arr)
        rows.append(f"| {name} | {steps or cfg['timesteps']} | {seconds:.0f} | {fd:.2f} | {spread:.2f} |")
        print(rows[-1], flush=True)
    threads = torch.get_num_threads()
    print(f"\n{n} samples from {args.ckpt}, {threads} CPU threads, torch {torch.__version__}")
    print(
        "| sampler | steps | seconds | FD to the test set | classes |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
    )


if __name__ == "__main__":
    main()
