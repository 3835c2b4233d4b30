"""The training options and their rules: :class:`TrainConfig` (defaults, types, which a resumed
run may change, :meth:`TrainConfig.validate`), checked once here for the command line,
``prepare_run`` and the train protocol's form; ``--batch auto`` and the encoder's box.
Torch-free."""
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..base.choices import (ENCODER_PRESETS, LOSSES, LR_SCHEDULES, POSE_INPUT_DEFAULT, POSE_INPUTS,
                            RENDER_ROUTES, workers_problem)
from ..base.errors import NmaemError, fail

__all__ = ["TrainConfig", "is_auto_batch", "encoder_box_for", "ENCODER_BOX_MAX"]


def is_auto_batch(batch: Union[int, str, None]) -> bool:
    """Whether a --batch value means ``auto`` (normstats.auto_batch): None or 'auto'."""
    return batch is None or (isinstance(batch, str) and batch.strip().lower() == "auto")


@dataclass
class TrainConfig:
    """The options of ``nmaem train`` (``None``: the default, or decided from the data)."""
    epochs: int = 200
    batch: Union[int, str] = "auto"     # auto: normstats.auto_batch of the training images
    lr: float = 1e-3
    box: Optional[int] = None
    n_modes: Optional[int] = None
    seed: int = 0
    loss: str = "whitened"
    encoder: str = "paper"
    # the box the encoder's convolutions see (None: encoder_box_for(box), network.Encoder)
    encoder_box: Optional[int] = None
    filters: Optional[Sequence[int]] = None
    hidden: Optional[Sequence[int]] = None
    rmsd_unit: float = 1.0
    bf16: bool = False
    device: Optional[str] = None
    num_workers: int = 0
    keep: int = 3
    lr_schedule: str = "constant"
    # the whitened likelihood (docs/likelihood.md): resolution band (Angstrom; None: all
    # frequencies but zero up to Nyquist) and an optional soft circular mask (radius, A)
    resolution_low: Optional[float] = None
    resolution_high: Optional[float] = None
    mask_radius: Optional[float] = None
    # with the whitened loss: the encoder sees the images whitened by the noise spectrum
    # (network.Encoder, "Input whitening"; docs/likelihood.md)
    whiten_input: bool = True
    # the fit check before a new run (fitcheck.py); force: train even when it fails
    check: bool = True
    force: bool = False
    # pose refinement (docs/training.md, "Pose refinement"): a per-particle rotation
    # correction A R(v) (poses.py), |v| <= max_pose_correction degrees, with a Gaussian prior
    # of sd pose_prior_sd degrees on its angle
    refine_pose: bool = False
    max_pose_correction: float = 5.0
    pose_prior_sd: float = 3.0
    # what the pose head reads: the image features ("image") or the conformation ("z")
    pose_input: str = POSE_INPUT_DEFAULT
    # the renderer (physics.renderer.Renderer): working-memory budget in GiB (None: the device's
    # default, physics.chunks.default_memory_budget) and the structure factor's route
    memory_budget: Optional[float] = None
    renderer: str = "auto"
    # RUN/checkpoints/last.pt also every N minutes within an epoch (None: at epoch ends only)
    checkpoint_minutes: Optional[float] = None

    # settings that a resumed run may change; every other one is fixed by the first start
    RESUMABLE = ("epochs", "batch", "lr", "lr_schedule", "device", "num_workers", "bf16", "keep",
                 "check", "force", "memory_budget", "renderer", "checkpoint_minutes")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_settings(cls, **settings) -> "TrainConfig":
        """Settings as keyword arguments; None means the default; unknown names raise
        TypeError."""
        unknown = set(settings) - set(cls.names())
        if unknown:
            raise TypeError("unknown training settings: %s" % ", ".join(sorted(unknown)))
        return cls(**{k: v for k, v in settings.items() if v is not None})

    def as_dict(self) -> Dict:
        return asdict(self)

    def layout(self) -> Tuple[List[int], List[int]]:
        """(CNN filters, MLP widths) of the encoder: the preset's unless given."""
        if self.encoder not in ENCODER_PRESETS:
            raise NmaemError("unknown encoder %r (choose from %s)"
                             % (self.encoder, ", ".join(ENCODER_PRESETS)))
        preset = ENCODER_PRESETS[self.encoder]
        filters = self.filters or preset["filters"]
        hidden = self.hidden or preset["hidden"]
        return [int(f) for f in filters], [int(h) for h in hidden]

    def problems(self, box0: Optional[int] = None) -> List[Tuple[str, str]]:
        """Every broken rule as (kind, one-line message); kind "box0" marks the rule that
        involves the particle images (box0 px, when known). Empty when all is well."""
        out = []
        if self.box is not None:
            box = int(self.box)
            if box0 is not None and box > box0:
                out.append(("box0", "--box %d is larger than the particle images (%d px)"
                            % (box, box0)))
            if box != box0 and box % 2:
                out.append(("box", "--box must be even (got %d)" % box))
        if self.encoder not in ENCODER_PRESETS:
            out.append(("encoder", "unknown encoder %r (choose from %s)"
                        % (self.encoder, ", ".join(ENCODER_PRESETS))))
        else:
            filters, _ = self.layout()
            box = self.box if self.box is not None else box0
            if box is not None and int(box) >> len(filters) < 1:
                out.append(("box", "--box %d is too small for an encoder of %d pooling blocks "
                                   "(at least %d px)" % (box, len(filters), 2 ** len(filters))))
        if self.encoder_box is not None:
            eb = int(self.encoder_box)
            box = self.box if self.box is not None else box0
            if eb < 2 or eb % 2 or (box is not None and eb > int(box)):
                out.append(("encoder_box", "--encoder-box must be an even number of pixels "
                            "up to the training box%s (got %d)"
                            % (" (%d px)" % int(box) if box is not None else "", eb)))
            elif self.encoder in ENCODER_PRESETS and eb >> len(self.layout()[0]) < 1:
                out.append(("encoder_box", "--encoder-box %d is too small for an encoder of "
                            "%d pooling blocks (at least %d px)"
                            % (eb, len(self.layout()[0]), 2 ** len(self.layout()[0]))))
        for k in ("epochs", "batch"):
            if k == "batch" and is_auto_batch(self.batch):
                continue
            if int(getattr(self, k)) < 1:
                out.append((k, "--%s must be at least 1" % k))
        if not self.lr > 0:
            out.append(("lr", "--lr must be positive"))
        if workers_problem(self.num_workers):
            out.append(("num_workers", workers_problem(self.num_workers)))
        if int(self.keep) < 1:
            out.append(("keep", "--keep must be at least 1: last.pt is a copy of the newest "
                                "epoch checkpoint (got %d)" % int(self.keep)))
        if self.lr_schedule not in LR_SCHEDULES:
            out.append(("lr_schedule", "unknown --lr-schedule %r (choose from %s)"
                        % (self.lr_schedule, ", ".join(LR_SCHEDULES))))
        for k in ("resolution_low", "resolution_high", "mask_radius"):
            v = getattr(self, k)
            if v is not None and not float(v) > 0:
                out.append((k, "--%s must be positive (Angstrom)" % k.replace("_", "-")))
        for k in ("max_pose_correction", "pose_prior_sd"):
            v = getattr(self, k)
            if not (np.isfinite(float(v)) and float(v) > 0):
                out.append((k, "--%s must be a positive number of degrees (got %s)"
                            % (k.replace("_", "-"), v)))
        if self.pose_input not in POSE_INPUTS:
            out.append(("pose_input", "--pose-input must be one of %s (got %r)"
                        % (", ".join(POSE_INPUTS), self.pose_input)))
        elif (self.refine_pose and self.pose_input == "z" and self.n_modes is not None
              and int(self.n_modes) == 0):
            out.append(("pose_input", "--refine-pose with --n-modes 0: a correction computed "
                        "from the conformation needs modes; add --pose-input image"))
        if float(self.max_pose_correction) >= 90:
            out.append(("max_pose_correction", "--max-pose-correction must be below 90 "
                        "degrees: it corrects a consensus pose, it does not search for one "
                        "(got %g)" % float(self.max_pose_correction)))
        if self.loss not in LOSSES:
            out.append(("loss", "unknown loss %r (choose from %s)"
                        % (self.loss, ", ".join(LOSSES))))
        if self.memory_budget is not None and not float(self.memory_budget) > 0:
            out.append(("memory_budget", "--memory-budget must be a positive number of GiB"))
        if self.checkpoint_minutes is not None and not float(self.checkpoint_minutes) > 0:
            out.append(("checkpoint_minutes", "--checkpoint-minutes must be positive"))
        if self.renderer not in RENDER_ROUTES:
            out.append(("renderer", "unknown --renderer %r (choose from %s)"
                        % (self.renderer, ", ".join(RENDER_ROUTES))))
        return out

    def validate(self, box0: Optional[int] = None, particles: Optional[str] = None) -> "TrainConfig":
        """Raise a one-line NmaemError for the first broken rule (:meth:`problems`); the
        image-size rule names the ``particles`` file."""
        for kind, msg in self.problems(box0):
            if kind == "box0" and particles is not None:
                fail(particles, msg)
            raise NmaemError(msg)
        return self


ENCODER_BOX_MAX = 128    # px: the default encoder box is the training box up to this


def encoder_box_for(box: int, encoder_box: Optional[int] = None) -> int:
    """The box the encoder sees (network.Encoder, "Encoder box"): ``encoder_box`` when
    given, else the training box up to ENCODER_BOX_MAX px and ENCODER_BOX_MAX above."""
    if encoder_box is not None:
        return int(encoder_box)
    return int(box) if int(box) <= ENCODER_BOX_MAX else ENCODER_BOX_MAX
