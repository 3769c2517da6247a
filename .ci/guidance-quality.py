"""What classifier-free guidance does to a class-conditional checkpoint, weight by weight.

    python .ci/guidance-quality.py runs/cond/ckpt.pt --data-dir data [--num-samples 2000]

For a grey 28x28 dataset that torchvision has (Fashion-MNIST by default) it trains the small
classifier of sampler-quality.py on the training set (at the checkpoint's image size), then for
each guidance weight w draws --num-samples images with `ddpm.py sample --class all --guidance w`
(rows of 8 per class, all from the same x_T: --seed 0) and prints a Markdown table:
- class accuracy: the share of samples that the classifier assigns to the class asked for;
- FD: the Frechet distance of the classifier's penultimate features of all the samples to those
  of the test set (FID's formula, with a classifier of this data instead of Inception);
- within-class spread: the mean over classes of the trace of the feature covariance of that
  class's samples, divided by the same for the test images of that class (1: as diverse as real
  images of the class; lower: less diverse).
CI never runs this (about 15 minutes on 2 CPU cores).
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent))
import ddpm  # noqa: E402

spec = importlib.util.spec_from_file_location("sampler_quality", here / "sampler-quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def spread(features, labels, classes):
    """The mean over classes of the trace of each class's feature covariance."""
    return np.mean([np.trace(np.cov(features[labels == k], rowvar=False)) for k in classes])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--dataset", default="FashionMNIST")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--weights", default="0,0.5,1,2,3,5")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--out-dir", default="runs/guidance-quality")
    args = p.parse_args()
    cfg = torch.load(args.ckpt, map_location="cpu", weights_only=True)["config"]
    K, n = cfg["num_classes"], args.num_samples
    torch.manual_seed(0)
    x, y = quality.images(args.dataset, args.data_dir, cfg["image_size"], True)
    x_test, y_test = quality.images(args.dataset, args.data_dir, cfg["image_size"], False)
    net = quality.train_classifier(x, y, x_test, y_test)
    reference = quality.features(net, x_test)
    real_spread = spread(reference, y_test.numpy(), range(K))
    asked = (torch.arange(n) // 8 % K).numpy()  # --class all: rows of 8 per class
    rows = []
    for w in args.weights.split(","):
        out = Path(args.out_dir) / f"w{w}"
        argv = ["sample", "--ckpt", args.ckpt, "--num-samples", str(n), "--batch-size", "500"]
        argv += ["--out-dir", str(out), "--sampler", args.sampler]
        argv += ["--device", "cpu", "--seed", "0", "--class", "all", "--guidance", w]
        t0 = time.time()
        assert ddpm.main(argv) == 0
        seconds = time.time() - t0
        samples = ddpm.load_image_folder(out / "images", None)[0].float() / 127.5 - 1
        feats = quality.features(net, samples)
        with torch.no_grad():
            predicted = torch.cat([net(b) for b in samples.split(500)]).argmax(1).numpy()
        accuracy = (predicted == asked).mean()
        fd = quality.frechet(feats, reference)
        ratio = spread(feats, asked, range(K)) / real_spread
        rows.append(f"| {w} | {accuracy:.1%} | {fd:.2f} | {ratio:.2f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    threads = torch.get_num_threads()
    print(f"\n{n} samples ({args.sampler}) from {args.ckpt}, {threads} CPU threads")
    print("| guidance w | class accuracy | FD to the test set | within-class spread | seconds |")
    print("|---:|---:|---:|---:|---:|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
