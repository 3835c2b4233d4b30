"""Scipion protocols of nmaem (thin: the work runs as the ``nmaem`` command).

Modules import only pyworkflow and pwem at their top: Scipion imports every plugin's
protocols at start-up.
"""
from .protocol_base import NmaemProtBase
from .protocol_compute_modes import NmaemProtComputeModes
from .protocol_simulate import NmaemProtSimulate
from .protocol_import_particles import NmaemProtImportParticles
from .protocol_train import NmaemProtTrain
from .protocol_infer import NmaemProtInfer
from .protocol_export import NmaemProtExport
from .protocol_states import NmaemProtStates
from .protocol_evaluate import NmaemProtEvaluate
