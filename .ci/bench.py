"""Training and sampling speed of ddpm.py's network, as the training loop and the samplers run it.

    python .ci/bench.py [--model res_att] [--compile [MODE]] [--batch-size 128] [--steps 20]

On a GPU the paper's network at batch 128; on a CPU the README's quick-start network at batch 32
(network flags override either). It prints the seconds the first 3 calls of each took (compiling,
cuDNN's choices: kept apart), then images/s over --steps timed calls of:
- train: all of Algorithm 1 as `ddpm.py train` runs it (the batch, the step, the warm-up, the EMA);
- sample: one network evaluation per image under inference_mode, what one sampler step costs.
.ci/gpu-check runs it; CI never does. Users read training speed from train's log lines.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpm  # noqa: E402

QUICKSTART = dict(
    image_size=16, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8]
)


def timed(name, call, steps, batch, cuda):
    """Run call(k) for k = 0, 1, 2 untimed (reported apart), then `steps` times; print images/s."""
    start = time.perf_counter()
    for k in range(3):
        call(k)
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for k in range(3, 3 + steps):
        call(k)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    print(f"{name}: {batch / seconds:,.1f} images/s, {1e3 * seconds:.2f} ms per call", end="")
    print(f" (the first 3 calls: {warm:.1f} s, compiling included)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(ddpm.MODELS), default="res_att")
    for flag in ddpm.pick(ddpm.RUN_FLAGS, ["image_size", "base_channels", "channel_mult", "num_res_blocks"]):
        parser.add_argument(flag.name, type=flag.type)
    parser.add_argument("--attn-resolutions", type=ddpm.int_list(4096))
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, help="default: 128 on a GPU, 32 on a CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed calls of each (default: 20)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto")
    parser.add_argument("--compile", nargs="?", const="auto", metavar="MODE", choices=ddpm.COMPILE_MODES)
    args = parser.parse_args(argv)
    device, amp = ddpm.setup_device(args.device, args.amp)
    cuda = device.type == "cuda"
    config = dict(ddpm.PAPER, channels=3, model=args.model, timesteps=args.timesteps)
    if not cuda:
        config.update(QUICKSTART)
    for key in ("image_size", "base_channels", "channel_mult", "num_res_blocks", "attn_resolutions"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    B = args.batch_size or (128 if cuda else 32)
    S = config["image_size"]
    torch.manual_seed(0)
    training, diffusion, model = ddpm.build_training(config, device, amp, args.compile)
    ema = ddpm.compile_model(training.ema, args.compile)  # as sample runs it
    data = torch.randint(0, 256, (4 * B, 3, S, S), dtype=torch.uint8, device=device)
    x_t = torch.randn(B, 3, S, S, device=device)
    t = torch.randint(0, args.timesteps, (B,), device=device)
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    size = f"{ddpm.count_parameters(training.net):,} parameters, {S}x{S}, batch {B}"
    print(
        f"bench: {args.model}, {size}, amp {amp}, compile {args.compile}, {where}, torch {torch.__version__}"
    )

    def train(step):
        x_0 = ddpm.get_batch(data, ddpm.batch_indices(len(data), B, step), flip=True)
        ddpm.train_iteration(training, diffusion, x_0, step, model=model)

    def sample(step):
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            ema(x_t, t)

    timed("train", train, args.steps, B, cuda)
    timed("sample", sample, args.steps, B, cuda)
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
