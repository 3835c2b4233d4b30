"""Training and inference speed of the autoencoder, and the share of the machine's matmul rate.

One training step is exactly what ``nmaem train`` does per batch (``core/learn/train.py``):
encoder -> (shift, z), CTF of the batch, decoder X0 + U z rendered with pose, shift and CTF,
l2 loss, backward, Adam step. Adenylate kinase (1,656 atoms), d = 16 (random orthonormal
modes: the speed does not depend on their values), images of random noise, batch 64 by
default, at 64 and 128 px (pixel size 0.8 * 192 / D), with the paper's and the small
encoder. Inference is the encoder alone, eval mode, no gradients.

In the same run the float32 rate of a large ``torch.matmul`` (4096^2) is measured. The
FLOPs of a step are counted two ways:

* encoder: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward (convolutions,
  linear layers; 2 FLOPs per multiply-add);
* decoder: analytically, the renderer's matrix products: per image 2 D^2 M FLOPs forward
  (one (D x M) by (M x D) product over all elements) and 2 more of the same size backward,
  so 6 D^2 M forward + backward (docs/imaging.md). The FlopCounterMode count of the whole
  step is printed too as a check.

The share is (FLOPs per image) x (images/s) / (matmul FLOP/s).

    python bench/train_speed.py [--sizes 64 128] [--encoders paper small] [--batch 64]
                                [--steps 10] [--threads N] [--channels-last] [--profile]
                                [--device cpu|cuda] [--bf16]

On a GPU (``--device cuda``) every timing ends with a synchronisation, the matmul rate is the
device's (float32 without TF32, as the renderer runs), and ``--bf16`` runs the encoder under
bfloat16 autocast as ``nmaem train --bf16`` does (the decoder stays float32).
"""
import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nmaem_plugin import DATA_DIR  # noqa: E402
from nmaem_plugin.core.physics.ctf import CTFParams  # noqa: E402
from nmaem_plugin.core.learn.network import (ENCODER_PRESETS, Decoder, Encoder, image_loss,
                                             z_scale_for)
