"""Worker: several trainings, one after another, in ONE torchrun process group (one launch and one
import of torch + megatron-core for all of them, instead of one each).

    torchrun --nproc-per-node N train_many.py RUNS.json

RUNS.json is a list of override lists (`section.key=value` strings, as `python -m
megatron_longpo.train` takes them). Each run sets megatron's parallel state up for its own layout
(parallel.setup tears the previous one down) and writes its own train.save_dir, exactly as a
separate launch would; a run that fails with a user error writes `error.txt` there and the others go on."""
import json
import sys
from pathlib import Path

if __name__ == "__main__":
    from megatron_longpo import parallel, quiet
    from megatron_longpo.config import load_config
    from megatron_longpo.training.loop import train

    quiet.install()
    for overrides in json.loads(Path(sys.argv[1]).read_text()):
        cfg = load_config(None, overrides)
        try:
            train(cfg)
        except (ValueError, FileNotFoundError) as e:
            if parallel.init_distributed()[0] == 0:
                Path(cfg.train.save_dir).mkdir(parents=True, exist_ok=True)
                (Path(cfg.train.save_dir) / "error.txt").write_text(str(e))
    parallel.teardown()
