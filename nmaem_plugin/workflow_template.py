# **************************************************************************
# * scipion-em-nmaem: heterogeneous reconstruction of deformable atomic models
# * in cryo-EM (Nashed, Levy, Poitevin et al. 2022) as a Scipion 3 plugin.
# *
# * This program is free software; you can redistribute it and/or modify it
# * under the terms of the GNU General Public License as published by the Free
# * Software Foundation; either version 3 of the License, or (at your option)
# * any later version. See the LICENSE file at the root of the project.
# **************************************************************************
"""The plugin's Scipion workflow templates (``nmaem_plugin/templates/*.json.template``)
and the checks of their aliases.

Scipion's template launcher (``scipion3 template ID alias=value ... --nogui``,
``scipion/scripts/kickoff.py``) fills the template's ``~title|default|type|alias~``
fields from the command line, checks each value by its type only, then creates the
project and schedules every protocol. ``Plugin.getTemplates`` hands it
:class:`NmaemTemplate` objects instead of plain ``LocalTemplate`` ones, which add:

* **checks of what the values mean**, before anything is created: the particle file
  exists and holds poses, CTFs and image stacks that exist; the pixel size agrees with the
  file's; the atomic model reads and is docked in the particles' map; the box, the epochs,
  the modes and the GPUs are sensible. A bad value stops the launcher with one line naming
  the alias and the problem (the launcher prints the exception's text and exits with
  status 65, EX_DATAERR) before any project or protocol exists. (A protocol's
  ``_validate`` would be too late: the scheduler treats a protocol that does not validate
  as one whose input is not ready yet, and waits for ever.)
* **optional aliases**: a field whose template default is not empty is filled with that
  default unless the command line gives it, so ``particles=... model=... --nogui`` runs
  unattended (Scipion's launcher otherwise wants every field on the command line, and
  opens its dialog for the others). With ``--nogui``, a field that has no default and is
  not on the command line is reported in one line instead of opening the dialog.

The checks import ``nmaem_plugin.core`` readers lazily (no torch).
"""
import os
import sys

from pyworkflow.template import LocalTemplate, TemplateParam

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
NOGUI_FLAG = "--nogui"

# aliases of the plugin's templates
PARTICLES, MODEL, PIXEL_SIZE, BOX, EPOCHS, GPUS, MODES, REFINE = (
    "particles", "model", "pixelSize", "box", "epochs", "gpus", "modes", "refineModels")


# aliases whose values are files (made absolute)
PATH_ALIASES = (PARTICLES, MODEL)


class AliasError(Exception):
    """A bad alias value: its text is the one line the launcher prints."""


def _int(value):
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _float(value):
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _particleBox(path):
    """The particles' image size (px) from their first stack, or None."""
    from .inputchecks import readParticleTable
    from .core.io.stacks import stack_box
    table, problem = readParticleTable(path)
    if problem or table.stack_paths is None or table.n == 0:
        return None
    return stack_box(str(table.stack_paths[0])) or None


def aliasProblem(alias, values):
    """The problem (one line) with ``values[alias]``, judged with the other aliases' values
    in ``values`` (those that are set), or None. Aliases this module does not know are
    left to Scipion's type check."""
    from .inputchecks import modelParticlesProblems, particleFileProblems
    v = values.get(alias)
    particles = values.get(PARTICLES)
    if alias == PARTICLES:
        apix = _float(values.get(PIXEL_SIZE, 0)) or 0.0
        p = particleFileProblems(os.path.abspath(v) if v else v, max(apix, 0.0))
        if p:
            return "%s: %s" % (v, p)
        if values.get(MODEL):
            return modelParticlesProblems(values[MODEL], os.path.abspath(v))
        return None
    if alias == PIXEL_SIZE:
        apix = _float(v)
        if apix is None or apix < 0:
            return "%r is not a pixel size (A/px; 0: the particle file's)" % v
        if particles and apix > 0:
            p = particleFileProblems(os.path.abspath(particles), apix)
            if p and "pixel size" in p:
                return "%s: %s" % (particles, p)
        return None
    if alias == MODEL:
        if not v or not os.path.isfile(v):
            return "%s: no such file" % v
        from .core.base.errors import NmaemError
        from .core.physics.structure import read_model
        try:
            if read_model(v).n_atoms == 0:
                return "%s holds no atoms" % v
        except NmaemError as exc:
            return str(exc)
        except Exception as exc:
            return "%s cannot be read as an atomic model (%s)" % (v, exc)
        if particles:
            return modelParticlesProblems(v, os.path.abspath(particles))
        return None
    if alias == BOX:
        box = _int(v)
        if box is None or (box != -1 and (box < 8 or box % 2)):
            return "%r is not a training box (an even number of pixels, at least 8; -1: " \
                   "the particles' box)" % v
        pbox = _particleBox(os.path.abspath(particles)) if particles else None
        if pbox and box > pbox:
            return "a %d px training box is larger than the particles' %d px" % (box, pbox)
        return None
    if alias in (EPOCHS, MODES):
        n = _int(v)
        if n is None or n < 1:
            return "%r is not a positive whole number" % v
        return None
    if alias == GPUS:
        ids = str(v).replace(",", " ").split()
        if not ids or any(_int(g) is None or _int(g) < 0 for g in ids):
            return "%r is not a list of GPU ids (CUDA device numbers, e.g. 0 or '0 1')" % v
        return None
    return None


