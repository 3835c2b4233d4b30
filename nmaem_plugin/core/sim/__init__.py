"""Layer 4, sim: synthetic datasets (``nmaem simulate``) and the nuisances of real particles
they can carry. Imports the layers below (``base``, ``io``, ``physics``, ``modes``) and ``sim``;
nothing of the network."""
