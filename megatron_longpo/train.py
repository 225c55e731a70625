"""`torchrun ... -m megatron_longpo.train --config examples/RECIPE.yaml [section.key=value ...]`"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(prog="python -m megatron_longpo.train", description=__doc__)
    p.add_argument("--config", help="YAML recipe (see examples/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-6 parallel.tensor_parallel=2")
    p.add_argument("--plan", action="store_true", help="print the memory plan (no GPU needed, nothing built) and exit")
    p.add_argument("--length", type=int, help="--plan: a LongPO pair of this many tokens per sequence (default: the dataset's longest)")
    p.add_argument("--response", type=int, default=512, help="--plan --length: response tokens per side (512)")
    p.add_argument("--world", type=int, help="--plan: GPUs (default: TP x PP x CP)")
    p.add_argument("--device-gib", type=float, help="--plan: GPU memory (default: this GPU's, else an H200's 139.8)")
    p.add_argument("--hf-config", help="--plan: a Hugging Face config.json instead of model.checkpoint")
    a = p.parse_args(argv)
    from megatron_longpo.config import ConfigError, load_config

    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if a.plan:
        from megatron_longpo.training.memory_check import plan_command

        try:
            print(plan_command(cfg, length=a.length, response=a.response, world=a.world, device_gib=a.device_gib,
                               hf_config=a.hf_config))
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    from megatron_longpo import parallel
    from megatron_longpo.errors import EXIT_STOPPED, EXIT_USER, user_error_line
    from megatron_longpo.training.engine import TrainingStopped
    from megatron_longpo.training.loop import train

    try:
        train(cfg)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_STOPPED
    except BaseException as e:  # noqa: BLE001 - a user's error (one line, exit 2) or a bug (traceback, exit 1)
        import os

        line = user_error_line(e)
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
            code = EXIT_USER
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_world_size() > 1 and not isinstance(e, ValueError):
                # an OS error (a full disk in a save, ...): other ranks may be waiting in a collective
                _end_children()
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(code)
            parallel.teardown()
            return code
        # another rank may be blocked in a collective: report now and leave without waiting for it
        import traceback

        traceback.print_exc()
        _end_children()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    else:
        code = 0
    parallel.teardown()
    return code


def _end_children() -> None:
    """Before os._exit: end the processes this one started (megatron's checkpoint writer starts a
    multiprocessing Manager), which would outlive it and hold its output open."""
    import multiprocessing

    for c in multiprocessing.active_children():
        c.kill()


if __name__ == "__main__":
    sys.exit(main())
