"""Particle metadata is validated when read (core/particles.check_table, called by
read_particles for STAR and .cs files): one line naming the file and the first bad row.

The STAR files are written by hand here (RELION 3.1 layout, three particles)."""
import contextlib
import io
import os
import shutil
import tempfile
import unittest

import numpy as np

from nmaem_plugin.core.base.errors import NmaemError
from nmaem_plugin.core.io.particles import read_particles

OPTICS = """
data_optics

loop_
_rlnOpticsGroup
_rlnOpticsGroupName
_rlnAmplitudeContrast
_rlnSphericalAberration
_rlnVoltage
_rlnImagePixelSize
_rlnImageSize
_rlnImageDimensionality
1 opticsGroup1 0.1 2.7 300.0 {apix} 32 2
"""
PARTICLES = """
data_particles

loop_
_rlnImageName
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnOriginXAngst
_rlnOriginYAngst
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnOpticsGroup
"""
GOOD = [["1@stack.mrcs", "10.0", "20.0", "30.0", "1.5", "-0.5", "10000", "9800", "15", "1"],
        ["2@stack.mrcs", "40.0", "50.0", "60.0", "0.0", "0.0", "12000", "11800", "20", "1"],
        ["3@stack.mrcs", "70.0", "80.0", "90.0", "-1.0", "2.0", "14000", "13900", "25", "1"]]
COL = {"image": 0, "rot": 1, "tilt": 2, "psi": 3, "ox": 4, "oy": 5, "du": 6, "dv": 7,
       "dang": 8}


class BadFileCase(unittest.TestCase):
    def assertBad(self, path, *words):
        """read_particles(path) fails with one line naming the file and ``words``."""
        with self.assertRaises(NmaemError) as cm:
            read_particles(path)
        msg = str(cm.exception)
        self.assertNotIn("\n", msg)
        self.assertTrue(msg.startswith(path + ": "), msg)
        for w in words:
            self.assertIn(w, msg)


class MetadataTest(BadFileCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-meta-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def star(self, row=None, col=None, value=None, apix="1.5", rows=None):
        rows = [list(r) for r in (rows or GOOD)]
        if row is not None:
            rows[row][COL[col]] = value
        path = os.path.join(self.tmp, "particles.star")
        with open(path, "w") as fh:
            fh.write("# version 30001\n" + OPTICS.format(apix=apix) + PARTICLES)
            fh.write("\n".join(" ".join(r) for r in rows) + "\n")
        return path

    def test_good_file_reads(self):
        t = read_particles(self.star())
        self.assertEqual(t.n, 3)

    def test_nan_angle(self):
        self.assertBad(self.star(1, "tilt", "nan"), "row 2", "non-finite", "angle")

    def test_infinite_angle(self):
        self.assertBad(self.star(2, "psi", "inf"), "row 3", "angle")

    def test_nan_origin(self):
        self.assertBad(self.star(0, "oy", "NaN"), "row 1", "origin")

    def test_infinite_origin(self):
        self.assertBad(self.star(1, "ox", "-inf"), "row 2", "origin")

    def test_nan_defocus(self):
        self.assertBad(self.star(1, "du", "nan"), "row 2", "defocus", "rlnDefocusU")

    def test_nan_defocus_v(self):
        self.assertBad(self.star(2, "dv", "nan"), "row 3", "rlnDefocusV")

    def test_nan_defocus_angle(self):
        self.assertBad(self.star(0, "dang", "nan"), "row 1", "rlnDefocusAngle")

    def test_negative_defocus(self):
        self.assertBad(self.star(2, "du", "-12000"), "row 3", "negative", "defocus")

    def test_zero_pixel_size(self):
        self.assertBad(self.star(apix="0.0"), "row 1", "pixel size", "optics group 1")

    def test_negative_pixel_size(self):
        self.assertBad(self.star(apix="-1.5"), "pixel size")

    def test_nan_pixel_size(self):
        self.assertBad(self.star(apix="nan"), "pixel size")

    def test_duplicated_particles_warn(self):
        rows = [list(r) for r in GOOD]
        rows[2][0] = "1@stack.mrcs"        # the image of row 1 again
        path = self.star(rows=rows)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            t = read_particles(path)
        self.assertEqual(t.n, 3)          # a warning, not an error
        line = err.getvalue().strip()
        self.assertTrue(line.startswith("nmaem: warning: %s: " % path), line)
        self.assertIn("rows 1 and 3", line)

    def test_no_warning_without_duplicates(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            read_particles(self.star())
        self.assertEqual(err.getvalue(), "")


if __name__ == "__main__":
    unittest.main()


class TruncatedFilesTest(BadFileCase):
    """Truncated or corrupt particle files (copies of tests/data files cut in a temporary
    folder): one line naming the file, never a traceback or a shorter table."""

    DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nmaem-trunc-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cut(self, name, size):
        with open(os.path.join(self.DATA, name), "rb") as fh:
            data = fh.read()
        path = os.path.join(self.tmp, "cut_" + name)
        with open(path, "wb") as fh:
            fh.write(data[:size(len(data))] if callable(size) else data[:size])
        return path

    def cs_files(self):
        return [f for f in sorted(os.listdir(self.DATA)) if f.endswith(".cs")]

    def test_cs_cut_in_the_data(self):
        for name in self.cs_files():
            with self.subTest(name):
                self.assertBad(self.cut(name, lambda n: n // 2), "truncated or corrupt")

    def test_cs_cut_in_the_header(self):
        for name in self.cs_files():
            with self.subTest(name):
                self.assertBad(self.cut(name, 40), "truncated or corrupt")

    def test_cs_one_row_short(self):
        """Cut exactly one row short: the header promises more rows than the file holds."""
        for name in self.cs_files():
            full = np.load(os.path.join(self.DATA, name), allow_pickle=False)
            with self.subTest(name):
                self.assertBad(self.cut(name, lambda n: n - full.dtype.itemsize),
                               "truncated or corrupt")

    def test_cs_garbage(self):
        path = os.path.join(self.tmp, "garbage.cs")
        with open(path, "wb") as fh:
            fh.write(bytes(range(256)) * 8)
        self.assertBad(path, "truncated or corrupt")

    def test_empty_cs(self):
        path = os.path.join(self.tmp, "empty.cs")
        open(path, "wb").close()
        self.assertBad(path)

    def test_star_cut_in_a_row(self):
        for name in ("relion31.star", "empiar_10076_7.star", "relion5.star"):
            path = os.path.join(self.DATA, name)
            with open(path) as fh:
                text = fh.read()
            last = text.rstrip("\n").rfind("\n")
            # cut in the middle of the last particle row
            cut = last + 1 + len(text[last + 1:].split()[0]) + 2
            with self.subTest(name):
                self.assertBad(self.cut(name, cut), "truncated or corrupt")

    def test_star_cut_in_the_header(self):
        self.assertBad(self.cut("relion31.star", 60))
