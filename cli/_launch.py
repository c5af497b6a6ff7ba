"""Script entry point: ``python <pack>/cli/_launch.py ARGS`` runs ``treerpo ARGS`` with this pack
imported as the package ``treerpo`` from its folder. `treerpo run` uses it to re-execute itself in
ComfyUI's Python and as the script torchrun starts on every rank, so the package need not be
installed in ComfyUI's environment."""

import importlib.util
import sys
from pathlib import Path


def _import_package(root: Path) -> None:
    spec = importlib.util.spec_from_file_location("treerpo", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["treerpo"] = module
    spec.loader.exec_module(module)


def _torchrun(argv: list[str]) -> int:
    """torch.distributed.run with its arguments; a failed rank ends it with one line (the rank's
    own error is already printed) instead of the launcher's traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r} exit code {f.exitcode}" for r, f in sorted(e.failures.items()))
        print(f"error: {len(e.failures)} process(es) failed: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--torchrun"]:
        sys.exit(_torchrun(sys.argv[2:]))
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # cli/*.py must not shadow modules
    _import_package(here.parent)
    from treerpo.cli.main import main

    sys.exit(main(sys.argv[1:]))
