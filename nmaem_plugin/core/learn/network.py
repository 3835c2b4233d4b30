"""The autoencoder of Nashed et al. (2022): a CNN encoder and a physics decoder.

Encoder (``Encoder``)
    Each particle image (B, D, D) is first normalised on its own (zero mean, unit standard
    deviation over its pixels: real and simulated datasets then look alike to the network,
    whatever their grey scale). A VGG-style trunk follows: ``len(filters)`` blocks of
    [3x3 convolution, batch norm, ReLU] x 2 and a 2x average pooling; the paper's filters
    are 32, 64, 128, 256, 512 (``ENCODER_PRESETS['paper']``). The feature map is flattened
    (``filters[-1] * (D >> len(filters))**2`` numbers) and fed to two MLPs with hidden
    sizes (512, 256) and ReLU: the *shift* head outputs 2 numbers, the *conformation* head
    d numbers (no conformation head when d = 0).

Output scaling (so that the raw network outputs are O(1) numbers and an untrained network
starts at the reference):
    * ``z = z_scale * out_z`` with ``z_scale = rmsd_unit * sqrt(M)``: one unit of network
      output along a mode is a deformation of RMSD ``rmsd_unit`` (default 1 Angstrom), since
      for orthonormal modes RMSD(X(z), X0) = |z| / sqrt(M). z itself is in Angstrom, the
      unit of ``modes.npz``.
    * ``shift = shift_scale * out_t``, ``shift_scale`` = the training pixel size by default
      (one unit = one pixel), in Angstrom.
    * The last layer of each head starts with weights 1e-3 times PyTorch's default and a
      zero bias, so an untrained network gives |z|/sqrt(M) and |shift| of the order of
      1e-3 Angstrom: the first renderings are the reference model at the known pose.

Decoder (``Decoder``)
    X(z) = X0 + sum_l z_l U_l, rendered by :class:`physics.renderer.Renderer` with the particle's
    rotation (RELION matrix of its pose), a shift of ``-origin + predicted shift + offset``
    (Angstrom; ``offset`` is zero unless an odd original box was Fourier-cropped, see
    ``train.py``) and its CTF. The rotation centre is the consensus-map centre
    (D0//2)*apix0 of the *original* particles, whatever the training box.

Encoder box (``encoder_box``, ``nmaem train --encoder-box``)
    The trunk may see the images Fourier-cropped to a smaller even box than the training
    box (after the whitening filter, which is defined on the training box). The default
    (``trainconfig.encoder_box_for``) is the training box up to 128 px and 128 px above:
    the conformations of domain motions live at low resolution, the convolutions' cost
    grows with the box squared (a small encoder took 4x longer per image at 256 px than
    at 128 px on the CPU), and the decoder and the loss still use the whole training box.
    Runs made before the option have no ``encoder_box``: the training box.

Input whitening (``input_filter``, ``nmaem train`` with the whitened loss, the default)
    The encoder sees each image filtered by 1 / sqrt(sigma2(k)), the inverse square root of
    the noise power spectrum estimated from the particles (``noise.whitening_filter``),
    with the zero frequency removed, before the per-image normalisation: its noise is then
    white whatever the detector, ice and processing made it, as the likelihood sees it.
    The filter is a buffer of the encoder (it travels with the checkpoints, so ``nmaem
    infer`` applies the same one). Runs without it (other losses, ``--no-whiten-input``,
    earlier versions) see the images as they are.

Pose correction (``pose_max`` > 0, ``nmaem train --refine-pose``)
    A third MLP head (same hidden sizes) outputs u (B, 3); the correction is the rotation
    vector v = pose_max tanh(|u|) u / |u| (radians): its angle |v| = pose_max tanh(|u|) is
    bounded by ``pose_max`` and v ~ pose_max u for small u. The head's last layer starts
    at exactly zero (weights and bias), so an untrained network gives v = 0 and renders
    with the file's rotation bit for bit. The decoder renders with A R(v) (the composition
    is documented in ``poses.py``). Without the option there is no such head, and the
    encoder's outputs and state dict are those of earlier versions.
    With ``pose_input="z"`` (the default, ``--pose-input z``) the head reads the z head's
    raw output (B, d) instead of the image features: the correction is a function of the
    conformation, as a consensus refinement's misalignment is (it aligned one domain),
    and cannot follow the noise of single images. ``pose_input="image"`` reads the image
    features (the first version; runs made before the option load that way).

Shift convention: the predicted shift t is the displacement of the particle centre
relative to where the file's origin puts it (a residual); the refined origin is
``origin - t`` (RELION: the particle centre sits at image centre - origin).

Loss (``image_loss``)
    ``l2``: mean over images and pixels of (Y - Y_hat)^2, the paper's loss; it assumes the
    images are in the renderer's units (true for ``nmaem simulate``). ``corr``: 1 - the
    Pearson correlation of each image with its rendering, averaged: invariant to the grey
    scale and offset of real data.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..base.choices import ENCODER_PRESETS, LOSSES, POSE_INPUT_DEFAULT, POSE_INPUTS
from ..physics.renderer import Renderer
from ..physics.rotations import correct_rotations
from ..physics.fourier import fourier_crop

__all__ = ["ENCODER_PRESETS", "normalise_images", "Encoder", "Decoder", "AutoEncoder",
           "image_loss", "LOSSES", "split_outputs", "pose_penalty", "whiten_images"]

LAST_LAYER_GAIN = 1e-3
# forward-difference steps of Decoder.render_ft_jacobian on the NUFFT route: Angstrom RMSD
# along a mode, and Angstrom of shift (small against an atom's width, large against float32
# rounding)
FD_RMSD = 0.02
FD_SHIFT = 0.05
FD_ANGLE = 1e-3           # radians, the rotation's forward difference on the NUFFT route


def normalise_images(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each image (B, D, D) to zero mean and unit standard deviation over its pixels."""
    flat = images.reshape(images.shape[0], -1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False)
    return (images - mean[:, None, None]) / (std[:, None, None] + eps)


