"""build_trainer opens the run's dataset once and hands it on: to the memory plan, the length check
and the step data; the plan's choice of model.recompute=auto is what the engine builds (one process,
the tiny Llama, CPU)."""
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

    cfg = load_config(None, [f"model.checkpoint={tiny_llama_ckpt}", f"data.path={tiny_longpo_data}",
                             f"train.save_dir={tmp_path / 'run'}", "model.bf16=false", "optim.distributed_optimizer=false",
                             "optim.clip_grad=0", "train.tensorboard=false", "data.global_batch_size=2",
                             "model.recompute=auto"])
    # a GPU on which the plan fits block recompute of 2 of the 4 layers, not of 1 (the CPU's bytes otherwise)
    from dataclasses import replace

    from megatron_longpo.checkpoint.dist import read_model_json
    from megatron_longpo.training import memory_check as MC
    from megatron_longpo.training import memory_plan as P

    monkeypatch.setattr(P, "device_bytes", lambda: None)
    inputs = MC.check_run(cfg, read_model_json(tiny_llama_ckpt)[0], 1, lambda _: None).inputs
    block = [P.plan(replace(inputs, recompute="full", recompute_method="block", recompute_num_layers=n)).peak for n in (1, 2)]
    monkeypatch.setattr(P, "device_bytes", lambda: sum(block) / 2 / P.FIT)
    monkeypatch.setattr(fmt.PairDataset, "__init__", counting)
    try:
        t = build_trainer(cfg)
        assert len(t.data.ds) == 8
        m = t.cfg.model
        assert (m.recompute, m.recompute_method, m.recompute_num_layers) == ("full", "block", 2)
        tc = t.chunks[0].config
        assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 2)
    finally:
        parallel.teardown()
    assert opened == [str(tiny_longpo_data)]
