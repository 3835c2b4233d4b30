"""Shared pieces of the Scipion protocol and viewer tests (not a test module itself)."""
import os
import sys

import pyworkflow
from pwem.protocols import ProtImportPdb
from pyworkflow.tests import BaseTest

from nmaem_plugin import DATA_DIR

# Scipion launches each protocol with ``pyworkflow.PYTHON`` (env SCIPION_PYTHON, default
# 'python3' from the PATH). In a plain virtual environment that is not activated (make
# test, CI) 'python3' is another interpreter without Scipion: use this one.
if not os.environ.get("SCIPION_PYTHON"):
    os.environ["SCIPION_PYTHON"] = sys.executable
    pyworkflow.PYTHON = sys.executable


def log_tail(prot, n=60):
    """The last lines of a protocol's logs, for failure messages."""
    out = []
    for path in prot.getLogPaths():
        if os.path.exists(path):
            with open(path) as fh:
                out += fh.readlines()[-n:]
    return "".join(out)


class NmaemBaseTest(BaseTest):
    """BaseTest with model import and a launch that shows the protocol's log on failure."""

    @classmethod
    def _importPdb(cls, name, label):
        """Import a bundled model (a name in nmaem_plugin/data) or any path."""
        prot = cls.newProtocol(ProtImportPdb, objLabel="import " + label,
                               inputPdbData=ProtImportPdb.IMPORT_FROM_FILES,
                               pdbFile=os.path.join(DATA_DIR, name))
        cls.launchProtocol(prot)
        return prot

    @classmethod
    def _launch(cls, prot):
        try:
            cls.launchProtocol(prot)
        except Exception as exc:
            raise AssertionError("%s failed: %s\n--- log ---\n%s"
                                 % (prot.getObjLabel(), exc, log_tail(prot)))
        return prot

    @classmethod
    def _simulateMorph(cls, **params):
        """Import the bundled open and closed AK models (``cls.ref``, ``cls.target``) and
        simulate a noise-free open -> closed morph on the CPU (``cls.sim``); ``params`` are
        the simulate protocol's parameters (frames, particles, box, pixel size, ...)."""
        from nmaem_plugin.constants import SIM_MORPH
        from nmaem_plugin.protocols import NmaemProtSimulate
        cls.ref = cls._importPdb("ak_open_4ake.pdb", "reference")
        cls.target = cls._importPdb("ak_closed_1ake.pdb", "target")
        kw = dict(inputSource=SIM_MORPH, addNoise=False, useGpu=False)
        kw.update(params)
        cls.sim = cls.newProtocol(NmaemProtSimulate, objLabel="simulate morph", **kw)
        cls.sim.referenceStructure.set(cls.ref.outputPdb)
        cls.sim.targetStructure.set(cls.target.outputPdb)
        return cls._launch(cls.sim)
