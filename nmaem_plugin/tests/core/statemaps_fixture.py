"""Simulated datasets for the state-map tests (not a test module): adenylate kinase open
(4AKE) and closed (1AKE) particles rendered by ``sim.simulate`` (small boxes, a few hundred
particles), and a hand-made training run folder whose one mode goes from the open to the
closed model, so that z = 0 is the open state and z = |closed - open| the closed one exactly
(no training: the states' models are known without the network)."""
import json
import os

import numpy as np

from nmaem_plugin import DATA_DIR
from nmaem_plugin.core.modes.modesfile import NormalModes, save_modes
from nmaem_plugin.core.physics.structure import read_model, write_model
from nmaem_plugin.core.sim.simulate import SimulationSettings, morph_frames, simulate

OPEN = os.path.join(DATA_DIR, "ak_open_4ake.pdb")
CLOSED = os.path.join(DATA_DIR, "ak_closed_1ake.pdb")


def quiet(*_):
    pass


def two_states(out, n=300, box=48, apix=2.5, snr_db=-10.0, seed=5, shift_std=1.5):
    """(model, frames (2, M, 3) in the dataset's frame, ground-truth frame per particle):
    ``out/particles.star`` of open and closed particles, half each (uniform over 2 frames)."""
    model, frames = morph_frames(read_model(OPEN), read_model(CLOSED), 2)
    settings = SimulationSettings(n=n, box=box, apix=apix, snr_db=snr_db, shift_std=shift_std,
                                  seed=seed)
    simulate(out, model, frames, settings, device="cpu", log=quiet)
    truth = np.load(os.path.join(out, "ground_truth.npz"))
    placed = read_model(os.path.join(out, "frames.pdb"), model=0)
    closed = read_model(os.path.join(out, "frames.pdb"), model=1)
    return placed, np.stack([placed.coords, closed.coords]), truth["frame"]


def open_closed_run(run_dir, model, frames):
    """A run folder (config.json, reference.pdb, modes.npz) with one mode along closed -
    open; returns the amplitude of the closed state."""
    os.makedirs(run_dir, exist_ok=True)
    write_model(os.path.join(run_dir, "reference.pdb"), model, frames[0])
    ref = read_model(os.path.join(run_dir, "reference.pdb"))
    step = frames[1] - frames[0]
    amp = float(np.linalg.norm(step))
    save_modes(os.path.join(run_dir, "modes.npz"),
               NormalModes(coords=ref.coords.astype(np.float32),
                           modes=(step / amp)[None].astype(np.float32),
                           eigenvalues=np.ones(1), atom_ids=ref.atom_ids))
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(dict(reference="reference.pdb", modes="modes.npz", n_modes=1,
                       n_atoms=int(ref.n_atoms)), fh)
    return amp
