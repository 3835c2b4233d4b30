"""``nmaem train``: prepare a run and train the autoencoder (one process, or torchrun for
several GPUs)."""
import argparse
from typing import Any

from ..base.choices import (ENCODERS, LOSSES, LR_SCHEDULES, POSE_INPUT_DEFAULT, POSE_INPUTS,
                            RENDER_ROUTES)
from ..base.errors import NmaemError

__all__ = ["add_parser", "run"]


def _int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, got %r" % text)


def _batch_arg(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected an integer or auto, got %r" % text)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train the autoencoder (encoder + physics decoder)",
        description="Train the encoder that maps each particle image to a 2D shift and "
                    "normal-mode amplitudes, through the physics decoder (X0 + U z rendered "
                    "with the particle's pose and CTF). Writes the run folder -o "
                    "(config.json, checkpoints/, log.csv; see "
                    "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md).")
    p.add_argument("--particles", metavar="P.star",
                   help="RELION STAR or cryoSPARC .cs with poses, CTF and images")
    p.add_argument("--ref", metavar="A.pdb", help="reference model X0, docked in the map")
    p.add_argument("--modes", metavar="modes.npz", help="normal modes of --ref (nmaem modes)")
    p.add_argument("-o", "--output", required=True, metavar="RUN", help="run folder")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 200)")
    p.add_argument("--batch", type=_batch_arg, default=None, metavar="B|auto",
                   help="images per optimisation step, over all processes (default auto: "
                        "min(256, max(16, training images // 64)), at least 64 steps per "
                        "epoch on small datasets; the paper's is 256)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--box", type=int, default=None,
                   help="train on images Fourier-cropped to this box (default: no cropping)")
    p.add_argument("--n-modes", type=int, default=None,
                   help="use the first N modes of --modes (default all; 0: shift only)")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="whitened (default: Gaussian likelihood with the particles' own noise "
                        "spectrum, per-particle scale and offset solved; real data), l2 (the "
                        "paper's; images in the renderer's units) or corr (1 - correlation); "
                        "see "
                        "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/likelihood.md")
    p.add_argument("--resolution-low", type=float, default=None, metavar="A",
                   help="whitened loss: ignore frequencies coarser than this (default: all "
                        "but zero)")
    p.add_argument("--resolution-high", type=float, default=None, metavar="A",
                   help="whitened loss: ignore frequencies finer than this (default: Nyquist "
                        "of the training box)")
    p.add_argument("--mask-radius", type=float, default=None, metavar="A",
                   help="whitened loss: soft circular mask on images and renderings against "
                        "neighbouring particles (default none)")
    p.add_argument("--no-check", dest="check", action="store_false", default=None,
                   help="skip the fit check of the reference against the particles")
    p.add_argument("--force", action="store_true", default=None,
                   help="train even when the fit check says the reference does not explain "
                        "the particles")
    p.add_argument("--encoder", choices=ENCODERS, default=None,
                   help="encoder size: paper (filters 32..512, MLP 512, 256) or small "
                        "(default paper)")
    p.add_argument("--encoder-box", type=int, default=None, metavar="PX",
                   help="the box (even, px) the encoder sees, the images Fourier-cropped to it "
                        "(default: the training box up to 128 px, 128 px above; the decoder "
                        "and the loss use the whole training box)")
    p.add_argument("--filters", type=_int_list, default=None, metavar="F1,F2,...",
                   help="override the encoder's convolution filters (one block each)")
    p.add_argument("--hidden", type=_int_list, default=None, metavar="H1,H2",
                   help="override the MLP hidden sizes")
    p.add_argument("--rmsd-unit", type=float, default=None,
                   help="RMSD (A) of one unit of network output along a mode (default 1)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="constant learning rate (default, as in the paper) or cosine decay "
                        "from --lr to 0 over --epochs")
    p.add_argument("--no-whiten-input", dest="whiten_input", action="store_false",
                   default=None,
                   help="with the whitened loss, give the encoder the images as they are "
                        "instead of whitened by the estimated noise spectrum")
    p.add_argument("--refine-pose", action="store_true", default=None,
                   help="also learn a small rotation per particle that corrects the file's "
                        "pose (written by nmaem infer; see "
                        "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md)")
    p.add_argument("--max-pose-correction", type=float, default=None, metavar="DEG",
                   help="--refine-pose: the largest correction angle (default 5 degrees)")
    p.add_argument("--pose-prior-sd", type=float, default=None, metavar="DEG",
                   help="--refine-pose: sd of the Gaussian prior on the correction angle "
                        "(default 3 degrees)")
    p.add_argument("--pose-input", choices=POSE_INPUTS, default=None,
                   help="--refine-pose: the correction is computed from the image or from "
                        "the conformation z (a consensus refinement's misalignment depends "
                        "on the conformation; default %s; see "
                        "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/training.md)"
                        % POSE_INPUT_DEFAULT)
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when "
                                                  "present)")
    p.add_argument("--gpus", type=_int_list, default=None, metavar="0,1,...",
                   help="train on these GPUs with DistributedDataParallel (torchrun)")
    p.add_argument("--nproc", type=int, default=None,
                   help="number of DDP processes (default: one per --gpus entry; with "
                        "--device cpu, gloo processes)")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bfloat16 autocast for the encoder (GPU)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes that read images (default 0)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="working memory of the renderer in GiB: atoms and images are "
                        "rendered in chunks that fit (default: a quarter of the free RAM, "
                        "half of the free GPU memory)")
    p.add_argument("--renderer", choices=RENDER_ROUTES, default=None,
                   help="structure factor: auto (default: the faster for the model, box and "
                        "device), gemm (cos/sin matrix products, exact) or nufft (FINUFFT, "
                        "CPU, optional: pip install finufft); see "
                        "https://github.com/scipion-em/scipion-em-nmaem/blob/main/docs/imaging.md")
    p.add_argument("--checkpoint-minutes", type=float, default=None, metavar="MIN",
                   help="also write RUN/checkpoints/last.pt every MIN minutes within an epoch "
                        "(long epochs; --resume continues from that batch; one process)")
    p.add_argument("--keep", type=int, default=None,
                   help="per-epoch checkpoints kept besides last.pt (default 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in -o from its last checkpoint")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from ..learn.distributed import launch_distributed
    from ..io.runfolder import run_lock
    from ..learn.prepare import prepare_run
    from ..learn.train import train_run
    if args.worker:                       # one torchrun process: the run is prepared
        rank = int(os.environ.get("RANK", "0"))
        try:
            train_run(args.output)
        except NmaemError:
            if rank != 0:
                return 2
            raise
        return 0
    nproc = args.nproc or (len(args.gpus) if args.gpus else 1)
    _warn_inert(args, nproc)
    if args.gpus and args.device is None:
        # one process: that GPU; several: CUDA_VISIBLE_DEVICES + one process per GPU
        args.device = "cuda:%d" % args.gpus[0] if nproc == 1 else "cuda"
    with run_lock(args.output):           # one run, one writer (torchrun workers: no lock)
        _prepare_and_train(args, nproc, prepare_run, train_run, launch_distributed)
    return 0


