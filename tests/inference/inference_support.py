"""Constants and the DICOM factory shared by this folder's tests (a uniquely named module, so that
importing it never collides with another folder's ``conftest``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from cxrvit.labels import DEFAULT_LABELS

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
_spec = importlib.util.spec_from_file_location("dicom_factory", ROOT / "tests/fixtures/dicom/factory.py")
factory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(factory)

#: Thresholds that make some labels positive and some not, whatever the random model says.
THRESHOLDS = {label: (0.0 if i % 2 == 0 else 1.01) for i, label in enumerate(DEFAULT_LABELS)}


def run_cli(argv: list[str]) -> int:
    """Run one of this part's subcommands through its own parser only, so that these tests do not
    depend on every other part's command module importing cleanly."""
    import argparse

    from cxrvit.inference import commands

    parser = argparse.ArgumentParser(prog="cxrvit")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))
