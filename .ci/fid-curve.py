"""A --fid-every curve on a CPU, with a stand-in for the Inception network.

    python .ci/fid-curve.py --data-dir data --out-dir runs/fid-curve -- [ddpm.py train flags]

It trains the small Fashion-MNIST classifier of sampler-quality.py, puts its 128 penultimate
features in the place of pytorch-fid's Inception network (ddpm.inception), writes the statistics of
the training set under those features to OUT_DIR/reference.npz, and runs `ddpm.py train` with the
flags after `--` plus `--ref-stats` (so no cache in --data-dir ever holds stand-in statistics).
fid.csv then holds the classifier's FD (FID's formula) and IS (of its 10 classes) at every --fid-every.
The images reach the classifier as they would reach Inception: RGB in [0, 1], of which it takes one
channel.
CI never runs this.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent))
import ddpm  # noqa: E402

spec = importlib.util.spec_from_file_location("sampler_quality", here / "sampler-quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out-dir", default="runs/fid-curve")
    p.add_argument("--size", type=int, default=16)
    args, train = p.parse_known_args()
    train = [a for a in train if a != "--"]
    torch.manual_seed(0)
    x, y = quality.images("FashionMNIST", args.data_dir, args.size, True)
    x_test, y_test = quality.images("FashionMNIST", args.data_dir, args.size, False)
    net = quality.train_classifier(x, y, x_test, y_test).eval()

    def features(images):  # [0, 1] -> [-1, 1]; pool3-shaped, (B, D, 1, 1) in a list, as pytorch-fid's
        return [net.body(images[:, :1] * 2 - 1)[:, :, None, None]]

    def inception(device):  # the features, and the classifier's head on them for the IS
        return features, net.head.weight.detach().double()

    ddpm.inception = inception
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = ddpm.load_dataset("fashion_mnist", args.data_dir, args.size)[0]
    mu, sigma = ddpm.feature_statistics(features, data, torch.device("cpu"), "the training set")
    stats = dict(mu=mu.numpy(), sigma=sigma.numpy(), image_size=args.size, images=len(data))
    np.savez(out / "reference.npz", **stats)
    argv = [*train, "--data-dir", args.data_dir, "--out-dir", str(out)]
    sys.exit(ddpm.main([*argv, "--ref-stats", str(out / "reference.npz")]))


if __name__ == "__main__":
    main()
