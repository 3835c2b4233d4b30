"""The science of nmaem: numpy, torch, gemmi, prody, pykeops. Never imports Scipion."""
