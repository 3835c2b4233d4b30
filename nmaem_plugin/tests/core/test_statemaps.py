"""State maps (``nmaem states --reconstruct``) with the real RELION, and what they rest on.

* the model's 3D map (``physics/density.py``) against the 2D renderer (its projection along
  z is the renderer's image at the identity pose) and against an independent float64
  real-space sum of the 5-Gaussian form factors;
* the FSC against RELION's own (``relion_image_handler --fsc``), its resolution on a
  hand-made curve, the band-limited correlation against a real-space Pearson correlation;
* RELION's origin convention: a model shifted by a known vector gives a map shifted by it;
* on a simulated homogeneous set the half-map (0.143) and map-model (0.5) resolutions agree
  with the resolution the images allow: the FSC at 0.5 between the map of the noisy images
  and the map of the same particles rendered without noise (Rosenthal & Henderson 2003:
  the half-map 0.143 threshold marks where the full map's correlation with the truth is
  0.5), for white and for coloured noise;
* two simulated states (adenylate kinase open and closed): the states x models table has
  its maxima on the diagonal;
* the subsets that keep the input (a real RELION file's extra columns and blocks, a .cs
  read back by cryosparc-tools), and the bad inputs of the issue.

The tests that need RELION say so (``needs RELION``) and are skipped only where it is not
installed (CI installs the Debian package, ``.ci/run``).
"""
import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch

from nmaem_plugin.core.analysis import fsc as F
from nmaem_plugin.core.analysis.statemaps import state_maps
from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.base.relion import find_relion, relion_program, run_relion
from nmaem_plugin.core.cli.main import main
from nmaem_plugin.core.io.latent import write_latent
from nmaem_plugin.core.io.maps import read_map, write_map
from nmaem_plugin.core.io.particles import read_particles
from nmaem_plugin.core.io.star import read_star_blocks, write_star
from nmaem_plugin.core.io.subsets import write_cs_subset, write_star_subset
from nmaem_plugin.core.physics.density import model_map
from nmaem_plugin.core.physics.renderer import Renderer
from nmaem_plugin.core.physics.structure import read_model
from nmaem_plugin.core.sim.nuisances import Nuisances
from nmaem_plugin.core.sim.simulate import SimulationSettings, simulate
from nmaem_plugin.tests.core.statemaps_fixture import (OPEN, open_closed_run, quiet,
                                                       two_states)

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
HAVE_RELION = find_relion("relion_reconstruct") is not None
NEEDS_RELION = ("needs RELION (relion_reconstruct): apt-get install relion, or set "
                "RELION_HOME")


