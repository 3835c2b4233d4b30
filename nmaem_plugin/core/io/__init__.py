"""Layer 1, io: the files of the project and their contracts (particle files: STAR, cryoSPARC
.cs, MRC stacks; the particle table; latent.npz; the run folder; provenance fingerprints; the
output policy) and the numpy pose conventions the readers use. Torch-free; imports ``base`` and
``io`` only."""
