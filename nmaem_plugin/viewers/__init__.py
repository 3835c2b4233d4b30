"""Scipion viewers of nmaem: latent space (and all-atom models at chosen points),
training curves, normal modes, states (thumbnails and counts; with ``nmaem states
--reconstruct``, the state maps, FSC curves and states x models table). The figures are drawn by
``nmaem_plugin.core.report.figures``; matplotlib is imported only when a figure is made.

"Analyze results" opens the first viewer Scipion finds for a protocol, and Scipion orders
the viewers that target it by the names they are found under here (pyworkflow's
``Domain.findViewers``): the training curves are found as ``NmaemATrainingViewer`` so that
they come before the latent viewer (which also targets a training) for a train protocol.
Import the class itself from ``viewer_training`` (one name here: two would list it twice).
"""
from .viewer_latent import NmaemLatentViewer
from .viewer_modes import NmaemModesViewer
from .viewer_states import NmaemStatesViewer
from .viewer_training import NmaemTrainingViewer as NmaemATrainingViewer  # noqa: F401
