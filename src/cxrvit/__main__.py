"""``python -m cxrvit`` (and ``torchrun -m cxrvit``) enter the same CLI as ``cxrvit``."""
from cxrvit.cli import run

if __name__ == "__main__":
    run()