def whiten_images(images: torch.Tensor, input_filter: torch.Tensor) -> torch.Tensor:
    """Images (B, D, D) filtered by ``input_filter`` (D, D//2+1) on their rfft2 grid: with
    :func:`noise.whitening_filter` their noise becomes white (Encoder, "Input whitening")."""
    return fourier_crop(images, images.shape[-1], input_filter)


def _vgg_block(c_in, c_out):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.AvgPool2d(2))


def _mlp(n_in, hidden, n_out, gain=LAST_LAYER_GAIN):
    layers = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU(inplace=True)]
        n_in = h
    last = nn.Linear(n_in, n_out)
    with torch.no_grad():
        last.weight.mul_(gain)
        last.bias.zero_()
    layers.append(last)
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Image (B, D, D) -> (shift (B, 2) Angstrom, z (B, d) Angstrom), and with a pose head
    (``pose_max`` radians > 0) a third output, the pose correction v (B, 3) radians; see
    the module doc (:func:`split_outputs` reads either form)."""

    def __init__(self, box: int, n_modes: int, filters: Sequence[int] = (32, 64, 128, 256, 512),
                 hidden: Sequence[int] = (512, 256), z_scale: float = 1.0,
                 shift_scale: float = 1.0, pose_max: float = 0.0,
                 input_filter: Optional[torch.Tensor] = None,
                 encoder_box: Optional[int] = None,
                 pose_input: str = POSE_INPUT_DEFAULT) -> None:
        super().__init__()
        box, n_modes = int(box), int(n_modes)
        work = box if encoder_box is None else int(encoder_box)
        filters, hidden = [int(f) for f in filters], [int(h) for h in hidden]
        if not filters:
            raise ValueError("the encoder needs at least one convolution block")
        if work > box or (work != box and work % 2):
            raise ValueError("the encoder's box must be even and at most the images' %d px "
                             "(got %d)" % (box, work))
        if work >> len(filters) < 1:
            raise ValueError("a %d px box is too small for %d pooling blocks (at least %d px)"
                             % (work, len(filters), 2 ** len(filters)))
        # box: the images given (the training box); encoder_box: what the trunk sees
        self.box, self.encoder_box, self.n_modes = box, work, n_modes
        blocks, c = [], 1
        for f in filters:
            blocks.append(_vgg_block(c, f))
            c = f
        self.trunk = nn.Sequential(*blocks)
        self.n_features = c * (work >> len(filters)) ** 2
        self.shift_head = _mlp(self.n_features, hidden, 2)
        self.z_head = _mlp(self.n_features, hidden, n_modes) if n_modes > 0 else None
        self.register_buffer("z_scale", torch.tensor(float(z_scale)))
        self.register_buffer("shift_scale", torch.tensor(float(shift_scale)))
        f = None                           # (D, D//2+1): the noise-whitening filter
        if input_filter is not None:
            f = torch.as_tensor(input_filter, dtype=torch.float32)
            if tuple(f.shape) != (box, box // 2 + 1):
                raise ValueError("input filter of shape %s for a %d px box"
                                 % (tuple(f.shape), box))
        self.register_buffer("input_filter", f)   # None: not in the state dict
        self.pose_head = None
        if pose_input not in POSE_INPUTS:
            raise ValueError("pose_input must be one of %s (got %r)"
                             % (", ".join(POSE_INPUTS), pose_input))
        if pose_input == "z" and float(pose_max) > 0 and n_modes < 1:
            raise ValueError("a pose correction from z needs at least one mode")
        self.pose_input = pose_input
        if float(pose_max) > 0:
            n_in = n_modes if pose_input == "z" else self.n_features
            self.pose_head = _mlp(n_in, hidden, 3, gain=0.0)
            self.register_buffer("pose_max", torch.tensor(float(pose_max)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # whitening filter and crop to the encoder box: one pair of FFTs
        images = fourier_crop(images, self.encoder_box, self.input_filter)
        x = normalise_images(images)[:, None]
        return torch.flatten(self.trunk(x), 1)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        h = self.features(images)
        shift = self.shift_head(h).float() * self.shift_scale
        if self.z_head is None:
            z_raw = shift.new_zeros(shift.shape[0], 0)
        else:
            z_raw = self.z_head(h).float()
        z = z_raw * self.z_scale
        if self.pose_head is None:
            return shift, z
        u = self.pose_head(z_raw if self.pose_input == "z" else h).float()
        r = torch.sqrt((u * u).sum(1, keepdim=True) + 1e-12)
        return shift, z, u * (self.pose_max * torch.tanh(r) / r)


def split_outputs(out: Sequence[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(shift, z, pose correction or None) from an encoder's outputs."""
    return out[0], out[1], (out[2] if len(out) > 2 else None)


