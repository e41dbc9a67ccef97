"""``python -m cxrvit`` (and ``torchrun -m cxrvit``) enter the same CLI as ``cxrvit``."""
from cxrvit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