def _prepare_and_train(args, nproc, prepare_run, train_run, launch_distributed):
    prepare_run(args.output, args.particles, args.ref, args.modes, resume=args.resume,
                epochs=args.epochs, batch=args.batch, lr=args.lr, box=args.box,
                n_modes=args.n_modes, loss=args.loss, encoder=args.encoder,
                encoder_box=args.encoder_box, filters=args.filters,
                hidden=args.hidden, rmsd_unit=args.rmsd_unit, seed=args.seed,
                device=args.device, bf16=args.bf16, num_workers=args.num_workers,
                keep=args.keep, lr_schedule=args.lr_schedule,
                memory_budget=args.memory_budget, renderer=args.renderer,
                checkpoint_minutes=args.checkpoint_minutes,
                resolution_low=args.resolution_low, resolution_high=args.resolution_high,
                mask_radius=args.mask_radius, check=args.check, force=args.force,
                whiten_input=args.whiten_input, refine_pose=args.refine_pose,
                max_pose_correction=args.max_pose_correction, pose_prior_sd=args.pose_prior_sd,
                pose_input=args.pose_input)
    if nproc > 1:
        launch_distributed(args.output, nproc, gpus=args.gpus)
    else:
        train_run(args.output)


def _warn_inert(args, nproc):
    """The options that do nothing with the run's loss, pose refinement or fit check: one
    warning line each (on --resume, the run's own settings decide)."""
    from ..io.runfolder import read_config_or_none
    from .options import warn_inert
    cfg = (read_config_or_none(args.output) or {}) if args.resume else {}
    loss = args.loss or cfg.get("loss") or "whitened"
    refine_pose = bool(args.refine_pose or cfg.get("refine_pose"))
    whitened = "with --loss %s (it applies to the whitened likelihood)" % loss
    warn_inert(args, [(k, loss == "whitened", whitened) for k in (
        "mask_radius", "resolution_low", "resolution_high", "whiten_input")]
        + [(k, refine_pose, "without --refine-pose") for k in (
            "max_pose_correction", "pose_prior_sd", "pose_input")]
        + [("force", args.check is not False and not args.resume,
            "with --no-check or --resume (it trains despite a failed fit check of a new run)"),
           ("checkpoint_minutes", nproc == 1,
            "with several processes (mid-epoch checkpoints need one process)")])
