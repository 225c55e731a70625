"""Worker: `python -m megatron_longpo.train` under torchrun, exit code passed through."""
import sys

if __name__ == "__main__":
    from megatron_longpo.train import main

    sys.exit(main(sys.argv[1:]))
