"""The trained fixture chain shared by the Scipion protocol and viewer tests (not a test
module itself): import the bundled adenylate kinase models, simulate 200 noise-free 32-px
particles of a 4-frame open -> closed morph, compute 3 modes on the simulation's
reference with the closed model as target, train the small encoder for 2 epochs on the
CPU and infer z. It is built once per test run (the first test class that asks for it
builds it, in its own project), and every class that uses it works in that project.
"""
import os

from pyworkflow.tests import setupTestProject

from nmaem_plugin.tests.scipion import scipion_base

N_PARTICLES = 200
BOX = 32
APIX = 2.5
N_MODES = 3
EPOCHS = 2

# what a test class gets from use(): the project and these protocols
PROTOCOLS = ("ref", "target", "sim", "modes", "train", "infer")


class NmaemTrainedChain(scipion_base.NmaemBaseTest):
    """Builds the chain (its name is the project's); not a test case of its own."""
    _built = False

    @classmethod
    def build(cls):
        from nmaem_plugin.protocols import NmaemProtComputeModes, NmaemProtInfer
        setupTestProject(cls)
        cls._simulateMorph(numberOfFrames=4, numberOfParticles=N_PARTICLES, boxSize=BOX,
                           samplingRate=APIX, shiftStd=1.0, seed=1)
        cls.modes = cls.newProtocol(NmaemProtComputeModes, objLabel="modes",
                                    numberOfModes=N_MODES, useGpu=False)
        cls.modes.inputStructure.set(cls.sim.outputReference)
        cls.modes.targetStructure.set(cls.target.outputPdb)
        cls._launch(cls.modes)
        cls.train = cls.newTrain("train", EPOCHS)
        cls._launch(cls.train)
        cls.infer = cls.newProtocol(NmaemProtInfer, objLabel="infer", batchSize=64,
                                    useGpu=False)
        cls.infer.inputNetwork.set(cls.train.outputNetwork)
        cls.infer.inputParticles.set(cls.sim.outputParticles)
        cls._launch(cls.infer)
        cls._built = True

    @classmethod
    def newTrain(cls, label, epochs, **kwargs):
        """A training protocol (not launched) on the chain's particles and modes."""
        from nmaem_plugin.protocols import NmaemProtTrain
        prot = cls.newProtocol(NmaemProtTrain, objLabel=label, numberOfEpochs=epochs,
                               autoBatch=False, batchSize=32, encoder=1, useGpu=False, **kwargs)
        prot.inputParticles.set(cls.sim.outputParticles)
        prot.inputStructure.set(cls.sim.outputReference)
        prot.inputModes.set(cls.modes.outputModes)
        return prot


def use(testClass):
    """Give ``testClass`` (a BaseTest) the shared chain: its project (``proj``,
    ``outputPath``, ``projName``, the working directory) and the protocols of
    :data:`PROTOCOLS`; the chain is built on the first call of the test run."""
    if not NmaemTrainedChain._built:
        NmaemTrainedChain.build()
    for name in ("proj", "outputPath", "projName") + PROTOCOLS:
        setattr(testClass, name, getattr(NmaemTrainedChain, name))
    os.chdir(NmaemTrainedChain.outputPath)