from nmaem_plugin.core.physics.structure import read_model  # noqa: E402


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n=4096, reps=5, device="cpu", dtype=torch.float32, tf32=False):
    """FLOP/s of the best of ``reps`` (n x n) products (``tf32``: TF32 allowed on CUDA)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        sync(device)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2.0 * n ** 3 / best


def setup(box, encoder, d, batch, model, channels_last=False, seed=0, device="cpu",
          encoder_box=None):
    g = torch.Generator().manual_seed(seed)
    apix = 0.8 * 192 / box
    coords = np.asarray(model.coords, dtype=np.float32)
    M = coords.shape[0]
    centre = coords.mean(0)
    q, _ = torch.linalg.qr(torch.randn(3 * M, d, generator=g, dtype=torch.float64))
    modes = q.T.reshape(d, M, 3).float().numpy()
    dec = Decoder(model.elements, coords, modes, box, apix, centre)
    p = ENCODER_PRESETS[encoder]
    enc = Encoder(box, d, p["filters"], p["hidden"], z_scale=z_scale_for(M),
                  encoder_box=encoder_box,
                  shift_scale=apix)
    if channels_last:
        enc = enc.to(memory_format=torch.channels_last)
    images = torch.randn(batch, box, box, generator=g)
    quat = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    quat = quat / quat.norm(dim=1, keepdim=True)
    w, x, y, z = quat.T
    rot = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1).float()
    ones = torch.ones(batch)
    ctf_params = CTFParams(defocus_u=1e4 * ones, defocus_v=1e4 * ones, defocus_angle=0 * ones,
                           voltage=300 * ones, cs=2.7 * ones, amp_contrast=0.1 * ones,
                           phase_shift=0 * ones, bfactor=0 * ones)
    base = torch.zeros(batch, 2)
    dev = torch.device(device)
    ctf_params = ctf_params.to(dev)
    return (enc.to(dev), dec.to(dev), images.to(dev), rot.to(dev), base.to(dev), ctf_params,
            M)


def make_step(enc, dec, images, rot, base, ctf_params, opt, bf16=False):
    def step():
        if bf16:
            with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
                shift, z = enc(images)
            shift, z = shift.float(), z.float()
        else:
            shift, z = enc(images)
        ctf = dec.ctf(ctf_params)
        rendered = dec(z, rot, base + shift, ctf)
        loss = image_loss(images, rendered, "l2")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def timed(fn, steps, warm=2, device="cpu"):
    for _ in range(warm):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--encoders", nargs="+", default=["paper", "small"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="print the torch.profiler top operators of a training step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encoder-box", type=int,
                    help="the box the encoder sees (nmaem train --encoder-box; default the box)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True (the fastest convolution "
                         "algorithms for these shapes)")
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 autocast for the encoder, as nmaem train --bf16")
    args = ap.parse_args()
    dev = args.device
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = read_model(os.path.join(DATA_DIR, "ak_open_4ake.pdb"))

    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    rate = matmul_rate(device=dev)
    gpu = (", GPU " + torch.cuda.get_device_name(torch.device(dev))
           if torch.device(dev).type == "cuda" else "")
    print("machine: %s%s, %d torch threads, torch %s, load average %s; float32 matmul "
          "(4096^2): %.1f GFLOP/s%s" % (platform.processor() or platform.machine(), gpu,
                                        torch.get_num_threads(), torch.__version__,
                                        " ".join(load), rate / 1e9,
                                        "; encoder in bf16" if args.bf16 else ""), flush=True)
    rows = []
    for box in args.sizes:
        for encname in args.encoders:
            enc, dec, images, rot, base, ctf_params, M = setup(box, encname, args.d, args.batch,
                                                         model, args.channels_last, device=dev,
                                                         encoder_box=args.encoder_box)
            opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
            enc.train()
            step = make_step(enc, dec, images, rot, base, ctf_params, opt, args.bf16)

            def enc_fb():
                with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16,
                                    enabled=args.bf16):
                    shift, z = enc(images)
                (shift.float().sum() + z.float().sum()).backward()
            f_enc = count_flops(enc_fb) / args.batch
            f_step_counted = count_flops(step) / args.batch
            f_dec = 6.0 * box * box * M
            t_train = timed(step, args.steps, device=dev)
            # the parts: encoder fwd+bwd alone, decoder fwd+bwd alone
            t_enc = timed(enc_fb, args.steps, device=dev)
            zz = torch.zeros(args.batch, args.d, requires_grad=True, device=dev)
            ss = torch.zeros(args.batch, 2, requires_grad=True, device=dev)

            def dec_fb():
                r = dec(zz, rot, base + ss, dec.ctf(ctf_params))
                image_loss(images, r).backward()
            t_dec = timed(dec_fb, args.steps, device=dev)
            enc.eval()
            with torch.no_grad(), torch.autocast(device_type=images.device.type,
                                                 dtype=torch.bfloat16, enabled=args.bf16):
                t_inf = timed(lambda: enc(images), args.steps, device=dev)
            ips = args.batch / t_train
            share = (f_enc + f_dec) * ips / rate
            rows.append((box, encname, ips, args.batch / t_inf, f_enc / 1e9, f_dec / 1e9,
                         f_step_counted / 1e9, (f_enc + f_dec) * ips / 1e9, share,
                         t_enc / t_train, t_dec / t_train))
            print("box %d, %s encoder: %.0f train img/s, %.0f infer img/s, share %.0f %%"
                  % (box, encname, ips, args.batch / t_inf, 100 * share), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                enc.train()
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                                 if torch.device(dev).type == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(3):
                        step()
                print("profile: box %d, %s encoder, 3 steps" % (box, encname))
                key = ("self_cuda_time_total" if torch.device(dev).type == "cuda"
                       else "self_cpu_time_total")
                if torch.device(dev).type == "cuda":
                    torch.cuda.synchronize(dev)
                print(prof.key_averages().table(sort_by=key, row_limit=20,
                                                max_name_column_width=60))

    print()
    print("| box | encoder | train img/s | infer img/s | encoder GFLOP/img (fwd+bwd) "
          "| decoder GFLOP/img (fwd+bwd) | counted GFLOP/img (whole step) | achieved GFLOP/s "
          "| share of matmul rate | encoder / decoder time share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %s | %.0f | %.0f | %.3f | %.3f | %.3f | %.1f | %.0f %% | %.0f %% / %.0f %% |"
              % (r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], 100 * r[8], 100 * r[9],
                 100 * r[10]))
    with open("/proc/loadavg") as fh:
        print("load average after: %s" % " ".join(fh.read().split()[:3]))


if __name__ == "__main__":
    main()
