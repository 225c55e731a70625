"""The loss and the gradients of the first step of a training config, saved for comparison
(`tools/compare_grads.py`; the CP checks of tests/test_gpu.py and `tools/gpu_checks.py cpgrads`).

    torchrun --nproc-per-node N -m megatron_longpo.checks.first_step OUT.pt key=value ...

OUT.pt: {"metrics": the step's metrics, "grad": every gradient buffer flattened (fp32),
"per_param": parameter name -> its main_grad (fp32)}, written by rank 0.
"""

from __future__ import annotations

import json
import sys


def first_step_grads(out: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from megatron_longpo.config import load_config
    from megatron_longpo.training.engine import build_trainer, forward_backward

    cfg = load_config(None, overrides)
    t = build_trainer(cfg)
    m = forward_backward(t, t.data.next_step())
    flat = torch.cat([b.grad_data.float().flatten() for c in t.chunks for b in c.buffers]).cpu()
    per_param = {n: p.main_grad.float().cpu() for c in t.chunks for n, p in c.named_parameters()
                 if getattr(p, "main_grad", None) is not None}
    if dist.get_rank() == 0:
        torch.save({"metrics": m, "grad": flat, "per_param": per_param}, out)
        print(json.dumps(dict(m.items()), indent=1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from megatron_longpo import parallel

    first_step_grads(argv[0], argv[1:])
    parallel.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
