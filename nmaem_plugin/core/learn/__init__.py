"""Layer 5, learn: the network (encoder, physics decoder) and its training (dataset and loader,
batch-norm statistics, devices and DDP, run preparation, checkpoints, the loop, the convergence
of a training log). Imports the layers below (``base`` to ``sim``) and ``learn``."""
