"""scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models (Scipion 3 plugin)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'^__version__ = "([^"]+)"',
                    (here / "nmaem_plugin" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="scipion-em-nmaem",
    version=version,
    description="Heterogeneous reconstruction of deformable atomic models in cryo-EM "
                "(normal modes + amortised inference), as a Scipion 3 plugin",
    long_description=(here / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    license="GPL-3.0-or-later",
    python_requires=">=3.9",
    # the data folders (no __init__.py) are listed as packages so that setuptools ships
    # their files without warning
    packages=find_packages(include=["nmaem_plugin", "nmaem_plugin.*"])
    + ["nmaem_plugin.data", "nmaem_plugin.tests.data", "nmaem_plugin.templates"],
    include_package_data=True,
    package_data={"nmaem_plugin": ["protocols.conf", "data/*.pdb", "tests/data/*",
                                   "templates/*.json.template"]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "scipy",
        "mrcfile",
        "gemmi>=0.6",
        "prody>=2.4",
        "pykeops>=2.1",
        "starfile>=0.5",
        "matplotlib",
        "openmm>=8.1",   # geometry refinement of exported models (MinimizationReporter)
    ],
    extras_require={"scipion": ["scipion-pyworkflow>=3.0", "scipion-em>=3.0"],
                    # nmaem states --format cs (requirements.txt installs it)
                    "cryosparc": ["cryosparc-tools>=4.6"]},
    entry_points={
        "pyworkflow.plugin": ["nmaem_plugin = nmaem_plugin"],
        "console_scripts": ["nmaem = nmaem_plugin.core.cli.main:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ],
)
