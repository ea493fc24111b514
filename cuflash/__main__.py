import sys

from .cli import main

# Guarded: worker processes started with "spawn" (cuflash compile / warmup) import the
# parent's __main__ module under another name, and must not run the CLI again.
if __name__ == "__main__":
    sys.exit(main())
