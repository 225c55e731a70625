"""build_trainer opens the run's dataset once and hands it on: to the memory plan, the length check
and the step data (one process, the tiny Llama, CPU)."""
import pytest

from megatron_longpo import parallel
from megatron_longpo.config import load_config
from megatron_longpo.data import format as fmt


@pytest.mark.slow  # builds the engine: 34 s on a loaded 2-core CPU (the fixtures are test_train.py's)
def test_the_dataset_is_opened_once(tiny_llama_ckpt, tiny_longpo_data, tmp_path, monkeypatch):
    from megatron_longpo.training.engine import build_trainer

    opened = []
    init = fmt.PairDataset.__init__

    def counting(self, prefix, *a, **k):
        opened.append(str(prefix))
        init(self, prefix, *a, **k)

    monkeypatch.setattr(fmt.PairDataset, "__init__", counting)
    cfg = load_config(None, [f"model.checkpoint={tiny_llama_ckpt}", f"data.path={tiny_longpo_data}",
                             f"train.save_dir={tmp_path / 'run'}", "model.bf16=false", "optim.distributed_optimizer=false",
                             "optim.clip_grad=0", "train.tensorboard=false", "data.global_batch_size=2"])
    try:
        t = build_trainer(cfg)
        assert len(t.data.ds) == 8
    finally:
        parallel.teardown()
    assert opened == [str(tiny_longpo_data)]