def _cli(*argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue(), out.getvalue()


def _one_error_line(case, err):
    """The one ``nmaem: error:`` line of ``err`` (no traceback); the test latents carry no
    fingerprints, so warnings that their particles and run cannot be checked may come
    before it."""
    case.assertNotIn("Traceback", err)
    lines = [ln for ln in err.strip().splitlines()
             if not ln.startswith("nmaem: warning: ")]
    case.assertEqual(len(lines), 1, err)
    case.assertTrue(lines[0].startswith("nmaem: error: "), err)
    return lines[0]


class _Tmp(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-maps-")
        self.addCleanup(shutil.rmtree, self.tmp, True)


class TestModelMap(unittest.TestCase):
    def test_projection_is_the_renderers_image(self):
        """Projection along z of the 3D map (apix * sum over z) = the renderer's image of
        the same model at the identity pose, no CTF (the central-slice theorem)."""
        m = read_model(OPEN)
        D, apix = 48, 2.0
        X = m.coords - m.coords.mean(0) + (D // 2) * apix + np.array([1.3, -2.1, 0.7])
        V = model_map(X, m.elements, D, apix, dtype=np.float64)
        r = Renderer(m.elements, D, apix, dtype=torch.float64, route="gemm")
        img = r.render(torch.as_tensor(X), torch.eye(3, dtype=torch.float64)[None])[0].numpy()
        self.assertGreater(np.abs(img).max(), 1.0)
        np.testing.assert_allclose(V.sum(0) * apix, img, atol=1e-10 * np.abs(img).max())

    def test_map_is_the_real_space_sum_of_the_form_factors(self):
        """Atoms blurred by B = 250 A^2 (the form factor negligible beyond Nyquist): the
        band-limited map equals sum_j sum_g a_g (4 pi/(b_g+B))^1.5 exp(-4 pi^2 r^2/(b_g+B))
        summed in float64 at voxel positions (x, y, z) = centre + (i - D//2) * apix."""
        import gemmi
        D, apix, B = 40, 1.0, 250.0
        rng = np.random.default_rng(0)
        el = np.array(["C", "N", "O", "S", "C", "Fe"])
        centre = np.array([21.0, 19.5, 20.0])          # not the box centre: tests the frame
        X = centre + rng.uniform(-4, 4, (len(el), 3))
        V = model_map(X, el, D, apix, centre=centre, bfactor=B, dtype=np.float64)

        def reference(p):
            total = 0.0
            for e, x in zip(el, X):
                c = gemmi.Element(e).c4322
                for a, b in zip(c.a, c.b):
                    bb = b + B
                    total += a * (4 * np.pi / bb) ** 1.5 * np.exp(
                        -4 * np.pi ** 2 * np.sum((p - x) ** 2) / bb)
            return total
        for z, y, x in [(20, 20, 20), (18, 22, 19), (25, 15, 21), (22, 17, 24), (3, 4, 36)]:
            p = centre + (np.array([x, y, z]) - D // 2) * apix
            self.assertAlmostEqual(V[z, y, x], reference(p), delta=1e-6 * V.max())


class TestModelInBox(unittest.TestCase):
    def test_reference_outside_is_refused_a_state_model_warned_about(self):
        """The box's frame: voxel D//2 at (D//2)*apix; an atom 10 A past its far edge is
        refused for the reference (not docked) and warned about, once, for a state's
        deformed model (its map is cut)."""
        from nmaem_plugin.core.analysis.statemaps import check_model_in_box
        box, apix = 32, 2.0
        inside = np.array([[32.0, 32.0, 32.0], [2.0, 60.0, 30.0]])     # voxels 0..31
        far = np.array([[32.0, 32.0, 32.0], [32.0, 32.0, 62.0 + 10.0]])
        check_model_in_box(inside, box, apix, "model")                   # silent
        with self.assertRaises(NmaemError) as cm:
            check_model_in_box(far, box, apix, "the reference")
        self.assertIn("10.0 A outside the particles' box", str(cm.exception))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            check_model_in_box(far, box, apix, "the model of state_01", strict=False)
        self.assertEqual(err.getvalue().count("nmaem: warning:"), 1)
        self.assertIn("the model of state_01", err.getvalue())
        self.assertIn("model map is cut", err.getvalue())


class TestFSC(_Tmp):
    def test_resolution_on_a_hand_made_curve(self):
        D, apix = 20, 2.0
        freq = np.arange(11) / (D * apix)
        curve = np.array([1, 0.9, 0.5, 0.1, 0.05, 0.3, 0, 0, 0, 0, 0])
        res, crossed = F.fsc_resolution(freq, curve, 0.3)
        # below 0.3 first at shell 3: halfway between shells 2 (0.5) and 3 (0.1)
        self.assertTrue(crossed)
        self.assertAlmostEqual(res, D * apix / 2.5)
        res, crossed = F.fsc_resolution(freq, np.ones(11), 0.143)
        self.assertFalse(crossed)
        self.assertAlmostEqual(res, 2 * apix)          # the last shell: Nyquist

    def test_band_correlation_is_the_pearson_correlation_of_low_passed_maps(self):
        rng = np.random.default_rng(1)
        D, apix, res = 24, 2.0, 8.0
        a, b = rng.standard_normal((2, D, D, D))
        b = a + 1.5 * b
        k = np.fft.fftfreq(D, 1.0 / D)
        r = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2
                            + k[None, None, :] ** 2))
        keep = (r >= 1) & (r <= np.floor(D * apix / res))

        def low(v):
            return np.fft.ifftn(np.fft.fftn(v) * keep).real
        expected = np.corrcoef(low(a).ravel(), low(b).ravel())[0, 1]
        self.assertAlmostEqual(F.band_correlation(a, b, apix, res), expected, places=10)
        table = F.correlation_table([a, b], [a], apix, res)
        self.assertEqual(table.shape, (2, 1))
        self.assertAlmostEqual(table[0, 0], 1.0, places=12)

    @unittest.skipUnless(HAVE_RELION, NEEDS_RELION)
    def test_fsc_is_relions(self):
        """Our FSC of two maps equals relion_image_handler --fsc shell by shell."""
        m = read_model(OPEN)
        D, apix = 32, 3.0
        X = m.coords - m.coords.mean(0) + (D // 2) * apix
        clean = model_map(X, m.elements, D, apix)
        rng = np.random.default_rng(2)
        a = clean + 0.05 * clean.std() * rng.standard_normal(clean.shape) * 20
        b = clean + 0.05 * clean.std() * rng.standard_normal(clean.shape) * 20
        write_map(os.path.join(self.tmp, "a.mrc"), a, apix)
        write_map(os.path.join(self.tmp, "b.mrc"), b, apix)
        out = run_relion("relion_image_handler", ["--i", "a.mrc", "--fsc", "b.mrc",
                                                  "--angpix", apix], cwd=self.tmp)
        rows = [ln.split() for ln in out.splitlines()]
        rows = [r for r in rows if len(r) == 4 and r[0].isdigit()]
        theirs = np.array([float(r[3]) for r in rows])
        ours = F.fsc(read_map(os.path.join(self.tmp, "a.mrc"))[0],
                     read_map(os.path.join(self.tmp, "b.mrc"))[0], apix)
        self.assertEqual(len(theirs), D // 2 + 1)
        self.assertLess(theirs[8], 0.9)                # a curve that falls, not all ones
        np.testing.assert_allclose(ours.fsc, theirs, atol=2e-5)
        np.testing.assert_allclose(ours.freq[1:], [float(r[1]) for r in rows][1:], atol=2e-6)


class TestRelionLookup(_Tmp):
    def test_missing_relion_is_one_line_saying_how_to_install(self):
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        with mock.patch.dict(os.environ, {"PATH": empty, "RELION_HOME": empty}):
            self.assertIsNone(find_relion())
            with self.assertRaises(NmaemError) as cm:
                relion_program()
        msg = str(cm.exception)
        self.assertEqual(len(msg.splitlines()), 1)
        self.assertIn("apt-get install relion", msg)
        self.assertIn("RELION_HOME", msg)

    def test_relion_home_comes_first(self):
        bindir = os.path.join(self.tmp, "relion", "bin")
        os.makedirs(bindir)
        prog = os.path.join(bindir, "relion_reconstruct")
        with open(prog, "w") as fh:
            fh.write("#!/bin/sh\necho 'ERROR: from RELION_HOME' >&2\nexit 3\n")
        os.chmod(prog, 0o755)
        with mock.patch.dict(os.environ, {"RELION_HOME": os.path.join(self.tmp, "relion")}):
            self.assertEqual(find_relion(), prog)
            with self.assertRaisesRegex(NmaemError, "relion_reconstruct failed \\(exit status "
                                                    "3\\): ERROR: from RELION_HOME"):
                run_relion("relion_reconstruct", ["--i", "x.star"], cwd=self.tmp)

    @unittest.skipUnless(HAVE_RELION, NEEDS_RELION)
    def test_relions_own_error_is_shown(self):
        star = os.path.join(self.tmp, "bad.star")
        shutil.copy(os.path.join(DATA, "relion31.star"), star)   # its stack is not beside it
        with self.assertRaises(NmaemError) as cm:
            run_relion("relion_reconstruct", ["--i", star, "--o", "x.mrc", "--ctf"],
                       cwd=self.tmp)
        msg = str(cm.exception)
        self.assertEqual(len(msg.splitlines()), 1)
        self.assertIn("relion_reconstruct failed", msg)
        self.assertIn("ERROR", msg)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x.mrc")))


class TestSubsets(_Tmp):
    def _check_star_subset(self, name, rows):
        src = os.path.join(DATA, name)
        dst = os.path.join(self.tmp, "sub.star")
        write_star_subset(src, dst, rows)
        a, b = read_star_blocks(src), read_star_blocks(dst)
        self.assertEqual(list(a), list(b))                   # every block, in order
        table = read_particles(src)
        part = [k for k in a if len(a[k]) == table.n][0]
        for k in a:
            self.assertEqual(list(a[k].columns), list(b[k].columns))  # every column
            want = a[k].iloc[rows].reset_index(drop=True) if k == part else a[k]
            self.assertTrue(want.equals(b[k]), k)
        with open(src) as fh:
            text = fh.read().splitlines()
        with open(dst) as fh:
            out = fh.read().splitlines()
        self.assertTrue(set(out) <= set(text))               # lines kept as written
        return a[part]

    def test_star_subset_keeps_a_relion_31_files_columns_and_blocks(self):
        parts = self._check_star_subset("relion31.6opticsgroups.star", [4, 0, 2])
        for col in ("rlnMicrographName", "rlnCoordinateX", "rlnAutopickFigureOfMerit",
                    "rlnGroupNumber", "rlnOpticsGroup"):
            self.assertIn(col, parts.columns)

    def test_star_subset_keeps_a_relion_30_files_columns(self):
        parts = self._check_star_subset("FinalRefinement-OriginalParticles-PfCRT.star", [3, 1])
        for col in ("rlnMicrographName", "rlnImageOriginalName", "rlnRandomSubset",
                    "rlnClassNumber"):
            self.assertIn(col, parts.columns)

    def test_cs_subset_reads_back_with_cryosparc_tools(self):
        from cryosparc.dataset import Dataset
        src = os.path.join(DATA, "cryosparc_P12_J24_001_particles.cs")
        dst = os.path.join(self.tmp, "sub.cs")
        rows = [7, 2, 11]
        write_cs_subset(src, dst, rows)
        whole, sub = Dataset.load(src), Dataset.load(dst)
        self.assertEqual(sorted(sub.fields()), sorted(whole.fields()))
        self.assertEqual(len(sub), 3)
        for f in whole.fields():
            np.testing.assert_array_equal(sub[f], whole[f][rows], err_msg=f)
        a, b = read_particles(src).subset(rows), read_particles(dst)
        np.testing.assert_allclose(b.euler, a.euler)
        np.testing.assert_allclose(b.origin, a.origin)

    def test_states_format_both_and_its_refusal(self):
        src = os.path.join(DATA, "cryosparc_P12_J24_001_particles.cs")
        n = read_particles(src).n
        latent = os.path.join(self.tmp, "latent.npz")
        z = np.where(np.arange(n) % 3 == 0, 5.0, -5.0)[:, None]
        z = z + 0.01 * np.sin(np.arange(n))[:, None]
        write_latent(latent, z)
        out = os.path.join(self.tmp, "states")
        rc, err, _ = _cli("states", "--latent", latent, "--kmeans", 2, "-o", out,
                          "--particles", src, "--format", "both")
        self.assertEqual(rc, 0, err)
        from cryosparc.dataset import Dataset
        for k, big in ((1, False), (2, True)):
            sub = Dataset.load(os.path.join(out, "state_%02d.cs" % k))
            rows = np.flatnonzero((z[:, 0] < 0) if not big else (z[:, 0] > 0))
            self.assertEqual(sorted(sub["uid"].tolist()),
                             sorted(Dataset.load(src)["uid"][rows].tolist()))
            self.assertTrue(os.path.isfile(os.path.join(out, "state_%02d.star" % k)))
        rc, err, _ = _cli("states", "--latent", latent, "--kmeans", 2, "-o", out + "2",
                          "--particles", os.path.join(DATA, "relion31.star"), "--format", "cs")
        self.assertEqual(rc, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("--format cs", err)
        self.assertFalse(os.path.exists(out + "2"))


@unittest.skipUnless(HAVE_RELION, NEEDS_RELION)
class TestStateMaps(_Tmp):
    def _homogeneous(self, n, box, apix, snr_db, seed, nuisances=Nuisances()):
        """(fsc.json of the one state, the resolution the images allow)."""
        m = read_model(OPEN)
        noisy, clean = os.path.join(self.tmp, "noisy"), os.path.join(self.tmp, "clean")
        simulate(noisy, m, m.coords[None], SimulationSettings(
            n=n, box=box, apix=apix, snr_db=snr_db, shift_std=1.5, seed=seed,
            nuisances=nuisances), device="cpu", log=quiet)
        ref = read_model(os.path.join(noisy, "reference.pdb"))
        table = read_particles(os.path.join(noisy, "particles.star"))
        simulate(clean, ref, ref.coords[None], SimulationSettings(n=None, snr_db=None),
                 like=table, device="cpu", log=quiet)
        run_relion("relion_reconstruct", ["--i", "particles.star", "--o", "map.mrc", "--ctf",
                                          "--angpix", apix], cwd=clean)
        infos, corr = state_maps(os.path.join(self.tmp, "out"), ["state_01"], table,
                                 np.zeros(n, dtype=int), ref, [ref.coords], log=quiet)
        noisy_map = read_map(os.path.join(self.tmp, "out", "state_01", "map.mrc"))[0]
        clean_map = read_map(os.path.join(clean, "map.mrc"))[0]
        allowed, crossed = F.fsc(noisy_map, clean_map, apix).resolution(0.5)
        self.assertTrue(crossed)
        # RELION's map of the noise-free particles is our model map to near Nyquist: the
        # simulator's poses, origins and CTF and the map frame are RELION's
        truth = F.fsc(clean_map, model_map(ref.coords, ref.elements, box, apix), apix)
        self.assertGreater(truth.fsc[1:box // 2 - 1].min(), 0.98)
        shutil.rmtree(noisy)
        shutil.rmtree(clean)
        shutil.rmtree(os.path.join(self.tmp, "out"))
        return infos[0], allowed

    def test_homogeneous_resolutions_are_what_the_images_allow(self):
        cases = [dict(n=500, box=48, apix=2.5, snr_db=-15.0, seed=1),
                 dict(n=300, box=40, apix=3.0, snr_db=-12.0, seed=2,
                      nuisances=Nuisances(noise_falloff=10.0))]
        for case in cases:
            info, allowed = self._homogeneous(**case)
            nyquist = 2 * case["apix"]
            self.assertGreater(allowed, 1.3 * nyquist, case)   # a crossing inside the band
            self.assertTrue(info["fsc_0143_crossed"] and info["model_fsc_05_crossed"])
            # the half-map estimate (from half the particles each) within 15%, the model's
            # (the truth's map against the full map) within 10%
            self.assertLess(abs(info["resolution_0143"] / allowed - 1), 0.15, (case, info[
                "resolution_0143"], allowed))
            self.assertLess(abs(info["model_map_resolution_05"] / allowed - 1), 0.10,
                            (case, info["model_map_resolution_05"], allowed))

    def test_a_shifted_model_gives_a_map_shifted_by_the_same_vector(self):
        """RELION's map of particles (with origins) of a model moved by v from the box
        centre peaks, in cross-correlation with the map of the unmoved model, at v."""
        m = read_model(OPEN)
        D, apix = 40, 3.0
        v = np.array([3, -2, 4])                         # voxels, (x, y, z)
        centred = m.coords - m.coords.mean(0) + (D // 2) * apix
        out = os.path.join(self.tmp, "sim")
        simulate(out, m, (centred + v * apix)[None], SimulationSettings(
            n=200, box=D, apix=apix, snr_db=None, shift_std=4.0, seed=4, recentre=False),
            device="cpu", log=quiet)
        table = read_particles(os.path.join(out, "particles.star"))
        self.assertGreater(np.abs(table.origin).max(), 4.0)     # the origins are used
        run_relion("relion_reconstruct", ["--i", "particles.star", "--o", "map.mrc", "--ctf",
                                          "--angpix", apix], cwd=out)
        rel = read_map(os.path.join(out, "map.mrc"))[0].astype(np.float64)
        ref = model_map(centred, m.elements, D, apix, dtype=np.float64)
        xc = np.fft.irfftn(np.fft.rfftn(rel) * np.conj(np.fft.rfftn(ref)), s=rel.shape)
        peak = np.array(np.unravel_index(np.argmax(xc), xc.shape))     # (z, y, x)
        peak = np.where(peak > D // 2, peak - D, peak)
        np.testing.assert_array_equal(peak[::-1], v)
        moved = model_map(centred + v * apix, m.elements, D, apix, dtype=np.float64)
        self.assertGreater(F.band_correlation(rel, moved, apix, 3 * apix), 0.97)

    def _two_states(self):
        model, frames, frame = two_states(os.path.join(self.tmp, "sim"), n=300)
        amp = open_closed_run(os.path.join(self.tmp, "run"), model, frames)
        rng = np.random.default_rng(0)
        z = (frame * amp + rng.normal(0, 0.3, len(frame)))[:, None]
        latent = os.path.join(self.tmp, "latent.npz")
        write_latent(latent, z)
        return latent, frame

    def test_two_states_table_has_its_maxima_on_the_diagonal(self):
        latent, frame = self._two_states()
        star = os.path.join(self.tmp, "sim", "particles.star")
        out = os.path.join(self.tmp, "states")
        rc, err, log = _cli("states", "--latent", latent, "--kmeans", 2, "-o", out,
                            "--particles", star, "--model", os.path.join(self.tmp, "run"),
                            "--reconstruct", "--no-refine", "--no-thumbnails")
        self.assertEqual(rc, 0, err)
        with open(os.path.join(out, "states.json")) as fh:
            listing = json.load(fh)
        corr = listing["map_model_correlation"]
        table = np.array(corr["table"])
        self.assertEqual(table.shape, (2, 2))
        for k in range(2):
            for j in range(2):
                if j != k:   # each map is its own model's, and each model its own map's
                    self.assertGreater(table[k, k], table[k, j] + 0.1)
                    self.assertGreater(table[k, k], table[j, k] + 0.1)
        self.assertEqual(corr["diagonal_is_row_maximum"], [True, True])
        # the states are the frames (k-means: the bigger first), each with its files
        label = np.load(os.path.join(out, "states.npz"))["label"]
        self.assertEqual(len(set(zip(label.tolist(), frame.tolist()))), 2)
        for row in listing["states"]:
            folder = os.path.join(out, row["name"])
            for key in ("map", "half1", "half2", "model", "model_map", "fsc", "map_figure"):
                self.assertTrue(os.path.isfile(os.path.join(out, row[key])), key)
            with open(os.path.join(folder, "fsc.json")) as fh:
                info = json.load(fh)
            self.assertEqual(info["resolution_0143"], row["resolution_0143"])
            self.assertEqual(info["n_half1"] + info["n_half2"], row["n_particles"])
            self.assertEqual(read_map(os.path.join(folder, "map.mrc"))[1], 2.5)
            self.assertLess(row["resolution_0143"], 20.0)
        self.assertFalse([f for f in os.listdir(out) if f.startswith(".nmaem-tmp")])
        # the state STAR: the input's rows, line for line
        with open(star) as fh:
            lines = set(fh.read().splitlines())
        with open(os.path.join(out, "state_01.star")) as fh:
            self.assertTrue(set(fh.read().splitlines()) <= lines)

    def test_bad_inputs(self):
        latent, frame = self._two_states()
        star = os.path.join(self.tmp, "sim", "particles.star")
        run = os.path.join(self.tmp, "run")
        base = ["states", "--latent", latent, "--particles", star, "--model", run,
                "--reconstruct", "--no-refine", "--no-thumbnails"]

        def refused(out, *argv, env=None):
            with mock.patch.dict(os.environ, env or {}):
                rc, err, _ = _cli(*(base + ["-o", out] + list(argv)))
            self.assertEqual(rc, 2, err)
            _one_error_line(self, err)
            self.assertFalse(os.path.exists(os.path.join(out, "states.json")))
            self.assertFalse(os.path.exists(os.path.join(out, "state_01")))
            return err
        # a latent made by another run (its model fingerprint: another basis), with
        # --no-thumbnails: refused before RELION runs
        from nmaem_plugin.core.io.provenance import model_fingerprint
        other = os.path.join(self.tmp, "other.npz")
        write_latent(other, np.load(latent)["z"], model=model_fingerprint(OPEN, None, 1))
        base[2] = other
        err = refused(os.path.join(self.tmp, "o0"), "--kmeans", 2)
        self.assertIn("was made by another run than %s" % run, err)
        base[2] = latent
        # RELION missing: how to install it, nothing written
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        err = refused(os.path.join(self.tmp, "o1"), "--kmeans", 2,
                      env={"PATH": empty, "RELION_HOME": empty})
        self.assertIn("apt-get install relion", err)
        # one state with too few particles for two halves: a warning, no map; all: an error
        small = "1:%g:%g" % (-1e9, np.sort(np.load(latent)["z"][:, 0])[2] + 1e-6)
        rc, err, log = _cli(*(base + ["-o", os.path.join(self.tmp, "o2"), "--range", small,
                                      "--range", "1:-1e9:1e9"]))
        self.assertEqual(rc, 0, err)
        self.assertIn("state_01 has 3 particle(s), fewer than the 4", log)
        with open(os.path.join(self.tmp, "o2", "states.json")) as fh:
            rows = json.load(fh)["states"]
        self.assertIsNone(rows[0]["map"])
        self.assertTrue(os.path.isfile(os.path.join(self.tmp, "o2", rows[1]["map"])))
        err = refused(os.path.join(self.tmp, "o3"), "--range", small)
        self.assertIn("no state has the 4 particles", err)
        # particles of two box sizes
        table = read_particles(star)
        table.box[::2] = 64
        mixed = os.path.join(self.tmp, "sim", "mixed.star")
        write_star(mixed, table)
        base[4] = mixed
        err = refused(os.path.join(self.tmp, "o4"), "--kmeans", 2)
        self.assertIn("several box sizes", err)
        base[4] = star
        # a model outside the box (a reference not docked in the map's frame)
        far = os.path.join(self.tmp, "far")
        shutil.copytree(run, far)
        ref = read_model(os.path.join(far, "reference.pdb"))
        from nmaem_plugin.core.physics.structure import write_model
        from nmaem_plugin.core.modes.modesfile import load_modes, save_modes
        from dataclasses import replace
        write_model(os.path.join(far, "reference.pdb"), ref, ref.coords + 150.0)
        nm = load_modes(os.path.join(far, "modes.npz"))
        save_modes(os.path.join(far, "modes.npz"), replace(nm, coords=nm.coords + 150.0))
        base[6] = far
        err = refused(os.path.join(self.tmp, "o5"), "--kmeans", 2)
        self.assertIn("outside the particles' box", err)
        base[6] = run
        # RELION failing (a stack gone): its own message, nothing half-written
        broken = os.path.join(self.tmp, "broken")
        shutil.copytree(os.path.join(self.tmp, "sim"), broken)
        stacks = sorted(os.listdir(os.path.join(broken, "stacks")))
        os.unlink(os.path.join(broken, "stacks", stacks[-1]))
        base[4] = os.path.join(broken, "particles.star")
        out = os.path.join(self.tmp, "o6")
        err = refused(out, "--kmeans", 2)
        self.assertIn("relion_reconstruct failed", err)
        self.assertIn("ERROR", err)
        # all or nothing (io/outputs.py): the maps of the states done before, gone with the
        # new folder
        self.assertFalse(os.path.exists(out))

    def test_state_folders_follow_the_output_policy(self):
        """The state folders are the output's files like any other (docs/reliability.md):
        the manifest lists every file written into them (RELION's maps included), a file of
        the user's in the way is refused before RELION runs, and --force onto a run with
        more states removes exactly the earlier run's files (a file of the user's beside
        them stays)."""
        from nmaem_plugin.core.io.outputs import manifest_path, read_manifest
        latent, _ = self._two_states()
        star = os.path.join(self.tmp, "sim", "particles.star")
        base = ["states", "--latent", latent, "--particles", star, "--model",
                os.path.join(self.tmp, "run"), "--reconstruct", "--no-refine",
                "--no-thumbnails"]
        out = os.path.join(self.tmp, "states")
        rc, err, _ = _cli(*(base + ["--kmeans", 2, "-o", out]))
        self.assertEqual(rc, 0, err)

        def on_disk():
            found = set()
            for root, _, files in os.walk(out):
                for f in files:
                    rel = os.path.relpath(os.path.join(root, f), out).replace(os.sep, "/")
                    if not f.startswith(".nmaem-"):
                        found.add(rel)
            return found
        listed = read_manifest(manifest_path(out, "states"))["files"]
        self.assertEqual(set(listed), on_disk())
        self.assertTrue({"state_01/map.mrc", "state_02/half2.mrc"} <= set(listed))
        # a file of the user's where a map would go: refused in one line, before RELION
        user = os.path.join(self.tmp, "mine")
        os.makedirs(os.path.join(user, "state_01"))
        with open(os.path.join(user, "state_01", "map.mrc"), "w") as fh:
            fh.write("my map")
        rc, err, log = _cli(*(base + ["--kmeans", 2, "-o", user]))
        self.assertEqual(rc, 2, err)
        self.assertIn(os.path.join("state_01", "map.mrc"), _one_error_line(self, err))
        self.assertNotIn("half-map resolution", log)
        with open(os.path.join(user, "state_01", "map.mrc")) as fh:
            self.assertEqual(fh.read(), "my map")
        self.assertEqual(sorted(os.listdir(user)), ["state_01"])
        # --force with one state: state_02/ goes, the user's note in state_01/ stays
        with open(os.path.join(out, "state_01", "notes.txt"), "w") as fh:
            fh.write("mine")
        rc, err, _ = _cli(*(base + ["--kmeans", 1, "-o", out, "--force"]))
        self.assertEqual(rc, 0, err)
        self.assertFalse(os.path.exists(os.path.join(out, "state_02")))
        self.assertFalse(os.path.exists(os.path.join(out, "state_02.star")))
        listed = read_manifest(manifest_path(out, "states"))["files"]
        self.assertEqual(set(listed) | {"state_01/notes.txt"}, on_disk())
        with open(os.path.join(out, "states.json")) as fh:
            self.assertEqual(json.load(fh)["states"][0]["n_particles"],
                             len(np.load(latent)["z"]))


if __name__ == "__main__":
    unittest.main()
