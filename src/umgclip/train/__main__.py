"""``python -m umgclip.train CONFIG.yaml`` / ``torchrun --nproc_per_node N -m umgclip.train``."""

import sys

from umgclip.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
