"""Load the plugin whenever fairseq is imported, so fairseq's own tools need no --user-dir.

fairseq imports a plugin only when given ``--user-dir``; a moe_fairseq checkpoint
handed to ``fairseq-generate``, ``fairseq-interactive`` or ``from_pretrained`` without
it names an architecture fairseq does not know. When the package is installed, a
``moe_fairseq-autoload.pth`` file in site-packages runs this file at interpreter
start-up. It only adds an import hook (standard library, no torch): the plugin itself
is imported right after ``fairseq`` finishes importing, in processes that use fairseq.

- ``pip install .`` writes the ``.pth`` (setup.py); for an editable install
  (``pip install -e .``, what ``make venv`` does) run ``python moe_fairseq/autoload.py
  install`` (``make venv`` does). ``uninstall`` removes it, ``status`` says where it is.
- ``MOE_FAIRSEQ_AUTOLOAD=0`` turns it off for one process (e.g. to pass ``--user-dir``
  of another checkout of the plugin: fairseq refuses two modules of the same name).
- If importing the plugin fails, fairseq goes on without it and a warning says why.

This file must stay importable without the package (it runs before anything else).
"""

import importlib.abc
import importlib.util
import os
import sys
import sysconfig
import warnings

PTH_NAME = "moe_fairseq-autoload.pth"
ENV = "MOE_FAIRSEQ_AUTOLOAD"
# One line, as site.py wants: find the package without importing it (its __init__
# imports torch and fairseq) and run this file.
PTH_LINE = (
    "import importlib.util as _u, os as _o; _s = _o.environ.get('" + ENV + "') != '0' and "
    "_u.find_spec('moe_fairseq'); _f = _s and _u.spec_from_file_location("
    "'moe_fairseq_autoload', _o.path.join(list(_s.submodule_search_locations)[0], "
    "'autoload.py')); _m = _f and _u.module_from_spec(_f); _m and _f.loader.exec_module(_m)\n"
)


class _AfterFairseq(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``fairseq`` so that the plugin is
    imported once fairseq's package has run (its registries are then complete)."""

    def find_spec(self, name, path=None, target=None):
        if name != "fairseq":
            return None
        sys.meta_path.remove(self)  # one shot; find the real spec without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_fairseq = spec.loader.exec_module

        def exec_module(module):
            exec_fairseq(module)
            _import_plugin()

        spec.loader.exec_module = exec_module
        return spec


def _import_plugin() -> None:
    try:
        import moe_fairseq  # noqa: F401
    except Exception as exc:  # the user's fairseq run must not die of our import
        warnings.warn(f"moe_fairseq autoload: the plugin failed to import ({type(exc).__name__}: "
                      f"{exc}); fairseq runs without it (set {ENV}=0 to silence this)")


def enable() -> None:
    """Install the hook (idempotent); if fairseq is already imported, import now."""
    if os.environ.get(ENV) == "0":
        return
    if "fairseq" in sys.modules:
        _import_plugin()
    elif not any(isinstance(f, _AfterFairseq) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterFairseq())


def pth_path() -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "status"
    path = pth_path()
    if command == "install":
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(PTH_LINE)
        os.replace(tmp, path)
        print(f"moe_fairseq autoload: wrote {path}")
    elif command == "uninstall":
        if os.path.exists(path):
            os.remove(path)
        print(f"moe_fairseq autoload: removed {path}")
    elif command == "status":
        print(f"moe_fairseq autoload: {'on' if os.path.exists(path) else 'off'} ({path})")
    else:
        print(f"usage: python {__file__} [install|uninstall|status]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "moe_fairseq_autoload":  # run by the .pth line at start-up
    enable()
