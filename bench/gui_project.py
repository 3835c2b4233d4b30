"""A small Scipion project holding the outputs of every nmaem protocol, for the GUI check
(docs/gui-check.md) in a few CPU-minutes instead of ``make demo``'s twelve.

    python bench/gui_project.py [--project NmaemGuiCheck]

It is the trained fixture chain of the protocol tests (nmaem_plugin/tests/scipion/chain.py:
the two bundled adenylate kinase imports, 200 noise-free 32-px particles of a 4-frame
morph, 3 normal modes, 2 epochs of training, inference) in a project of its own, then
export models along PC1, states (k-means, 3 states) and evaluate. Needs Scipion's
environment (SCIPION_HOME, SCIPION_USER_DATA, SCIPION_PYTHON, ...; see the Makefile). An
existing project of that name is replaced.
"""
import argparse
import sys


def build(name):
    from nmaem_plugin.protocols import NmaemProtEvaluate, NmaemProtExport, NmaemProtStates
    from nmaem_plugin.protocols.protocol_export import EXPORT_PCS
    from nmaem_plugin.protocols.protocol_states import STATES_KMEANS
    from nmaem_plugin.tests.scipion import chain

    from pyworkflow.project import Manager
    manager = Manager()
    if manager.hasProject(name):
        manager.deleteProject(name)
    # setupTestProject names the project after the class
    Chain = type(name, (chain.NmaemTrainedChain,), {})
    Chain.build()
    export = Chain.newProtocol(NmaemProtExport, objLabel="export PC1", exportMode=EXPORT_PCS,
                               pcs="1", steps=5, refineGeometry=False)
    export.inputParticles.set(Chain.infer.outputParticles)
    Chain._launch(export)
    states = Chain.newProtocol(NmaemProtStates, objLabel="states k-means",
                               statesMode=STATES_KMEANS, numberOfClusters=3,
                               refineGeometry=False)
    states.inputParticles.set(Chain.infer.outputParticles)
    Chain._launch(states)
    evaluate = Chain.newProtocol(NmaemProtEvaluate, objLabel="evaluate",
                                 minProminence=0.05, minSignificance=2.5)
    evaluate.inputParticles.set(Chain.infer.outputParticles)
    evaluate.simulatedParticles.set(Chain.sim.outputParticles)
    Chain._launch(evaluate)
    print("project %s: %s" % (name, Chain.proj.getPath()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", default="NmaemGuiCheck")
    args = ap.parse_args()
    build(args.project)


if __name__ == "__main__":
    sys.exit(main())