def pose_penalty(rotvec: torch.Tensor, prior_sd: float) -> torch.Tensor:
    """theta^2 / prior_sd^2 per image (B,): -2 log of the Gaussian prior on the angle
    theta = |v| of the pose correction (``prior_sd`` radians), up to a constant; it is
    added to the chi2 of the image (docs/training.md, "Pose refinement")."""
    return (rotvec.float() ** 2).sum(1) / float(prior_sd) ** 2


class Decoder(nn.Module):
    """(z, rotations, shifts, ctf) -> images: X0 + U z rendered by :class:`Renderer`.

    ``coords`` (M, 3) and ``modes`` (d, M, 3) Angstrom (``modes.npz``), ``elements`` (M,);
    ``centre`` (3,) the rotation centre in the model frame; ``offset`` (2,) Angstrom added to
    every shift. No trainable parameters; the renderer is built for each device used, with
    ``memory_budget`` (bytes; None: the device's default) and ``route`` (``Renderer``).
    """

    def __init__(self, elements: Sequence[str], coords: np.ndarray, modes: np.ndarray, box: int,
                 apix: float, centre: Sequence[float], offset: Sequence[float] = (0.0, 0.0),
                 memory_budget: Optional[int] = None, route: str = "auto"):
        super().__init__()
        self.elements = np.asarray(elements).astype(str)
        self.box, self.apix = int(box), float(apix)
        self.centre = [float(c) for c in np.asarray(centre, dtype=np.float64).reshape(3)]
        coords = torch.as_tensor(np.asarray(coords, dtype=np.float32))
        modes = torch.as_tensor(np.asarray(modes, dtype=np.float32)).reshape(-1, *coords.shape)
        self.register_buffer("coords", coords, persistent=False)
        self.register_buffer("modes", modes, persistent=False)
        self.register_buffer("offset", torch.as_tensor(np.asarray(offset, np.float32)),
                             persistent=False)
        self.memory_budget, self.route = memory_budget, route
        self._renderers = {}

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    def renderer(self, device: Union[str, torch.device, None] = None) -> Renderer:
        device = torch.device(self.coords.device if device is None else device)
        key = str(device)
        if key not in self._renderers:
            self._renderers[key] = Renderer(self.elements, self.box, self.apix,
                                            centre=self.centre, device=device,
                                            memory_budget=self.memory_budget,
                                            route=self.route)
        return self._renderers[key]

    def ctf(self, *args, **kwargs) -> torch.Tensor:
        """CTF (B, D, K) on the decoder's grid: a :class:`physics.ctf.CTFParams` of per-image
        tensors, or its fields as arguments (``Renderer.ctf``)."""
        return self.renderer().ctf(*args, **kwargs)

    def conformations(self, z: torch.Tensor) -> torch.Tensor:
        """X(z) = X0 + sum_l z_l U_l, (B, M, 3); z (B, d) (d may be 0)."""
        if self.n_modes == 0:
            return self.coords.expand(z.shape[0], *self.coords.shape)
        return self.coords + torch.einsum("bd,dmk->bmk", z.float(), self.modes)

    @staticmethod
    def rotations(rotations: torch.Tensor, rotvec: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rotations rendered: the file's, or A R(v) with a pose correction v."""
        rotations = rotations.float()
        if rotvec is None:
            return rotations
        return correct_rotations(rotations, rotvec.float())

    def forward(self, z: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor,
                ctf: Optional[torch.Tensor] = None,
                rotvec: Optional[torch.Tensor] = None) -> torch.Tensor:
        r = self.renderer()
        return r.render(self.conformations(z), self.rotations(rotations, rotvec),
                        shifts.float() + self.offset, ctf)

    def render_ft(self, z: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor,
                  ctf: Optional[torch.Tensor] = None,
                  rotvec: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rfft2 of :meth:`forward`'s images, (B, D, D//2+1) (for the whitened loss)."""
        r = self.renderer()
        return r.render_ft(self.conformations(z), self.rotations(rotations, rotvec),
                           shifts.float() + self.offset, ctf)


    def render_ft_jacobian(self, z: torch.Tensor, rotations: torch.Tensor,
                           shifts: torch.Tensor, ctf: Optional[torch.Tensor] = None,
                           rotvec: Optional[torch.Tensor] = None, rotation: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(F, J): :meth:`render_ft` (B, D, K) and its derivatives with respect to the d
        amplitudes (per Angstrom of z) and the 2 shift components x, y (per Angstrom),
        (d + 2, B, D, K); with ``rotation``, then also with respect to a small rotation of
        the model about its x, y and z axes applied last (the rendered rotation
        A R(v) R(w), per radian of w at w = 0), (d + 5, B, D, K). No gradients.

        On the matrix-product route the derivatives are exact
        (:meth:`physics.renderer.Renderer.render_ft_jvp` with the modes as tangents, and for the
        rotation the tangents e_k x (X(z) - centre), rotated by the rotations rendered, pose
        correction included). On the NUFFT route they are forward differences of
        ``FD_RMSD`` Angstrom RMSD along each mode (``FD_RMSD * sqrt(M)`` in z, the modes
        being orthonormal), ``FD_SHIFT`` Angstrom along each axis and ``FD_ANGLE`` radians
        about each axis, all rendered in one batch of (P + 1) B images."""
        r = self.renderer()
        if r.chunks(z.shape[0]).route == "nufft":
            return self._render_ft_differences(z, rotations, shifts, ctf, rotvec, rotation)
        X = self.conformations(z)
        A = self.rotations(rotations, rotvec)
        if not rotation:
            return r.render_ft_jvp(X, A, shifts.float() + self.offset, ctf, self.modes)
        B, d = z.shape[0], self.n_modes
        rel = X - X.new_tensor(self.centre)
        o = torch.zeros_like(rel[..., 0])
        x, y, w = rel.unbind(-1)
        # e_k x r for the model's axes k = x, y, z
        turns = torch.stack([torch.stack([o, -w, y], -1), torch.stack([w, o, -x], -1),
                             torch.stack([-y, x, o], -1)])                 # (3, B, M, 3)
        tangents = torch.cat([self.modes[:, None].expand(d, B, *self.modes.shape[1:]),
                              turns], 0)
        F, J = r.render_ft_jvp(X, A, shifts.float() + self.offset, ctf, tangents)
        return F, torch.cat([J[:d], J[d + 3:], J[d:d + 3]], 0)

    def _render_ft_differences(self, z: torch.Tensor, rotations: torch.Tensor,
                               shifts: torch.Tensor, ctf: Optional[torch.Tensor] = None,
                               rotvec: Optional[torch.Tensor] = None, rotation: bool = False
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`render_ft_jacobian` by forward differences (its docstring)."""
        B, d = z.shape[0], self.n_modes
        n_rot = 3 if rotation else 0
        P = d + 2 + n_rot
        step = torch.cat([torch.full((d,), FD_RMSD * math.sqrt(self.coords.shape[0])),
                          torch.full((2,), FD_SHIFT), torch.full((n_rot,), FD_ANGLE)]
                         ).to(z.device)
        p = torch.cat([z.float(), shifts.float(), z.new_zeros(B, n_rot)], 1)
        eye = torch.eye(P, device=z.device)
        ps = torch.cat([p] + [p + step[k] * eye[k] for k in range(P)], 0)
        rep = P + 1
        A = self.rotations(rotations, rotvec).repeat(rep, 1, 1)
        if rotation:
            A = correct_rotations(A, ps[:, d + 2:])
        with torch.no_grad():
            S = self.render_ft(ps[:, :d], A, ps[:, d:d + 2],
                               None if ctf is None else ctf.repeat(rep, 1, 1))
        S = S.reshape(rep, B, *S.shape[1:])
        return S[0], (S[1:] - S[0]) / step[:, None, None, None].to(S.real.dtype)


class AutoEncoder(nn.Module):
    """Encoder + decoder. ``forward(images, rotations, base_shift, ctf)`` returns
    (rendered images, predicted shift, z); ``base_shift`` = -origin (Angstrom)."""

    def __init__(self, encoder: "Encoder", decoder: Decoder):
        super().__init__()
        if encoder.n_modes != decoder.n_modes:
            raise ValueError("encoder has %d modes, decoder %d"
                             % (encoder.n_modes, decoder.n_modes))
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor, rotations: torch.Tensor, base_shift: torch.Tensor,
                ctf: Optional[torch.Tensor] = None, encoder: Optional[nn.Module] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder if encoder is None else encoder
        shift, z, rotvec = split_outputs(enc(images))
        rendered = self.decoder(z, rotations, base_shift + shift, ctf, rotvec=rotvec)
        return rendered, shift, z


def image_loss(images: torch.Tensor, rendered: torch.Tensor, kind: str = "l2",
               penalty: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean loss over the batch (a 0-d tensor); see the module docstring for ``kind``.

    ``penalty`` (B,): a prior's -2 log density per image (:func:`pose_penalty`), added on
    the scale of the loss: chi2 / (number of pixels P) with the noise variance estimated
    by the batch's mean squared residual for ``l2``, penalty / P for ``corr``.
    """
    y = images.reshape(images.shape[0], -1).float()
    r = rendered.reshape(rendered.shape[0], -1).float()
    extra = 0.0
    if kind == "l2":
        loss = ((y - r) ** 2).mean()
        if penalty is not None:
            extra = (penalty * loss.detach()).mean() / y.shape[1]
        return loss + extra
    if kind == "corr":
        y = y - y.mean(dim=1, keepdim=True)
        r = r - r.mean(dim=1, keepdim=True)
        c = (y * r).sum(1) / (y.norm(dim=1) * r.norm(dim=1) + 1e-12)
        if penalty is not None:
            extra = penalty.mean() / y.shape[1]
        return (1.0 - c).mean() + extra
    raise ValueError("unknown loss %r (choose from %s)" % (kind, ", ".join(LOSSES)))


def z_scale_for(n_atoms: int, rmsd_unit: float = 1.0) -> float:
    """The z scale that makes one unit of network output a deformation of RMSD ``rmsd_unit``."""
    return float(rmsd_unit) * math.sqrt(int(n_atoms))
