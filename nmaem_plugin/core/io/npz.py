"""Reading the project's .npz files (modes, latent, ground truth) with one-line errors."""
import os
import zipfile
from typing import Dict, Union

import numpy as np

from ..base.errors import fail, require_file


def read_npz(path: Union[str, "os.PathLike[str]"], what: str) -> Dict[str, np.ndarray]:
    """All arrays of an .npz file as a dict, never unpickling objects.

    ``what`` names the kind of file in the messages: "path: no such <what> file",
    "path: not a readable <what> file (.npz): <reason>".
    """
    path = require_file(str(path), "%s file" % what)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        fail(path, "not a readable %s file (.npz): %s"
             % (what, (str(exc).splitlines() or ["?"])[0]))
