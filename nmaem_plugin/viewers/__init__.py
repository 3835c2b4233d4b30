"""Scipion viewers of nmaem: latent space (and all-atom models at chosen points),
training curves, normal modes, state maps. The figures are drawn by ``nmaem_plugin.core.report.figures``;
matplotlib is imported only when a figure is made."""
from .viewer_latent import NmaemLatentViewer
from .viewer_modes import NmaemModesViewer
from .viewer_states import NmaemStatesViewer
from .viewer_training import NmaemTrainingViewer
