# -*- coding: utf-8 -*-
r"""
@article{Nashed2022,
title = {Heterogeneous reconstruction of deformable atomic models in Cryo-EM},
author = {Nashed, Youssef and Martel, Julien and Levy, Axel and Peck, Ariana and Koo, Bongjin and Wetzstein, Gordon and Miolane, Nina and Ratner, Daniel and Poitevin, Fr{\'e}d{\'e}ric},
journal = {arXiv preprint (Machine Learning in Structural Biology workshop)},
year = {2022}
}

@article{Bakan2011,
title = {ProDy: Protein Dynamics Inferred from Theory and Experiments},
author = {Bakan, Ahmet and Meireles, Lidio M. and Bahar, Ivet},
journal = {Bioinformatics},
volume = {27},
number = {11},
pages = {1575--1577},
year = {2011},
doi = {http://dx.doi.org/10.1093/bioinformatics/btr168}
}

@article{Wojdyr2022,
title = {GEMMI: A library for structural biology},
author = {Wojdyr, Marcin},
journal = {Journal of Open Source Software},
volume = {7},
number = {73},
pages = {4200},
year = {2022},
doi = {http://dx.doi.org/10.21105/joss.04200}
}

@article{Charlier2021,
title = {Kernel Operations on the GPU, with Autodiff, without Memory Overflows},
author = {Charlier, Benjamin and Feydy, Jean and Glaun{\`e}s, Joan Alexis and Collin, Fran{\c{c}}ois-David and Durif, Ghislain},
journal = {Journal of Machine Learning Research},
volume = {22},
number = {74},
pages = {1--6},
year = {2021}
}

@inproceedings{Paszke2019,
title = {PyTorch: An Imperative Style, High-Performance Deep Learning Library},
author = {Paszke, Adam and Gross, Sam and Massa, Francisco and others},
booktitle = {Advances in Neural Information Processing Systems 32},
pages = {8024--8035},
year = {2019}
}
"""