class NmaemTemplateParam(TemplateParam):
    """A template field whose ``validate`` also runs :func:`aliasProblem` (Scipion's
    dialog validates each field with it before creating the project)."""

    def __init__(self, template, index, title, value=None, varType=None, alias=None):
        super().__init__(index, title, value, varType, alias)
        self.template = template

    def validate(self):
        problem = super().validate()
        if problem is None and self.getAlias():
            problem = aliasProblem(self.getAlias(), self.template.aliasValues())
        return problem


class NmaemTemplate(LocalTemplate):
    """A plugin template whose aliases are checked for what they mean, and whose fields
    with a default are optional on the command line (module docstring)."""

    def parseContent(self):
        super().parseContent()
        self.optional = {}
        params = {}
        for title, p in self.params.items():
            q = NmaemTemplateParam(self, p.getIndex(), p.getTitle(), p.getValue(),
                                   p.getType(), p.getAlias())
            if q.getValue() not in (None, ""):
                self.optional[title] = q       # filled with its default unless given
            else:
                params[title] = q
        self.params = params
        self.given = set()
        if _unattended():
            given = _commandLineAliases()
            missing = [p for p in self.params.values() if p.getAlias() not in given]
            if missing:
                p = missing[0]
                raise SystemExit("nmaem template %s: alias '%s' (%s) missing: give %s=VALUE "
                                 "on the command line" % (self.getObjId(), p.getAlias(),
                                                          p.getTitle(), p.getAlias()))

    def allFields(self):
        return list(self.params.values()) + list(self.optional.values())

    def aliasValues(self):
        """{alias: value} of the fields set so far (given, or optional with a default)."""
        out = {}
        for p in self.allFields():
            if p.getAlias() and (p.getAlias() in self.given or p in self.optional.values()):
                out[p.getAlias()] = p.getValue()
        return out

    def setParamValue(self, alias, newValue):
        """Set every field of ``alias`` (Scipion's launcher calls this for each
        ``alias=value`` of the command line); raises :class:`AliasError` with one line naming
        the alias and the problem. Returns the number of required fields set."""
        fields = [p for p in self.allFields() if p.getAlias() == alias]
        if not fields:
            raise AliasError("nmaem template %s: unknown alias '%s' (aliases: %s)"
                             % (self.getObjId(), alias, ", ".join(self.aliases())))
        old = [p.getValue() for p in fields]
        if alias in PATH_ALIASES and newValue:
            # the protocols run in the project's folder: a relative path would not resolve
            newValue = os.path.abspath(newValue)
        for p in fields:
            p.setValue(newValue)
        self.given.add(alias)
        problem = None
        for p in fields:
            problem = aliasProblem(alias, self.aliasValues()) or TemplateParam.validate(p)
            if problem:
                break
        if problem:
            for p, v in zip(fields, old):
                p.setValue(v)
            raise AliasError("nmaem template %s: alias '%s' (%s): %s"
                             % (self.getObjId(), alias, fields[0].getTitle(), problem))
        return sum(1 for p in fields if p.getTitle() in self.params)

    def aliases(self):
        seen = []
        for p in self.allFields():
            if p.getAlias() and p.getAlias() not in seen:
                seen.append(p.getAlias())
        return seen

    def _replaceFields(self):
        for field in self.allFields():
            self.content[field.getIndex()] = str(field.getValue())


def _commandLineAliases():
    return {a.split("=", 1)[0] for a in sys.argv[1:] if "=" in a and not a.startswith("-")}


def _unattended():
    return any(a.lower() == NOGUI_FLAG for a in sys.argv[1:])


def pluginTemplates(pluginName):
    """The plugin's templates (``templates/*.json.template``) as :class:`NmaemTemplate`."""
    import glob
    from pyworkflow.constants import SCIPION_JSON_TEMPLATES
    return [NmaemTemplate(pluginName, fn) for fn in
            sorted(glob.glob(os.path.join(TEMPLATE_DIR, "*" + SCIPION_JSON_TEMPLATES)))]
