"""Worker: `python -m megatron_longpo.train` under torchrun, exit code passed through."""
import sys

if __name__ == "__main__":
    import os

    from megatron_longpo.train import main

    if os.environ.get("TEST_SLOW_STEP"):  # a stalled step: sleeps (frames at rest) before each training step
        import time

        from megatron_longpo.training import loop

        real = loop.train_step

        def stalled_step(t):
            time.sleep(float(os.environ["TEST_SLOW_STEP"]))
            return real(t)

        loop.train_step = stalled_step

    sys.exit(main(sys.argv[1:]))
